"""Norm, margin, sharpness and PAC-Bayes complexity measures for trained networks.

The measures follow Neyshabur, Bhojanapalli, McAllester and Srebro, "Exploring generalization in
deep learning" (NeurIPS 2017), with the spectral bounds of Bartlett, Foster and Telgarsky (2017)
and Neyshabur, Bhojanapalli and Srebro (ICLR 2018). They work on any ``nn.Module`` built from
``Linear``, ``Conv2d``, ``ReLU`` (module or ``torch.relu``), ``MaxPool2d``/``AvgPool2d``/
``AdaptiveAvgPool2d``, ``BatchNorm1d/2d`` (directly after a Linear/Conv2d), ``Flatten``,
``Dropout`` and ``Identity``, in any wiring where branches are concatenated or added.

Conventions
-----------
* Batch norm is folded into the preceding Linear/Conv2d (eval-mode statistics) before anything is
  measured: :func:`fold_batchnorm`. The model is measured in eval mode.
* Every norm measure is a per-layer statistic folded by an operator (product or sum), registered
  in :data:`MEASURES` as ``name -> Measure(function, paper, description)``. The *margin-normalised*
  value is ``complexity / margin`` where ``margin`` is the 5th percentile of
  ``f_y(x) - max_{j != y} f_j(x)`` over the training set (:func:`margin`). The papers' capacities
  are the squares of these ratios times architecture-only constants (depth, width, log factors,
  input norm), which are left out: they cancel in every comparison between networks of one
  architecture (true vs random labels, growing training sets).
* Path norms count every path from an input unit or a bias (a constant-1 unit) to an output unit
  through the dense operator each layer applies. They are exact for nets of linear/conv/ReLU/
  average-pool layers. A max-pool forwards one input per window, chosen by the data; the path norm
  here replaces it by a *sum* over its window and so is an upper bound (``exact=False`` is
  recorded for such nets).
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
    "LayerInfo", "Measure", "MEASURES", "trace_layers", "fold_batchnorm", "margins", "margin",
    "conv_operator_norm", "layer_statistics", "path_norm", "compute_norm_measures",
    "sharpness", "pac_bayes_noise", "pac_bayes_sweep", "pac_bayes_at_sharpness", "cross_entropy_loss",
]

_LINEAR_TYPES = (nn.Linear, nn.Conv2d)
_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)
# Modules that are the identity or positively homogeneous and monotone on non-negative inputs,
# so a forward pass with |W| on a non-negative input sums path products exactly.
_PATH_SAFE = (nn.ReLU, nn.Flatten, nn.Dropout, nn.Identity, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
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
        raise InputError("the model has no Linear or Conv2d layer to measure. Fix: pass a network built from Linear/Conv2d layers.")
    return layers


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


def fold_batchnorm(model: nn.Module, example) -> nn.Module:
    """Deep copy of ``model`` (eval mode) with each BatchNorm folded into the Linear/Conv2d before it.

    ``W' = W * g / sqrt(var + eps)`` per output channel and ``b' = (b - mean) * g / sqrt(var + eps) + beta``;
    the BatchNorm module becomes ``nn.Identity``. Outputs in eval mode are unchanged (up to
    rounding). A BatchNorm whose input is not the output of a Linear/Conv2d raises InputError.
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
    if problems:
        raise InputError(
            f"cannot fold batch norm layer(s) {problems}: their input is not the output of a Linear/Conv2d layer. "
            "Fix: place BatchNorm directly after a Linear or Conv2d layer, or measure a network without it."
        )
    if len({bn for _, bn in pairs}) != len(pairs) or len({src for src, _ in pairs}) != len(pairs):
        raise InputError(
            "a batch norm layer is used more than once or two batch norms follow one layer; "
            "folding is only defined for one BatchNorm per Linear/Conv2d. Fix: use distinct modules."
        )
    with torch.no_grad():
        for src, bn_name in pairs:
            lin = model.get_submodule(src)
            bn = model.get_submodule(bn_name)
            if bn.running_mean is None or bn.running_var is None:
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
        raise InputError(f"expected torch tensors X and y, got {type(X).__name__} and {type(y).__name__}. Fix: torch.as_tensor(...).")
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
                full = (y.shape[2 + i] - 1) * conv.stride[i] - 2 * conv.padding[i] + conv.dilation[i] * (conv.kernel_size[i] - 1) + 1
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
        s = svds(op, k=1, tol=tol, maxiter=max_iter, ncv=min(20, min(n_in, n_out) - 1), v0=v.numpy().reshape(-1) if n_in <= n_out else None,
                 return_singular_vectors=False, random_state=np.random.default_rng(seed))
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
    """(2,1) norm of the dense conv operator's transpose: sum over output units of row 2-norms."""
    ones = torch.ones((1,) + tuple(input_shape), dtype=conv.weight.dtype, device=conv.weight.device)
    sq = conv._conv_forward(ones, conv.weight ** 2, None)  # row norm^2 counts only in-bounds taps
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


