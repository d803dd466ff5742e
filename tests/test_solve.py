import warnings

import numpy as np
import pytest
import scipy.linalg
from scipy.spatial.distance import cdist
from sklearn.kernel_ridge import KernelRidge

from kernelfit.errors import InputError, MemoryPlanError, NotPositiveDefiniteError
from kernelfit.experiment import run_interpolation
from kernelfit.linalg.options import FactorOptions
from kernelfit.linalg.refine import float64_level_threshold
from kernelfit.planning import plan_solve, require_fits
from kernelfit.solve import SolveOptions, fit_feature_gram, fit_interpolant


def data(n=300, d=20, k=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((n, d)), rng.standard_normal((n, k))


def gaussian(X, Z, s):
    return np.exp(-cdist(X, Z, "sqeuclidean") / (2 * s * s))


@pytest.mark.parametrize("mode,strategy,eps", [
    ("float64", "auto", 2.2e-16), ("float32", "auto", 1.2e-7), ("mixed", "auto", 2.2e-16),
    ("mixed", "stored-float64-gram", 2.2e-16), ("mixed", "recomputed-float64", 2.2e-16)])
def test_solution_matches_kernel_ridge_with_tiny_alpha(mode, strategy, eps):
    X, Y = data()
    sigma = 1.0
    # forward error of any backward-stable solve is ~ cond(K) * eps: a dtype- and condition-aware tolerance
    tol = min(100 * np.linalg.cond(gaussian(X, X, sigma)) * eps, 5e-3)
    ref = KernelRidge(alpha=1e-10, kernel="rbf", gamma=1 / (2 * sigma**2)).fit(X, Y)
    m = fit_interpolant(X, Y, SolveOptions(bandwidth=sigma, mode=mode, strategy=strategy, jitter=1e-10,
                                           placement=FactorOptions(block_size=64)))
    Xt = np.random.default_rng(9).random((40, X.shape[1]))
    np.testing.assert_allclose(m.alpha, ref.dual_coef_, rtol=0, atol=tol * np.abs(ref.dual_coef_).max())
    np.testing.assert_allclose(m.predict(Xt), ref.predict(Xt), rtol=0, atol=tol * 10 * np.abs(ref.predict(Xt)).max())


@pytest.mark.parametrize("strategy", ["stored-float64-gram", "recomputed-float64"])
def test_mixed_mode_reaches_float64_direct_residual(strategy):
    X, Y = data(n=400, d=10)
    sigma = 0.6  # cond(K) ~ 1e4: float32 alone gives ~1e-4 relative residual
    K = gaussian(X, X, sigma)
    direct = scipy.linalg.cho_solve(scipy.linalg.cho_factor(K, lower=True), Y)
    direct_rel = np.linalg.norm(K @ direct - Y) / np.linalg.norm(Y)
    f32 = fit_interpolant(X, Y, SolveOptions(bandwidth=sigma, mode="float32", placement=FactorOptions(block_size=64)))
    mixed = fit_interpolant(X, Y, SolveOptions(bandwidth=sigma, mode="mixed", strategy=strategy,
                                               placement=FactorOptions(block_size=64)))
    mixed_rel = np.linalg.norm(K @ mixed.alpha - Y) / np.linalg.norm(Y)   # independent residual (dense scipy K)
    f32_rel = np.linalg.norm(K @ f32.alpha - Y) / np.linalg.norm(Y)
    assert f32_rel > 1e3 * direct_rel            # float32 alone is far from float64 accuracy ...
    assert mixed_rel <= 10 * max(direct_rel, 1e-15)  # ... refinement gets there
    assert mixed.stats["refinement"]["float64_level"]
    assert mixed.stats["refinement"]["iterations"] >= 1
    # the reported residual is an independent float64 evaluation: equal to the dense one up to the
    # rounding of a float64 kernel evaluation (~1e-13 here)
    assert mixed.stats["residual_relative"] == pytest.approx(mixed_rel, abs=1e-13)


def test_refinement_says_so_when_it_cannot_reach_float64():
    # Low-precision factor of A + 1e-5 I used to refine A x = y with cond(A) = 1e9: the iteration
    # contracts by ~1 - lambda_min / (lambda_min + 1e-5), i.e. it stalls; the report must say so.
    from kernelfit.linalg.panels import SymmetricPanels
    rng = np.random.default_rng(0)
    Q, _ = np.linalg.qr(rng.standard_normal((120, 120)))
    A = (Q * np.geomspace(1.0, 1e-9, 120)) @ Q.T
    A = (A + A.T) / 2
    Y = rng.standard_normal((120, 2))
    # the factor-only shift is a preconditioner, not the ridge of SolveOptions.jitter: driven directly
    from kernelfit.linalg.factor import factor
    from kernelfit.linalg.mixed import solve_refined
    G = SymmetricPanels.from_dense((A + 1e-5 * np.eye(120)).astype(np.float32), 32)
    alpha, _, rep, _ = solve_refined(lambda dt: G, lambda P: factor(P).to_dict(), lambda V: A @ V, Y,
                                     dtype=np.float32, max_refine=4)
    assert not rep["float64_level"]
    assert rep["stop_reason"].startswith(("stopped improving", "reached max_refine"))
    assert rep["relative_residuals"][-1] > 1e-12


def test_rkhs_norm_is_sqrt_alpha_dot_y():
    X, Y = data(n=120)
    m = fit_interpolant(X, Y, SolveOptions(bandwidth=1.0, mode="float64"))
    K = gaussian(X, X, 1.0)
    alpha = np.linalg.solve(K, Y)
    assert m.rkhs_norm == pytest.approx(np.sqrt(np.sum(alpha * Y)), rel=1e-8)
    np.testing.assert_allclose(m.rkhs_norm_per_output, np.sqrt(np.einsum("ij,ij->j", alpha, K @ alpha)), rtol=1e-8)


def test_duplicate_points_raise_typed_error_and_jitter_fixes_it():
    X, Y = data(n=80)
    X = np.vstack([X, X[:5]])
    Y = np.vstack([Y, Y[:5]])
    with pytest.raises(NotPositiveDefiniteError) as err:
        fit_interpolant(X, Y, SolveOptions(bandwidth=1.0, mode="float64", placement=FactorOptions(block_size=32)))
    assert 80 < err.value.minor <= 85
    m = fit_interpolant(X, Y, SolveOptions(bandwidth=1.0, mode="float64", jitter=1e-6, placement=FactorOptions(block_size=32)))
    assert m.stats["jitter"] == 1e-6


@pytest.mark.parametrize("X,match", [
    (np.ones(10), "2-D"),
    (np.ones((0, 3)), "empty"),
    (np.array([[1.0, np.nan], [0.0, 1.0]]), "NaN"),
    (np.array([[1.0, np.inf], [0.0, 1.0]]), "NaN or inf"),
])
def test_bad_features(X, match):
    with pytest.raises(InputError, match=match):
        fit_interpolant(X, np.ones(len(X)), SolveOptions(bandwidth=1.0))


def test_bad_targets_and_labels():
    X, Y = data(n=20)
    with pytest.raises(InputError, match="rows"):
        fit_interpolant(X, Y[:10], SolveOptions(bandwidth=1.0))
    with pytest.raises(InputError, match="NaN"):
        fit_interpolant(X, np.full(20, np.nan), SolveOptions(bandwidth=1.0))
    with pytest.raises(InputError, match="outside the class range"):
        run_interpolation(X, {"true": np.arange(20) % 11}, None, None, 10, SolveOptions(bandwidth=1.0))
    with pytest.raises(InputError, match="mode"):
        fit_interpolant(X, Y, SolveOptions(bandwidth=1.0, mode="float16"))
    with pytest.raises(InputError, match="bandwidth"):
        fit_interpolant(X, Y, SolveOptions(bandwidth=-2.0))


def test_memory_refusal_happens_before_allocation(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("allocated the Gram despite the plan")

    monkeypatch.setattr("kernelfit.solve.build_gram_panels", boom)
    monkeypatch.setattr("kernelfit.planning.available_bytes", lambda: 10 * 2**20)
    X, Y = data(n=200)
    with pytest.raises(MemoryPlanError, match="would not fit") as err:
        fit_interpolant(X, Y, SolveOptions(bandwidth=1.0))
    assert err.value.plan.total_bytes > err.value.plan.available_bytes


def test_memory_plan_numbers():
    p = plan_solve(60000, 784, 20, "mixed", n_test=10000, available=24 * 2**30)
    assert 7.1e9 < p.gram_bytes < 7.5e9  # lower triangle in float32: n^2/2 * 4
    assert p.fits
    p64 = plan_solve(60000, 784, 20, "float64", n_test=10000, available=16 * 2**30)
    assert not p64.fits and 14.2e9 < p64.gram_bytes < 15e9
    with pytest.raises(MemoryPlanError, match="mixed"):
        require_fits(p64)


def test_run_interpolation_true_and_random_labels_share_one_factorization():
    rng = np.random.default_rng(0)
    X, y = rng.random((200, 30)), rng.integers(0, 4, 200)
    Xt, yt = rng.random((50, 30)), rng.integers(0, 4, 50)
    rec = run_interpolation(X, {"true": y, "random-labels": rng.integers(0, 4, 200)}, Xt, yt, 4,
                            SolveOptions(bandwidth=1.0, mode="mixed"))
    for name in ("true", "random-labels"):
        r = rec["results"][name]
        assert r["train_error"] == 0.0
        assert r["residual_relative"] < 1e-10
        assert len(r["rkhs_norm_per_class"]) == 4
        assert r["rkhs_norm"] == pytest.approx(np.sqrt(np.sum(np.square(r["rkhs_norm_per_class"]))))
    assert set(rec["stats"]["timings_s"]) >= {"gram", "factor", "solve", "predict"}


def feature_gram(X, Xt=None, block=32):
    """The feature Gram of X (phi = x) as the random-conv pipeline hands it to fit_feature_gram."""
    from kernelfit.features.randconv import GramBlocks
    from kernelfit.linalg.panels import SymmetricPanels
    return GramBlocks(train=SymmetricPanels.from_dense(X @ X.T, block), train_diag=np.einsum("ij,ij->i", X, X),
                      cross=None if Xt is None else Xt @ X.T, test_diag=None if Xt is None else np.einsum("ij,ij->i", Xt, Xt),
                      n_features=X.shape[1])


def test_feature_gram_with_refinement_matches_scipy():
    X, Y = data(n=150, d=6)
    K = gaussian(X, X, 0.8)
    model, _ = fit_feature_gram(feature_gram(X), Y, SolveOptions(bandwidth=0.8))
    alpha = model.alpha
    ref = np.linalg.solve(K, Y)
    np.testing.assert_allclose(alpha, ref, rtol=0, atol=1e-8 * np.abs(ref).max())
    rep = model.stats["refinement"]
    assert rep["backward_stable"]   # as good as float64 gets for this K (cond ~ 6e5) ...
    # ... and the float64_level flag says whether the relative residual itself is at float64 level
    rel = np.linalg.norm(K @ alpha - Y) / np.linalg.norm(Y)
    assert rep["float64_level"] == (rel <= float64_level_threshold(len(X)))


def test_feature_gram_median_rule_test_scores_and_laplacian_match_scipy():
    from scipy.spatial.distance import pdist
    X, Y = data(n=120, d=5)
    Xt = np.random.default_rng(3).random((30, 5))
    median = np.median(pdist(X))   # n < 2000: the median heuristic's sample is every point
    for kernel, metric, scale in (("gaussian", "sqeuclidean", lambda s: 2 * s * s), ("laplacian", "euclidean", lambda s: s)):
        model, scores = fit_feature_gram(feature_gram(X, Xt), Y, SolveOptions(kernel=kernel, bandwidth="0.5*median"))
        sigma = 0.5 * median
        assert model.bandwidth == pytest.approx(sigma, rel=1e-12)
        assert model.stats["median_distance"] == pytest.approx(median, rel=1e-12)
        assert model.stats["bandwidth_rule"] == "0.5 x median heuristic"
        K, Kt = np.exp(-cdist(X, X, metric) / scale(sigma)), np.exp(-cdist(Xt, X, metric) / scale(sigma))
        ref = np.linalg.solve(K, Y)
        np.testing.assert_allclose(model.alpha, ref, rtol=0, atol=1e-7 * np.abs(ref).max())
        np.testing.assert_allclose(model.train_scores, Y, rtol=0, atol=1e-9)
        # the test block is kept in float32: scores to float32 accuracy of k times |alpha|
        np.testing.assert_allclose(scores, Kt @ ref, rtol=0, atol=1e-5 * np.abs(ref).sum(axis=0).max())


def test_feature_gram_linear_kernel_and_float64_mode_match_numpy():
    X, Y = data(n=40, d=60)
    model, scores = fit_feature_gram(feature_gram(X), Y, SolveOptions(mode="float64"), linear=True)
    ref = np.linalg.solve((X @ X.T + 1.0) / 60, Y)
    np.testing.assert_allclose(model.alpha, ref, rtol=0, atol=1e-9 * np.abs(ref).max())
    assert scores is None and model.stats["factor_dtype"] == "float64" and model.stats["bandwidth"] is None


def test_feature_gram_refuses_before_overwriting_the_gram():
    X, Y = data(n=50, d=4)
    g = feature_gram(X)
    before = g.train.to_dense().copy()
    with pytest.raises(InputError, match="numerically the identity"):
        fit_feature_gram(g, Y, SolveOptions(bandwidth=1e-4))
    np.testing.assert_array_equal(g.train.to_dense(), before)   # nothing computed is lost
    g.train = before
    with pytest.raises(InputError, match="float64 SymmetricPanels"):
        fit_feature_gram(g, Y)
    with pytest.raises(InputError, match="X has 50 rows but Y has 3"):
        fit_feature_gram(feature_gram(X), Y[:3])


def test_solve_options_for_features_take_the_catalog_default_bandwidth():
    from kernelfit.catalog import DEFAULT_BANDWIDTH, FEATURE_KINDS
    for kind in FEATURE_KINDS:
        assert SolveOptions.for_features(kind).bandwidth == DEFAULT_BANDWIDTH[kind]
    assert SolveOptions.for_features("gabor").bandwidth == "0.5*median"
    assert SolveOptions.for_features("pixels", bandwidth=5.0, mode="float64") == SolveOptions(bandwidth=5.0, mode="float64")
    with pytest.raises(InputError, match="feature kind: expected one of pixels, gabor, randconv"):
        SolveOptions.for_features("hog")


def test_translation_invariance_in_float32():
    # |x|^2 ~ 5e6 at offset 1000: without centering, float32 squared distances lose every digit
    X, Y = data(n=200, d=20)
    base = fit_interpolant(X, Y, SolveOptions(bandwidth=1.0, mode="float32"))
    shifted = fit_interpolant(X + 1000.0, Y, SolveOptions(bandwidth=1.0, mode="float32"))
    np.testing.assert_allclose(shifted.alpha, base.alpha, rtol=0, atol=1e-3 * np.abs(base.alpha).max())


@pytest.mark.parametrize("strategy", ["stored-float64-gram", "recomputed-float64"])
def test_mixed_falls_back_to_float64_and_says_so(strategy):
    # cond(K) ~ 8e9: beyond a float32 factor (breakdown or stalled refinement), fine for float64
    rng = np.random.default_rng(0)
    X, Y = rng.random((300, 3)), rng.standard_normal((300, 2))
    m = fit_interpolant(X, Y, SolveOptions(bandwidth=0.3, mode="mixed", strategy=strategy))
    ref = np.linalg.solve(gaussian(X, X, 0.3), Y)
    assert m.stats["factor_dtype"] == "float64"
    assert "re-factored in float64" in m.stats["refinement"]["fallback"]
    assert m.stats["refinement"]["backward_stable"]
    K = gaussian(X, X, 0.3)
    assert np.linalg.norm(K @ m.alpha - Y) / np.linalg.norm(Y) <= 10 * np.linalg.norm(K @ ref - Y) / np.linalg.norm(Y) + 1e-12


def test_mixed_without_fallback_never_returns_silently():
    rng = np.random.default_rng(0)
    X, Y = rng.random((300, 3)), rng.standard_normal((300, 2))
    opts = SolveOptions(bandwidth=0.3, mode="mixed", strategy="recomputed-float64", fallback_float64=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            m = fit_interpolant(X, Y, opts)
        except NotPositiveDefiniteError:
            return  # the float32 factor broke down: raised, not returned
    assert not m.stats["refinement"]["float64_level"]
    assert any("did not reach float64 level" in str(w.message) for w in caught)


def test_memory_plan_error_names_library_parameters_from_python_and_flags_from_the_cli():
    from kernelfit.errors import MemoryPlanError
    from kernelfit.planning import plan_solve, require_fits

    plan = plan_solve(60000, 784, 10, "float64", available=2**30)
    with pytest.raises(MemoryPlanError) as lib:
        require_fits(plan)
    assert "force_memory=True" in str(lib.value) and "mode='mixed'" in str(lib.value)
    assert "--" not in str(lib.value)
    with pytest.raises(MemoryPlanError) as cli:
        require_fits(plan, cli=True)
    assert "--force-memory" in str(cli.value) and "--n-train" in str(cli.value)


# --- regression targets, duplicate rows (run_interpolation) -------------------------------------

def test_regression_task_matches_kernel_ridge_multi_output():
    from sklearn.metrics import r2_score

    rng = np.random.default_rng(5)
    X, Xt = rng.random((250, 4)), rng.random((60, 4))

    def f(A):
        return np.stack([np.sin(3 * A[:, 0]), A[:, 1] * A[:, 2] - A[:, 3]], axis=1)

    sigma = 0.5
    rec = run_interpolation(X, {"true": f(X)}, Xt, f(Xt), None,
                            SolveOptions(bandwidth=sigma, mode="float64", jitter=1e-10), task="regression")
    ref = KernelRidge(alpha=1e-10, kernel="rbf", gamma=1 / (2 * sigma**2)).fit(X, f(X))
    pred = ref.predict(Xt)
    res = rec["results"]["true"]
    assert rec["task"] == "regression" and rec["num_outputs"] == 2 and rec["num_classes"] is None
    assert res["test_rmse"] == pytest.approx(float(np.sqrt(np.mean((pred - f(Xt)) ** 2))), rel=1e-5)
    assert res["test_r2"] == pytest.approx(r2_score(f(Xt), pred), rel=1e-5)
    assert res["test_r2_per_output"] == pytest.approx(list(r2_score(f(Xt), pred, multioutput="raw_values")), rel=1e-5)
    assert res["train_rmse"] < 1e-6 and "train_error" not in res
    assert res["rkhs_norm"] == pytest.approx(float(np.sqrt(np.sum(ref.dual_coef_ * f(X)))), rel=1e-5)
    # 1-D targets work the same way and give one output
    rec1 = run_interpolation(X, {"true": f(X)[:, 0]}, Xt, f(Xt)[:, 0], None,
                             SolveOptions(bandwidth=sigma, mode="float64", jitter=1e-10), task="regression")
    assert rec1["num_outputs"] == 1
    assert rec1["results"]["true"]["test_rmse"] == pytest.approx(res["test_rmse_per_output"][0], rel=1e-6)
    with pytest.raises(InputError, match="y_test has shape"):
        run_interpolation(X, {"true": f(X)}, Xt, f(Xt)[:, 0], None, SolveOptions(bandwidth=sigma), task="regression")
    with pytest.raises(InputError, match="unknown task"):
        run_interpolation(X, {"true": f(X)}, None, None, None, SolveOptions(bandwidth=sigma), task="ranking")


@pytest.mark.parametrize("labels_agree", [True, False])
def test_duplicate_training_rows_refused_before_the_solve(labels_agree, monkeypatch):
    # Before: found by the factorization only when the labels differ (after the O(n^3) work), and not
    # at all when they agree (mixed mode's float32 factor of the singular K still went through).
    rng = np.random.default_rng(6)
    X = rng.random((120, 5))
    X[90] = X[33]
    y = rng.integers(0, 3, 120)
    y[90] = y[33] if labels_agree else (y[33] + 1) % 3

    def no_solve(*a, **k):
        raise AssertionError("the solve ran before the duplicate check")

    monkeypatch.setattr("kernelfit.solve.fit_interpolant", no_solve)
    with pytest.raises(InputError, match=r"X_train rows 33 and 90 are equal.*np\.unique.*--jitter 1e-8"):
        run_interpolation(X, {"true": y}, None, None, 3, SolveOptions(bandwidth=1.0))
    monkeypatch.undo()
    rec = run_interpolation(X, {"true": y}, None, None, 3, SolveOptions(bandwidth=1.0, jitter=1e-6))
    assert rec["n_train"] == 120


def test_f_times_median_bandwidth_is_f_times_the_median_pairwise_distance():
    import scipy.spatial.distance

    rng = np.random.default_rng(3)
    X, Y = rng.standard_normal((60, 4)), rng.standard_normal((60, 2))
    m = fit_interpolant(X, Y, SolveOptions(bandwidth="0.5*median", mode="float64"))
    assert m.bandwidth == pytest.approx(0.5 * np.median(scipy.spatial.distance.pdist(X)), rel=1e-12)
    assert m.stats["bandwidth_rule"] == "0.5 x median heuristic"
