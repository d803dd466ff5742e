"""SGD on an over-parameterized linear least-squares problem converges to the minimum-norm solution.

Zhang et al. (2017, Section 5): for ``min_w sum_i (x_i . w - y_i)^2`` with d > n, every SGD update is a
multiple of some x_i, so started at w = 0 the iterate stays in the row space of X; the only
interpolating solution in the row space is the minimum-norm one ``w* = X^T (X X^T)^{-1} y``. Started at
``w0 != 0`` SGD converges to ``w* + (I - X^+ X) w0``: the null-space part of ``w0`` never moves, so the
distance to ``w*`` tends to ``||(I - X^+ X) w0||`` instead of 0.

``python -m kernelfit.linear`` (or ``kernelfit.linear.main(argv)``) runs both starts and prints JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import scipy.linalg

from .errors import InputError

__all__ = ["min_norm_solution", "sgd_least_squares", "null_space_component", "sgd_min_norm_demo",
           "main"]


def _check_xy(X, y):
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if X.ndim != 2:
        raise InputError(f"X must be a 2-D (n, d) array; got shape {X.shape}.")
    if y.shape != (X.shape[0],):
        raise InputError(f"y must have shape ({X.shape[0]},) to match X; got {y.shape}.")
    if not (np.all(np.isfinite(X)) and np.all(np.isfinite(y))):
        raise InputError("X or y contains NaN or inf.")
    return X, y


def min_norm_solution(X, y) -> np.ndarray:
    """``X^T (X X^T)^{-1} y`` (requires X of full row rank, i.e. d >= n and independent rows)."""
    X, y = _check_xy(X, y)
    n, d = X.shape
    if d < n:
        raise InputError(f"min_norm_solution needs an under-determined system (d >= n); got n = {n}, "
                         f"d = {d}. For d < n use the least-squares solution instead.")
    G = X @ X.T
    try:
        c = scipy.linalg.cho_factor(G)
    except np.linalg.LinAlgError as e:
        raise InputError("X X^T is singular (rows of X are linearly dependent); the interpolating "
                         "minimum-norm solution is not unique in this form. Use np.linalg.pinv(X) @ y.") from e
    return X.T @ scipy.linalg.cho_solve(c, y)


def null_space_component(X, w) -> np.ndarray:
    """``(I - X^+ X) w``: the part of w orthogonal to the row space of X."""
    X = np.asarray(X, dtype=np.float64)
    coef, *_ = np.linalg.lstsq(X.T, np.asarray(w, dtype=np.float64), rcond=None)
    return w - X.T @ coef


def sgd_least_squares(X, y, w0=None, lr: float | None = None, epochs: int = 500, seed: int = 0,
                      tol: float = 0.0) -> tuple[np.ndarray, list[dict]]:
    """Plain single-example SGD on ``0.5 (x_i . w - y_i)^2``, examples shuffled every epoch.

    ``lr`` defaults to ``1 / max_i ||x_i||^2`` (stable for every example). Returns ``(w, history)``;
    history has one record per epoch-checkpoint (epoch, train RMSE). Stops early when RMSE < tol.
    """
    X, y = _check_xy(X, y)
    n, d = X.shape
    w = np.zeros(d) if w0 is None else np.array(w0, dtype=np.float64, copy=True)
    if w.shape != (d,):
        raise InputError(f"w0 must have shape ({d},); got {w.shape}.")
    if lr is None:
        lr = 1.0 / float(np.max(np.einsum("ij,ij->i", X, X)))
    if not (lr > 0):
        raise InputError(f"lr must be > 0; got {lr}.")
    rng = np.random.default_rng(seed)
    history = []
    for epoch in range(1, int(epochs) + 1):
        for i in rng.permutation(n):
            xi = X[i]
            w -= lr * (xi @ w - y[i]) * xi
        if epoch == 1 or epoch % max(1, epochs // 20) == 0 or epoch == epochs:
            rmse = float(np.sqrt(np.mean((X @ w - y) ** 2)))
            history.append({"epoch": epoch, "train_rmse": rmse})
            if rmse < tol:
                break
    return w, history


def sgd_min_norm_demo(n: int = 50, d: int = 500, epochs: int = 500, seed: int = 0,
                      init_scale: float = 1.0) -> dict:
    """Gaussian X (n, d), y = random labels +-1; SGD from zero and from a random w0."""
    if d <= n:
        raise InputError(f"the demo needs an over-parameterized problem, d > n; got n = {n}, d = {d}.")
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d)) / np.sqrt(d)
    y = rng.choice([-1.0, 1.0], size=n)
    w_star = min_norm_solution(X, y)
    out = {"n": n, "d": d, "epochs": epochs, "seed": seed, "min_norm": float(np.linalg.norm(w_star))}
    for name, w0 in (("zero", None), ("random", init_scale * rng.standard_normal(d))):
        t = time.perf_counter()
        w, hist = sgd_least_squares(X, y, w0=w0, epochs=epochs, seed=seed + 1)
        rec = {
            "distance_to_min_norm": float(np.linalg.norm(w - w_star)),
            "relative_distance": float(np.linalg.norm(w - w_star) / np.linalg.norm(w_star)),
            "norm": float(np.linalg.norm(w)),
            "train_rmse": hist[-1]["train_rmse"],
            "seconds": round(time.perf_counter() - t, 3),
        }
        if w0 is not None:
            # What theory predicts SGD keeps: the null-space part of the start.
            rec["predicted_distance"] = float(np.linalg.norm(null_space_component(X, w0)))
        out[name] = rec
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kernelfit.linear", description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=50, help="examples (default 50)")
    ap.add_argument("--d", type=int, default=500, help="dimensions, must exceed n (default 500)")
    ap.add_argument("--epochs", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init-scale", type=float, default=1.0, help="std of the non-zero start")
    args = ap.parse_args(argv)
    res = sgd_min_norm_demo(args.n, args.d, args.epochs, args.seed, args.init_scale)
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
