"""Path norms on any DAG of the supported layers: a forward pass with |W|^p on a non-negative input
sums every path product (max pools replaced by a sum over the window: an upper bound)."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernelfit.errors import InputError

from .graph import _ACTIVATION_NAMES, _BN_OPS, analyse_graph
from .layers import _BN_TYPES, _LINEAR_TYPES, _as_example, _set_submodule, fold_batchnorm

# Modules that are the identity or positively homogeneous and monotone on non-negative inputs,
# so a forward pass with |W| on a non-negative input sums path products exactly.
_PATH_SAFE = (nn.ReLU, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Identity, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
              nn.Sequential, nn.ModuleList, nn.MaxPool2d)


class _SumPool2d(nn.Module):
    """Sum over each max-pool window (zero padding): an upper bound for max-pool path sums."""

    def __init__(self, mp: nn.MaxPool2d):
        super().__init__()
        if mp.dilation not in (1, (1, 1)) or mp.return_indices:
            raise InputError("path norms support MaxPool2d with dilation 1 and return_indices=False only.")
        self.k, self.s, self.p, self.ceil = mp.kernel_size, mp.stride, mp.padding, mp.ceil_mode

    def forward(self, x):
        return F.avg_pool2d(x, self.k, self.s, self.p, self.ceil, count_include_pad=True, divisor_override=1)


def _adaptive_window_sizes(n_in: int, n_out: int) -> torch.Tensor:
    """Window lengths of adaptive pooling along one axis: [floor(i n/m), ceil((i+1) n/m))."""
    i = torch.arange(n_out)
    return (torch.div((i + 1) * n_in + n_out - 1, n_out, rounding_mode="floor")
            - torch.div(i * n_in, n_out, rounding_mode="floor"))


class _PoweredAvgPool(nn.Module):
    """An average pool whose edge weights ``c`` (1/window size or 1/divisor) are raised to the power p.

    Each output of an average pool is ``c * sum(window)`` with one weight ``c`` for all its edges, so
    the pool with weights ``c^p`` is ``pool(x) * c^(p - 1)``; ``c`` is read off by pooling ones.
    """

    def __init__(self, pool: nn.Module, p: int):
        super().__init__()
        self.pool, self.p = pool, p

    def _edge_weight(self, x: torch.Tensor) -> torch.Tensor:
        ones = torch.ones_like(x[:1])
        if isinstance(self.pool, nn.AvgPool2d):
            m = self.pool
            window_sum = F.avg_pool2d(ones, m.kernel_size, m.stride, m.padding, m.ceil_mode,
                                      count_include_pad=True, divisor_override=1)  # in-bounds taps
            return self.pool(ones) / window_sum
        h, w = x.shape[-2:]
        oh, ow = (
            (self.pool.output_size, self.pool.output_size) if isinstance(self.pool.output_size, int) else self.pool.output_size
        )
        oh, ow = oh or h, ow or w
        sizes = _adaptive_window_sizes(h, oh)[:, None] * _adaptive_window_sizes(w, ow)[None, :]
        return (1.0 / sizes.to(x)).expand_as(self.pool(ones))

    def forward(self, x):
        return self.pool(x) * self._edge_weight(x) ** (self.p - 1)


def _bn_affine(bn: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode batch norm as ``scale * x + shift`` per channel (InputError without running statistics)."""
    if bn.running_mean is None or bn.running_var is None:
        raise InputError(f"batch norm {name!r} has no running statistics (track_running_stats=False): it normalises "
                         "with each batch's statistics, so it is not a fixed map and has no norm. Fix: build it with "
                         "track_running_stats=True.")
    scale = torch.rsqrt(bn.running_var + bn.eps)
    shift = -bn.running_mean * scale
    if bn.weight is not None:
        scale, shift = scale * bn.weight, shift * bn.weight
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale.detach(), shift.detach()


