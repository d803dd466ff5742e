"""Finite-sample expressivity (Zhang et al. 2017, Theorem 1).

"There exists a two-layer neural network with ReLU activations and 2n + d weights that can
represent any function on a sample of size n in d dimensions." The construction: pick w so that
the projections ``z_i = <w, x_i>`` are distinct, sort them, interleave biases
``b_1 < z_(1) < b_2 < z_(2) < ... < b_n < z_(n)``; the matrix ``A_ij = relu(z_(i) - b_j)`` is lower
triangular with a positive diagonal, so ``A a = y`` has a unique solution and
``c(x) = sum_j a_j relu(<w, x> - b_j)`` interpolates. With biases midway between consecutive
projections the triangular system is solved in O(n) through the slopes of the piecewise-linear
interpolant (``a_j`` = change of slope at ``b_j``), which is exact algebra and better conditioned
than a generic triangular solve.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from kernelfit.errors import InputError

__all__ = ["TwoLayerInterpolant", "build_interpolating_network", "verify_fit"]


class TwoLayerInterpolant(nn.Module):
    """``c(x) = sum_j a_j relu(<w, x> - b_j)``: parameters w (d), b (n), a (n) or (n, k)."""

    def __init__(self, w: torch.Tensor, b: torch.Tensor, a: torch.Tensor):
        super().__init__()
        self.w = nn.Parameter(w)
        self.b = nn.Parameter(b)
        self.a = nn.Parameter(a)

    @property
    def num_weights(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x.reshape(x.shape[0], -1).to(self.w.dtype) @ self.w
        return torch.relu(z[:, None] - self.b[None, :]) @ self.a

    def to_sequential(self) -> nn.Sequential:
        """The same function as Flatten -> Linear(d, n) -> ReLU -> Linear(n, k); shares no storage."""
        d, n = self.w.numel(), self.b.numel()
        k = 1 if self.a.dim() == 1 else self.a.shape[1]
        l1 = nn.Linear(d, n).to(self.w.dtype)
        l2 = nn.Linear(n, k, bias=False).to(self.w.dtype)
        with torch.no_grad():
            l1.weight.copy_(self.w.detach()[None, :].expand(n, d))
            l1.bias.copy_(-self.b.detach())
            l2.weight.copy_(self.a.detach().reshape(n, k).T)
        return nn.Sequential(nn.Flatten(), l1, nn.ReLU(), l2)


def build_interpolating_network(X, y, *, seed: int = 0) -> TwoLayerInterpolant:
    """The Theorem-1 network (float64) with ``2n + d`` weights fitting ``y`` on the n points ``X``.

    ``X``: (n, d) or (n, ...) array of distinct points. ``y``: (n,) real labels (class indices
    count as reals), or (n, k) targets (then ``a`` is (n, k), ``n k + n + d`` weights).
    ``seed`` draws w (Gaussian); distinct points have distinct projections with probability one.
    """
    X = torch.as_tensor(np.asarray(X), dtype=torch.float64)
    Y = torch.as_tensor(np.asarray(y), dtype=torch.float64)
    if X.dim() < 2 or X.shape[0] < 1:
        raise InputError(f"expected X of shape (n, d) with n >= 1, got {tuple(X.shape)}. Fix: X.reshape(n, -1).")
    X = X.reshape(X.shape[0], -1)
    n, d = X.shape
    if Y.shape[0] != n or Y.dim() > 2:
        raise InputError(f"expected y of shape ({n},) or ({n}, k), got {tuple(Y.shape)}.")
    if not (torch.isfinite(X).all() and torch.isfinite(Y).all()):
        raise InputError("X and y must be finite; found NaN or inf. Fix: clean the data first.")
    g = torch.Generator().manual_seed(int(seed))
    w = torch.randn(d, generator=g, dtype=torch.float64)
    z = X @ w
    order = torch.argsort(z)
    zs = z[order]
    gaps = zs[1:] - zs[:-1]
    if n > 1 and float(gaps.min()) <= 0:
        dup = int(torch.argmin(gaps))
        raise InputError(
            f"two points have the same projection (sorted positions {dup} and {dup + 1}): the points are not distinct "
            f"(or collide by chance). Fix: remove duplicate points, or try another seed."
        )
    Ys = Y[order]
    # biases: one below the first projection, then midway between consecutive projections
    first_gap = float(gaps.min()) if n > 1 else 1.0
    b = torch.empty(n, dtype=torch.float64)
    b[0] = zs[0] - first_gap / 2
    if n > 1:
        b[1:] = 0.5 * (zs[1:] + zs[:-1])
    # slopes s_j on [b_j, b_{j+1}]: f(z_1) = s_1 (z_1 - b_1);
    # f(z_{i+1}) = f(z_i) + s_i (b_{i+1} - z_i) + s_{i+1} (z_{i+1} - b_{i+1})
    s = torch.empty_like(Ys)
    s[0] = Ys[0] / (zs[0] - b[0])
    for i in range(n - 1):
        s[i + 1] = (Ys[i + 1] - Ys[i] - s[i] * (b[i + 1] - zs[i])) / (zs[i + 1] - b[i + 1])
    a = s.clone()
    a[1:] = s[1:] - s[:-1]
    return TwoLayerInterpolant(w, b, a)


@torch.no_grad()
def verify_fit(net: nn.Module, X, y) -> dict:
    """Max absolute and relative residual of ``net`` on (X, y), and whether rounding recovers labels."""
    X = torch.as_tensor(np.asarray(X), dtype=torch.float64)
    Y = torch.as_tensor(np.asarray(y), dtype=torch.float64)
    out = net(X.reshape(X.shape[0], -1)).double().reshape(Y.shape)
    err = (out - Y).abs()
    scale = float(Y.abs().max()) or 1.0
    res = dict(max_abs_residual=float(err.max()), max_rel_residual=float(err.max()) / scale,
               n=int(X.shape[0]), num_weights=sum(p.numel() for p in net.parameters()))
    if Y.dim() == 1:
        res["labels_recovered"] = bool(torch.equal(torch.round(out), Y))
    else:
        res["labels_recovered"] = bool(torch.equal(out.argmax(1), Y.argmax(1)))
    return res
