"""Out-of-core Cholesky on the CPU execution paths (numpy 'device' and torch-CPU device): tiny budgets
force streaming; results are compared with LAPACK; the device working set is counted and bounded."""

import numpy as np
import pytest
import scipy.linalg
from scipy.spatial.distance import cdist

from kernelfit.errors import MemoryPlanError, NotPositiveDefiniteError
from kernelfit.gram_device import build_gram_panels_device
from kernelfit.linalg.outofcore import (
    WorkingSet,
    cholesky_out_of_core,
    make_device,
    min_budget_bytes,
    plan_slabs,
)
from kernelfit.linalg.panels import SymmetricPanels


def spd(n, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((n, n + 3))
    return (A @ A.T / n + np.eye(n)).astype(dtype)


DEVICES = ["numpy", pytest.param("cpu", id="torch-cpu")]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,block,budget_panels", [(53, 8, 3.2), (100, 16, 5.5), (61, 61, 2), (97, 10, 40)])
def test_matches_lapack_and_respects_budget(device, n, block, budget_panels):
    if device == "cpu":
        pytest.importorskip("torch")
    A = spd(n, seed=n)
    G = SymmetricPanels.from_dense(A, block)
    dev = make_device(device)
    ws_bytes = dev.workspace_bytes(G.block, n, 8)
    budget = max(int(budget_panels * n * G.block * 8) + ws_bytes,
                 min_budget_bytes(n, G.block, 8, ws_bytes, buffers=1))
    stats = {}
    cholesky_out_of_core(G, device=device, budget_bytes=budget, stats_out=stats)
    np.testing.assert_allclose(G.to_dense(symmetric=False), scipy.linalg.cholesky(A, lower=True),
                               atol=1e-12, rtol=1e-11)
    assert stats["peak_device_bytes"] <= budget
    assert stats["d2h_bytes"] == G.nbytes                 # every panel written back exactly once
    assert stats["h2d_bytes"] >= G.nbytes
    if G.nbytes + ws_bytes > budget:                      # it had to stream: several slabs, extra traffic
        assert stats["slabs"] > 1 and stats["h2d_bytes"] > G.nbytes


def test_streams_more_with_smaller_budget_float32():
    n, block = 130, 13
    A = spd(n, seed=1, dtype=np.float32)
    ref = scipy.linalg.cholesky(A.astype(np.float64), lower=True)
    moved = []
    for panels in (2, 3.5, 30):
        G = SymmetricPanels.from_dense(A, block)
        budget = max(int(panels * n * block * 4), min_budget_bytes(n, block, 4, buffers=1))
        stats = {}
        cholesky_out_of_core(G, "numpy", budget, stats_out=stats)
        np.testing.assert_allclose(G.to_dense(symmetric=False), ref, atol=3e-5)
        assert stats["peak_device_bytes"] <= budget
        moved.append(stats["h2d_bytes"])
    assert moved[0] > moved[1] > moved[2]


def test_in_core_budget_is_one_slab_no_streaming():
    A = spd(40, seed=2)
    G = SymmetricPanels.from_dense(A, 8)
    stats = {}
    cholesky_out_of_core(G, "numpy", budget_bytes=G.nbytes, stats_out=stats)
    assert stats["slabs"] == 1 and stats["h2d_bytes"] == G.nbytes
    np.testing.assert_allclose(G.to_dense(symmetric=False), scipy.linalg.cholesky(A, lower=True), atol=1e-12)


def test_budget_too_small_says_numbers_and_fix():
    with pytest.raises(MemoryPlanError, match=r"too small.*n=100, block=10.*smaller block"):
        plan_slabs(100, 10, 8, budget=1000)


def test_working_set_refuses_over_budget():
    ws = WorkingSet(budget=1000)
    a = ws.alloc(make_device("numpy"), (10, 10), np.float64)   # 800 bytes
    with pytest.raises(MemoryPlanError, match="exceed its device budget"):
        ws.alloc(make_device("numpy"), (5, 10), np.float64)
    del a                                                       # freed for real: the bytes come back
    assert ws.current == 0 and ws.peak == 800


def test_not_positive_definite_global_minor():
    A = spd(60, seed=3)
    A[47, 47] = -1.0
    G = SymmetricPanels.from_dense(A, 8)
    with pytest.raises(NotPositiveDefiniteError) as exc:
        cholesky_out_of_core(G, "numpy", budget_bytes=min_budget_bytes(60, 8, 8, buffers=2) + 8 * 60 * 8)
    _, info = scipy.linalg.lapack.dpotrf(A, lower=1)
    assert exc.value.minor == info == 48 and exc.value.n == 60


def test_resume_from_start_panel_equals_uninterrupted():
    A = spd(70, seed=4)
    budget = min_budget_bytes(70, 8, 8, buffers=2) + 2 * 70 * 8 * 8
    full = SymmetricPanels.from_dense(A, 8)
    cholesky_out_of_core(full, "numpy", budget)
    G = SymmetricPanels.from_dense(A, 8)
    done = []

    class Stop(Exception):
        pass

    def stop(j):
        done.append(j)
        if j >= 4:
            raise Stop

    with pytest.raises(Stop):
        cholesky_out_of_core(G, "numpy", budget, on_panel_done=stop)
    # left-looking: panels after the last finished one are still the untouched input
    for j in range(done[-1] + 1, len(G.panels)):
        np.testing.assert_array_equal(G.panels[j], SymmetricPanels.from_dense(A, 8).panels[j])
    cholesky_out_of_core(G, "numpy", budget, start_panel=done[-1] + 1)
    np.testing.assert_allclose(G.to_dense(False), full.to_dense(False), atol=1e-13)


def test_gram_on_device_matches_cdist_and_numpy_builder():
    pytest.importorskip("torch")
    from kernelfit.gram import build_gram_panels

    rng = np.random.default_rng(5)
    X = rng.random((45, 9))
    G = build_gram_panels_device(X, "gaussian", 0.8, block=7, dtype=np.float64, device="cpu")
    ref = np.exp(-cdist(X, X, "sqeuclidean") / (2 * 0.64))
    np.testing.assert_allclose(G.to_dense(), ref, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(G.to_dense(), build_gram_panels(X, "gaussian", 0.8, 7, np.float64).to_dense(),
                               rtol=1e-12)
    G32 = build_gram_panels_device(X, "laplacian", 2.0, block=7, dtype=np.float32, device="cpu")
    np.testing.assert_allclose(G32.to_dense(), np.exp(-cdist(X, X) / 2.0), atol=2e-6)


# --- factor(): the one entry point -------------------------------------------------------------

from kernelfit.errors import InputError  # noqa: E402
from kernelfit.linalg.factor import factor, plan_device_memory  # noqa: E402
from kernelfit.linalg.mixed import solve_refined  # noqa: E402
from kernelfit.linalg.options import FactorOptions  # noqa: E402


@pytest.mark.parametrize("kwargs,path,backend", [
    ({}, "in-core", "numpy"),
    ({"device_memory_budget": 10**9}, "in-core", "numpy"),
    ({"device_memory_budget": 16_000}, "out-of-core", "numpy"),       # Gram (~23 KB) does not fit: streams
    ({"out_of_core": True, "device_memory_budget": 10**9}, "out-of-core", "numpy"),
    ({"device": "cpu"}, "in-core", "torch"),
    ({"backend": "torch", "device": "cpu", "device_memory_budget": 16_000}, "out-of-core", "torch"),
])
def test_factor_paths_match_lapack(kwargs, path, backend):
    if backend == "torch":
        pytest.importorskip("torch")
    A = spd(71, seed=7)
    G = SymmetricPanels.from_dense(A, 9)
    info = factor(G, FactorOptions(**kwargs))
    assert (info.path, info.backend) == (path, backend)
    np.testing.assert_allclose(G.to_dense(False), scipy.linalg.cholesky(A, lower=True), atol=1e-12)
    d = info.to_dict()
    assert d["n"] == 71 and d["timings_s"]["factor"] > 0 and np.isfinite(d["tflops"])
    if path == "out-of-core":
        assert d["device_memory"]["peak_bytes"] <= d["device_memory"]["budget_bytes"]
        assert d["bytes_moved"]["d2h"] == G.nbytes


def test_forced_in_core_too_big_names_both_numbers():
    G = SymmetricPanels.from_dense(spd(50, seed=8), 10)
    with pytest.raises(MemoryPlanError, match=r"out_of_core=False.*needs [0-9]+ bytes.*1000 bytes is usable.*out_of_core=.auto."):
        factor(G, FactorOptions(out_of_core=False, device_memory_budget=1000))


def test_forced_choices_impossible_are_clear():
    G = SymmetricPanels.from_dense(spd(30, seed=9), 10)
    with pytest.raises(InputError, match="unknown backend 'jax'"):
        factor(G, FactorOptions(backend="jax"))
    with pytest.raises(InputError, match="backend='numpy' runs on the CPU"):
        factor(G, FactorOptions(backend="numpy", device="cuda"))
    with pytest.raises(InputError, match="out_of_core must be"):
        factor(G, FactorOptions(out_of_core="yes"))
    try:
        import cupy  # noqa: F401
    except ImportError:
        with pytest.raises(InputError, match="needs CuPy"):
            factor(G, FactorOptions(backend="cupy"))
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="sees no CUDA GPU"):
            factor(G, FactorOptions(device="cuda"))
    with pytest.raises(MemoryPlanError, match="even the out-of-core path needs"):
        factor(G, FactorOptions(out_of_core=True, device_memory_budget=100))


def test_device_plan_numbers():
    p = plan_device_memory(60000, 2048, np.float32, free_bytes=80 * 2**30)
    assert p.in_core_bytes == SymmetricPanels.nbytes_for(60000, 2048, np.float32)
    assert p.fits_in_core                                   # 7.4 GB on an 80 GB GPU
    p = plan_device_memory(150000, 2048, np.float32, free_bytes=40 * 2**30)
    assert not p.fits_in_core and p.min_out_of_core_bytes < 40 * 2**30


def _gram_problem(n, bandwidth, seed=0):
    from kernelfit.gram import KernelOperator, build_gram_panels

    rng = np.random.default_rng(seed)
    X = rng.random((n, 5))
    Y = rng.standard_normal((n, 2))
    op = KernelOperator(X, "gaussian", bandwidth, np.float64)
    return X, Y, (lambda dt: build_gram_panels(X, "gaussian", bandwidth, 16, dt)), op.symmetric_matmul


def _solve_mixed(build, apply_high, Y, **kw):
    """float32 factor with unit-diagonal scaling, float64 refinement, float64 fallback allowed."""
    X, R, info, factors = solve_refined(build, lambda G: factor(G, FactorOptions(**kw)).to_dict(), apply_high, Y,
                                        dtype=np.float32, scale_diagonal=True, fallback=lambda: None)
    np.testing.assert_allclose(R, Y - apply_high(X), rtol=0, atol=1e-12)   # the residual it reports is real
    return X, info, factors


def test_mixed_reaches_float64_without_fallback_when_well_conditioned():
    X, Y, build, apply_high = _gram_problem(120, 0.15)
    Xs, info, factors = _solve_mixed(build, apply_high, Y)
    K = np.exp(-scipy.spatial.distance.cdist(X, X, "sqeuclidean") / (2 * 0.15**2))
    np.testing.assert_allclose(Xs, scipy.linalg.solve(K, Y, assume_a="pos"), rtol=1e-9, atol=1e-9)
    assert info["fallback"] is None and info["factor_dtype"] == "float32" and len(factors) == 1
    assert info["float64_level"] and info["scale_diagonal"]


def test_mixed_falls_back_to_float64_on_ill_conditioned_gram_and_says_so():
    # wide bandwidth on clustered points: cond(K) ~ 1e9+, beyond what a float32 factor can refine
    X, Y, build, apply_high = _gram_problem(120, 1.2, seed=1)
    K = np.exp(-scipy.spatial.distance.cdist(X, X, "sqeuclidean") / (2 * 1.2**2))
    assert np.linalg.cond(K) > 1e8
    Xs, info, factors = _solve_mixed(build, apply_high, Y)
    assert info["fallback"] and "float64" in info["fallback"] and info["factor_dtype"] == "float64"
    assert len(factors) == 2 and not (info["refinement_float32"] or {}).get("float64_level")
    ref = scipy.linalg.solve(K, Y, assume_a="pos")
    r_ours = np.abs(K @ Xs - Y).max()
    r_ref = np.abs(K @ ref - Y).max()
    assert r_ours <= 10 * r_ref + 1e-12        # float64-quality residual, like LAPACK's own solve


def test_panel_past_2_31_elements_is_refused_before_any_work():
    # a fake panel list: only shapes are looked at before the refusal
    n, block = 2_200_000, 1024
    big = np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), shape=(n, block), strides=(0, 0))
    G = SymmetricPanels(n=n, block=block, panels=[big])
    with pytest.raises(InputError, match=r"past 2\^31.*block_size <= 976"):
        factor(G)


