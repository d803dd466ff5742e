"""Sharpness (projected ascent on the loss within a relative box) and PAC-Bayes sweeps (Gaussian
weight noise, its KL term, the noise level at a target loss increase)."""

from __future__ import annotations

import copy
import math
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from kernelfit.errors import InputError

from .layers import fold_batchnorm
from .margin_stats import check_xy

SHARPNESS_STEPS = 10  # the one default number of projected-ascent steps (sharpness() and MeasureOptions)


def cross_entropy_loss(model: nn.Module, params: dict, X: torch.Tensor, y: torch.Tensor, batch_size: int = 2048,
                       create_graph: bool = False) -> torch.Tensor:
    """Mean cross-entropy of ``functional_call(model, params)`` over (X, y), in batches."""
    n = X.shape[0]
    total = 0.0
    for i in range(0, n, batch_size):
        out = functional_call(model, params, (X[i:i + batch_size],))
        total = total + F.cross_entropy(out, y[i:i + batch_size].long(), reduction="sum")
    return total / n


def _params(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def sharpness(model: nn.Module, X: torch.Tensor, y: torch.Tensor, *, eps: float = 5e-4, steps: int = SHARPNESS_STEPS,
              step_frac: float = 0.25, seed: int = 0, batch_size: int = 2048, fold_bn: bool = False) -> dict:
    """Max sharpness in the box ``|nu_i| <= eps (|w_i| + 1)`` by projected gradient *ascent*.

    Starting from a uniform random point in the box (seeded), each step moves every coordinate by
    ``step_frac`` of its box half-width in the direction of the sign of the gradient of the loss
    (increasing it) and clips back into the box. Returns ``value = (max_loss - loss) / (1 + loss)``
    with the loss (mean cross-entropy over X, y), the largest loss found, and ``max_box_violation``
    (<= 0 means the perturbation stayed in the box). The box is around the model's own parameters;
    ``fold_bn=True`` takes it around the batch-norm-folded parameters instead.
    """
    check_xy(X, y)
    if eps <= 0 or steps < 1:
        raise InputError(f"need eps > 0 and steps >= 1, got eps={eps!r}, steps={steps!r}.")
    net = fold_batchnorm(model, X[:1]) if fold_bn else copy.deepcopy(model)
    net.eval()
    w = _params(net)
    bound = {k: eps * (v.abs() + 1) for k, v in w.items()}
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    nu = {k: ((torch.rand(v.shape, generator=g, dtype=torch.float64) * 2 - 1).to(v) * bound[k]) for k, v in w.items()}
    with torch.no_grad():
        loss0 = float(cross_entropy_loss(net, w, X, y, batch_size))
    best = -math.inf
    best_nu = None
    history = []
    for _ in range(steps):
        pert = {k: (w[k] + nu[k]).requires_grad_(True) for k in w}
        L = cross_entropy_loss(net, pert, X, y, batch_size)
        grads = torch.autograd.grad(L, list(pert.values()))
        Lf = float(L.detach())
        history.append(Lf)
        if Lf > best:
            best, best_nu = Lf, {k: v.clone() for k, v in nu.items()}
        with torch.no_grad():
            for (k, gr) in zip(pert.keys(), grads):
                nu[k] = torch.clamp(nu[k] + step_frac * bound[k] * torch.sign(gr), -bound[k], bound[k])
    with torch.no_grad():
        Lf = float(cross_entropy_loss(net, {k: w[k] + nu[k] for k in w}, X, y, batch_size))
    history.append(Lf)
    if Lf > best:
        best, best_nu = Lf, nu
    violation = max(float((best_nu[k].abs() - bound[k]).max()) for k in w)
    return dict(value=(best - loss0) / (1.0 + loss0), loss=loss0, max_loss=best, eps=eps, steps=steps,
                loss_history=history, max_box_violation=violation)


def _t_interval(d: np.ndarray, level: float = 0.95) -> list[float]:
    """Two-sided Student-t interval for the mean of the samples d (n - 1 degrees of freedom)."""
    from scipy.stats import t as student_t
    n = len(d)
    half = float(student_t.ppf(0.5 + level / 2, n - 1)) * float(d.std(ddof=1)) / math.sqrt(n)
    return [float(d.mean()) - half, float(d.mean()) + half]


def pac_bayes_noise(params: dict, alpha: float, generator: torch.Generator) -> dict:
    """Gaussian noise with per-parameter standard deviation ``sigma_i = alpha (10 |w_i| + 1)``.

    Draws ``N(0, 1)`` and multiplies by sigma (not sigma^2).
    """
    if alpha < 0:
        raise InputError(f"alpha must be >= 0, got {alpha!r}.")
    out = {}
    for k, w in params.items():
        sigma = alpha * (10 * w.abs() + 1)
        z = torch.randn(w.shape, generator=generator, dtype=torch.float64).to(w)
        out[k] = z * sigma
    return out


def pac_bayes_kl(params: dict, alpha: float) -> float:
    """KL between posterior N(w, diag sigma^2) and prior N(0, diag sigma^2): sum w_i^2 / (2 sigma_i^2)."""
    if alpha <= 0:
        return float("inf")
    return float(sum(((w.double() ** 2) / (2 * (alpha * (10 * w.double().abs() + 1)) ** 2)).sum() for w in params.values()))


def pac_bayes_sweep(model: nn.Module, X: torch.Tensor, y: torch.Tensor, alphas: Sequence[float], *,
                    n_samples: int = 10, seed: int = 0, batch_size: int = 2048, fold_bn: bool = False,
                    delta: float = 0.05) -> list[dict]:
    """Expected sharpness ``E_nu[L(w + nu)] - L(w)`` vs the KL term for each alpha (Neyshabur Fig. 2).

    Each entry: ``alpha, kl, expected_sharpness=(estimate, stderr, n_samples)``, ``loss`` and
    ``bound_term = sqrt((KL + ln(2m/delta)) / (2(m-1)))`` (McAllester's PAC-Bayes term, m = n), and
    ``expected_sharpness_ci95``: the 95% Student-t interval of the mean (n_samples - 1 degrees of
    freedom; with 5 samples +-2.78 stderr, where +-2 stderr would cover about 88%). The noise is
    added to the model's own parameters (``fold_bn=True``: to the batch-norm-folded ones).
    """
    check_xy(X, y)
    if n_samples < 2:
        raise InputError(f"n_samples must be >= 2 to estimate a standard error, got {n_samples!r}.")
    net = fold_batchnorm(model, X[:1]) if fold_bn else copy.deepcopy(model)
    net.eval()
    w = _params(net)
    m = X.shape[0]
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    with torch.no_grad():
        loss0 = float(cross_entropy_loss(net, w, X, y, batch_size))
        rows = []
        for a in alphas:
            diffs = []
            for _ in range(n_samples):
                nu = pac_bayes_noise(w, float(a), g)
                diffs.append(float(cross_entropy_loss(net, {k: w[k] + nu[k] for k in w}, X, y, batch_size)) - loss0)
            d = np.asarray(diffs)
            kl = pac_bayes_kl(w, float(a))
            rows.append(dict(alpha=float(a), kl=kl, loss=loss0,
                             expected_sharpness=(float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d))), len(d)),
                             expected_sharpness_ci95=_t_interval(d),
                             bound_term=math.sqrt((kl + math.log(2 * m / delta)) / (2 * max(m - 1, 1)))))
    return rows


