"""Norm, margin, sharpness and PAC-Bayes complexity measures for trained networks.

The measures follow Neyshabur, Bhojanapalli, McAllester and Srebro, "Exploring generalization in
deep learning" (NeurIPS 2017), with the spectral bounds of Bartlett, Foster and Telgarsky (2017)
and Neyshabur, Bhojanapalli and Srebro (ICLR 2018). They work on any ``nn.Module`` built from
``Linear``, ``Conv2d``, ``ReLU`` (module or ``torch.relu``), ``MaxPool2d``/``AvgPool2d``/
``AdaptiveAvgPool2d``, ``BatchNorm1d/2d`` (folded when directly after a Linear/Conv2d, else an affine
layer of its own), LeakyReLU/ELU/Tanh/GELU/Sigmoid/Softplus (product measures), ``Flatten``, ``Unflatten``,
``Dropout`` and ``Identity``; path norms in any wiring where branches are concatenated or added,
per-layer products on chains of layers (see Conventions).

Conventions
-----------
* Batch norm is folded into the preceding Linear/Conv2d (eval-mode statistics) before the norms are
  measured (:func:`fold_batchnorm`); one that cannot be folded is an affine layer with operator norm
  ``max |gamma / sqrt(var + eps)|``. Sharpness and PAC-Bayes perturb the model's own parameters.
  Every measure works on a copy in eval mode; the caller's model
  keeps its mode, weights and ``requires_grad`` flags.
* Every norm measure is a per-layer statistic folded by an operator (product or sum), registered
  in :data:`MEASURES` as ``name -> Measure(function, paper, description, kind, power, convention)``.
  Each is reported three ways: ``value`` (the norm itself), ``normalized = value / margin`` and
  ``capacity = normalized ** power``, the quantity the paper plots: ``gamma^-2 prod ||W_i||_F^2``
  and the like for Neyshabur et al. 2017/2018 (power 2), ``R_A / gamma`` for Bartlett et al.
  (power 1). ``margin`` is the 5th percentile of ``f_y(x) - max_{j != y} f_j(x)`` over the
  training set (:func:`margin`). Architecture-only constants (``4^d``, widths ``h_i``, log factors,
  input norm) are left out: they cancel in every comparison between networks of one architecture
  (true vs random labels, growing training sets).
* Product measures (``kind="product"``) are defined for a *chain* of layers: each Linear/Conv2d
  fed by the one before through ReLU, pooling and reshapes. :func:`analyse_graph` checks this on
  the autograd graph of one forward pass; on branched networks (concatenation, residual addition,
  shared layers) or with other operations between layers (e.g. LocalResponseNorm) the product over
  all layers is neither the paper's quantity nor a bound, so those measures are not computed and
  the reason is returned. Pools can enlarge distances: an overlapping max pool has Lipschitz
  constant ``sqrt(max number of windows covering one input)`` (2 for 3x3 windows of stride 2), an
  average pool its operator norm, which exceeds 1 for an adaptive pool that upsamples or a divisor
  below the window size (``count_include_pad=False``, ``divisor_override``). The spectral measures
  multiply by each pool's constant (Bartlett et al.'s ``rho_i``), so they stay Lipschitz bounds. A
  discontinuous activation (``nn.Threshold`` with value != threshold, ``nn.Hardshrink``) has no
  Lipschitz constant: the product measures are refused with the module named.
* Path norms (``kind="path"``) count every path from an input unit or a bias (a constant-1 unit)
  to an output unit through the dense operator each layer applies, on any DAG of the supported
  layers. Average pools are edges of weight ``1/window``, raised to the power p like every other
  edge. A max-pool forwards one input per window, chosen by the data; the path norm here replaces
  it by a *sum* over its window and so is an upper bound (``exact=False`` is recorded).
* Per-layer norms of a conv layer: Frobenius norm of its kernel (as in the papers' code);
  spectral norm = the true operator norm of the convolution on the input shape it actually
  receives (power iteration with ``conv2d`` / ``conv_transpose2d``), not the norm of the reshaped
  kernel; the (2,1) norm of Bartlett et al. is computed on the dense operator too.
* Stochastic estimates return ``(estimate, stderr, n_samples)``; every random choice takes a seed
  and uses its own ``torch.Generator``; nothing is seeded globally.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from kernelfit.errors import InputError

__all__ = [
    "LayerInfo",
    "Measure",
    "MEASURES",
    "PATH_MEASURES",
    "PRODUCT_MEASURES",
    "GraphInfo",
    "analyse_graph",
    "trace_layers",
    "fold_batchnorm",
    "margins",
    "margin",
    "conv_operator_norm",
    "layer_statistics",
    "path_norm",
    "compute_norm_measures",
    "sharpness",
    "pac_bayes_noise",
    "pac_bayes_sweep",
    "pac_bayes_at_sharpness",
    "cross_entropy_loss",
]

_LINEAR_TYPES = (nn.Linear, nn.Conv2d)
SHARPNESS_STEPS = 10  # the one default number of projected-ascent steps (sharpness() and MeasureOptions)
_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)
# Modules that are the identity or positively homogeneous and monotone on non-negative inputs,
# so a forward pass with |W| on a non-negative input sums path products exactly.
_PATH_SAFE = (nn.ReLU, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Identity, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
              nn.Sequential, nn.ModuleList, nn.MaxPool2d)


# --------------------------------------------------------------------------------------------
# Tracing and batch-norm folding
# --------------------------------------------------------------------------------------------

@dataclass
class LayerInfo:
    """One Linear/Conv2d layer in execution order with the shapes it saw (batch dim dropped)."""

    name: str
    module: nn.Module
    kind: str  # "linear" or "conv"
    input_shape: tuple
    output_shape: tuple


def _as_example(model: nn.Module, example) -> torch.Tensor:
    if isinstance(example, torch.Tensor):
        x = example
    else:
        try:
            shape = tuple(int(s) for s in example)
        except TypeError:
            raise InputError(
                f"expected an example input tensor (N, ...) or an input shape tuple, got {type(example).__name__}. "
                "Fix: pass X[:1] or the per-sample shape such as (1, 28, 28)."
            ) from None
        x = torch.zeros((1,) + shape)
    p = next(iter(model.parameters()), None)
    if p is not None:
        x = x.to(device=p.device, dtype=p.dtype)
    return x[:1] if x.shape[0] > 1 else x


def _leaf_modules(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if len(list(m.children())) == 0]


def trace_layers(model: nn.Module, example) -> list[LayerInfo]:
    """Linear/Conv2d layers of ``model`` in the order a forward pass on ``example`` runs them."""
    layers: list[LayerInfo] = []
    handles = []

    def hook(name, kind):
        def fn(mod, inp, out):
            layers.append(LayerInfo(name, mod, kind, tuple(inp[0].shape[1:]), tuple(out.shape[1:])))
        return fn

    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            handles.append(mod.register_forward_hook(hook(name, "linear")))
        elif isinstance(mod, nn.Conv2d):
            handles.append(mod.register_forward_hook(hook(name, "conv")))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(_as_example(model, example))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not layers:
        raise InputError(
            "the model has no Linear or Conv2d layer to measure. Fix: pass a network built from Linear/Conv2d layers."
        )
    return layers


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


def fold_batchnorm(model: nn.Module, example, strict: bool = False) -> nn.Module:
    """Deep copy of ``model`` (eval mode) with each BatchNorm folded into the Linear/Conv2d before it.

    ``W' = W * g / sqrt(var + eps)`` per output channel and ``b' = (b - mean) * g / sqrt(var + eps) + beta``;
    the BatchNorm module becomes ``nn.Identity``. Outputs in eval mode are unchanged (up to
    rounding). A BatchNorm that cannot be folded (its input is not the output of one Linear/Conv2d,
    e.g. it follows a ReLU, or it is shared) stays in place: the measures treat it as an affine layer
    of its own (operator norm ``max |gamma / sqrt(var + eps)|``). ``strict=True`` raises InputError instead.
    """
    model = copy.deepcopy(model).eval()
    producers: dict[int, str] = {}
    keep: list[torch.Tensor] = []  # keep outputs alive so their ids are not reused
    pairs: list[tuple[str, str]] = []
    problems: list[str] = []
    handles = []

    def lin_hook(name):
        def fn(mod, inp, out):
            producers[id(out)] = name
            keep.append(out)
        return fn

    def bn_hook(name):
        def fn(mod, inp, out):
            src = producers.get(id(inp[0]))
            if src is None:
                problems.append(name)
            else:
                pairs.append((src, name))
        return fn

    for name, mod in model.named_modules():
        if isinstance(mod, _LINEAR_TYPES):
            handles.append(mod.register_forward_hook(lin_hook(name)))
        elif isinstance(mod, _BN_TYPES):
            handles.append(mod.register_forward_hook(bn_hook(name)))
    try:
        with torch.no_grad():
            model(_as_example(model, example))
    finally:
        for h in handles:
            h.remove()
    if strict and problems:
        raise InputError(
            f"cannot fold batch norm layer(s) {problems}: their input is not the output of a Linear/Conv2d layer. "
            "Fix: place BatchNorm directly after a Linear or Conv2d layer, or measure a network without it."
        )
    once = [(src, bn) for src, bn in pairs if [b for _, b in pairs].count(bn) == 1
            and [s_ for s_, _ in pairs].count(src) == 1 and bn not in problems]
    if strict and len(once) != len(pairs):
        raise InputError(
            "a batch norm layer is used more than once or two batch norms follow one layer; "
            "folding is only defined for one BatchNorm per Linear/Conv2d. Fix: use distinct modules."
        )
    with torch.no_grad():
        for src, bn_name in once:
            lin = model.get_submodule(src)
            bn = model.get_submodule(bn_name)
            if bn.running_mean is None or bn.running_var is None:
                if not strict:
                    continue   # no fixed affine map to fold; the measures refuse what needs one
                raise InputError(
                    f"batch norm {bn_name!r} has no running statistics (track_running_stats=False), so eval-mode "
                    "folding is undefined. Fix: build it with track_running_stats=True."
                )
            scale = torch.rsqrt(bn.running_var + bn.eps)
            shift = -bn.running_mean * scale
            if bn.weight is not None:
                scale = scale * bn.weight
                shift = shift * bn.weight
            if bn.bias is not None:
                shift = shift + bn.bias
            w = lin.weight
            lin.weight.copy_(w * scale.view((-1,) + (1,) * (w.dim() - 1)))
            old_b = lin.bias if lin.bias is not None else torch.zeros_like(scale)
            new_b = old_b * scale + shift
            if lin.bias is None:
                lin.bias = nn.Parameter(new_b.detach().clone())
            else:
                lin.bias.copy_(new_b)
            _set_submodule(model, bn_name, nn.Identity())
    return model


# --------------------------------------------------------------------------------------------
# Margins
# --------------------------------------------------------------------------------------------

def _check_xy(X, y):
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
    _check_xy(X, y)
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


# --------------------------------------------------------------------------------------------
# Per-layer statistics
# --------------------------------------------------------------------------------------------

def _conv_fn(conv: nn.Conv2d):
    def A(x):
        return conv._conv_forward(x, conv.weight, None)
    return A


def _conv_adjoint(conv: nn.Conv2d, in_shape: tuple):
    """The adjoint of the bias-free conv on inputs of shape ``in_shape`` (C, H, W)."""
    zero_pad = conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
    if zero_pad:
        def AT(y):
            outpad = []
            for i in range(2):
                full = (
                    (y.shape[2 + i] - 1) * conv.stride[i] - 2 * conv.padding[i] + conv.dilation[i] * (conv.kernel_size[i] - 1) + 1
                )
                outpad.append(in_shape[1 + i] - full)
            return F.conv_transpose2d(y, conv.weight, None, conv.stride, conv.padding, tuple(outpad), conv.groups, conv.dilation)
        return AT
    A = _conv_fn(conv)

    def AT_autograd(y):  # exact adjoint of any linear map, e.g. circular / reflect padding
        x = torch.zeros((1,) + tuple(in_shape), dtype=y.dtype, device=y.device, requires_grad=True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(A(x), x, grad_outputs=y)
        return g
    return AT_autograd


@torch.no_grad()
def conv_operator_norm(conv: nn.Conv2d, input_shape: tuple, *, seed: int = 0, tol: float = 1e-7,
                       max_iter: int = 2000, method: str = "lanczos") -> tuple[float, int]:
    """Spectral norm of the (bias-free) convolution as a linear map on inputs of shape (C, H, W).

    The map and its adjoint are applied with ``conv2d`` and ``conv_transpose2d`` on the actual
    input shape (recorded by a forward hook in :func:`trace_layers`). ``method="power"``: power
    iteration on ``A^T A`` until the estimate changes by less than ``tol`` relative (a lower bound
    that converges to the top singular value; slow when the top two singular values are close).
    ``method="lanczos"`` (default): ARPACK's implicitly restarted Lanczos (``scipy.sparse.linalg.svds``)
    on the same two operators, to relative accuracy ``tol``. Returns ``(sigma, matvecs)``.
    """
    if len(input_shape) != 3:
        raise InputError(f"expected a conv input shape (C, H, W), got {input_shape!r}.")
    if method not in ("power", "lanczos"):
        raise InputError(f"method must be 'power' or 'lanczos', got {method!r}.")
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    A, AT = _conv_fn(conv), _conv_adjoint(conv, tuple(input_shape))
    w = conv.weight
    v = torch.randn((1,) + tuple(input_shape), generator=g, dtype=torch.float64)
    if method == "lanczos":
        from scipy.sparse.linalg import LinearOperator, svds

        out_shape = tuple(A(torch.zeros((1,) + tuple(input_shape), dtype=w.dtype, device=w.device)).shape)
        n_in, n_out = int(np.prod(input_shape)), int(np.prod(out_shape))
        count = [0]

        def mv(x):
            count[0] += 1
            t = torch.as_tensor(np.ascontiguousarray(x).reshape((1,) + tuple(input_shape))).to(device=w.device, dtype=w.dtype)
            return A(t).double().cpu().numpy().reshape(-1)

        def rmv(x):
            count[0] += 1
            t = torch.as_tensor(np.ascontiguousarray(x).reshape(out_shape)).to(device=w.device, dtype=w.dtype)
            return AT(t).double().cpu().numpy().reshape(-1)

        op = LinearOperator((n_out, n_in), matvec=mv, rmatvec=rmv, dtype=np.float64)
        if min(n_in, n_out) <= 2:  # ARPACK needs k < min(shape); tiny maps: build them densely
            dense = np.stack([mv(e) for e in np.eye(n_in)], axis=1)
            return float(np.linalg.svd(dense, compute_uv=False)[0]), count[0]
        s = svds(
            op,
            k=1,
            tol=tol,
            maxiter=max_iter,
            ncv=min(20, min(n_in, n_out) - 1),
            v0=v.numpy().reshape(-1) if n_in <= n_out else None,
            return_singular_vectors=False,
            random_state=np.random.default_rng(seed),
        )
        return float(s[0]), count[0]
    v = v.to(device=w.device, dtype=w.dtype)
    v /= v.norm()
    sigma_old, sigma = 0.0, 0.0
    it = 0
    for it in range(1, max_iter + 1):
        u = A(v)
        sigma = float(u.norm())
        if sigma == 0.0:
            return 0.0, 2 * it
        v = AT(u)
        v /= v.norm()
        if abs(sigma - sigma_old) <= tol * sigma:
            break
        sigma_old = sigma
    return sigma, 2 * it


@torch.no_grad()
def _conv_l21(conv: nn.Conv2d, input_shape: tuple) -> float:
    """(2,1) norm of the dense conv operator's transpose: sum over output units of row 2-norms.

    Zero padding: a row holds each in-bounds tap once (``conv(ones, W^2)``). Reflect / replicate /
    circular padding map several taps of one window to the same input pixel, whose entry in the row is
    then the *sum* of those taps: the taps' input indices come from padding an image of pixel indices
    the way the layer pads, and ``row^2 = sum_ci W[c, ci]^T M_p W[c, ci]`` with ``M_p[t, t'] = 1`` when
    taps t, t' of window p read the same pixel.
    """
    if conv.padding_mode == "zeros":
        ones = torch.ones((1,) + tuple(input_shape), dtype=conv.weight.dtype, device=conv.weight.device)
        sq = conv._conv_forward(ones, conv.weight ** 2, None)  # row norm^2 counts only in-bounds taps
        return float(sq.clamp_min(0).sqrt().sum())
    h, w = input_shape[1:]
    idx = torch.arange(h * w, dtype=torch.float64).reshape(1, 1, h, w)
    idx = F.pad(idx, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
    taps = F.unfold(idx, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)[0].long()   # (K, P)
    same = (taps.T[:, :, None] == taps.T[:, None, :]).double()                                    # (P, K, K)
    W = conv.weight.detach().double().flatten(2)                                                   # (Cout, Cin/g, K)
    sq = torch.einsum("cik,pkl,cil->cp", W, same, W)
    return float(sq.clamp_min(0).sqrt().sum())


@torch.no_grad()
def layer_statistics(model: nn.Module, example, *, seed: int = 0, fold_bn: bool = True) -> list[dict]:
    """Per-layer norms: Frobenius (kernel), spectral (operator), (2,1) of the dense operator, width."""
    if fold_bn:
        model = fold_batchnorm(model, example)
    stats = []
    for i, L in enumerate(trace_layers(model, example)):
        W = L.module.weight.detach()
        fro = float(W.double().norm())
        if L.kind == "linear":
            W64 = W.double()
            spec = float(torch.linalg.matrix_norm(W64, ord=2))
            l21 = float(W64.norm(dim=1).sum())  # ||W^T||_{2,1}: sum of row norms
            iters = 0
        else:
            spec, iters = conv_operator_norm(L.module, L.input_shape, seed=seed + i)
            l21 = _conv_l21(L.module, L.input_shape)
        stats.append(dict(name=L.name, kind=L.kind, input_shape=list(L.input_shape), output_shape=list(L.output_shape),
                          frobenius=fro, spectral=spec, l21=l21, matvecs=iters,
                          width=int(np.prod(L.output_shape))))
    return stats


# --------------------------------------------------------------------------------------------
# Path norms
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# The computation graph: is the network a chain of layers? (product measures need one)
# --------------------------------------------------------------------------------------------

# Autograd nodes allowed between two consecutive layers of a chain: 1-Lipschitz in l2 (ReLU, reshapes),
# or pools, whose Lipschitz constants (:func:`_pool_lipschitz`) multiply the product measures.
# Thresholds pass only when made by an ``nn.Threshold`` whose value equals its threshold (otherwise the
# function jumps and has no Lipschitz constant). Anything else (a LocalResponseNorm, a scaling, a
# softmax) has a Lipschitz constant the per-layer products do not include.
_CHAIN_OPS = {"ReluBackward0", "ReluBackward1", "ThresholdBackward0", "ThresholdBackward1",
              "MaxPool2DWithIndicesBackward0", "AvgPool2DBackward0", "AdaptiveAvgPool2DBackward0", "MeanBackward1",
              "ViewBackward0", "ReshapeAliasBackward0", "UnsafeViewBackward0", "CloneBackward0", "AddBackward0",
              "AddBackward1", "CatBackward0", "SqueezeBackward0", "SqueezeBackward1", "UnsqueezeBackward0"}
# Activations with a known Lipschitz constant (sup |f'|, :func:`_activation_lipschitz`), and the eval-mode
# batch norm that could not be folded (a per-channel affine map, norm max |gamma / sqrt(var + eps)|).
_ACTIVATION_OPS = {"LeakyReluBackward0", "EluBackward0", "CeluBackward0", "TanhBackward0", "GeluBackward0",
                   "SigmoidBackward0", "SoftplusBackward0", "HardtanhBackward0"}
_BN_OPS = {"NativeBatchNormBackward0", "CudnnBatchNormBackward0"}
_ACTIVATION_NAMES = {"leaky-relu", "elu", "celu", "tanh", "gelu", "sigmoid", "softplus", "hardtanh"}
_CHAIN_OPS |= _ACTIVATION_OPS | _BN_OPS
_POOL_OPS = {"AvgPool2DBackward0", "AdaptiveAvgPool2DBackward0", "MeanBackward1", "MaxPool2DWithIndicesBackward0"}
_THRESHOLD_OPS = {"ThresholdBackward0", "ThresholdBackward1"}


@dataclass
class GraphInfo:
    """What a forward pass shows about the wiring of the Linear/Conv2d layers.

    ``chain``: the layers form one path (each layer's input depends on the previous layer only,
    through 1-Lipschitz element-wise or pooling ops); ``reason`` says why not otherwise.
    ``pool_lipschitz``: per pool on the chain, its Lipschitz constant in l2 (:func:`_pool_lipschitz`):
    ``sqrt(max number of windows covering one input)`` for a max pool (1 when windows do not overlap),
    the operator norm for the linear pools (average, adaptive average, mean).
    ``functional_pools``: pooling ops not made by an nn pooling module; ``other_ops``: autograd ops
    outside the supported set (for example the pieces of a LocalResponseNorm).
    """

    chain: bool
    reason: str
    pool_lipschitz: list
    functional_pools: list
    other_ops: list


def _maxpool_coverage(node) -> int:
    """Largest number of max-pool windows that contain one input position (from the autograd node)."""
    def pair(v, default):  # functional calls may save () for "same as the kernel" or one number for both axes
        v = tuple(v) or tuple(default)
        return (v[0], v[0]) if len(v) == 1 else v

    kh, kw = pair(node._saved_kernel_size, ())
    sh, sw = pair(node._saved_stride, (kh, kw))
    ph, pw = pair(node._saved_padding, (0, 0))
    dh, dw = pair(node._saved_dilation, (1, 1))
    h, w = node._saved_self.shape[-2:]
    extent = []
    for n, k, s, pd, d in ((h, kh, sh, ph, dh), (w, kw, sw, pw, dw)):
        span = n + 2 * pd - d * (k - 1) - 1
        out = (-(-span // s) if node._saved_ceil_mode else span // s) + 1
        if node._saved_ceil_mode and (out - 1) * s >= n + pd:
            out -= 1  # torch drops a last window that would start in the padding
        extent.append(max((out - 1) * s + d * (k - 1) + 1, n + 2 * pd))
    ones = torch.ones((1, 1, extent[0], extent[1]), dtype=torch.float64)
    cols = F.unfold(ones, (kh, kw), dilation=(dh, dw), stride=(sh, sw))
    counts = F.fold(cols, tuple(extent), (kh, kw), dilation=(dh, dw), stride=(sh, sw))
    return int(counts[0, 0, ph:ph + h, pw:pw + w].max())


_DENSE_POOL_LIMIT = 4096  # inputs per channel up to which a pool's matrix is built and decomposed densely


def _linear_map_norm(fn: Callable, h: int, w: int) -> float:
    """Operator norm of a linear map acting alike on every channel of (h, w) planes (a pooling op).

    Every channel is pooled by the same map independently, so the norm is that of the one-channel
    map: its matrix (built from the h*w unit inputs) by SVD, or ARPACK's Lanczos on larger planes.
    """
    n = h * w
    if n <= _DENSE_POOL_LIMIT:
        cols = fn(torch.eye(n, dtype=torch.float64).reshape(n, 1, h, w)).reshape(n, -1)  # row i = A e_i
        return float(torch.linalg.matrix_norm(cols, ord=2))
    from scipy.sparse.linalg import LinearOperator, svds

    out_n = int(fn(torch.zeros(1, 1, h, w, dtype=torch.float64)).numel())

    def mv(v):
        return fn(torch.as_tensor(np.ascontiguousarray(v)).reshape(1, 1, h, w)).reshape(-1).numpy()

    def rmv(u):
        x = torch.zeros(1, 1, h, w, dtype=torch.float64, requires_grad=True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(fn(x), x, grad_outputs=torch.as_tensor(np.ascontiguousarray(u)).reshape(
                fn(x).shape))
        return g.reshape(-1).numpy()

    op = LinearOperator((out_n, n), matvec=mv, rmatvec=rmv, dtype=np.float64)
    return float(svds(op, k=1, tol=1e-10, return_singular_vectors=False, random_state=np.random.default_rng(0))[0])


def _pool_lipschitz(node, target: str) -> dict:
    """The l2 Lipschitz constant of the pooling op behind autograd node ``node`` (raises InputError
    when it cannot be read off). Average pools are linear: their constant is their operator norm,
    which exceeds 1 when windows overlap unevenly (an adaptive pool that upsamples feeds one input to
    several outputs) or the divisor is smaller than the window (count_include_pad=False at a border,
    divisor_override)."""
    kind = type(node).__name__
    if kind == "MaxPool2DWithIndicesBackward0":
        return dict(op="max-pool", before=target, kernel=list(node._saved_kernel_size),
                    stride=list(node._saved_stride) or list(node._saved_kernel_size),
                    factor=math.sqrt(_maxpool_coverage(node)))
    if kind == "MeanBackward1":   # each output is the mean of N inputs, disjoint between outputs
        sizes = list(node._saved_self_sym_sizes)
        dims = [d % len(sizes) for d in node._saved_dim] if len(node._saved_dim) else list(range(len(sizes)))
        n = math.prod(int(sizes[d]) for d in dims)
        return dict(op="mean", before=target, dims=dims, factor=1.0 / math.sqrt(n))
    h, w = (int(v) for v in node._saved_self.shape[-2:])
    if kind == "AvgPool2DBackward0":
        k = tuple(node._saved_kernel_size)
        st = tuple(node._saved_stride) or k
        pad, ceil = tuple(node._saved_padding), bool(node._saved_ceil_mode)
        cip, div = bool(node._saved_count_include_pad), node._saved_divisor_override

        def fn(x):
            return F.avg_pool2d(x, k, st, pad, ceil, cip, div)
        info = dict(op="avg-pool", kernel=list(k), stride=list(st), padding=list(pad), count_include_pad=cip,
                    divisor_override=div)
    else:  # AdaptiveAvgPool2DBackward0
        meta = getattr(node, "_input_metadata", None)
        if not meta:
            raise InputError(f"cannot read the output size of the adaptive average pool before {target} from this "
                             "torch version, so its Lipschitz constant is unknown. Fix: use nn.AvgPool2d.")
        out_hw = tuple(int(v) for v in meta[0].shape[-2:])

        def fn(x):
            return F.adaptive_avg_pool2d(x, out_hw)
        info = dict(op="adaptive-avg-pool", output_size=list(out_hw))
    return dict(info, before=target, input_size=[h, w], factor=_linear_map_norm(fn, h, w))


_GELU_LIPSCHITZ: dict[str, float] = {}


def gelu_lipschitz(approximate: str = "none") -> float:
    """``sup |GELU'(x)|``. Exact GELU: ``GELU'' = phi(x) (2 - x^2)`` vanishes at ``x = +-sqrt(2)``, so the sup is
    ``Phi(sqrt 2) + sqrt(2) phi(sqrt 2) = 1.12890...`` (the value at -sqrt(2), -0.1289, is smaller in size).
    The tanh approximation: the derivative (autograd, float64) on a grid of step 1e-4 over [-8, 8], refined
    by a bounded scalar search around the best grid point; computed once and cached."""
    if approximate not in _GELU_LIPSCHITZ:
        if approximate == "none":
            from scipy.stats import norm
            r2 = math.sqrt(2.0)
            _GELU_LIPSCHITZ[approximate] = float(norm.cdf(r2) + r2 * norm.pdf(r2))
        else:
            from scipy.optimize import minimize_scalar

            def d(x):
                t = torch.as_tensor(x, dtype=torch.float64).reshape(-1).requires_grad_(True)
                (g,) = torch.autograd.grad(F.gelu(t, approximate=approximate).sum(), t)
                return g.abs()
            grid = torch.arange(-8.0, 8.0, 1e-4, dtype=torch.float64)
            with torch.enable_grad():
                x0 = float(grid[int(d(grid).argmax())])
                best = minimize_scalar(lambda x: -float(d([x])[0]), bounds=(x0 - 1e-3, x0 + 1e-3), method="bounded",
                                       options=dict(xatol=1e-12))
            _GELU_LIPSCHITZ[approximate] = float(-best.fun)
    return _GELU_LIPSCHITZ[approximate]


def _activation_lipschitz(node, target: str) -> dict:
    """``sup |f'|`` of the activation behind autograd node ``node`` (its l2 Lipschitz constant, element-wise)."""
    kind = type(node).__name__
    if kind == "LeakyReluBackward0":
        slope = float(node._saved_negative_slope)
        return dict(op="leaky-relu", negative_slope=slope, before=target, factor=max(1.0, abs(slope)))
    if kind == "EluBackward0":   # scale * (x if x > 0 else alpha (exp(input_scale x) - 1)): ELU, SELU
        a, sc, isc = float(node._saved_alpha), float(node._saved_scale), float(node._saved_input_scale)
        return dict(op="elu", alpha=a, scale=sc, input_scale=isc, before=target, factor=abs(sc) * max(1.0, abs(a * isc)))
    if kind == "CeluBackward0":  # derivative exp(x / alpha) <= 1 below 0
        return dict(op="celu", alpha=float(node._saved_alpha), before=target, factor=1.0)
    if kind == "GeluBackward0":
        ap = str(node._saved_approximate)
        return dict(op="gelu", approximate=ap, before=target, factor=gelu_lipschitz(ap))
    if kind == "SigmoidBackward0":
        return dict(op="sigmoid", before=target, factor=0.25)
    name = {"TanhBackward0": "tanh", "SoftplusBackward0": "softplus", "HardtanhBackward0": "hardtanh"}[kind]
    return dict(op=name, before=target, factor=1.0)


def _bn_lipschitz(node, target: str) -> dict:
    """Operator norm of an eval-mode batch norm that was not folded: ``max |gamma / sqrt(running_var + eps)|``."""
    if bool(getattr(node, "_saved_training", False)) or node._saved_running_var is None:
        raise InputError(f"a batch norm before {target} normalises with the batch's own statistics "
                         "(track_running_stats=False), so it is not a fixed map and has no Lipschitz constant. Fix: "
                         "build it with track_running_stats=True.")
    scale = torch.rsqrt(node._saved_running_var.double() + float(node._saved_eps))
    if node._saved_weight is not None:
        scale = scale * node._saved_weight.double()
    return dict(op="batch-norm", before=target, factor=float(scale.abs().max()))


def _discontinuity(mod: nn.Module) -> str | None:
    """Why ``mod`` is a discontinuous activation (it then has no Lipschitz constant), or None."""
    if isinstance(mod, nn.Threshold) and float(mod.value) != float(mod.threshold):
        return (f"jumps by {abs(float(mod.value) - float(mod.threshold)):g} at x = {float(mod.threshold):g} "
                "(value != threshold)")
    if isinstance(mod, nn.Hardshrink) and float(mod.lambd) > 0:
        return f"jumps by {float(mod.lambd):g} at x = +-{float(mod.lambd):g}"
    return None


def analyse_graph(model: nn.Module, example) -> GraphInfo:
    """Walk the autograd graph of one forward pass (on a copy: the caller's model is untouched)."""
    net = copy.deepcopy(model).eval()
    for prm in net.parameters():
        prm.requires_grad_(False)  # constants (biases, shifts) then drop out of the graph
    layer_nodes: dict[int, int] = {}
    order: list[str] = []
    inputs: list = []
    keep: list = []
    pool_nodes: set[int] = set()
    continuous_thresholds: set[int] = set()   # nodes of nn.Threshold(t, value=t), i.e. max(x, t)
    jumps: list[str] = []
    handles = []

    def layer_hook(name):
        def fn(mod, inp, out):
            layer_nodes[id(out.grad_fn)] = len(order)
            order.append(name)
            inputs.append(inp[0])
            keep.append(out.grad_fn)
        return fn

    def pool_hook(mod, inp, out):
        pool_nodes.add(id(out.grad_fn))
        keep.append(out.grad_fn)

    def activation_hook(name):
        def fn(mod, inp, out):
            why = _discontinuity(mod)
            if why is not None:
                jumps.append(f"the activation {name!r} ({mod!r}) is discontinuous: it {why}, so no Lipschitz "
                             "constant bounds it and a product of per-layer norms bounds nothing")
            elif isinstance(mod, nn.Threshold):
                continuous_thresholds.add(id(out.grad_fn))
                keep.append(out.grad_fn)
        return fn

    for name, mod in net.named_modules():
        if isinstance(mod, _LINEAR_TYPES):
            handles.append(mod.register_forward_hook(layer_hook(name)))
        elif isinstance(mod, (nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.MaxPool2d) + _BN_TYPES):
            handles.append(mod.register_forward_hook(pool_hook))
        elif isinstance(mod, (nn.Threshold, nn.Hardshrink)):
            handles.append(mod.register_forward_hook(activation_hook(name)))
    x = _as_example(net, example).detach().clone().requires_grad_(True)
    try:
        with torch.enable_grad():
            out = net(x)
    finally:
        for h in handles:
            h.remove()

    reasons: list[str] = list(dict.fromkeys(jumps))
    lipschitz: list = []
    functional: list[str] = []
    other: list[str] = []
    seen_functional: set[int] = set()

    def walk(t, target: str) -> set:
        """Sources ("input" or a layer index) of tensor t; records ops met on the way."""
        if t.grad_fn is None:  # the network input itself (or a constant)
            return {"input"} if t.requires_grad else set()
        sources, stack, seen = set(), [t.grad_fn], set()
        while stack:
            node = stack.pop()
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            if id(node) in layer_nodes:
                sources.add(layer_nodes[id(node)])
                continue
            kind = type(node).__name__
            if kind == "AccumulateGrad":
                sources.add("input")
                continue
            if (kind in _POOL_OPS or kind in _BN_OPS) and id(node) not in pool_nodes and id(node) not in seen_functional:
                seen_functional.add(id(node))
                functional.append(kind)
            live = [f for f, _ in node.next_functions if f is not None]
            if kind not in _CHAIN_OPS:
                other.append(kind)
                reasons.append(f"the input of {target} passes through {kind}, whose Lipschitz constant is not accounted for")
            elif len(live) > 1:
                reasons.append(f"the input of {target} joins branches ({kind} of tensors that both depend on the input)")
            elif kind in _THRESHOLD_OPS and id(node) not in continuous_thresholds and not jumps:
                reasons.append(f"the input of {target} passes through a threshold (F.threshold or a discontinuous "
                               "activation) that may jump, so it has no Lipschitz constant. Fix: nn.ReLU, or "
                               "nn.Threshold(t, t)")
            if kind in _POOL_OPS or kind in _ACTIVATION_OPS or kind in _BN_OPS:
                try:
                    lipschitz.append(_pool_lipschitz(node, target) if kind in _POOL_OPS else
                                     _activation_lipschitz(node, target) if kind in _ACTIVATION_OPS else
                                     _bn_lipschitz(node, target))
                except InputError as e:
                    reasons.append(str(e))
            stack.extend(live)
        return sources

    if not isinstance(out, torch.Tensor):
        raise InputError(f"expected the model to return one tensor, got {type(out).__name__}.")
    if len(set(order)) != len(order):
        reasons.append("a layer is applied more than once (shared weights)")
    for i, name in enumerate(order):
        want = {"input"} if i == 0 else {i - 1}
        got = walk(inputs[i], f"layer {name!r}")
        if got != want:
            srcs = sorted("the network input" if s == "input" else repr(order[s]) for s in got)
            reasons.append(f"layer {name!r} receives {', '.join(srcs)} (a chain feeds each layer from the one before)")
    got = walk(out, "the output")
    if order and got != {len(order) - 1}:
        srcs = sorted("the network input" if s == "input" else repr(order[s]) for s in got)
        reasons.append(f"the output depends on {', '.join(srcs)}, not on the last layer alone")
    reasons = list(dict.fromkeys(reasons))
    return GraphInfo(
        chain=not reasons,
        reason="; ".join(reasons[:3]) + (f" (and {len(reasons) - 3} more)" if len(reasons) > 3 else ""),
        pool_lipschitz=lipschitz,
        functional_pools=functional,
        other_ops=sorted(set(other)),
    )


# --------------------------------------------------------------------------------------------
# Measure registry
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Measure:
    """A registered norm measure ``function(layer_stats, path_norms, lipschitz) -> complexity``.

    ``kind``: "product" (a product over the layers of a chain; needs :func:`analyse_graph` to find
    a chain) or "path" (defined on any DAG of the supported layers). ``power``: the paper's figure
    plots ``(complexity / margin) ** power`` (:attr:`convention` says so in words).
    """

    function: Callable
    paper: str
    description: str
    kind: str
    power: int
    convention: str


def _prod(xs: Iterable[float]) -> float:
    return float(math.prod(xs))


def _l2(stats, paths, lip):
    return _prod(s["frobenius"] for s in stats)


def _spectral(stats, paths, lip):
    return lip * _prod(s["spectral"] for s in stats)


def _bartlett(stats, paths, lip):
    spec = [s["spectral"] for s in stats]
    if any(v == 0 for v in spec):
        return 0.0
    return lip * _prod(spec) * sum((s["l21"] / s["spectral"]) ** (2.0 / 3.0) for s in stats) ** 1.5


def _neyshabur2018(stats, paths, lip):
    spec = [s["spectral"] for s in stats]
    if any(v == 0 for v in spec):
        return 0.0
    return lip * _prod(spec) * math.sqrt(sum((s["frobenius"] / s["spectral"]) ** 2 for s in stats))


_SQUARED = ("Neyshabur et al. 2017, Fig. 1: capacity = {what}^2 / margin^2; the architecture-only constants "
            "({const}) are dropped: they cancel between networks of one architecture")

MEASURES: dict[str, Measure] = {
    "l2": Measure(_l2, "Neyshabur et al. 2017 (Sec. 2.1)", "product over layers of the Frobenius norm of the weights",
                  "product", 2, _SQUARED.format(what="prod_i ||W_i||_F", const="4^d")),
    "l1-path": Measure(lambda st, pn, lip: pn[1], "Neyshabur et al. 2015/2017",
                       "sum over input-to-output paths of the product of |w| (bias paths included)",
                       "path", 2, _SQUARED.format(what="(sum_paths prod |w|)", const="2^(2d)")),
    "l2-path": Measure(lambda st, pn, lip: pn[2], "Neyshabur et al. 2015/2017",
                       "square root of the sum over paths of the product of w^2 (average-pool edges 1/k included)",
                       "path", 2, _SQUARED.format(what="sqrt(sum_paths prod w^2)", const="prod_i 4 h_i")),
    "spectral": Measure(_spectral, "Neyshabur et al. 2017; Bartlett et al. 2017",
                        "product over layers of the operator (spectral) norm, convs on their true input shape, times the "
                        "Lipschitz constant of each pool (max: sqrt(max window overlap); average: its operator norm)",
                        "product", 2, _SQUARED.format(what="prod_i ||W_i||_2", const="prod_i h_i")),
    "spectral-complexity": Measure(_bartlett, "Bartlett, Foster, Telgarsky 2017",
                                   "prod rho_i ||A_i||_2 * (sum (||A_i^T||_{2,1} / ||A_i||_2)^(2/3))^(3/2), reference "
                                   "matrices 0, rho_i the Lipschitz constants of the pools",
                                   "product", 1, "Bartlett et al. 2017, Fig. 1: margin-normalised spectral complexity "
                                   "R_A / margin (not squared)"),
    "neyshabur2018": Measure(_neyshabur2018, "Neyshabur, Bhojanapalli, Srebro 2018",
                             "prod ||W_i||_2 * sqrt(sum ||W_i||_F^2 / ||W_i||_2^2) (PAC-Bayes spectral bound), times the "
                             "pools' Lipschitz constants",
                             "product", 2, "Neyshabur et al. 2018, Thm. 1: the bound's complexity term "
                             "prod ||W_i||_2^2 sum ||W_i||_F^2/||W_i||_2^2 / margin^2; constants (B^2 d^2 h ln(dh)) dropped"),
}

PATH_MEASURES = [n for n, m in MEASURES.items() if m.kind == "path"]
PRODUCT_MEASURES = [n for n, m in MEASURES.items() if m.kind == "product"]


def _not_a_chain(reason: str) -> str:
    return (f"the per-layer product is neither the paper's quantity nor a bound on this network: {reason}. "
            f"Measures that apply to any wiring of these layers: {', '.join(PATH_MEASURES)} (path norms).")


def compute_norm_measures(model: nn.Module, X: torch.Tensor, y: torch.Tensor, *, names: Sequence[str] | None = None,
                          percentile: float = 5.0, seed: int = 0) -> dict:
    """Every applicable norm measure, raw, divided by the margin and in its paper's convention.

    Returns ``{"margin", "margin_percentile", "measures": {name: {"value", "normalized", "capacity",
    "convention", "paper", "exact"}}, "not_applicable": {name: reason}, "layers": [...],
    "pool_lipschitz": [...]}``. ``normalized`` is ``value / margin`` and ``capacity`` is
    ``normalized ** power`` (the quantity the paper plots); both are ``nan`` when the margin is
    <= 0 (the network does not fit that percentile of the training set). Product measures need a
    chain of layers (:func:`analyse_graph`); on other wirings they are listed in
    ``not_applicable`` with the reason, or, when asked for by ``names``, raise InputError.
    """
    explicit = names is not None
    names = list(MEASURES) if names is None else list(names)
    unknown = [n for n in names if n not in MEASURES]
    if unknown:
        raise InputError(f"unknown measure(s) {unknown}; registered: {list(MEASURES)}.")
    _check_xy(X, y)
    example = X[:1]
    folded = fold_batchnorm(model, example)
    graph = analyse_graph(folded, example)
    skipped: dict[str, str] = {}
    if not graph.chain:
        for n in names:
            if MEASURES[n].kind == "product":
                skipped[n] = _not_a_chain(graph.reason)
        if explicit and skipped:
            raise InputError(f"cannot compute {', '.join(skipped)}: {_not_a_chain(graph.reason)}")
    paths, exacts = {}, {}
    for n in names:   # each path norm on its own: l1 stays when l2 is refused (e.g. functional average pools)
        if MEASURES[n].kind != "path":
            continue
        p = int(n[1])
        try:
            paths[p], exacts[p] = path_norm(folded, example, p, fold_bn=False)
        except InputError as e:
            if explicit:
                raise
            skipped[n] = str(e)
    gamma = margin(folded, X, y, percentile)
    stats = []
    if any(MEASURES[n].kind == "product" and n not in skipped for n in names):
        try:
            stats = layer_statistics(folded, example, seed=seed, fold_bn=False)
        except InputError as e:
            if explicit:
                raise
            for n in names:
                if MEASURES[n].kind == "product":
                    skipped.setdefault(n, str(e))
    lip = _prod(m["factor"] for m in graph.pool_lipschitz)
    out = {}
    for n in names:
        if n in skipped:
            continue
        m = MEASURES[n]
        v = float(m.function(stats, paths, lip))
        normalized = (v / gamma) if gamma > 0 else float("nan")
        out[n] = dict(value=v, normalized=normalized, capacity=normalized ** m.power, power=m.power,
                      convention=m.convention, paper=m.paper, description=m.description,
                      exact=(exacts[int(n[1])] if m.kind == "path" else True))
    if gamma <= 0:
        for v in out.values():
            v["note"] = (f"normalized and capacity are undefined: the margin ({gamma:.4g}) is <= 0, so the network "
                         f"misclassifies at least {percentile:g}% of the training set")
    return dict(margin=gamma, margin_percentile=percentile, measures=out, not_applicable=skipped, layers=stats,
                pool_lipschitz=graph.pool_lipschitz, chain=graph.chain)


# --------------------------------------------------------------------------------------------
# Sharpness and PAC-Bayes
# --------------------------------------------------------------------------------------------

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
    _check_xy(X, y)
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
    _check_xy(X, y)
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
