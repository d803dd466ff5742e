"""Solve strategies (kernelfit/planning.py): each against LAPACK float64, the choice against mocked
memory, and the refine_tol contract."""

import json
import warnings

import numpy as np
import pytest
import scipy.linalg
from scipy.spatial.distance import cdist

from kernelfit import cli
from kernelfit.errors import InputError, MemoryPlanError
from kernelfit.linalg.options import FactorOptions
from kernelfit.linalg.refine import float64_level_threshold
from kernelfit.planning import FLOAT64, FLOAT64_THROUGHOUT_MAX_N, RECOMPUTED, STORED, plan_solve
from kernelfit.solve import SolveOptions, fit_interpolant

GIB = 2**30


def gaussian(X, Z, s):
    return np.exp(-cdist(X, Z, "sqeuclidean") / (2 * s * s))


def lapack_solve(X, Y, sigma):
    K = gaussian(X, X, sigma)
    return K, scipy.linalg.cho_solve(scipy.linalg.cho_factor(K, lower=True), Y)


@pytest.mark.parametrize("strategy", [STORED, RECOMPUTED, FLOAT64])
def test_each_strategy_matches_lapack_float64(strategy):
    rng = np.random.default_rng(3)
    X, Y = rng.random((500, 8)), rng.standard_normal((500, 4))
    sigma = 0.5   # cond(K) ~ 1e5: float32 alone is ~1e-3 off
    K, ref = lapack_solve(X, Y, sigma)
    ref_rel = np.linalg.norm(K @ ref - Y) / np.linalg.norm(Y)
    m = fit_interpolant(X, Y, SolveOptions(bandwidth=sigma, strategy=strategy, placement=FactorOptions(block_size=96)))
    assert m.stats["strategy"] == strategy
    rel = np.linalg.norm(K @ m.alpha - Y) / np.linalg.norm(Y)   # dense scipy K: independent of the solver
    assert rel <= max(10 * ref_rel, float64_level_threshold(500))
    cond = np.linalg.cond(K)
    np.testing.assert_allclose(m.alpha, ref, rtol=0, atol=100 * cond * 2.2e-16 * np.abs(ref).max())
    assert m.stats["residual_relative"] == pytest.approx(rel, abs=1e-13)
    assert m.stats["refinement"]["float64_level"]
    assert m.stats["factor_dtype"] == ("float64" if strategy == FLOAT64 else "float32")


def test_stored_strategy_never_recomputes_kernel_tiles(monkeypatch):
    # its residuals (and the reported one) are products with the stored float64 Gram
    def boom(*a, **k):
        raise AssertionError("recomputed the kernel from the data")

    monkeypatch.setattr("kernelfit.gram.KernelOperator.symmetric_matmul", boom)
    rng = np.random.default_rng(0)
    X, Y = rng.random((400, 6)), rng.standard_normal((400, 2))
    m = fit_interpolant(X, Y, SolveOptions(bandwidth=0.5, strategy=STORED, placement=FactorOptions(block_size=64)))
    assert m.stats["refinement"]["iterations"] >= 1
    assert "float64 Gram built from the data and kept" in m.stats["residual_source"]


def plan_mnist(n, available_gib, **kw):
    return plan_solve(n, 784, 10, "mixed", n_test=10000, available=int(available_gib * GIB), **kw)


def test_strategy_choice_follows_memory():
    # full MNIST on a 24 GiB machine: a stored float64 Gram (n^2/2 x 12 bytes = 20 GiB) does not fit
    p = plan_mnist(60000, 24 * 0.92)
    assert p.strategy == RECOMPUTED and p.fits and p.factor_dtype == "float32"
    assert "does not fit" in p.strategy_reason
    assert p.total_bytes < 16 * GIB
    # the same solve with 64 GiB free keeps the float64 Gram
    p = plan_mnist(60000, 64)
    assert p.strategy == STORED and p.fits
    assert p.gram_bytes > 60000**2 / 2 * 12
    assert p.strategy in p.summary() and p.strategy_reason in p.summary()
    # small n: float64 throughout; just above the limit: the stored Gram
    assert plan_mnist(FLOAT64_THROUGHOUT_MAX_N, 24).strategy == FLOAT64
    assert plan_mnist(FLOAT64_THROUGHOUT_MAX_N + 1, 24).strategy == STORED
    # direct modes are not re-routed
    assert plan_solve(20000, 784, 10, "float64", available=64 * GIB).strategy == "float64"
    assert plan_solve(20000, 784, 10, "float32", available=64 * GIB).strategy == "float32"


def test_fit_records_the_strategy_chosen_from_measured_memory(monkeypatch):
    rng = np.random.default_rng(1)
    X, Y = rng.random((2000, 20)), rng.standard_normal((2000, 2))
    need32 = plan_solve(2000, 20, 2, "mixed", strategy=RECOMPUTED, available=GIB).total_bytes
    # enough for the float32 Gram, 8 MB short of the kept float64 Gram (2000^2/2 x 8 = 16 MB)
    monkeypatch.setattr("kernelfit.planning.available_bytes", lambda: int((need32 + 8e6) / 0.92))
    m = fit_interpolant(X, Y, SolveOptions(bandwidth=1.0))
    assert m.stats["strategy"] == RECOMPUTED and "does not fit" in m.stats["strategy_reason"]
    assert m.stats["memory_plan"]["strategy"] == RECOMPUTED
    monkeypatch.setattr("kernelfit.planning.available_bytes", lambda: 64 * GIB)
    m = fit_interpolant(X, Y, SolveOptions(bandwidth=1.0))
    assert m.stats["strategy"] == STORED