@torch.no_grad()
def path_norm(model: nn.Module, example, p: int = 1, *, fold_bn: bool = True) -> tuple[float, bool]:
    """l_p path norm ``(sum_paths prod_edges |w_e|^p)^(1/p)``; returns ``(value, exact)``.

    Computed as one forward pass of the network with every parameter replaced by ``|w|^p`` on an
    all-ones input (ReLU is the identity on non-negative values), summed over outputs. Paths start
    at input units and at biases. ``exact`` is False when max-pooling was replaced by sum-pooling
    (an upper bound).
    """
    if p not in (1, 2):
        raise InputError(f"path norm order p must be 1 or 2, got {p!r}.")
    for name, mod in model.named_modules():
        if len(list(mod.children())) == 0 and not isinstance(mod, _PATH_SAFE + _LINEAR_TYPES + _BN_TYPES):
            raise InputError(
                f"path norms are defined here for Linear/Conv2d/ReLU/pooling/BatchNorm/Flatten/Dropout nets; module "
                f"{name!r} is a {type(mod).__name__}. Fix: measure a network without it."
            )
    net = fold_batchnorm(model, example) if fold_bn else copy.deepcopy(model).eval()
    if fold_bn is False and any(isinstance(m, _BN_TYPES) for m in net.modules()):
        raise InputError("path_norm(fold_bn=False) got a network that still has BatchNorm layers. Fix: fold_bn=True.")
    exact = True
    for name, mod in list(net.named_modules()):
        if isinstance(mod, nn.MaxPool2d):
            _set_submodule(net, name, _SumPool2d(mod))
            exact = False
    for prm in net.parameters():
        prm.copy_(prm.abs() ** p)
    x = torch.ones_like(_as_example(net, example))
    out = net(x)
    total = float(out.double().sum())
    return total ** (1.0 / p), exact


# --------------------------------------------------------------------------------------------
# Measure registry
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Measure:
    """A registered norm measure: ``function(layer_stats, path_norms) -> complexity``."""

    function: Callable
    paper: str
    description: str


def _prod(xs: Iterable[float]) -> float:
    return float(math.prod(xs))


def _l2(stats, paths):
    return _prod(s["frobenius"] for s in stats)


def _spectral(stats, paths):
    return _prod(s["spectral"] for s in stats)


def _bartlett(stats, paths):
    spec = [s["spectral"] for s in stats]
    if any(v == 0 for v in spec):
        return 0.0
    return _prod(spec) * sum((s["l21"] / s["spectral"]) ** (2.0 / 3.0) for s in stats) ** 1.5


def _neyshabur2018(stats, paths):
    spec = [s["spectral"] for s in stats]
    if any(v == 0 for v in spec):
        return 0.0
    return _prod(spec) * math.sqrt(sum((s["frobenius"] / s["spectral"]) ** 2 for s in stats))


