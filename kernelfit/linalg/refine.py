"""Mixed-precision iterative refinement.

Factor in low precision (float32), then repeat: r = Y - K X in float64, X += solve_low(r). Each step
contracts the error by about cond(K) * eps32, so for a well-conditioned K a few steps reach the
accuracy of a float64 solve at float32 factorization cost and memory. The iteration stops at the
tolerance, when a step no longer halves the residual (it has reached the level the float64 residual
can resolve, or cond(K) is too large for the low-precision factor), or at ``max_iter``; the result
says which, and whether the final backward error is at float64 level.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

EPS64 = np.finfo(np.float64).eps


@dataclass
class RefinementReport:
    iterations: int = 0
    relative_residuals: list = field(default_factory=list)   # ||Y - K X||_F / ||Y||_F before each step
    backward_error: float = float("nan")                     # ||r||_inf / (||K||_inf ||X||_inf + ||Y||_inf)
    float64_level: bool = False
    stop_reason: str = ""

    def to_dict(self) -> dict:
        return {
            "iterations": self.iterations,
            "relative_residuals": [float(v) for v in self.relative_residuals],
            "backward_error": float(self.backward_error),
            "float64_level": bool(self.float64_level),
            "stop_reason": self.stop_reason,
        }


def float64_level_threshold(n: int) -> float:
    """Backward error a float64 solve typically attains (a few sqrt(n) ulps)."""
    return max(1e-13, 8.0 * np.sqrt(n) * EPS64)


def backward_error(R, X, Y, K_inf_norm) -> float:
    r = np.max(np.abs(R)) if R.size else 0.0
    denom = K_inf_norm * np.max(np.abs(X)) + np.max(np.abs(Y))
    return float(r / denom) if denom > 0 else float(r)


def refine(solve_low, apply_high, Y, K_inf_norm, X0=None, max_iter: int = 10, tol: float | None = None,
           stagnation: float = 0.5):
    """Refine X for K X = Y.

    solve_low(R) -> approximate K^{-1} R (any dtype; accumulated in float64).
    apply_high(X) -> K X in float64.
    K_inf_norm: ||K||_inf, or a callable giving it after the first apply_high call.
    Returns (X, residual R = Y - K X of the returned X, report).
    """
    Y = np.asarray(Y, dtype=np.float64)
    n = Y.shape[0]
    X = np.asarray(solve_low(Y), dtype=np.float64) if X0 is None else np.array(X0, dtype=np.float64)
    y_norm = np.linalg.norm(Y) or 1.0
    report = RefinementReport()
    threshold = float64_level_threshold(n)
    best = None
    while True:
        R = Y - apply_high(X)
        rel = float(np.linalg.norm(R) / y_norm)
        report.relative_residuals.append(rel)
        k_inf = K_inf_norm() if callable(K_inf_norm) else float(K_inf_norm)
        report.backward_error = backward_error(R, X, Y, k_inf)
        if best is None or rel < best[0]:
            best = (rel, X.copy(), R, report.backward_error)
        if not np.isfinite(rel):
            report.stop_reason = "residual is not finite"
            break
        if tol is not None and rel <= tol:
            report.stop_reason = f"relative residual {rel:.3g} <= tol {tol:.3g}"
            break
        if report.backward_error <= EPS64:
            report.stop_reason = "backward error at unit roundoff"
            break
        prev = report.relative_residuals[-2] if len(report.relative_residuals) > 1 else None
        if prev is not None and rel > stagnation * prev:
            report.stop_reason = f"stopped improving (residual {prev:.3g} -> {rel:.3g})"
            break
        if report.iterations >= max_iter:
            report.stop_reason = f"reached max_refine = {max_iter}"
            break
        X = X + np.asarray(solve_low(R), dtype=np.float64)
        report.iterations += 1
    rel, X, R, report.backward_error = best
    report.float64_level = report.backward_error <= threshold
    return X, R, report
