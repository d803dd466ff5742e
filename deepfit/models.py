"""Model registry for the randomization tests (Zhang et al. 2017, appendix A) and the measure experiments.

``build_model(name, input_shape=(3, 28, 28), num_classes=10, **kw)`` returns a ``torch.nn.Module``;
``MODELS`` maps each name to its :class:`ModelSpec` (builder, description, the paper's parameter
count where there is one). Names:

* ``mlp-1x512``, ``mlp-3x512``: fully connected, ReLU, 512 units a layer.
* ``alexnet-small``: two (conv 5x5, 64 ch -> max-pool 3x3/2 -> LRN) modules, FC 384, FC 192, linear 10.
* ``inception-small`` / ``inception-small-nobn``: the CIFAR-10 Inception of appendix A.
* ``vgg-cifar``: a VGG-style CIFAR net (3 stages of two 3x3 convs) used by the norm/sharpness measures.
* ``mlp2``: a 2-layer MLP (one hidden layer of configurable ``width``) for MNIST measure experiments.

Paper counts (28x28x3 input, i.e. CIFAR-10 after the 28x28 centre crop): MLP 1x512 1,209,866;
MLP 3x512 1,735,178; small AlexNet 1,387,786; small Inception 1,649,402.

The Inception count is reproduced exactly by TensorFlow's historic ``batch_norm`` default
(``center=True, scale=False``): conv without bias, BN with a learned shift (beta) but no scale.
Without batch norm the conv carries an ordinary bias instead, which has the same size, so both
Inception variants have 1,649,402 parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from kernelfit.errors import InputError

__all__ = ["MODELS", "ModelSpec", "build_model", "count_parameters", "model_names"]


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (buffers such as BN running statistics excluded)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _check_shape(name: str, input_shape, min_hw: int = 1) -> tuple[int, int, int]:
    try:
        c, h, w = (int(v) for v in input_shape)
    except (TypeError, ValueError):
        raise InputError(
            f"model {name!r}: input_shape must be (channels, height, width), got {input_shape!r}. "
            f"Fix: pass e.g. input_shape=(3, 28, 28) for centre-cropped CIFAR-10 or (1, 28, 28) for MNIST."
        ) from None
    if c < 1 or h < min_hw or w < min_hw:
        raise InputError(
            f"model {name!r} cannot take images of shape (C, H, W) = ({c}, {h}, {w}): it needs at least "
            f"1 channel and height/width >= {min_hw}. Fix: use a larger image size (e.g. 28x28) or a "
            f"model that takes small inputs (mlp-1x512, mlp-3x512, mlp2)."
        )
    return c, h, w


class ShapeCheckedModel(nn.Module):
    """Wraps a network with the input shape it was built for and refuses any other."""

    def __init__(self, name: str, net: nn.Module, input_shape: tuple[int, int, int]):
        super().__init__()
        self.name = name
        self.net = net
        self.input_shape = tuple(input_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.input_shape:
            raise InputError(
                f"model {self.name!r} was built for inputs of shape (N, {', '.join(map(str, self.input_shape))}), "
                f"got {tuple(x.shape)}. Fix: build the model with input_shape={tuple(x.shape[1:])} or "
                f"preprocess the images to {self.input_shape[1]}x{self.input_shape[2]} with "
                f"{self.input_shape[0]} channel(s)."
            )
        return self.net(x)


def _mlp(in_features: int, hidden: list[int], num_classes: int, dropout: float, batch_norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    prev = in_features
    for h in hidden:
        layers.append(nn.Linear(prev, h))
        if batch_norm:
            layers.append(nn.BatchNorm1d(h))
        layers.append(nn.ReLU(inplace=True))
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        prev = h
    layers.append(nn.Linear(prev, num_classes))
    return nn.Sequential(*layers)


def _build_mlp_1x512(input_shape, num_classes, dropout=0.0, batch_norm=False):
    c, h, w = _check_shape("mlp-1x512", input_shape)
    return _mlp(c * h * w, [512], num_classes, dropout, batch_norm)


def _build_mlp_3x512(input_shape, num_classes, dropout=0.0, batch_norm=False):
    c, h, w = _check_shape("mlp-3x512", input_shape)
    return _mlp(c * h * w, [512, 512, 512], num_classes, dropout, batch_norm)


def _build_mlp2(input_shape, num_classes, width=1024, dropout=0.0, batch_norm=False):
    c, h, w = _check_shape("mlp2", input_shape)
    if int(width) < 1:
        raise InputError(f"mlp2: width must be a positive integer, got {width!r}. Fix: pass e.g. width=1024.")
    return _mlp(c * h * w, [int(width)], num_classes, dropout, batch_norm)


def _pool_out(n: int) -> int:
    # max-pool 3x3, stride 2, padding 1 ("SAME" in TF): ceil(n / 2)
    return (n + 2 - 3) // 2 + 1


def _build_alexnet_small(input_shape, num_classes, dropout=0.0, batch_norm=False):
    c, h, w = _check_shape("alexnet-small", input_shape, min_hw=4)
    # TF cifar10 LRN: depth_radius=4, bias=1, alpha=0.001/9, beta=0.75. PyTorch divides alpha by size.
    def lrn():
        return nn.LocalResponseNorm(size=9, alpha=0.001, beta=0.75, k=1.0)

    def block(cin):
        mods: list[nn.Module] = [nn.Conv2d(cin, 64, 5, padding=2)]
        if batch_norm:
            mods.append(nn.BatchNorm2d(64))
        mods += [nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2, padding=1), lrn()]
        return mods

    h2, w2 = _pool_out(_pool_out(h)), _pool_out(_pool_out(w))
    feats = nn.Sequential(*block(c), *block(64), nn.Flatten())
    head = _mlp(64 * h2 * w2, [384, 192], num_classes, dropout, batch_norm)
    return nn.Sequential(feats, head)


class ConvModule(nn.Module):
    """conv -> [BN] -> ReLU, the appendix-A "Conv module".

    With batch norm: conv without bias, BN without scale, a learned per-channel shift after BN
    (TF ``batch_norm(center=True, scale=False)``). Without: conv with bias.
    """

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, batch_norm: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=not batch_norm)
        if batch_norm:
            self.bn = nn.BatchNorm2d(cout, affine=False)
            self.beta = nn.Parameter(torch.zeros(cout))
        else:
            self.bn = None
            self.register_parameter("beta", None)

    def forward(self, x):
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x) + self.beta.view(1, -1, 1, 1)
        return torch.relu(x)


class InceptionModule(nn.Module):
    def __init__(self, cin: int, ch1: int, ch3: int, batch_norm: bool):
        super().__init__()
        self.b1 = ConvModule(cin, ch1, 1, batch_norm=batch_norm)
        self.b3 = ConvModule(cin, ch3, 3, batch_norm=batch_norm)
        self.out_channels = ch1 + ch3

    def forward(self, x):
        return torch.cat([self.b1(x), self.b3(x)], dim=1)


class DownsampleModule(nn.Module):
    def __init__(self, cin: int, ch3: int, batch_norm: bool):
        super().__init__()
        self.conv = ConvModule(cin, ch3, 3, stride=2, batch_norm=batch_norm)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.out_channels = cin + ch3

    def forward(self, x):
        return torch.cat([self.conv(x), self.pool(x)], dim=1)


# Appendix A, Figure 3: ("i", ch1x1, ch3x3) inception, ("d", ch3x3) downsample.
INCEPTION_SMALL_LAYOUT = [
    ("i", 32, 32), ("i", 32, 48), ("d", 80),
    ("i", 112, 48), ("i", 96, 64), ("i", 80, 80), ("i", 48, 96), ("d", 96),
    ("i", 176, 160), ("i", 176, 160),
]


def _inception(name, input_shape, num_classes, batch_norm, dropout=0.0):
    c, h, w = _check_shape(name, input_shape, min_hw=4)
    mods: list[nn.Module] = [ConvModule(c, 96, 3, batch_norm=batch_norm)]
    ch = 96
    for spec in INCEPTION_SMALL_LAYOUT:
        m = InceptionModule(ch, spec[1], spec[2], batch_norm) if spec[0] == "i" else DownsampleModule(ch, spec[1], batch_norm)
        mods.append(m)
        ch = m.out_channels
    # Global mean pooling == the paper's 7x7 mean pooling at 28x28 input (28 -> 14 -> 7).
    mods += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    if dropout > 0:
        mods.append(nn.Dropout(dropout))
    mods.append(nn.Linear(ch, num_classes))
    return nn.Sequential(*mods)


def _build_inception_small(input_shape, num_classes, dropout=0.0, batch_norm=True):
    return _inception("inception-small", input_shape, num_classes, batch_norm, dropout)


def _build_inception_small_nobn(input_shape, num_classes, dropout=0.0, batch_norm=False):
    if batch_norm:
        raise InputError(
            "inception-small-nobn is Inception without batch norm; batch_norm=True contradicts the name. "
            "Fix: use model 'inception-small' for the batch-norm version."
        )
    return _inception("inception-small-nobn", input_shape, num_classes, False, dropout)


def _build_vgg_cifar(input_shape, num_classes, width=64, dropout=0.0, batch_norm=False):
    c, h, w = _check_shape("vgg-cifar", input_shape, min_hw=8)
    width = int(width)
    if width < 1:
        raise InputError(f"vgg-cifar: width must be a positive integer, got {width!r}. Fix: pass e.g. width=64.")
    mods: list[nn.Module] = []
    cin = c
    for mult in (1, 2, 4):
        for _ in range(2):
            mods.append(nn.Conv2d(cin, width * mult, 3, padding=1, bias=not batch_norm))
            if batch_norm:
                mods.append(nn.BatchNorm2d(width * mult))
            mods.append(nn.ReLU(inplace=True))
            cin = width * mult
        mods.append(nn.MaxPool2d(2))
    mods += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    if dropout > 0:
        mods.append(nn.Dropout(dropout))
    mods.append(nn.Linear(cin, num_classes))
    return nn.Sequential(*mods)


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: ``builder(input_shape, num_classes, **kw) -> nn.Module``.

    ``paper_params``: the parameter count the paper reports for (3, 28, 28) inputs and 10 classes
    (None where the paper gives none). ``default_lr``: the paper's initial SGD learning rate.
    ``options``: the extra keyword arguments the builder accepts.
    """

    builder: Callable[..., nn.Module]
    description: str
    paper_params: int | None
    default_lr: float
    options: tuple[str, ...] = ("dropout", "batch_norm")


