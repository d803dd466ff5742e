"""The computation graph of one forward pass: is the network a chain of layers (product measures need
one), and the Lipschitz constant of every pool, activation and unfolded batch norm between layers."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from kernelfit.errors import InputError

from .layers import _BN_TYPES, _LINEAR_TYPES, _as_example

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
