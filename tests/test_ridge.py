"""Ridge path from one eigendecomposition vs direct solves, sklearn KernelRidge and brute-force LOO."""

import numpy as np
import pytest
import scipy.linalg
from scipy.spatial.distance import cdist
from sklearn.kernel_ridge import KernelRidge

from kernelfit.errors import InputError, MemoryPlanError
from kernelfit.ridge import EigenRidge, plan_eigh, ridge_path


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    X, Xt = rng.standard_normal((150, 4)), rng.standard_normal((40, 4))
    K = np.exp(-cdist(X, X, "sqeuclidean") / 6.0)
    Kt = np.exp(-cdist(Xt, X, "sqeuclidean") / 6.0)
    y = (X[:, 0] + 0.5 * rng.standard_normal(150) > 0).astype(int) + (X[:, 1] > 0.8)
    yt = (Xt[:, 0] > 0).astype(int) + (Xt[:, 1] > 0.8)
    return K, Kt, np.eye(3)[y], y, yt


LAMBDAS = [0.0, 1e-4, 1e-2, 0.3, 2.0]


def test_alpha_equals_direct_solves(problem):
    K, Kt, Y, y, yt = problem
    path = ridge_path(K, Y, LAMBDAS, K_test=Kt, y_test=yt, keep_alpha=True)
    for lam, alpha, err, norm in zip(LAMBDAS, path.alphas, path.test_error, path.norm):
        ref = scipy.linalg.solve(K + lam * np.eye(len(K)), Y, assume_a="pos")
        np.testing.assert_allclose(alpha, ref, rtol=1e-7, atol=1e-7 * np.abs(ref).max())
        np.testing.assert_allclose(norm, np.sqrt(np.einsum("ik,ij,jk->", ref, K, ref)), rtol=1e-8)
        assert err == np.mean(np.argmax(Kt @ ref, 1) != yt)
    # lambda = 0 is the interpolant: zero training error and norm^2 = sum(alpha * Y)
    assert path.train_error[0] == 0.0 and path.train_mse[0] < 1e-16
    np.testing.assert_allclose(path.norm[0] ** 2, np.sum(path.alphas[0] * Y), rtol=1e-8)
    assert np.all(np.diff(path.norm) < 0)  # the norm shrinks as lambda grows


def test_matches_sklearn_kernel_ridge(problem):
    K, Kt, Y, _, _ = problem
    path = ridge_path(K, Y, [0.05], K_test=Kt, keep_alpha=True)
    kr = KernelRidge(alpha=0.05, kernel="precomputed").fit(K, Y)
    np.testing.assert_allclose(path.alphas[0], kr.dual_coef_, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(path.test_scores[0], kr.predict(Kt), rtol=1e-7, atol=1e-9)


def test_leave_one_out_matches_brute_force(problem):
    K, _, Y, y, _ = problem
    lams = [0.0, 0.05]
    path = ridge_path(K, Y, lams)
    n = len(K)
    for lam, loo in zip(lams, path.loo_error):
        wrong = 0
        for i in range(n):
            m = np.arange(n) != i
            a = np.linalg.solve(K[np.ix_(m, m)] + lam * np.eye(n - 1), Y[m])
            wrong += np.argmax(K[i, m] @ a) != y[i]
        assert loo == wrong / n
    assert path.best_by_loo() in (0, 1)


def test_bad_input_and_memory_plan(problem):
    K, _, Y, _, _ = problem
    with pytest.raises(InputError, match="lambdas"):
        ridge_path(K, Y, [-1.0])
    with pytest.raises(InputError, match="square"):
        ridge_path(K[:, :10], Y, [0.0])
    with pytest.raises(InputError, match="shape"):
        ridge_path(K, Y[:10], [0.0])
    with pytest.raises(MemoryPlanError, match="Plan"):
        EigenRidge(K, max_bytes=1000)
    assert plan_eigh(20000)["total_bytes"] == 4 * 20000**2 * 8


def test_singular_gram_gives_min_norm_interpolant():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((30, 5))
    K = X @ X.T  # rank 5
    y = X @ rng.standard_normal(5)  # in the range of K: interpolation possible
    er = EigenRidge(K)
    assert er.n_null == 25
    a = er.alpha(y, 0.0)[:, 0]
    np.testing.assert_allclose(a, np.linalg.pinv(K) @ y, atol=1e-8)
    np.testing.assert_allclose(K @ a, y, atol=1e-8)
