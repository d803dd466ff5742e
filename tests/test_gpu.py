"""The device code paths, parametrized by device: "cpu" always runs (torch-CPU tensors in separate
device copies, so the copy / staging / slab code is exercised), "cuda" runs where torch sees a GPU
(marked ``gpu``: deselected by default, select with ``pytest -m gpu``). Only the asserts that need
CUDA (pinned staging, CUDA-event busy time, the allocator's statistics) are conditional.
References: scipy/LAPACK and scipy's cdist."""

import weakref

import numpy as np
import pytest
import scipy.linalg
from scipy.spatial.distance import cdist

torch = pytest.importorskip("torch")

from kernelfit.gram_device import build_gram_panels_device  # noqa: E402
from kernelfit.linalg import backend_torch as bt  # noqa: E402
from kernelfit.linalg.factor import factor  # noqa: E402
from kernelfit.linalg.mixed import solve_refined  # noqa: E402
from kernelfit.linalg.options import FactorOptions  # noqa: E402
from kernelfit.linalg.outofcore import TorchDevice, cholesky_out_of_core, plan_slabs  # noqa: E402
from kernelfit.linalg.panels import SymmetricPanels  # noqa: E402
from kernelfit.linalg.tiled import cholesky_inplace  # noqa: E402

CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                       reason="needs a CUDA GPU (torch sees none)")])
DEVICES = ["cpu", CUDA]


def spd(n, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((n, n + 7))
    return (A @ A.T / n + np.eye(n)).astype(dtype)


def separate_device_budget(device, G):
    """On the CPU a device_memory_budget makes factor() treat the device as separate memory (copy to
    it and back, as on a GPU); on CUDA the measured free memory decides (None)."""
    return 4 * G.nbytes if device == "cpu" else None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-11), (np.float32, 1e-4)])
def test_in_core_copy_path_matches_lapack(device, dtype, tol):
    A = spd(1000 if device == "cuda" else 300, dtype=dtype)
    G = SymmetricPanels.from_dense(A, 128 if device == "cuda" else 48)
    info = factor(G, FactorOptions(device=device, out_of_core=False, device_memory_budget=separate_device_budget(device, G)))
    assert info.backend == "torch" and info.device.startswith(device) and info.path == "in-core"
    assert info.bytes_moved == {"h2d": G.nbytes, "d2h": G.nbytes}     # the copy branch ran
    np.testing.assert_allclose(G.to_dense(False), scipy.linalg.cholesky(A.astype(np.float64), lower=True), atol=tol)
    if device == "cuda":
        assert info.device_memory["pinned_staging"] is True


@pytest.mark.parametrize("device", DEVICES)
def test_tiled_on_device_tensors_in_place(device):
    A = spd(700 if device == "cuda" else 200)
    G = bt.panels_to_torch(SymmetricPanels.from_dense(A, 96 if device == "cuda" else 32), device)
    ptrs = [P.data_ptr() for P in G.panels]
    cholesky_inplace(G, backend="torch")
    assert [P.data_ptr() for P in G.panels] == ptrs
    np.testing.assert_allclose(bt.panels_to_numpy(G).to_dense(False), scipy.linalg.cholesky(A, lower=True), atol=1e-11)


def _warm_cublas(device):
    """cuBLAS / cuSOLVER allocate their workspaces (32 MiB on Hopper) on first use: do that before
    the memory baseline so they are not charged to the out-of-core working set."""
    a = torch.eye(64, device=device, dtype=torch.float32)
    a.addmm_(a, a)
    torch.linalg.cholesky_ex(a)
    torch.linalg.solve_triangular(a, a, upper=True, left=False)
    torch.cuda.synchronize(device)