MODELS: dict[str, ModelSpec] = {
    "mlp-1x512": ModelSpec(_build_mlp_1x512, "MLP, one hidden layer of 512 ReLU units", 1_209_866, 0.01),
    "mlp-3x512": ModelSpec(_build_mlp_3x512, "MLP, three hidden layers of 512 ReLU units", 1_735_178, 0.01),
    "alexnet-small": ModelSpec(
        _build_alexnet_small, "small AlexNet: 2x(conv5x5-64, maxpool, LRN), FC 384, FC 192", 1_387_786, 0.01
    ),
    "inception-small": ModelSpec(_build_inception_small, "small Inception (appendix A) with batch norm", 1_649_402, 0.1),
    "inception-small-nobn": ModelSpec(_build_inception_small_nobn, "small Inception without batch norm", 1_649_402, 0.1),
    "vgg-cifar": ModelSpec(
        _build_vgg_cifar,
        "VGG-style CIFAR net: 3 stages of 2 conv3x3 (width, 2w, 4w), GAP, linear",
        None,
        0.01,
        ("width", "dropout", "batch_norm"),
    ),
    "mlp2": ModelSpec(
        _build_mlp2,
        "2-layer MLP (one hidden layer of configurable width), for MNIST",
        None,
        0.01,
        ("width", "dropout", "batch_norm"),
    ),
}


