"""The resident pipeline (Gram, factor, refinement, prediction on one torch device) on CPU tensors,
against scipy's dense solve and cdist; CUDA runs the same code (tests/test_gpu.py's cuda cases run
the building blocks there)."""

import numpy as np
import pytest
import scipy.linalg
from scipy.spatial.distance import cdist

torch = pytest.importorskip("torch")

from kernelfit.errors import InputError, MemoryPlanError  # noqa: E402
from kernelfit.gram_device import ResidentOptions, resident_bytes, solve_resident  # noqa: E402
from kernelfit.linalg.options import FactorOptions  # noqa: E402


def _problem(n=200, d=6, k=3, seed=0, offset=0.0):
    rng = np.random.default_rng(seed)
    X = rng.random((n, d)) + offset
    return X, rng.standard_normal((n, k)), rng.random((50, d)) + offset


@pytest.mark.parametrize("dtype,max_refine", [(np.float32, 10), (np.float64, 0)])
def test_resident_solve_and_predict_match_scipy(dtype, max_refine):
    X, Y, Xt = _problem(offset=100.0)       # far from the origin: centering keeps float32 accurate
    bw = 0.6
    sol = solve_resident(X, Y, ResidentOptions(kernel="gaussian", bandwidth=bw, dtype=dtype, max_refine=max_refine),
                         FactorOptions(device="cpu", block_size=48, device_memory_budget=10**9))
    K = np.exp(-cdist(X, X, "sqeuclidean") / (2 * bw * bw))
    ref = scipy.linalg.solve(K, Y, assume_a="pos")
    np.testing.assert_allclose(sol.alpha, ref, rtol=1e-8, atol=1e-8 * np.abs(ref).max())
    np.testing.assert_allclose(sol.residual, Y - K @ sol.alpha, atol=1e-10)       # the reported residual is real
    assert sol.report["factor_dtype"] == np.dtype(dtype).name and sol.report["backward_stable"]
    assert sol.factors[0]["device"] == "cpu" and sol.factors[0]["bytes_moved"] == {"h2d": 0, "d2h": 0}
    Kt = np.exp(-cdist(Xt, X, "sqeuclidean") / (2 * bw * bw))
    np.testing.assert_allclose(sol.predict(Xt), Kt @ sol.alpha, rtol=1e-10, atol=1e-12)
    assert {"gram", "factor", "refine"} <= set(sol.device_timings_s)
    assert all(v >= 0 for v in sol.device_timings_s.values())


def test_resident_jitter_and_laplacian():
    X, Y, _ = _problem(n=120, seed=1)
    sol = solve_resident(X, Y, ResidentOptions(kernel="laplacian", bandwidth=2.0, dtype=np.float32, jitter=1e-3),
                         FactorOptions(device="cpu", device_memory_budget=10**9))
    K = np.exp(-cdist(X, X) / 2.0) + 1e-3 * np.eye(len(X))
    np.testing.assert_allclose(sol.alpha, scipy.linalg.solve(K, Y, assume_a="pos"), rtol=1e-8, atol=1e-10)


def test_resident_falls_back_to_float64_when_float32_cannot_refine():
    rng = np.random.default_rng(1)
    X = rng.random((120, 5))                 # wide bandwidth for these points: cond(K) ~ 1e9+
    Y = rng.standard_normal((120, 2))
    K = np.exp(-cdist(X, X, "sqeuclidean") / (2 * 1.2**2))
    assert np.linalg.cond(K) > 1e8
    sol = solve_resident(X, Y, ResidentOptions(kernel="gaussian", bandwidth=1.2, dtype=np.float32),
                         FactorOptions(device="cpu", device_memory_budget=10**9))
    assert sol.report["fallback"] and sol.report["factor_dtype"] == "float64" and len(sol.factors) == 2
    ref = scipy.linalg.solve(K, Y, assume_a="pos")
    assert np.abs(K @ sol.alpha - Y).max() <= 10 * np.abs(K @ ref - Y).max() + 1e-12


