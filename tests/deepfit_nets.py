"""Test networks and references shared by the deepfit measure tests (pool factors, measure graphs)."""

from __future__ import annotations

import torch
import torch.nn as nn


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def jacobian_norm(fn, x) -> float:
    """Largest singular value of the Jacobian of ``fn`` at ``x`` (dense, float64)."""
    jac = torch.autograd.functional.jacobian(fn, x)
    return float(torch.linalg.matrix_norm(jac.reshape(-1, x.numel()), ord=2))


def identity_around(pool: nn.Module, n_out: int) -> nn.Sequential:
    """float64 ``1x1 conv (weight 1, no bias) -> pool -> flatten -> identity Linear(n_out, n_out)``: the
    network's Lipschitz constant is the pool's own, so a measure's bound on it is checked directly."""
    conv = nn.Conv2d(1, 1, 1, bias=False).double()
    lin = nn.Linear(n_out, n_out, bias=False).double()
    with torch.no_grad():
        conv.weight.fill_(1.0)
        lin.weight.copy_(torch.eye(n_out, dtype=torch.float64))
    return nn.Sequential(conv, pool, nn.Flatten(), lin)