@pytest.mark.parametrize("device", DEVICES)
def test_out_of_core_third_of_the_gram_streams_and_stays_in_budget(device, monkeypatch):
    n, block = (3000, 256) if device == "cuda" else (600, 48)
    A = spd(n, seed=1, dtype=np.float32)
    G = SymmetricPanels.from_dense(A, block)
    dev = TorchDevice(device)
    workspace = dev.workspace_bytes(block, n, 4)
    budget = G.nbytes // 3 + workspace                     # about a third of the Gram: >= 3 slabs
    assert len(plan_slabs(n, block, 4, budget, workspace).slabs) >= 3
    live = {"now": 0, "peak": 0}
    if device == "cuda":
        _warm_cublas(device)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:   # live bytes of the device buffers, counted by finalizers independent of the WorkingSet
        real_empty = TorchDevice.empty

        def counted_empty(self, shape, dtype):
            buf = real_empty(self, shape, dtype)
            nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
            live["now"] += nbytes
            live["peak"] = max(live["peak"], live["now"])
            weakref.finalize(buf, lambda: live.__setitem__("now", live["now"] - nbytes))
            return buf

        monkeypatch.setattr(TorchDevice, "empty", counted_empty)
    stats = {}
    cholesky_out_of_core(G, device=dev, budget_bytes=budget, stats_out=stats)
    assert stats["slabs"] >= 3 and stats["h2d_bytes"] > G.nbytes
    assert stats["peak_device_bytes"] <= budget
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
        assert stats["pinned"]
        assert 0 < stats["timings_s"]["gpu_busy_fraction"] <= 1.0   # CUDA-event spans of the compute stream
    else:
        peak = live["peak"] + workspace
    assert peak <= budget * (1.1 if device == "cuda" else 1.0)   # what is really allocated, not the accounting
    np.testing.assert_allclose(G.to_dense(False), scipy.linalg.cholesky(A.astype(np.float64), lower=True), atol=2e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_gram_on_device_has_tf32_off(device):
    with bt.tf32_enabled():     # the trap: TF32 left on globally by user code
        rng = np.random.default_rng(2)
        X = rng.random((2000 if device == "cuda" else 300, 784)).astype(np.float32)
        G = build_gram_panels_device(X, "gaussian", 5.0, 512 if device == "cuda" else 64, np.float32, device)
        ref = np.exp(-cdist(X.astype(np.float64), X.astype(np.float64), "sqeuclidean") / 50.0)
        assert np.max(np.abs(G.to_dense() - ref)) < 1e-5   # TF32 (10-bit mantissa) gives ~1e-3 here
        assert bt.tf32_matmul_enabled()                     # the caller's setting is restored


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_with_tf32_factor_refines_to_float64(device):
    from kernelfit.gram import KernelOperator, build_gram_panels

    rng = np.random.default_rng(3)
    n = 1500 if device == "cuda" else 300
    X = rng.random((n, 20))
    Y = rng.standard_normal((n, 2))
    op = KernelOperator(X, "gaussian", 0.3, np.float64)
    Xs, _, info, factors = solve_refined(lambda dt: build_gram_panels(X, "gaussian", 0.3, 64, dt),
                                         lambda G: factor(G, FactorOptions(device=device, tf32=True)).to_dict(),
                                         op.symmetric_matmul, Y, dtype=np.float32, scale_diagonal=True,
                                         fallback=lambda: None)
    assert factors[0]["tf32"] is (device == "cuda")         # TF32 applies to CUDA float32 factors only
    K = np.exp(-cdist(X, X, "sqeuclidean") / (2 * 0.09))
    assert np.abs(K @ Xs - Y).max() < 1e-9 or info["fallback"]


@pytest.mark.parametrize("device", DEVICES)
def test_forced_in_core_too_big_names_both_numbers(device):
    from kernelfit.errors import MemoryPlanError

    G = SymmetricPanels.from_dense(spd(100), 32)
    with pytest.raises(MemoryPlanError, match=f"does not fit on {device}"):
        factor(G, FactorOptions(device=device, out_of_core=False, device_memory_budget=1000))


@pytest.mark.parametrize("device", DEVICES)
def test_checkpoint_resume_on_a_separate_device(device, tmp_path):
    A = spd(900 if device == "cuda" else 200, seed=5)
    G = SymmetricPanels.from_dense(A, 64 if device == "cuda" else 16)
    budget = separate_device_budget(device, G)

    class Crash(Exception):
        pass

    def crash(j):
        if j >= 8:
            raise Crash

    with pytest.raises(Crash):
        factor(G, FactorOptions(device=device, out_of_core=False, device_memory_budget=budget, checkpoint_dir=tmp_path),
               checkpoint_every=2, on_panel_done=crash)
    G2 = SymmetricPanels.from_dense(A, G.block)
    info = factor(G2, FactorOptions(device=device, out_of_core=False, device_memory_budget=budget, checkpoint_dir=tmp_path,
                                    resume=True), checkpoint_every=2)
    assert info.resumed_from_panel > 0 and info.bytes_moved["h2d"] == G2.nbytes
    np.testing.assert_allclose(G2.to_dense(False), scipy.linalg.cholesky(A, lower=True), atol=1e-11)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch sees none)")