def test_resident_float32_breakdown_is_recorded_ahead_of_the_float64_factor():
    # X[1] == X[0] and a ridge (1e-8) below float32's half-ulp at 1: the float32 Gram's first 2 x 2 block is
    # all ones, so its Cholesky breaks down at the leading minor of order 2; in float64 the ridge keeps K
    # positive definite (cond ~1e10) and the float64 re-factorization solves it
    rng = np.random.default_rng(2)
    X = rng.random((120, 5))
    X[1] = X[0]
    Y = rng.standard_normal((120, 2))
    sol = solve_resident(X, Y, ResidentOptions(kernel="gaussian", bandwidth=3.0, dtype=np.float32, jitter=1e-8),
                         FactorOptions(device="cpu", device_memory_budget=10**9, tf32=True))
    first, final = sol.factors
    assert (first["status"], first["minor"], first["dtype"], first["device"]) == ("broke down", 2, "float32", "cpu")
    assert first["tf32"] is False                      # TF32 applies on CUDA only: the CPU attempt was plain float32
    assert final["dtype"] == "float64" and "status" not in final
    assert "leading minor of order 2" in sol.report["fallback"] and sol.report["factor_dtype"] == "float64"
    assert sol.timings_s["factor"] >= first["timings_s"]["factor"] + final["timings_s"]["factor"]
    K = np.exp(-cdist(X, X, "sqeuclidean") / (2 * 3.0**2)) + 1e-8 * np.eye(len(X))
    ref = scipy.linalg.solve(K, Y, assume_a="pos")
    assert np.abs(K @ sol.alpha - Y).max() <= 10 * np.abs(K @ ref - Y).max() + 1e-12


def test_resident_refuses_before_work_when_it_does_not_fit():
    X, Y, _ = _problem(n=300)
    need = resident_bytes(300, 6, 3, 48, np.float32)
    with pytest.raises(MemoryPlanError, match=r"resident solve of n=300.*needs.*usable.*host-panel path"):
        solve_resident(X, Y, ResidentOptions(kernel="gaussian", bandwidth=1.0, dtype=np.float32),
                       FactorOptions(device="cpu", block_size=48, device_memory_budget=need - 1))


def test_resident_phases_are_timed_with_the_one_phase_timer():
    # results.PhaseTimer (wall clock, device synchronized per phase) times each phase of the solve
    X, Y, _ = _problem(n=120)
    sol = solve_resident(X, Y, ResidentOptions(kernel="gaussian", bandwidth=0.6, dtype=np.float32, max_refine=3),
                         FactorOptions(device="cpu", block_size=48, device_memory_budget=10**9))
    s = sol.device_timings_s
    assert {"gram", "factor", "refine"} <= set(s) and all(0.0 <= v < 60.0 for v in s.values())


def test_fit_interpolant_takes_the_resident_path_for_a_separate_device():
    from kernelfit.linalg.options import FactorOptions
    from kernelfit.solve import SolveOptions, fit_interpolant

    X, Y, Xt = _problem(n=150, seed=3)
    Y = np.eye(3)[np.argmax(Y, 1)]
    bw = 0.8
    K = np.exp(-cdist(X, X, "sqeuclidean") / (2 * bw * bw))
    ref = scipy.linalg.solve(K, Y, assume_a="pos")
    res = fit_interpolant(X, Y, SolveOptions(bandwidth=bw, placement=FactorOptions(device="cpu", device_memory_budget=10**9)))
    fac = res.stats["factorization"]
    assert fac["pipeline"] == "resident" and fac["bytes_moved"]["h2d"] == 0
    np.testing.assert_allclose(res.alpha, ref, rtol=1e-8, atol=1e-8 * np.abs(ref).max())
    np.testing.assert_allclose(res.train_scores, K @ res.alpha, atol=1e-10)
    assert res.stats["residual_max_abs"] < 1e-9 and res.stats["timings_s"]["factor"] > 0
    host = fit_interpolant(X, Y, SolveOptions(bandwidth=bw,
                                              placement=FactorOptions(device="cpu")))     # no budget: host panels in place
    assert "pipeline" not in host.stats["factorization"]
    np.testing.assert_allclose(host.alpha, res.alpha, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("placement", [dict(checkpoint_dir="ck"), dict(out_of_core=True), dict(backend="numpy")])
def test_resident_refuses_a_placement_it_cannot_honour(placement):
    X, Y, _ = _problem(n=40)
    with pytest.raises(InputError, match="a resident solve runs on torch with the whole Gram on the device"):
        solve_resident(X, Y, ResidentOptions(), FactorOptions(device="cpu", device_memory_budget=10**9, **placement))