class _PathAffine(nn.Module):
    """An unfolded batch norm for path sums: edge weights ``|scale|^p`` and a bias path ``|shift|^p`` per channel."""

    def __init__(self, bn: nn.Module, name: str, p: int):
        super().__init__()
        scale, shift = _bn_affine(bn, name)
        self.register_buffer("scale", scale.abs() ** p)
        self.register_buffer("shift", shift.abs() ** p)

    def forward(self, x):
        view = (1, -1) + (1,) * (x.dim() - 2)
        return x * self.scale.view(view) + self.shift.view(view)


@torch.no_grad()
def path_norm(model: nn.Module, example, p: int = 1, *, fold_bn: bool = True) -> tuple[float, bool]:
    """l_p path norm ``(sum_paths prod_edges |w_e|^p)^(1/p)``; returns ``(value, exact)``.

    Computed as one forward pass of the network with every edge weight replaced by ``|w|^p`` on an
    all-ones input (ReLU is the identity on non-negative values), summed over outputs: parameters
    are raised to the power p, and so are the ``1/window`` edges of average pools. Paths start at
    input units and at biases; the graph may branch (concatenation, addition). ``exact`` is False
    when max-pooling was replaced by sum-pooling (an upper bound).
    """
    if p not in (1, 2):
        raise InputError(f"path norm order p must be 1 or 2, got {p!r}.")
    for name, mod in model.named_modules():
        builtin = type(mod).__module__.startswith("torch.nn")
        if builtin and len(list(mod.children())) == 0 and not isinstance(mod, _PATH_SAFE + _LINEAR_TYPES + _BN_TYPES):
            raise InputError(
                f"path norms are defined here for Linear/Conv2d/ReLU/pooling/BatchNorm/Flatten/Dropout nets; module "
                f"{name!r} is a {type(mod).__name__}. Fix: measure a network without it."
            )
    net = fold_batchnorm(model, example) if fold_bn else copy.deepcopy(model).eval()
    graph = analyse_graph(net, example)
    for name, mod in list(net.named_modules()):   # batch norms that could not be folded: affine layers of their own
        if isinstance(mod, _BN_TYPES):
            _set_submodule(net, name, _PathAffine(mod, name, p))
    if graph.other_ops:
        raise InputError(
            f"path norms need a network of Linear/Conv2d layers, ReLU, pooling, reshapes, concatenation and addition; "
            f"this one also computes {', '.join(graph.other_ops)}. Fix: measure a network without those operations."
        )
    acts = sorted({e["op"] for e in graph.pool_lipschitz if e["op"] in _ACTIVATION_NAMES})
    if acts:
        raise InputError(f"path norms sum over the paths of a ReLU network (positively homogeneous activations); this "
                         f"one applies {', '.join(acts)}. The product measures (spectral, ...) include their Lipschitz "
                         "constants instead.")
    functional = [k for k in graph.functional_pools if p != 1 or k.startswith("MaxPool") or k in _BN_OPS]
    if functional:
        raise InputError(
            f"the network pools or normalises with functional calls ({', '.join(sorted(set(functional)))}) instead of "
            f"nn.MaxPool2d / nn.AvgPool2d / nn.AdaptiveAvgPool2d / nn.BatchNorm modules, so their path weights cannot be "
            f"set (max pools become sums, average-pool edges 1/k become (1/k)^p). Fix: use the modules."
        )
    exact = True
    for name, mod in list(net.named_modules()):
        if isinstance(mod, nn.MaxPool2d):
            _set_submodule(net, name, _SumPool2d(mod))
            exact = False
        elif isinstance(mod, (nn.AvgPool2d, nn.AdaptiveAvgPool2d)) and p != 1:
            _set_submodule(net, name, _PoweredAvgPool(mod, p))
    for prm in net.parameters():
        prm.copy_(prm.abs() ** p)
    x = torch.ones_like(_as_example(net, example))
    out = net(x)
    total = float(out.double().sum())
    return total ** (1.0 / p), exact
