"""Hessian of the training loss: top eigenvalues, trace, Frobenius norm and basin volume.

Wu, Zhu and E, "Towards understanding generalization of deep learning: perspective of loss
landscapes" relate generalization to the Hessian's size (Frobenius norm) and the volume of the
basin around the minimum. Everything here is matrix-free: Hessian-vector products by double
back-propagation, on one batch or accumulated over the whole training set
(``H = sum_b (n_b / n) H_b`` for a mean loss).

Every stochastic estimate returns ``(estimate, stderr, n_samples)`` and takes a seed;
eigenvalues come with their residual norm ``||H v - lambda v||`` (for a symmetric matrix some
eigenvalue lies within that distance of the Ritz value).
"""

from __future__ import annotations

import copy
import math
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from kernelfit.errors import InputError

__all__ = ["HessianOperator", "top_eigenvalues", "hessian_trace", "hessian_frobenius",
           "basin_volume_from_spectrum", "basin_volume_random_directions"]

_LOSSES = {
    "cross_entropy": lambda out, y: F.cross_entropy(out, y.long(), reduction="sum"),
    "mse": lambda out, y: ((out - y.to(out.dtype)) ** 2).sum(),
}


class HessianOperator:
    """Matrix-free Hessian of the mean loss of ``model`` over (X, y) w.r.t. all its parameters.

    ``batch_size=None`` uses the whole set in one batch; otherwise the loss and its Hessian are
    accumulated over consecutive batches (the whole training set), which is exact, not a sample.
    The Hessian is taken at the weights the model has now, in eval mode (batch norm uses its
    running statistics, dropout is off), on a private copy: the caller's model keeps its mode,
    weights and ``requires_grad`` flags, so it can go on training.
    """

    def __init__(self, model: nn.Module, X: torch.Tensor, y: torch.Tensor, *, loss: str | Callable = "cross_entropy",
                 batch_size: int | None = None):
        if X.shape[0] != y.shape[0] or X.shape[0] == 0:
            raise InputError(
                f"expected X (n, ...) and y (n, ...) with the same n >= 1, got {tuple(X.shape)} and {tuple(y.shape)}."
            )
        if isinstance(loss, str):
            if loss not in _LOSSES:
                raise InputError(f"unknown loss {loss!r}; expected one of {list(_LOSSES)} or a callable (out, y) -> summed loss.")
            loss = _LOSSES[loss]
        model = copy.deepcopy(model).eval()
        self.model = model
        self.X, self.y, self.loss_fn = X, y, loss
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.shapes = [p.shape for n, p in model.named_parameters() if p.requires_grad]
        self.numels = [int(np.prod(s)) for s in self.shapes]
        self.dim = int(sum(self.numels))
        p0 = next(model.parameters())
        self.dtype, self.device = p0.dtype, p0.device
        self.w0 = torch.cat([p.detach().reshape(-1) for n, p in model.named_parameters() if p.requires_grad])
        n = X.shape[0]
        bs = n if batch_size is None else int(batch_size)
        if bs < 1:
            raise InputError(f"batch_size must be a positive integer or None, got {batch_size!r}.")
        self.batches = [(X[i:i + bs], y[i:i + bs]) for i in range(0, n, bs)]
        self.n = n
        self.n_matvecs = 0

    def _unflatten(self, flat: torch.Tensor) -> dict:
        parts = torch.split(flat, self.numels)
        return {k: v.reshape(s) for k, v, s in zip(self.names, parts, self.shapes)}

    def loss(self, flat: torch.Tensor | None = None) -> float:
        """Mean loss at the flat parameter vector ``flat`` (default: the model's own weights)."""
        flat = self.w0 if flat is None else flat
        params = self._unflatten(flat)
        with torch.no_grad():
            return float(sum(self.loss_fn(functional_call(self.model, params, (xb,)), yb) for xb, yb in self.batches) / self.n)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``H v`` at the model's weights, ``v`` a flat vector of length :attr:`dim`."""
        if v.shape != (self.dim,):
            raise InputError(f"expected a vector of shape ({self.dim},), got {tuple(v.shape)}.")
        v = v.to(device=self.device, dtype=self.dtype)
        out = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        for xb, yb in self.batches:
            w = self.w0.clone().requires_grad_(True)
            L = self.loss_fn(functional_call(self.model, self._unflatten(w), (xb,)), yb) / self.n
            (g,) = torch.autograd.grad(L, w, create_graph=True)
            (hv,) = torch.autograd.grad(g @ v, w)
            out += hv.detach()
        self.n_matvecs += 1
        return out


