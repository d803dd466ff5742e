"""deepfit's data adapter: kernelfit's readers + randomizations -> preprocessed device-ready tensors.

Nothing here reads files or randomizes labels/pixels itself: datasets come from
``kernelfit.data.load_dataset`` and the six variants from ``kernelfit.randomize``. This module only
turns the result into float32 NCHW tensors with the paper's preprocessing (appendix A: centre crop
to 28x28, then per-image whitening as TensorFlow's ``per_image_standardization``) or a plain
normalization (pixels / 255 standardized per channel with training-set statistics), and provides
the random-crop augmentation used by the ``augment`` toggle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kernelfit.errors import InputError

__all__ = ["PreparedData", "to_nchw", "center_crop", "per_image_whiten", "prepare_data", "prepare_arrays",
           "PREPROCESS_MODES"]

PREPROCESS_MODES = ("whiten", "normalize", "scale")  # scale: pixels / 255 (deepfit measure only)


def to_nchw(x) -> torch.Tensor:
    """uint8/float images (N, H, W) or (N, H, W, C) -> float32 tensor (N, C, H, W), pixel scale kept."""
    t = torch.as_tensor(np.asarray(x)).to(torch.float32)
    if t.ndim == 3:
        return t.unsqueeze(1)
    if t.ndim == 4:
        return t.permute(0, 3, 1, 2).contiguous()
    raise InputError(f"expected images of shape (N, H, W) or (N, H, W, C), got shape {tuple(t.shape)}.")


def center_crop(x: torch.Tensor, size: int | None) -> torch.Tensor:
    """Centre crop (N, C, H, W) to size x size (offset floor((H - size) / 2), as TF's crop_or_pad)."""
    if size is None:
        return x
    h, w = x.shape[-2:]
    if size > h or size > w:
        raise InputError(
            f"cannot centre-crop images of size {h}x{w} to {size}x{size}: the crop is larger than the image. "
            f"Fix: use crop <= {min(h, w)} or crop=None."
        )
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top:top + size, left:left + size]


def per_image_whiten(x: torch.Tensor) -> torch.Tensor:
    """(x - mean) / max(std, 1/sqrt(numel)) over each image's pixels and channels (TF semantics)."""
    flat = x.reshape(x.shape[0], -1)
    mean = flat.mean(1, keepdim=True)
    std = flat.std(1, unbiased=False, keepdim=True)
    std = torch.clamp(std, min=1.0 / float(flat.shape[1]) ** 0.5)
    return ((flat - mean) / std).reshape(x.shape)


@dataclass
class PreparedData:
    """Tensors ready for :func:`deepfit.train.train`.

    ``x_train`` is what minibatches are drawn from: the preprocessed training images, or with
    augmentation the raw (un-cropped, pixel-scale) images that :meth:`train_batch` crops and
    normalizes per batch; ``x_train_eval`` is then the preprocessed centre-cropped training set
    (None without augmentation). ``info`` records dataset, sizes, preprocessing and the
    randomization's own info dict.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    input_shape: tuple[int, int, int]
    info: dict[str, Any] = field(default_factory=dict)
    x_train_eval: torch.Tensor | None = None
    preprocess: str = "whiten"
    crop: int | None = 28
    channel_mean: torch.Tensor | None = None
    channel_std: torch.Tensor | None = None

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        if self.preprocess == "whiten":
            return per_image_whiten(x)
        if self.preprocess == "scale":
            return x / 255.0
        mean = self.channel_mean.to(x.device).view(1, -1, 1, 1)
        std = self.channel_std.to(x.device).view(1, -1, 1, 1)
        return (x / 255.0 - mean) / std

    def train_batch(self, xb: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Random crop (offsets drawn from ``gen``) of raw images to the model's size, then normalize."""
        size = self.input_shape[1]
        h, w = xb.shape[-2:]
        dy = torch.randint(0, h - size + 1, (xb.shape[0],), generator=gen)
        dx = torch.randint(0, w - size + 1, (xb.shape[0],), generator=gen)
        out = torch.empty(xb.shape[0], xb.shape[1], size, size, dtype=xb.dtype, device=xb.device)
        # Group by offset: at most (h-size+1)*(w-size+1) slicing ops instead of one per image.
        key = (dy * (w - size + 1) + dx).tolist()
        groups: dict[int, list[int]] = {}
        for i, k in enumerate(key):
            groups.setdefault(k, []).append(i)
        for k, rows in groups.items():
            oy, ox = divmod(k, w - size + 1)
            r = torch.as_tensor(rows, device=xb.device)
            out[r] = xb[r, :, oy:oy + size, ox:ox + size]
        return self._normalize(out)


