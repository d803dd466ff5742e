"""A fitted interpolant f(x) = sum_i alpha_i k(x, x_i) and its predictions.

What ``kernelfit.solve``'s fits return (``Interpolant``; ``PrecomputedInterpolant`` for a precomputed
Gram) and ``kernelfit.model`` saves and loads. Kept apart from the solves: predicting needs only the
kernel products of ``kernelfit.gram``, never the factorization.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import InputError
from .gram import KernelOperator, argmax_exact_scores
from .validate import check_features

__all__ = ["Interpolant", "PrecomputedInterpolant"]


@dataclass
class Interpolant:
    """A fitted interpolant f(x) = sum_i alpha_i k(x, x_i)."""

    X_fit: np.ndarray       # float64 training points
    alpha: np.ndarray       # (n, k) float64 coefficients
    Y: np.ndarray           # (n, k) float64 targets
    kernel: str
    bandwidth: float
    mode: str
    train_scores: np.ndarray  # K alpha, recomputed in float64
    stats: dict = field(default_factory=dict)
    # float64 kernel products with X_fit (its grid detection done once); built on first use
    operator: KernelOperator | None = field(default=None, repr=False, compare=False)

    def kernel_operator(self, rows: int = 1024) -> KernelOperator:
        if self.operator is None or self.operator.rows != rows:
            grid = "auto" if self.operator is None else self.operator.grid
            self.operator = KernelOperator(self.X_fit, self.kernel, self.bandwidth, np.float64, rows, grid=grid)
        return self.operator

    @property
    def rkhs_norm_per_output(self) -> np.ndarray:
        # ||f_c||_H^2 = alpha_c^T K alpha_c, evaluated as alpha_c . (K alpha_c) (float64 product)
        sq = np.einsum("ij,ij->j", self.alpha, self.train_scores)
        return np.sqrt(np.maximum(sq, 0.0))

    @property
    def rkhs_norm(self) -> float:
        """||f||_H = sqrt(sum_c alpha_c^T K alpha_c) (= sqrt(sum(alpha * Y)) at exact interpolation)."""
        return float(np.sqrt(max(float(np.sum(self.alpha * self.train_scores)), 0.0)))

    def predict(self, X, rows: int = 1024, argmax_groups: int | None = None) -> np.ndarray:
        """Scores f(X), float64. When training and test points lie on one integer grid (pixels / 255)
        the float64 scores come at float32 GEMM speed (``kernelfit.grid``). Otherwise, with
        ``argmax_groups`` = c (class scores in groups of c columns), the kernel tiles are float32
        GEMMs: scores are float32-accurate, and every row whose top two scores in a group are within
        their error bound is recomputed in float64, so the argmax classes are those of the float64
        scores (``gram.argmax_exact_scores``)."""
        X = check_features(X, "X")
        if X.shape[1] != self.X_fit.shape[1]:
            raise InputError(f"X has {X.shape[1]} features but the interpolant was fitted on {self.X_fit.shape[1]}.")
        op = self.kernel_operator(rows)
        points = op.points(X)
        if argmax_groups is not None and points[1] is None:
            scores, recomputed = argmax_exact_scores(self.X_fit, self.alpha, X, self.kernel, self.bandwidth,
                                                     int(argmax_groups), rows)
            self.stats["predict_scores"] = "float32 tiles, rows within the error bound recomputed in float64"
            self.stats["predict_rows_recomputed_float64"] = recomputed
            return scores
        self.stats["predict_scores"] = "float64; distances: " + op.distances_of(points[1])
        self.stats.pop("predict_rows_recomputed_float64", None)
        return op.matmul(X, self.alpha, points)


class PrecomputedInterpolant(Interpolant):
    """A fitted interpolant of a precomputed Gram: f(test) = K_test @ alpha, K_test of shape (m, n).

    ``X_fit`` is None (there are no training points, only the Gram); ``kernel`` is "precomputed".
    """

    def predict(self, K_test, rows: int | None = None) -> np.ndarray:
        from .data.gram import check_test_gram, gram_matmul, open_gram

        K_test = open_gram(K_test, what="K_test")
        check_test_gram(K_test, self.alpha.shape[0], what="K_test")
        return gram_matmul(K_test, self.alpha, rows)
