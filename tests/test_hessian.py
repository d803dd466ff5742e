"""deepfit.hessian against torch.autograd.functional.hessian and closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from deepfit import hessian as Hs
from kernelfit.errors import InputError


def _gen(s):
    return torch.Generator().manual_seed(s)


def _problem(seed=0, n=40):
    g = _gen(seed)
    net = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    X = torch.randn(n, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return net, X, y


def _exact_hessian(net, X, y):
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for _, p in net.named_parameters()]
    sizes = [p.numel() for _, p in net.named_parameters()]
    w0 = torch.cat([p.detach().reshape(-1) for p in net.parameters()])

    def f(w):
        parts = torch.split(w, sizes)
        params = {k: v.reshape(s) for k, v, s in zip(names, parts, shapes)}
        return F.cross_entropy(functional_call(net, params, (X,)), y)

    return torch.autograd.functional.hessian(f, w0)


def test_matvec_matches_autograd_hessian_full_and_batched():
    net, X, y = _problem()
    Hx = _exact_hessian(net, X, y)
    v = torch.randn(Hx.shape[0], generator=_gen(1), dtype=torch.float64)
    for bs in (None, 7):
        H = Hs.HessianOperator(net, X, y, batch_size=bs)
        torch.testing.assert_close(H.matvec(v), Hx @ v, rtol=1e-10, atol=1e-12)
    assert H.loss() == pytest.approx(float(F.cross_entropy(net(X), y).detach()), rel=1e-12)


@pytest.mark.parametrize("method", ["lanczos"])
def test_top_eigenvalues_vs_eigvalsh(method):
    net, X, y = _problem()
    Hx = _exact_hessian(net, X, y)
    ev = torch.linalg.eigvalsh(Hx).numpy()[::-1]
    H = Hs.HessianOperator(net, X, y)
    top = Hs.top_eigenvalues(H, k=3, method=method, tol=1e-12, seed=0)
    np.testing.assert_allclose([t["value"] for t in top], ev[:3], rtol=1e-8)
    assert all(t["residual"] < 1e-6 for t in top)


def _quadratic(seed=2, n=30, d=6):
    g = _gen(seed)
    net = nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        net.weight.copy_(torch.randn(1, d, generator=g, dtype=torch.float64))
    X = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.3, 3.0, d, dtype=torch.float64)
    y = torch.randn(n, 1, generator=g, dtype=torch.float64)
    Hx = 2.0 / n * X.T @ X  # mean squared error: exact, constant Hessian
    return net, X, y, Hx


def test_power_iteration_with_deflation_on_psd_hessian():
    net, X, y, Hx = _quadratic()
    H = Hs.HessianOperator(net, X, y, loss="mse")
    ev = torch.linalg.eigvalsh(Hx).numpy()[::-1]
    top = Hs.top_eigenvalues(H, k=3, method="power", tol=1e-13, max_iter=5000, seed=0)
    np.testing.assert_allclose([t["value"] for t in top], ev[:3], rtol=1e-6)
    for t, lam in zip(top, ev[:3]):  # some eigenvalue lies within the residual
        assert abs(t["value"] - lam) <= t["residual"] + 1e-10


def test_trace_and_frobenius_estimates_cover_exact_values():
    net, X, y = _problem()
    Hx = _exact_hessian(net, X, y)
    H = Hs.HessianOperator(net, X, y)
    tr, se, n = Hs.hessian_trace(H, n_samples=400, seed=3)
    assert n == 400 and se > 0
    assert abs(tr - float(torch.trace(Hx))) < 4 * se
    fro, sef, nf = Hs.hessian_frobenius(H, n_samples=400, seed=4)
    assert abs(fro - float(torch.linalg.matrix_norm(Hx))) < 4 * sef
    # on a diagonal Hessian Rademacher probes are exact: z^T D z = tr D, ||D z|| = ||D||_F
    net_q, Xq, yq, _ = _quadratic()
    Xd = torch.eye(6, dtype=torch.float64) * torch.arange(1, 7, dtype=torch.float64)
    Hd = Hs.HessianOperator(net_q, Xd, torch.zeros(6, 1, dtype=torch.float64), loss="mse")
    tr_d, se_d, _ = Hs.hessian_trace(Hd, n_samples=5)
    assert tr_d == pytest.approx(2 / 6 * 91) and se_d == pytest.approx(0, abs=1e-12)


def test_basin_volume_random_directions_on_quadratic():
    net, X, y, Hx = _quadratic()
    # move to the minimiser so the loss rise along d is exactly r^2 d^T H d / 2
    with torch.no_grad():
        net.weight.copy_(torch.linalg.lstsq(X, y).solution.T)
    H = Hs.HessianOperator(net, X, y, loss="mse")
    delta = 0.05
    res = Hs.basin_volume_random_directions(H, n_directions=6, delta=delta, seed=5, bisection_steps=50)
    g = _gen(5)
    for r in res["radii"]:
        d = torch.randn(6, generator=g, dtype=torch.float64)
        d /= d.norm()
        assert r == pytest.approx(math.sqrt(2 * delta / float(d @ Hx @ d)), rel=1e-6)
    est, se, n = res["log_volume_lower_bound"]
    assert n == 6 and se > 0 and math.isfinite(est)
    # spectrum estimate of the same basin: the exact ellipsoid volume with all 6 eigenvalues
    ev = torch.linalg.eigvalsh(Hx).numpy()
    eigs = [dict(value=float(v), residual=0.0) for v in ev]
    spec = Hs.basin_volume_from_spectrum(eigs, delta=delta)
    exact = math.log(math.pi ** 3 / math.gamma(4)) + sum(0.5 * math.log(2 * delta / v) for v in ev)
    assert spec["log_volume"] == pytest.approx(exact, rel=1e-12)
    assert spec["log_volume"] >= est  # the Jensen bound is below the true log-volume


def test_bad_input():
    net, X, y = _problem()
    with pytest.raises(InputError, match="unknown loss"):
        Hs.HessianOperator(net, X, y, loss="hinge")
    H = Hs.HessianOperator(net, X, y)
    with pytest.raises(InputError, match="shape"):
        H.matvec(torch.zeros(3))
    with pytest.raises(InputError, match="k must"):
        Hs.top_eigenvalues(H, k=0)
