"""Kernel ridge paths: every lambda (including 0, the interpolant) from one eigendecomposition.

Convention: ``(K + lambda I) alpha = Y`` (as ``sklearn.kernel_ridge.KernelRidge(alpha=lambda,
kernel="precomputed")``). With ``K = V diag(s) V^T`` and ``Q = V^T Y``:

* ``alpha(lambda) = V diag(1 / (s + lambda)) Q``;
* training predictions ``K alpha = V diag(s / (s + lambda)) Q``;
* test predictions ``K_test alpha = (K_test V) diag(1 / (s + lambda)) Q`` (``K_test V`` computed once);
* RKHS norm ``||f||^2 = alpha^T K alpha = sum_j s_j Q_j^2 / (s_j + lambda)^2`` (summed over the
  columns of Y; at lambda = 0 this is ``sum(alpha * Y)``, the minimum-norm interpolant's norm);
* leave-one-out residuals ``alpha_i / [(K + lambda I)^{-1}]_ii`` (exact, valid at lambda = 0), used to
  choose lambda without touching the test set.

Cost and memory: ``scipy.linalg.eigh`` is a dense O(n^3) method (about 4/3 n^3 for the tridiagonal
reduction plus the divide-and-conquer back-transformation, several times a Cholesky) and holds K, V and a
workspace of about 2 n^2 doubles: ~4 n^2 x 8 bytes in all, i.e. 3.2 GB at n = 10,000 and 12.8 GB at
n = 20,000. ``plan_eigh`` computes this and ``EigenRidge`` refuses (``MemoryPlanError``) before
allocating when it will not fit. Beyond n ~ 20,000 on a 24 GB machine, solve the interpolant with
``kernelfit.solve`` (tiled Cholesky) instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.linalg

from .errors import InputError, MemoryPlanError

__all__ = ["EigenRidge", "RidgePath", "ridge_path", "plan_eigh", "classification_error"]


def plan_eigh(n: int) -> dict:
    """Bytes the eigendecomposition path needs for an n x n float64 Gram."""
    gram = n * n * 8
    return {"n": n, "gram_bytes": gram, "eigvec_bytes": gram, "workspace_bytes": 2 * gram,
            "total_bytes": 4 * gram}


def _available_bytes() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def classification_error(scores: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(scores, axis=1) != np.asarray(labels)))


def _check_targets(Y, n: int, name: str = "Y") -> np.ndarray:
    Y = np.asarray(Y, dtype=np.float64)
    if Y.ndim == 1:
        Y = Y[:, None]
    if Y.ndim != 2 or Y.shape[0] != n:
        raise InputError(f"{name} must have shape (n, k) or (n,) with n = {n}; got {np.shape(Y)}.")
    if not np.all(np.isfinite(Y)):
        raise InputError(f"{name} contains NaN or inf.")
    return Y


def _check_lambdas(lambdas) -> np.ndarray:
    lam = np.atleast_1d(np.asarray(lambdas, dtype=np.float64))
    if lam.ndim != 1 or lam.size == 0 or np.any(~np.isfinite(lam)) or np.any(lam < 0):
        raise InputError(f"lambdas must be a non-empty list of finite values >= 0; got {lambdas!r}.")
    return lam


class EigenRidge:
    """Eigendecomposition of a symmetric PSD Gram, reused for every lambda and every target matrix.

    ``rcond``: eigenvalues below ``rcond * max(s)`` (round-off, possibly negative) are treated as zero,
    so at lambda = 0 the solution is the minimum-norm (pseudo-inverse) interpolant on the numerically
    non-singular part; ``n_null`` says how many were dropped (0 for a well-conditioned Gram).
    """

    def __init__(self, K, rcond: float | None = None, overwrite: bool = False,
                 max_bytes: int | None = None):
        K = np.asarray(K)
        if K.ndim != 2 or K.shape[0] != K.shape[1]:
            raise InputError(f"K must be a square (n, n) Gram matrix; got shape {K.shape}.")
        n = K.shape[0]
        plan = plan_eigh(n)
        limit = max_bytes if max_bytes is not None else 0.9 * _available_bytes()
        if plan["total_bytes"] > limit:
            raise MemoryPlanError(
                f"the ridge path eigendecomposition of an n = {n} Gram needs about "
                f"{plan['total_bytes'] / 2**30:.1f} GiB (K, eigenvectors and LAPACK workspace, float64) "
                f"but {limit / 2**30:.1f} GiB is available. Plan: use n <= "
                f"{int(np.sqrt(limit / 32))} for the path, or solve single lambdas with kernelfit.solve.",
                plan=plan,
            )
        if not np.all(np.isfinite(K)):
            raise InputError("K contains NaN or inf.")
        K = np.asarray(K, dtype=np.float64)
        s, V = scipy.linalg.eigh(K, overwrite_a=overwrite, check_finite=False, driver="evd")
        self.n = n
        self.min_eigenvalue = float(s[0])
        self.max_eigenvalue = float(s[-1])
        tol = (rcond if rcond is not None else n * np.finfo(np.float64).eps) * max(s[-1], 0.0)
        self.null = s <= tol
        self.n_null = int(self.null.sum())
        self.s = np.where(self.null, 0.0, s)
        self.V = V

    def _inv(self, lam: float) -> np.ndarray:
        d = self.s + lam
        with np.errstate(divide="ignore"):
            inv = np.where(d > 0, 1.0 / np.where(d > 0, d, 1.0), 0.0)
        if lam == 0:
            inv[self.null] = 0.0  # pseudo-inverse on the numerical null space
        return inv

    def project(self, Y) -> np.ndarray:
        return self.V.T @ _check_targets(Y, self.n)

    def alpha(self, Y, lam: float) -> np.ndarray:
        Q = self.project(Y)
        return self.V @ (self._inv(float(lam))[:, None] * Q)

    def path(self, Y, lambdas, K_test=None, y_train=None, y_test=None, loo: bool = True,
             keep_alpha: bool = False) -> "RidgePath":
        lam = _check_lambdas(lambdas)
        Y = _check_targets(Y, self.n)
        Q = self.V.T @ Y
        KtV = None
        if K_test is not None:
            K_test = np.asarray(K_test, dtype=np.float64)
            if K_test.ndim != 2 or K_test.shape[1] != self.n:
                raise InputError(f"K_test must have shape (m, {self.n}); got {K_test.shape}.")
            KtV = K_test @ self.V
        labels = np.argmax(Y, axis=1) if y_train is None else np.asarray(y_train)
        out = RidgePath(lambdas=lam)
        if loo:
            # diag((K + lambda I)^-1) for all lambdas at once, in row chunks of V to bound memory.
            inv_all = np.stack([self._inv(float(lm)) for lm in lam], axis=1)  # (n, L)
            gdiag = np.empty((self.n, lam.size))
            for r0 in range(0, self.n, 2048):
                Vr = self.V[r0 : r0 + 2048]
                gdiag[r0 : r0 + 2048] = (Vr * Vr) @ inv_all
        for li, lm in enumerate(lam):
            inv = self._inv(float(lm))
            coef = inv[:, None] * Q
            alpha = self.V @ coef
            fit = self.V @ ((self.s * inv)[:, None] * Q)
            out.train_error.append(classification_error(fit, labels))
            out.train_mse.append(float(np.mean((fit - Y) ** 2)))
            out.norm.append(float(np.sqrt(max(np.sum(self.s[:, None] * coef * coef), 0.0))))
            if KtV is not None:
                scores = KtV @ coef
                out.test_scores.append(scores if keep_alpha else None)
                if y_test is not None:
                    out.test_error.append(classification_error(scores, y_test))
            if loo:
                g = gdiag[:, li]
                with np.errstate(divide="ignore", invalid="ignore"):
                    f_loo = Y - alpha / g[:, None]
                ok = g > 0
                out.loo_error.append(float(np.mean(np.argmax(f_loo[ok], 1) != labels[ok])) if ok.any()
                                     else float("nan"))
            if keep_alpha:
                out.alphas.append(alpha)
        return out


@dataclass
class RidgePath:
    """Per-lambda results (lists aligned with ``lambdas``). Errors are classification errors
    (argmax over the columns of Y); ``norm`` is the RKHS norm sqrt(alpha^T K alpha)."""

    lambdas: np.ndarray
    train_error: list = field(default_factory=list)
    train_mse: list = field(default_factory=list)
    test_error: list = field(default_factory=list)
    loo_error: list = field(default_factory=list)
    norm: list = field(default_factory=list)
    alphas: list = field(default_factory=list)
    test_scores: list = field(default_factory=list)

    def best_by_loo(self) -> int:
        """Index of the lambda with the smallest leave-one-out error (ties: the larger lambda)."""
        if not self.loo_error:
            raise InputError("this path was computed with loo=False; no leave-one-out errors.")
        e = np.asarray(self.loo_error)
        best = np.nanmin(e)
        return int(np.flatnonzero(e == best)[-1])

    def to_records(self) -> list[dict]:
        rows = []
        for i, lm in enumerate(self.lambdas):
            r = {"lambda": float(lm), "train_error": self.train_error[i], "train_mse": self.train_mse[i],
                 "norm": self.norm[i]}
            if self.test_error:
                r["test_error"] = self.test_error[i]
            if self.loo_error:
                r["loo_error"] = self.loo_error[i]
            rows.append(r)
        return rows


def ridge_path(K, Y, lambdas, K_test=None, y_train=None, y_test=None, loo: bool = True,
               keep_alpha: bool = False, overwrite: bool = False) -> RidgePath:
    """One eigendecomposition of ``K``, then the whole lambda path (see the module docstring)."""
    return EigenRidge(K, overwrite=overwrite).path(Y, lambdas, K_test=K_test, y_train=y_train,
                                                   y_test=y_test, loo=loo, keep_alpha=keep_alpha)