def top_eigenvalues(H: HessianOperator, k: int = 5, *, method: str = "lanczos", tol: float = 1e-6,
                    max_iter: int = 1000, seed: int = 0) -> list[dict]:
    """The ``k`` largest (algebraic) Hessian eigenvalues, each with its residual norm.

    ``method="lanczos"``: ARPACK's implicitly restarted Lanczos (``scipy.sparse.linalg.eigsh``,
    which="LA") on Hessian-vector products, start vector from ``seed``. ``method="power"``: power
    iteration with deflation (``H - sum_j lambda_j u_j u_j^T``); it finds eigenvalues of largest
    *magnitude* of the deflated operator, so a large negative eigenvalue can appear.
    Returns ``[{"value", "residual", "matvecs"}]`` sorted by value, largest first.
    """
    if not 1 <= k < H.dim:
        raise InputError(f"k must satisfy 1 <= k < number of parameters ({H.dim}), got {k!r}.")
    if method not in ("lanczos", "power"):
        raise InputError(f"method must be 'lanczos' or 'power', got {method!r}.")
    rng = np.random.default_rng(seed)
    start = H.n_matvecs
    if method == "lanczos":
        from scipy.sparse.linalg import LinearOperator, eigsh

        op = LinearOperator(
            (H.dim, H.dim),
            matvec=lambda x: H.matvec(torch.as_tensor(np.asarray(x).reshape(-1))).double().cpu().numpy(),
            dtype=np.float64,
        )
        ncv = min(H.dim - 1, max(2 * k + 1, 20))  # a wider Krylov space: fewer restarts, fewer HVPs
        vals, vecs = eigsh(op, k=k, which="LA", tol=tol, maxiter=max_iter, ncv=ncv, v0=rng.standard_normal(H.dim))
        order = np.argsort(vals)[::-1]
        vals, vecs = vals[order], vecs[:, order]
    else:
        vals, vecs_l = [], []
        for _ in range(k):
            v = torch.as_tensor(rng.standard_normal(H.dim), dtype=torch.float64)
            v /= v.norm()
            lam_old = 0.0
            for _ in range(max_iter):
                hv = H.matvec(v).double().cpu()
                for lj, uj in zip(vals, vecs_l):
                    hv -= lj * (uj @ v) * uj
                lam = float(v @ hv)
                nrm = float(hv.norm())
                if nrm == 0:
                    break
                v = hv / nrm
                if abs(lam - lam_old) <= tol * max(abs(lam), 1e-30):
                    break
                lam_old = lam
            vals.append(lam)
            vecs_l.append(v)
        vals = np.asarray(vals)
        vecs = torch.stack(vecs_l, 1).numpy()
        order = np.argsort(vals)[::-1]
        vals, vecs = vals[order], vecs[:, order]
    out = []
    used = H.n_matvecs - start
    for lam, u in zip(vals, vecs.T):
        u = torch.as_tensor(u)
        r = float((H.matvec(u).double().cpu() - float(lam) * u).norm() / u.norm())
        out.append(dict(value=float(lam), residual=r, matvecs=used))
    return out


def _rademacher(dim, gen, dtype, device):
    return (torch.randint(0, 2, (dim,), generator=gen) * 2 - 1).to(device=device, dtype=dtype)


def _mean_se(xs):
    a = np.asarray(xs, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1) / math.sqrt(len(a))), len(a)


def _rademacher_samples(H, n_samples: int, seed: int, statistic) -> list[float]:
    """statistic(z) for n_samples Rademacher vectors z drawn from a generator seeded with ``seed``."""
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    return [statistic(_rademacher(H.dim, g, H.dtype, H.device)) for _ in range(n_samples)]


def hessian_trace(H: HessianOperator, n_samples: int = 50, *, seed: int = 0) -> tuple[float, float, int]:
    """Hutchinson's estimate ``E[z^T H z]`` (z Rademacher) of ``tr H``: (estimate, stderr, n)."""
    if n_samples < 2:
        raise InputError(f"n_samples must be >= 2 to estimate a standard error, got {n_samples!r}.")
    return _mean_se(_rademacher_samples(H, n_samples, seed, lambda z: float(z @ H.matvec(z))))