def model_names() -> list[str]:
    return sorted(MODELS)


def build_model(name: str, input_shape=(3, 28, 28), num_classes: int = 10, **kw) -> nn.Module:
    """Build the registered model ``name`` for inputs of shape ``input_shape`` = (C, H, W).

    Keyword options (each model accepts the subset in ``MODELS[name].options``): ``dropout`` (float
    in [0, 1), default 0), ``batch_norm`` (bool), ``width`` (int; vgg-cifar and mlp2). Options
    set to None are ignored (the model's default applies). The returned module checks the input
    shape on every call. Parameters are initialised from torch's global RNG: seed it (or wrap in
    ``torch.random.fork_rng``) before calling for reproducible weights; the trainer does this.
    """
    if name not in MODELS:
        raise InputError(
            f"unknown model {name!r}. Valid models: {', '.join(model_names())}."
        )
    spec = MODELS[name]
    kw = {k: v for k, v in kw.items() if v is not None}
    bad = sorted(set(kw) - set(spec.options))
    if bad:
        raise InputError(
            f"model {name!r} does not take option(s) {bad}; it accepts {list(spec.options)}."
        )
    if "dropout" in kw and not (0.0 <= float(kw["dropout"]) < 1.0):
        raise InputError(f"dropout must be in [0, 1), got {kw['dropout']!r}.")
    if int(num_classes) < 2:
        raise InputError(f"num_classes must be >= 2, got {num_classes!r}.")
    shape = _check_shape(name, input_shape)
    net = spec.builder(shape, int(num_classes), **kw)
    return ShapeCheckedModel(name, net, shape)