def test_forced_strategy_that_does_not_fit_is_refused_before_work(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("allocated the Gram despite the plan")

    monkeypatch.setattr("kernelfit.solve.build_gram_panels", boom)
    monkeypatch.setattr("kernelfit.planning.available_bytes", lambda: 700 * 2**20)
    rng = np.random.default_rng(0)
    X, Y = rng.random((4000, 5)), rng.standard_normal((4000, 2))
    with pytest.raises(MemoryPlanError, match="stored-float64-gram"):
        fit_interpolant(X, Y, SolveOptions(bandwidth=1.0, strategy=STORED))
    with pytest.raises(InputError, match="expected 'auto' or one of"):
        fit_interpolant(X, Y, SolveOptions(bandwidth=1.0, strategy="fastest"))
    with pytest.raises(InputError, match="mode 'mixed' only"):
        fit_interpolant(X, Y, SolveOptions(bandwidth=1.0, mode="float64", strategy=STORED))


def test_plan_command_shows_the_strategy(capsys):
    assert cli.main(["plan", "--dataset", "mnist", "--n-train", "60000", "--available-gib", "24"]) == 0
    captured = capsys.readouterr()
    plan = json.loads(captured.out)
    # 8-bit pixels: the exact dot products plus the float32 Gram fit where the float64 Gram does not
    assert plan["strategy"] == "stored-grid-products" and plan["residual_source"]
    assert "stored-grid-products" in captured.err and "does not fit" in captured.err
    assert cli.main(["plan", "--dataset", "mnist", "--n-train", "60000", "--available-gib", "13"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["strategy"] == RECOMPUTED and RECOMPUTED in captured.err
    assert cli.main(["plan", "--dataset", "mnist", "--n-train", "20000", "--available-gib", "24"]) == 0
    assert json.loads(capsys.readouterr().out)["strategy"] == STORED


# ---------------------------------------------------------------------------------------------
# refine_tol
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("strategy", [STORED, RECOMPUTED])
def test_loose_refine_tol_stops_early(strategy):
    rng = np.random.default_rng(3)
    X, Y = rng.random((500, 8)), rng.standard_normal((500, 3))
    full = fit_interpolant(X, Y, SolveOptions(bandwidth=0.5, strategy=strategy))
    loose = fit_interpolant(X, Y, SolveOptions(bandwidth=0.5, strategy=strategy, refine_tol=1e-6))
    rep = loose.stats["refinement"]
    assert rep["tol_reached"] and rep["relative_residuals"][-1] <= 1e-6
    assert rep["iterations"] < full.stats["refinement"]["iterations"]
    assert loose.stats["residual_relative"] <= 1e-6


@pytest.mark.parametrize("strategy", [STORED, RECOMPUTED])
def test_reached_refine_tol_never_triggers_the_float64_refactorization(strategy):
    # cond(K) beyond float32: without a tolerance the float32 attempt stalls and is re-factored in
    # float64; a tolerance the float32 attempt does reach is accepted as it is
    rng = np.random.default_rng(0)
    rng.random((300, 3)), rng.standard_normal((300, 2))
    X, Y = rng.random((300, 3)), rng.standard_normal((300, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = fit_interpolant(X, Y, SolveOptions(bandwidth=0.22, strategy=strategy))
    first = full.stats["refinement"].get("refinement_float32")
    if first is None:
        pytest.skip("the float32 attempt reached float64 level here; nothing to fall back from")
    assert "re-factored in float64" in full.stats["refinement"]["fallback"]
    tol = 2 * min(first["relative_residuals"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = fit_interpolant(X, Y, SolveOptions(bandwidth=0.22, strategy=strategy, refine_tol=tol))
    rep = m.stats["refinement"]
    assert rep["fallback"] is None and m.stats["factor_dtype"] == "float32"
    assert rep["tol_reached"]
    K = gaussian(X, X, 0.22)
    assert np.linalg.norm(K @ m.alpha - Y) / np.linalg.norm(Y) <= tol * (1 + 1e-6)
    assert m.stats["factorization"]["dtype"] == "float32"


def test_unreachable_refine_tol_is_an_error_before_any_work(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("built the Gram for an impossible tolerance")

    monkeypatch.setattr("kernelfit.solve.build_gram_panels", boom)
    rng = np.random.default_rng(0)
    X, Y = rng.random((400, 3)), rng.standard_normal((400, 2))
    with pytest.raises(InputError, match=r"below what float64 can reach for n = 400.*refine_tol >= 4.4e-15"):
        fit_interpolant(X, Y, SolveOptions(bandwidth=1.0, refine_tol=1e-17))
    for bad in (0.0, -1e-3, float("nan"), "tight"):
        with pytest.raises(InputError, match="refine_tol"):
            fit_interpolant(X, Y, SolveOptions(bandwidth=1.0, refine_tol=bad))


def test_refine_tol_below_what_this_K_reaches_warns_with_the_reached_residual():
    # allowed a priori (above the float64 rounding floor) but below what this K's float64 solve reaches
    rng = np.random.default_rng(3)
    X, Y = rng.random((500, 8)), rng.standard_normal((500, 3))
    with pytest.warns(RuntimeWarning, match="was not reached.*what float64 can reach"):
        m = fit_interpolant(X, Y, SolveOptions(bandwidth=0.5, strategy=STORED, refine_tol=6e-15))
    assert not m.stats["refinement"]["tol_reached"] and m.stats["refinement"]["float64_level"]


def test_planning_reads_the_modes_from_the_catalog():
    from kernelfit import catalog, planning

    assert planning.MODES is catalog.MODES
    with pytest.raises(InputError, match="unknown mode 'fast'; expected one of mixed, float32, float64"):
        plan_solve(10, 2, mode="fast")