def pac_bayes_at_sharpness(rows: list[dict], target: float = 0.1) -> dict:
    """The KL term at which the expected sharpness reaches ``target`` (Neyshabur et al.'s read-off).

    The sweep is sorted by alpha; where the expected sharpness crosses ``target`` between two
    consecutive alphas, ``log KL`` is interpolated linearly in expected sharpness
    (``bracketed=True``). Otherwise the entry with the largest alpha whose expected sharpness is
    <= ``target`` is returned (``bracketed=False``; its KL is then an upper bound of the read-off),
    or NaNs when no alpha qualifies.
    """
    rows = sorted(rows, key=lambda r: r["alpha"])
    ok = [i for i, r in enumerate(rows) if r["expected_sharpness"][0] <= target]
    if not ok:
        return dict(alpha=float("nan"), kl=float("nan"), expected_sharpness=(float("nan"), float("nan"), 0),
                    target=target, bracketed=False)
    i = max(ok)
    if i + 1 < len(rows) and 0 < rows[i]["kl"] < math.inf and rows[i + 1]["kl"] > 0:
        lo, hi = rows[i], rows[i + 1]
        s0, s1 = lo["expected_sharpness"][0], hi["expected_sharpness"][0]
        t = (target - s0) / (s1 - s0) if s1 > s0 else 0.0
        kl = math.exp(math.log(lo["kl"]) + t * (math.log(hi["kl"]) - math.log(lo["kl"])))
        alpha = math.exp(math.log(lo["alpha"]) + t * (math.log(hi["alpha"]) - math.log(lo["alpha"])))
        return dict(alpha=alpha, kl=kl, expected_sharpness=(target, float("nan"), 0), target=target, bracketed=True,
                    between_alphas=(lo["alpha"], hi["alpha"]))
    return dict(rows[i], target=target, bracketed=False)