def test_panels_on_a_torch_device_are_factored_where_they_live():
    torch = pytest.importorskip("torch")
    from kernelfit.linalg.backend_torch import panels_to_numpy, panels_to_torch

    A = spd(45, seed=11)
    G = panels_to_torch(SymmetricPanels.from_dense(A, 8), "cpu")
    info = factor(G)                                   # backend auto: the data decides
    assert (info.backend, info.device, info.path) == ("torch", "cpu", "in-core")
    np.testing.assert_allclose(panels_to_numpy(G).to_dense(False), scipy.linalg.cholesky(A, lower=True), atol=1e-12)
    with pytest.raises(InputError, match="panels are torch arrays on cpu but backend='numpy'"):
        factor(panels_to_torch(SymmetricPanels.from_dense(A, 8), "cpu"), FactorOptions(backend="numpy"))
    with pytest.raises(InputError, match="out-of-core and checkpoints need host"):
        factor(panels_to_torch(SymmetricPanels.from_dense(A, 8), "cpu"), FactorOptions(out_of_core=True))
    assert isinstance(G.panels[0], torch.Tensor)


def test_device_gram_float32_accurate_far_from_origin():
    pytest.importorskip("torch")
    rng = np.random.default_rng(12)
    X = rng.random((60, 8)) + 1000.0          # |x|^2 ~ 8e6: float32 expansion without centering loses it
    G = build_gram_panels_device(X, "gaussian", 0.5, block=16, dtype=np.float32, device="cpu")
    ref = np.exp(-cdist(X, X, "sqeuclidean") / (2 * 0.25))
    assert np.max(np.abs(G.to_dense() - ref)) < 1e-5
    bad = build_gram_panels_device(X, "gaussian", 0.5, block=16, dtype=np.float32, device="cpu", center=False)
    assert np.max(np.abs(bad.to_dense() - ref)) > 1e-2    # shows what centering protects against


def test_cpu_auto_stays_in_place_even_when_little_ram_is_left(monkeypatch):
    # the panels already occupy host RAM; 'available' excludes them, which must not trigger streaming
    import kernelfit.linalg.factor as fmod

    monkeypatch.setattr(fmod, "free_device_bytes", lambda device: 1000)
    A = spd(40, seed=13)
    G = SymmetricPanels.from_dense(A, 8)
    ptrs = [P.ctypes.data for P in G.panels]
    info = factor(G)
    assert info.path == "in-core" and [P.ctypes.data for P in G.panels] == ptrs
    np.testing.assert_allclose(G.to_dense(False), scipy.linalg.cholesky(A, lower=True), atol=1e-12)
