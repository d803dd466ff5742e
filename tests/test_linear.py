"""SGD from zero converges to the minimum-norm solution; a non-zero start keeps its null-space part."""

import numpy as np
import pytest

from kernelfit.errors import InputError
from kernelfit.linear import main, min_norm_solution, null_space_component, sgd_least_squares, sgd_min_norm_demo


def test_min_norm_solution_is_pinv():
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((10, 40)), rng.standard_normal(10)
    np.testing.assert_allclose(min_norm_solution(X, y), np.linalg.pinv(X) @ y, atol=1e-10)


def test_sgd_from_zero_reaches_min_norm():
    rng = np.random.default_rng(1)
    X, y = rng.standard_normal((20, 100)) / 10, rng.choice([-1.0, 1.0], 20)
    w, hist = sgd_least_squares(X, y, epochs=400, seed=0)
    w_star = np.linalg.lstsq(X, y, rcond=None)[0]  # numpy's minimum-norm least squares
    assert np.linalg.norm(w - w_star) < 1e-6 * np.linalg.norm(w_star)
    assert hist[-1]["train_rmse"] < 1e-8


def test_sgd_from_nonzero_start_does_not():
    rng = np.random.default_rng(2)
    X, y = rng.standard_normal((20, 100)) / 10, rng.choice([-1.0, 1.0], 20)
    w0 = rng.standard_normal(100)
    w, _ = sgd_least_squares(X, y, w0=w0, epochs=400, seed=0)
    w_star = np.linalg.pinv(X) @ y
    assert np.allclose(X @ w, y, atol=1e-8)  # it still interpolates ...
    gap = np.linalg.norm(w - w_star)
    assert gap > 1.0  # ... but not with the minimum norm
    # Theory: it keeps exactly the null-space part of the start.
    np.testing.assert_allclose(w - w_star, null_space_component(X, w0), atol=1e-6)


def test_demo_and_cli(capsys):
    res = sgd_min_norm_demo(n=15, d=60, epochs=300, seed=0)
    assert res["zero"]["relative_distance"] < 1e-6
    assert res["random"]["relative_distance"] > 0.5
    np.testing.assert_allclose(res["random"]["distance_to_min_norm"], res["random"]["predicted_distance"],
                               rtol=1e-5)
    assert main(["--n", "8", "--d", "30", "--epochs", "100"]) == 0
    assert '"zero"' in capsys.readouterr().out
    with pytest.raises(InputError, match="d > n"):
        sgd_min_norm_demo(n=10, d=5)
    with pytest.raises(InputError, match="d >= n"):
        min_norm_solution(np.ones((5, 3)), np.ones(5))
