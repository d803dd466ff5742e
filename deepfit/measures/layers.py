"""Tracing a network into its Linear / Conv2d layers, batch-norm folding, and the per-layer statistics
(Frobenius, spectral = the true operator norm of a convolution on its input shape, (2,1) norms) the
norm measures are folded from."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from kernelfit.errors import InputError

_LINEAR_TYPES = (nn.Linear, nn.Conv2d)
_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)


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