MEASURES: dict[str, Measure] = {
    "l2": Measure(_l2, "Neyshabur et al. 2017 (Sec. 2.1)",
                  "product over layers of the Frobenius norm of the weights"),
    "l1-path": Measure(lambda st, pn: pn[1], "Neyshabur et al. 2015/2017",
                       "sum over input-to-output paths of the product of |w| (bias paths included)"),
    "l2-path": Measure(lambda st, pn: pn[2], "Neyshabur et al. 2015/2017",
                       "square root of the sum over paths of the product of w^2"),
    "spectral": Measure(_spectral, "Neyshabur et al. 2017; Bartlett et al. 2017",
                        "product over layers of the operator (spectral) norm; convs on their true input shape"),
    "spectral-complexity": Measure(_bartlett, "Bartlett, Foster, Telgarsky 2017",
                                   "prod ||A_i||_2 * (sum (||A_i^T||_{2,1} / ||A_i||_2)^(2/3))^(3/2), reference matrices 0"),
    "neyshabur2018": Measure(_neyshabur2018, "Neyshabur, Bhojanapalli, Srebro 2018",
                             "prod ||W_i||_2 * sqrt(sum ||W_i||_F^2 / ||W_i||_2^2) (PAC-Bayes spectral bound, constants dropped)"),
}


def compute_norm_measures(model: nn.Module, X: torch.Tensor, y: torch.Tensor, *, names: Sequence[str] | None = None,
                          percentile: float = 5.0, seed: int = 0) -> dict:
    """All registered norm measures, raw and divided by the margin, plus per-layer statistics.

    Returns ``{"margin": float, "measures": {name: {"value", "normalized", "paper", "exact"}},
    "layers": [...]}``. ``normalized`` is ``value / margin`` (``nan`` when the margin is <= 0,
    i.e. the network does not fit the 5th percentile of the training set).
    """
    names = list(MEASURES) if names is None else list(names)
    unknown = [n for n in names if n not in MEASURES]
    if unknown:
        raise InputError(f"unknown measure(s) {unknown}; registered: {list(MEASURES)}.")
    _check_xy(X, y)
    example = X[:1]
    folded = fold_batchnorm(model, example)
    gamma = margin(folded, X, y, percentile)
    stats = layer_statistics(folded, example, seed=seed, fold_bn=False)
    paths, exact = {}, True
    if any(n.endswith("-path") for n in names):
        for p in (1, 2):
            paths[p], exact = path_norm(folded, example, p, fold_bn=False)
    out = {}
    for n in names:
        v = float(MEASURES[n].function(stats, paths))
        out[n] = dict(value=v, normalized=(v / gamma) if gamma > 0 else float("nan"), paper=MEASURES[n].paper,
                      exact=(exact if n.endswith("-path") else True))
    return dict(margin=gamma, margin_percentile=percentile, measures=out, layers=stats)


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


def sharpness(model: nn.Module, X: torch.Tensor, y: torch.Tensor, *, eps: float = 5e-4, steps: int = 20,
              step_frac: float = 0.25, seed: int = 0, batch_size: int = 2048, fold_bn: bool = True) -> dict:
    """Max sharpness in the box ``|nu_i| <= eps (|w_i| + 1)`` by projected gradient *ascent*.

    Starting from a uniform random point in the box (seeded), each step moves every coordinate by
    ``step_frac`` of its box half-width in the direction of the sign of the gradient of the loss
    (increasing it) and clips back into the box. Returns ``value = (max_loss - loss) / (1 + loss)``
    with the loss (mean cross-entropy over X, y), the largest loss found, and ``max_box_violation``
    (<= 0 means the perturbation stayed in the box).
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
                    n_samples: int = 10, seed: int = 0, batch_size: int = 2048, fold_bn: bool = True,
                    delta: float = 0.05) -> list[dict]:
    """Expected sharpness ``E_nu[L(w + nu)] - L(w)`` vs the KL term for each alpha (Neyshabur Fig. 2).

    Each entry: ``alpha, kl, expected_sharpness=(estimate, stderr, n_samples)``, ``loss`` and
    ``bound_term = sqrt((KL + ln(2m/delta)) / (2(m-1)))`` (McAllester's PAC-Bayes term, m = n).
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
