"""Prediction from float32 kernel tiles: argmax classes equal those of the float64 scores."""

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from kernelfit.errors import InputError
from kernelfit.gram import argmax_exact_scores
from kernelfit.solve import SolveOptions, fit_interpolant, one_hot


def float64_scores(B, alpha, A, kernel, s):   # independent reference: scipy distances
    if kernel == "gaussian":
        return np.exp(-cdist(A, B, "sqeuclidean") / (2 * s * s)) @ alpha
    return np.exp(-cdist(A, B) / s) @ alpha


@pytest.mark.parametrize("kernel,s", [("gaussian", 1.5), ("laplacian", 3.0)])
def test_float32_scores_have_the_float64_argmax(kernel, s):
    rng = np.random.default_rng(0)
    B, A = rng.random((600, 40)) + 3.0, rng.random((700, 40)) + 3.0     # off-center: centering matters
    alpha = rng.standard_normal((600, 20)) * 50
    ref = float64_scores(B, alpha, A, kernel, s)
    got, recomputed = argmax_exact_scores(B, alpha, A, kernel, s, groups=10, rows=128)
    for g in (slice(0, 10), slice(10, 20)):
        np.testing.assert_array_equal(np.argmax(got[:, g], axis=1), np.argmax(ref[:, g], axis=1))
    scale = np.abs(ref).max()
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4 * scale)     # float32-accurate scores
    assert recomputed < len(A) // 4                                      # most rows stay float32


def test_tied_scores_are_recomputed_in_float64():
    # two identical columns tie exactly in every row: no float32 score may decide between them
    rng = np.random.default_rng(1)
    B, A = rng.random((300, 10)), rng.random((50, 10))
    a = rng.standard_normal((300, 1))
    alpha = np.hstack([a, a, -np.abs(a)])
    got, recomputed = argmax_exact_scores(B, alpha, A, "gaussian", 1.0, groups=3)
    assert recomputed == len(A)
    np.testing.assert_allclose(got, float64_scores(B, alpha, A, "gaussian", 1.0), rtol=1e-12, atol=1e-12)


def test_groups_must_divide_the_score_columns():
    with pytest.raises(InputError, match="groups of 4"):
        argmax_exact_scores(np.zeros((5, 2)), np.zeros((5, 10)), np.zeros((3, 2)), "gaussian", 1.0, groups=4)


def _mnist(shared_data_dir, n, m):
    with np.load(shared_data_dir / "mnist.npz") as f:
        X = f["x_train"][:n].reshape(n, -1) / 255.0
        y = f["y_train"][:n]
        Xt = f["x_test"][:m].reshape(m, -1) / 255.0
    return X, y, Xt


def _check_mnist_classes(shared_data_dir, n, m):
    X, y, Xt = _mnist(shared_data_dir, n, m)
    model = fit_interpolant(X, one_hot(y, 10), SolveOptions(bandwidth=5.0))
    fast = model.predict(Xt, argmax_groups=10)
    exact = model.predict(Xt)   # float64 tiles
    np.testing.assert_array_equal(np.argmax(fast, axis=1), np.argmax(exact, axis=1))
    return model


@pytest.mark.data
def test_mnist_classes_equal_the_float64_path(shared_data_dir):
    _check_mnist_classes(shared_data_dir, 1000, 2000)


@pytest.mark.data
@pytest.mark.slow
def test_mnist_full_test_set_classes_equal_the_float64_path(shared_data_dir):
    _check_mnist_classes(shared_data_dir, 5000, 10000)
