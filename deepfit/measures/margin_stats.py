"""Classification margins f_y(x) - max_{j != y} f_j(x) and the 5th-percentile margin the norm measures
are normalized by."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from kernelfit.errors import InputError


def check_xy(X, y):
    if not isinstance(X, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise InputError(
            f"expected torch tensors X and y, got {type(X).__name__} and {type(y).__name__}. Fix: torch.as_tensor(...)."
        )
    if y.dim() != 1 or X.shape[0] != y.shape[0]:
        raise InputError(
            f"expected X of shape (n, ...) and integer labels y of shape (n,), got X {tuple(X.shape)} and y {tuple(y.shape)}."
        )
    if X.shape[0] == 0:
        raise InputError("got an empty training set (n = 0). Fix: pass at least one sample.")


@torch.no_grad()
def _logits(model: nn.Module, X: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    was = model.training
    model.eval()
    try:
        return torch.cat([model(X[i:i + batch_size]) for i in range(0, X.shape[0], batch_size)])
    finally:
        model.train(was)


def margins(model: nn.Module, X: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Per-sample margins ``f_y(x) - max_{j != y} f_j(x)`` (eval mode)."""
    check_xy(X, y)
    out = _logits(model, X, batch_size)
    return margins_from_logits(out, y)


def margins_from_logits(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    y = y.long()
    if out.dim() != 2 or out.shape[1] < 2:
        raise InputError(f"expected logits of shape (n, k >= 2), got {tuple(out.shape)}.")
    if int(y.min()) < 0 or int(y.max()) >= out.shape[1]:
        raise InputError(f"labels must lie in [0, {out.shape[1] - 1}], found range [{int(y.min())}, {int(y.max())}].")
    true = out.gather(1, y[:, None]).squeeze(1)
    other = out.clone()
    other.scatter_(1, y[:, None], float("-inf"))
    return true - other.max(dim=1).values


def margin(model: nn.Module, X: torch.Tensor, y: torch.Tensor, percentile: float = 5.0, batch_size: int = 1024) -> float:
    """The ``percentile``-th percentile (numpy's linear interpolation) of the margins over (X, y)."""
    if not 0.0 <= percentile <= 100.0:
        raise InputError(f"percentile must lie in [0, 100], got {percentile!r}.")
    m = margins(model, X, y, batch_size).double().cpu().numpy()
    return float(np.percentile(m, percentile))