def prepare_arrays(x_train, y_train, x_test, y_test, num_classes: int, *, preprocess: str = "whiten",
                   crop: int | None = 28, augment: bool = False, info: dict | None = None) -> PreparedData:
    """Preprocess numpy arrays (uint8 or float pixel-scale images) into a :class:`PreparedData`."""
    if preprocess not in PREPROCESS_MODES:
        raise InputError(f"preprocess must be one of {PREPROCESS_MODES}, got {preprocess!r}.")
    xtr, xte = to_nchw(x_train), to_nchw(x_test)
    h, w = xtr.shape[-2:]
    if crop is not None and (crop > h or crop > w):
        raise InputError(
            f"crop {crop} is larger than the images ({h}x{w}). Fix: use crop <= {min(h, w)} or no crop."
        )
    mean = std = None
    if preprocess == "normalize":
        c = center_crop(xtr, crop) / 255.0
        mean = c.mean(dim=(0, 2, 3))
        std = c.std(dim=(0, 2, 3)).clamp(min=1e-6)
    pd = PreparedData(
        x_train=xtr, y_train=torch.as_tensor(np.asarray(y_train), dtype=torch.int64),
        x_test=xte, y_test=torch.as_tensor(np.asarray(y_test), dtype=torch.int64),
        num_classes=int(num_classes), input_shape=(int(xtr.shape[1]), int(crop or h), int(crop or w)),
        info=dict(info or {}), preprocess=preprocess, crop=crop, channel_mean=mean, channel_std=std,
    )
    pd.x_test = pd._normalize(center_crop(xte, crop)).contiguous()
    evaluated = pd._normalize(center_crop(xtr, crop)).contiguous()
    if augment:
        if crop is None or (crop == h and crop == w):
            # Nothing to crop from: pad by 2 pixels (zeros in pixel space) so crops can move.
            xtr = torch.nn.functional.pad(xtr, (2, 2, 2, 2))
            if crop is None:
                pd.input_shape = (int(xtr.shape[1]), int(h), int(w))
        pd.x_train = xtr.contiguous()
        pd.x_train_eval = evaluated
    else:
        pd.x_train = evaluated
    pd.info.update({"preprocess": preprocess, "crop": crop, "augment": bool(augment),
                    "input_shape": list(pd.input_shape)})
    return pd


def prepare_data(config, data_dir=None, download: bool = False) -> PreparedData:
    """Load ``config.dataset`` through kernelfit's reader, randomize it, preprocess it.

    ``config`` is a :class:`deepfit.train.TrainConfig` (fields dataset, n_train, n_test,
    data_seed, variant, p, corrupt_test, preprocess, crop, augment).
    """
    from kernelfit.data import load_dataset
    from kernelfit.randomize import VARIANTS, Randomization, apply_randomization

    if config.variant not in VARIANTS:
        raise InputError(f"unknown variant {config.variant!r}. Valid variants: {', '.join(VARIANTS)}.")
    ds = load_dataset(config.dataset, data_dir=data_dir, download=download)
    if config.n_train is not None or config.n_test is not None:
        n_tr = len(ds.y_train) if config.n_train is None else int(config.n_train)
        n_te = len(ds.y_test) if config.n_test is None else int(config.n_test)
        if n_tr > len(ds.y_train) or n_te > len(ds.y_test):
            raise InputError(
                f"requested n_train={n_tr}, n_test={n_te} but {config.dataset} has "
                f"{len(ds.y_train)} training and {len(ds.y_test)} test images. Fix: ask for fewer."
            )
        ds = ds.subset(n_tr, n_te, seed=config.data_seed)
    r = Randomization(config.variant, p=float(config.p), seed=int(config.data_seed), corrupt_test=bool(config.corrupt_test))
    ds, rinfo = apply_randomization(ds, r)
    info = {"dataset": config.dataset, "n_train": int(len(ds.y_train)), "n_test": int(len(ds.y_test)),
            "randomization": rinfo, "test_labels": "corrupted" if config.corrupt_test else "clean"}
    return prepare_arrays(ds.x_train, ds.y_train, ds.x_test, ds.y_test, ds.num_classes,
                          preprocess=config.preprocess, crop=config.crop, augment=config.augment, info=info)