def hessian_frobenius(H: HessianOperator, n_samples: int = 50, *, seed: int = 0) -> tuple[float, float, int]:
    """``||H||_F`` from ``E||H z||^2 = tr(H^T H)`` (z Rademacher): (estimate, stderr, n).

    The stderr of the square root comes from the delta method, ``se(F^2) / (2 F)``.
    """
    if n_samples < 2:
        raise InputError(f"n_samples must be >= 2 to estimate a standard error, got {n_samples!r}.")
    m2, se2, n = _mean_se(_rademacher_samples(H, n_samples, seed,
                                              lambda z: float(H.matvec(z).double().pow(2).sum())))
    f = math.sqrt(max(m2, 0.0))
    return f, (se2 / (2 * f) if f > 0 else float("inf")), n


def _log_unit_ball_volume(p: int) -> float:
    return 0.5 * p * math.log(math.pi) - math.lgamma(0.5 * p + 1)


def basin_volume_from_spectrum(eigs: Sequence[dict], delta: float = 0.1) -> dict:
    """Log-volume of the quadratic basin ``{nu : nu^T H nu / 2 <= delta}`` in the top-k eigenspace.

    The set is an ellipsoid with semi-axes ``sqrt(2 delta / lambda_i)``; its log-volume is
    ``log V_k + sum_i log sqrt(2 delta / lambda_i)`` over the k positive top eigenvalues (flatter
    directions are left out, as they make the volume unbounded in the quadratic model). The stderr
    propagates each eigenvalue's residual bound to first order: ``sum residual_i / (2 lambda_i)``.
    """
    if delta <= 0:
        raise InputError(f"delta must be > 0, got {delta!r}.")
    pos = [e for e in eigs if e["value"] > 0]
    if not pos:
        return dict(log_volume=float("nan"), stderr=float("nan"), k=0, delta=delta)
    k = len(pos)
    lv = _log_unit_ball_volume(k) + sum(0.5 * math.log(2 * delta / e["value"]) for e in pos)
    se = sum(e["residual"] / (2 * e["value"]) for e in pos)
    return dict(log_volume=lv, stderr=se, k=k, delta=delta)


def basin_volume_random_directions(H: HessianOperator, n_directions: int = 20, *, delta: float = 0.1, seed: int = 0,
                                   r_max: float = 100.0, bisection_steps: int = 30) -> dict:
    """Basin size along random directions: the radius where the loss first rises by ``delta``.

    For each random unit direction d (Gaussian, normalised; seeded), the radius
    ``r(d) = min{r : L(w + r d) - L(w) >= delta}`` is bracketed by doubling from ``r_max / 2^20``
    and refined by bisection (``r_max`` if never reached). The star-shaped basin's log-volume
    ``log V_p + log E[r^p]`` (p = number of parameters) is bounded below by
    ``log V_p + p E[log r]`` (Jensen); that lower bound is returned with its stderr
    ``p * se(log r)``, along with the mean radius (estimate, stderr, n).
    """
    if n_directions < 2:
        raise InputError(f"n_directions must be >= 2 to estimate a standard error, got {n_directions!r}.")
    if delta <= 0 or r_max <= 0:
        raise InputError(f"delta and r_max must be > 0, got delta={delta!r}, r_max={r_max!r}.")
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    L0 = H.loss()
    radii = []
    for _ in range(n_directions):
        d = torch.randn(H.dim, generator=g, dtype=torch.float64)
        d = (d / d.norm()).to(device=H.device, dtype=H.dtype)

        def rise(r, d=d):
            return H.loss(H.w0 + r * d) - L0

        lo, hi = 0.0, r_max / 2 ** 20
        while hi < r_max and rise(hi) < delta:
            lo, hi = hi, hi * 2
        if hi >= r_max:
            hi = r_max
            if rise(hi) < delta:
                radii.append(r_max)
                continue
        for _ in range(bisection_steps):
            mid = 0.5 * (lo + hi)
            if rise(mid) >= delta:
                hi = mid
            else:
                lo = mid
        radii.append(0.5 * (lo + hi))
    r = np.asarray(radii)
    p = H.dim
    mlog, selog, n = _mean_se(np.log(r))
    return dict(mean_radius=_mean_se(r), log_volume_lower_bound=(_log_unit_ball_volume(p) + p * mlog, p * selog, n),
                radii=r.tolist(), delta=delta, n_parameters=p, capped=int((r >= r_max).sum()))