def test_cupy_backend_on_gpu():
    cupy = pytest.importorskip("cupy")
    A = spd(500, seed=4)
    G = SymmetricPanels.from_dense(A, 64)
    info = factor(G, FactorOptions(backend="cupy", out_of_core=False))
    assert info.backend == "cupy"
    np.testing.assert_allclose(G.to_dense(False), scipy.linalg.cholesky(A, lower=True), atol=1e-10)
    bad = spd(200, seed=6)
    bad[150, 150] = -1.0
    from kernelfit.errors import NotPositiveDefiniteError

    with pytest.raises(NotPositiveDefiniteError) as exc:     # cupy must not return a partial factor silently
        factor(SymmetricPanels.from_dense(bad, 64), FactorOptions(backend="cupy", out_of_core=False))
    assert exc.value.minor == scipy.linalg.lapack.dpotrf(bad, lower=1)[1]
    assert cupy.cuda.runtime.getDeviceCount() >= 1


def test_cli_tf32_reaches_the_factor_and_needs_mixed_mode(tmp_path, capsys):
    import json

    from kernelfit.cli import main

    out = tmp_path / "r.json"
    assert main(["solve", "--n-train", "300", "--n-test", "100", "--bandwidth", "5", "--tf32", "--no-progress",
                 "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    fac = rec["stats"]["factorization"]
    assert rec["options"]["tf32"] is True
    assert fac["tf32"] is False and any("tf32 requested but ignored" in note for note in fac["notes"])  # CPU here
    with pytest.raises(SystemExit):
        main(["solve", "--n-train", "300", "--mode", "float32", "--tf32", "--no-progress"])
    assert "--tf32 needs --mode mixed" in capsys.readouterr().err


@pytest.mark.parametrize("device", DEVICES)
def test_resident_pipeline_with_tf32_factor_reaches_float64(device):
    from kernelfit.gram_device import ResidentOptions, solve_resident

    rng = np.random.default_rng(7)
    n = 2000 if device == "cuda" else 300
    X, Y = rng.random((n, 30)), rng.standard_normal((n, 3))
    sol = solve_resident(X, Y, ResidentOptions(kernel="gaussian", bandwidth=1.0, dtype=np.float32),
                         FactorOptions(device=device, tf32=True, device_memory_budget=None if device == "cuda" else 10**9))
    K = np.exp(-cdist(X, X, "sqeuclidean") / 2.0)
    assert np.abs(K @ sol.alpha - Y).max() < 1e-9 and sol.report["backward_stable"]
    assert sol.factors[0]["tf32"] is (device == "cuda") and sol.factors[0]["bytes_moved"]["h2d"] == 0
    assert sol.device_timings_s["factor"] > 0
    if device == "cuda":
        assert sol.memory["peak_allocated_bytes"] <= sol.memory["usable_bytes"]
