"""``linalg.mixed.solve_refined`` when the low-precision factor breaks down: the attempt stays in the
factor list (dtype, minor, seconds, what the caller knew of it) ahead of the float64 factor that
replaced it, and its seconds count in the factor time."""

import time

import numpy as np
import pytest
import scipy.linalg

from kernelfit.errors import NotPositiveDefiniteError
from kernelfit.linalg.factor import factor
from kernelfit.linalg.mixed import broke_down, solve_refined
from kernelfit.linalg.panels import SymmetricPanels

DELTA = 1e-9   # below float32's half-ulp at 1 (3e-8): 1 - DELTA is 1.0 in float32


def _pair_matrix(n=40, i=20):
    """I with one 2x2 block [[1, 1 - DELTA], [1 - DELTA, 1]] at rows i, i + 1: positive definite in
    float64 (eigenvalues 1 +- (1 - DELTA)), exactly singular in float32, where the block is all ones:
    the Cholesky pivot of row i + 1 is 1 - 1 * 1 = 0, the leading minor of order i + 2 fails."""
    A = np.eye(n)
    A[i, i + 1] = A[i + 1, i] = 1.0 - DELTA
    return A


def test_a_float32_factor_that_breaks_down_is_recorded_before_the_float64_one():
    A = _pair_matrix()
    Y = np.random.default_rng(0).standard_normal((len(A), 2))
    timings = {}
    X, R, report, factors = solve_refined(lambda dt: SymmetricPanels.from_dense(A.astype(dt), 16),
                                          lambda G: factor(G).to_dict(), lambda V: A @ V, Y, dtype=np.float32,
                                          fallback=lambda: None, timings=timings,
                                          attempt_info={"tf32": False, "device": "cpu"})
    assert [f["dtype"] for f in factors] == ["float32", "float64"]
    first, final = factors
    assert broke_down(first) and not broke_down(final)
    assert first["status"] == "broke down" and first["minor"] == 22 and first["n"] == 40   # closed form: row 21 + 1
    assert first["tf32"] is False and first["device"] == "cpu"
    assert 0.0 <= first["timings_s"]["factor"] <= timings["factor"]
    assert report["factor_dtype"] == "float64" and "leading minor of order 22" in report["fallback"]
    np.testing.assert_allclose(X, scipy.linalg.solve(A, Y, assume_a="pos"), rtol=1e-6)
    np.testing.assert_allclose(R, Y - A @ X, atol=1e-12)


def test_the_attempt_carries_its_seconds_and_the_callers_attempt_info():
    # an emulated TF32 factor that spends 0.2 s and then breaks down, as a GPU factor would
    A = _pair_matrix()
    Y = np.ones((len(A), 1))

    def factor_gram(G):
        if G.dtype == np.float32:
            time.sleep(0.2)
            raise NotPositiveDefiniteError(minor=17, n=G.n, dtype="float32")
        return factor(G).to_dict()

    timings = {}
    X, _, report, factors = solve_refined(lambda dt: SymmetricPanels.from_dense(A.astype(dt), 16), factor_gram,
                                          lambda V: A @ V, Y, dtype=np.float32, fallback=lambda: None,
                                          timings=timings, attempt_info={"tf32": True, "device": "cuda:0",
                                                                         "status": "not mine to set"})
    first, final = factors
    assert broke_down(first) and first["minor"] == 17
    assert first["tf32"] is True and first["device"] == "cuda:0" and first["status"] == "broke down"
    assert first["timings_s"]["factor"] >= 0.2
    # "factor" counts both factorizations: the 0.2 s lost to the attempt and the float64 factor
    assert timings["factor"] >= first["timings_s"]["factor"] + final["timings_s"]["factor"]
    assert final["dtype"] == "float64" and "tf32" in final and final["tf32"] is False    # factor()'s own dict
    np.testing.assert_allclose(X, scipy.linalg.solve(A, Y, assume_a="pos"), rtol=1e-6)


def test_without_a_fallback_the_breakdown_still_propagates():
    A = _pair_matrix()
    with pytest.raises(NotPositiveDefiniteError, match="leading minor of order 22"):
        solve_refined(lambda dt: SymmetricPanels.from_dense(A.astype(dt), 16), lambda G: factor(G).to_dict(),
                      lambda V: A @ V, np.ones((len(A), 1)), dtype=np.float32, fallback=None)
