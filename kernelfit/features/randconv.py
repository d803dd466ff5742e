"""Random-convolution features in the style of Coates & Ng (2011), and a blockwise Gram.

Pipeline for an image (H, W, C):
  1. all ``p x p`` patches at stride 1 (``(H-p+1) (W-p+1)`` positions, ``p*p*C`` values each);
  2. per-patch brightness / contrast normalization ``(x - mean) / sqrt(var + contrast_eps)``;
  3. ZCA whitening ``(x - mu) W`` with ``W = V diag(1 / sqrt(s + zca_eps)) V^T`` estimated from
     ``n_whitening_patches`` random training patches (seeded);
  4. F random unit-norm filters: Gaussian, or whitened training patches (``filters="patches"``);
  5. symmetric rectifier with a bias: ``max(0, z - bias)`` and ``max(0, -z - bias)`` (z = w.x);
  6. sum pooling of each of the two maps over a ``pool_grid x pool_grid`` grid of image regions.
So each filter gives ``2 * pool_grid**2`` features: 32,000 filters and a 2x2 grid give 256,000.

Steps 1-4 run as one convolution of the image: whitening is linear, so it folds into the filters
(``z = u . g - mu . g`` with ``g = W f``), and the per-patch normalization ``u = (x - m 1) / s`` does too:
``x . g - m sum(g) = x . (g - mean(g) 1)``, so ``z = conv(x, g - mean(g)) / s - mu . g`` with ``m``, ``s``
from box filters. Nothing of size (positions x p*p*C) is ever built, and the same code runs on any torch
device (CPU, CUDA). Rectifier and pooling are one soft-threshold and two small matmuls with a 0/1 pooling
matrix.

The CIFAR-10 feature matrix at that size is ~60 GB (60,000 x 256,000 float32), so it is never built:
``accumulate_gram`` computes the features of all images for one block of filters at a time and adds
that block's contribution ``Phi_b Phi_b^T`` (float32 GEMM, TF32 off, accumulated in float64) to the
Gram (train x train, test x train and the test diagonal), optionally standardizing each feature with
its training mean / std first (each block holds all images for its columns, so the statistics are
exact). A Gaussian kernel on the features then follows from the squared distances
``g_ii + g_jj - 2 g_ij``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterator

import numpy as np

from ..errors import InputError, MemoryPlanError
from .gabor import _available_bytes
from .randconv_gram import DEFAULT_GRAM_OPTIONS, GramBlocks, GramOptions, accumulate_gram, gram_plan
from .randconv_gram import torch_device as _device

__all__ = ["RandConvConfig", "RandConvFeatures", "GramBlocks", "zca_whitening"]

_FILTERS = ("gaussian", "patches")


@dataclass(frozen=True)
class RandConvConfig:
    """Everything that changes the features (hashed into cache keys / result records).

    n_filters: number of random filters F (features = 2 * pool_grid**2 * F).
    patch_size: p (filters are p x p x C).
    filters: "gaussian" (i.i.d. normal, unit-normed) or "patches" (random whitened training patches).
    bias: rectifier threshold alpha in max(0, +-z - alpha) (Coates & Ng use 0.25 on whitened data).
    pool_grid: sum-pooling grid per side (2 -> quadrants).
    contrast_eps: added to the patch variance before dividing (pixels scaled to [0, 1];
        10 / 255**2 is Coates & Ng's 10 on the 0..255 scale).
    zca_eps: added to the covariance eigenvalues in ZCA whitening.
    n_whitening_patches: random training patches used to estimate the whitening (and to draw filters).
    seed: seeds every random choice (patch sampling, filters); nothing global is touched.
    """

    n_filters: int = 1024
    patch_size: int = 6
    filters: str = "gaussian"
    bias: float = 0.25
    pool_grid: int = 2
    contrast_eps: float = 10.0 / 255.0**2
    zca_eps: float = 0.1
    n_whitening_patches: int = 100_000
    seed: int = 0

    def __post_init__(self):
        if int(self.n_filters) < 1:
            raise InputError(f"RandConvConfig.n_filters must be >= 1, got {self.n_filters}.")
        if int(self.patch_size) < 1:
            raise InputError(f"RandConvConfig.patch_size must be >= 1, got {self.patch_size}.")
        if self.filters not in _FILTERS:
            raise InputError(f"RandConvConfig.filters must be one of {_FILTERS}, got {self.filters!r}.")
        if int(self.pool_grid) < 1:
            raise InputError(f"RandConvConfig.pool_grid must be >= 1, got {self.pool_grid}.")
        if self.zca_eps < 0 or self.contrast_eps < 0:
            raise InputError("RandConvConfig.zca_eps and contrast_eps must be >= 0.")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["kind"] = "randconv"
        return d


def zca_whitening(patches: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Mean and ZCA matrix ``W`` (symmetric) so that ``(x - mean) @ W`` has covariance
    ``V diag(s / (s + eps)) V^T`` (the identity when eps = 0 and the covariance is full rank)."""
    x = np.asarray(patches, dtype=np.float64)
    mean = x.mean(axis=0)
    xc = x - mean
    cov = xc.T @ xc / max(len(x) - 1, 1)
    s, v = np.linalg.eigh(cov)
    s = np.maximum(s, 0.0)
    if eps == 0 and s.min() <= 1e-12 * max(s.max(), 1e-300):
        raise InputError("patch covariance is singular; ZCA with zca_eps = 0 is undefined. Use zca_eps > 0.")
    w = (v / np.sqrt(s + eps)) @ v.T
    return mean, w


class RandConvFeatures:
    """Coates & Ng random-convolution feature map. ``fit`` on training images, then blocks."""

    def __init__(self, config: RandConvConfig | None = None, **overrides):
        config = config or RandConvConfig()
        if overrides:
            config = RandConvConfig(**{**asdict(config), **overrides})
        self.config = config
        self.image_shape_: tuple[int, int, int] | None = None
        self.mean_ = self.whiten_ = self.filters_ = None

    # ------------------------------------------------------------ checks
    def _as_images(self, images, fitting: bool = False) -> np.ndarray:
        x = np.asarray(images)
        if x.ndim == 3:
            x = x[..., None]  # grayscale (N, H, W) -> one channel
        if x.ndim != 4:
            raise InputError(
                f"random-conv features expect images of shape (N, H, W, C) (HWC, as load_dataset returns)"
                f" or (N, H, W); got shape {x.shape}. Flattened CIFAR-10 rows reshape with "
                f"x.reshape(-1, 32, 32, 3)."
            )
        if x.shape[1] <= 4 and x.shape[3] > 4:
            raise InputError(
                f"images look channels-first (N, C, H, W) = {x.shape}; expected HWC. Fix: "
                f"x.transpose(0, 2, 3, 1)."
            )
        if x.dtype.kind not in "uif":
            raise InputError(f"images must be a real numeric array; got dtype {x.dtype}.")
        n, h, w, c = x.shape
        if n == 0:
            raise InputError("images is empty (N = 0).")
        p = int(self.config.patch_size)
        if p > h or p > w:
            raise InputError(
                f"patch (filter) size {p}x{p} is larger than the {h}x{w} images. Fix: patch_size <= {min(h, w)}."
            )
        positions = min(h, w) - p + 1
        if self.config.pool_grid > positions:
            raise InputError(
                f"pool_grid = {self.config.pool_grid} exceeds the {positions} patch positions per side."
            )
        if not fitting:
            if self.image_shape_ is None:
                raise InputError("RandConvFeatures is not fitted; call fit(train_images) first.")
            if (h, w, c) != self.image_shape_:
                raise InputError(
                    f"images have shape (H, W, C) = {(h, w, c)} but the feature map was fitted on "
                    f"{self.image_shape_} ({self.image_shape_[2]} channels). Fix: pass images of the "
                    f"same size and channel count as the training images."
                )
        return x

    # ------------------------------------------------------------ fitting
    def _raw_patches(self, x: np.ndarray) -> np.ndarray:
        """(B, positions, p*p*C) float32 normalized patches of a block of images."""
        p = int(self.config.patch_size)
        xf = x.astype(np.float32)
        if x.dtype == np.uint8:
            xf /= 255.0
        win = np.lib.stride_tricks.sliding_window_view(xf, (p, p), axis=(1, 2))  # (B, oh, ow, C, p, p)
        b, oh, ow = win.shape[:3]
        pt = np.array(win.transpose(0, 1, 2, 4, 5, 3), dtype=np.float32, order="C").reshape(b, oh * ow, -1)
        pt -= pt.mean(axis=2, keepdims=True)
        pt /= np.sqrt((pt * pt).mean(axis=2, keepdims=True) + np.float32(self.config.contrast_eps))
        return pt

    def fit(self, images) -> "RandConvFeatures":
        x = self._as_images(images, fitting=True)
        cfg = self.config
        rng = np.random.default_rng(cfg.seed)
        n, h, w, c = x.shape
        p = int(cfg.patch_size)
        oh, ow = h - p + 1, w - p + 1
        # Sample (image, position) pairs and cut exactly those patches.
        m = int(cfg.n_whitening_patches)
        img = rng.integers(0, n, size=m)
        pos_y = rng.integers(0, oh, size=m)
        pos_x = rng.integers(0, ow, size=m)
        ar = np.arange(p)
        cut = x[img[:, None, None], (pos_y[:, None] + ar)[:, :, None], (pos_x[:, None] + ar)[:, None, :]]
        pt = self._raw_patches(cut)[:, 0, :]  # a p x p image has exactly one patch
        self.mean_, self.whiten_ = zca_whitening(pt, cfg.zca_eps)
        self.mean_ = self.mean_.astype(np.float32)
        self.whiten_ = self.whiten_.astype(np.float32)
        dim = pt.shape[1]
        if cfg.filters == "gaussian":
            f = rng.standard_normal((int(cfg.n_filters), dim))
        else:
            pick = rng.integers(0, m, size=int(cfg.n_filters))
            f = (pt[pick] - self.mean_) @ self.whiten_
        f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
        self.filters_ = np.ascontiguousarray(f, dtype=np.float32)
        self.image_shape_ = (h, w, c)
        return self

    # ------------------------------------------------------------ features
    @property
    def n_features(self) -> int:
        return 2 * int(self.config.pool_grid) ** 2 * int(self.config.n_filters)

    def whitened_patches(self, images) -> np.ndarray:
        x = self._as_images(images)
        return (self._raw_patches(x) - self.mean_) @ self.whiten_

    def _pool_bounds(self, size: int) -> list[tuple[int, int]]:
        edges = np.linspace(0, size, int(self.config.pool_grid) + 1).round().astype(int)
        return list(zip(edges[:-1], edges[1:]))

    def _pool_matrix(self, oh: int, ow: int) -> np.ndarray:
        """(oh*ow, g*g) 0/1 matrix: column c sums the positions of grid cell c (row-major cells)."""
        g = int(self.config.pool_grid)
        P = np.zeros((oh, ow, g * g), dtype=np.float32)
        for i, (y0, y1) in enumerate(self._pool_bounds(oh)):
            for j, (x0, x1) in enumerate(self._pool_bounds(ow)):
                P[y0:y1, x0:x1, i * g + j] = 1.0
        return P.reshape(oh * ow, g * g)

    def _folded_filters(self, filt: slice, device):
        """Conv weights (Fb, C, p, p) = centred ``W f`` and offsets ``mu . W f`` (Fb,) for the filters ``filt``."""
        import torch

        h, w, c = self.image_shape_
        p = int(self.config.patch_size)
        g = self.filters_[filt].astype(np.float64) @ self.whiten_.astype(np.float64)   # rows W f (W symmetric)
        offset = g @ self.mean_.astype(np.float64)
        g -= g.mean(axis=1, keepdims=True)      # absorbs the patch-mean subtraction
        weight = g.reshape(-1, p, p, c).transpose(0, 3, 1, 2)   # patch order (dy, dx, c) -> conv (c, dy, dx)
        return (torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32)).to(device),
                torch.from_numpy(offset.astype(np.float32)).to(device).view(1, -1, 1, 1))

    def _features_block(self, x: np.ndarray, weight, offset, pool, device):
        """Features (B, 2 g^2 Fb) float32 torch tensor on ``device`` of images x (B, H, W, C).

        Column order: sign (+, -), then grid cell (row-major), then filter within the block.
        """
        import torch
        import torch.nn.functional as F

        p = int(self.config.patch_size)
        xt = torch.from_numpy(np.ascontiguousarray(x)).to(device).permute(0, 3, 1, 2).float().contiguous()
        if x.dtype == np.uint8:
            xt /= 255.0
        xt -= 0.5   # smaller magnitudes, fewer digits lost in the float32 dot products (filters sum to 0)
        x64 = xt.double()
        m = F.avg_pool2d(x64.mean(1, keepdim=True), p, stride=1)      # patch means (B, 1, oh, ow)
        m2 = F.avg_pool2d((x64 * x64).mean(1, keepdim=True), p, stride=1)
        inv_s = torch.rsqrt((m2 - m * m).clamp_min(0.0) + self.config.contrast_eps).float()
        z = F.conv2d(xt, weight)                                        # (B, Fb, oh, ow)
        z.mul_(inv_s).sub_(offset)
        b, fb = z.shape[:2]
        t = F.softshrink(z, float(self.config.bias)).view(b * fb, -1)  # relu(z - a) - relu(-z - a)
        del z
        shrunk = t @ pool
        pos = t.relu_() @ pool
        cells = pool.shape[1]
        out = torch.cat([pos.view(b, fb, cells), (pos - shrunk).view(b, fb, cells)], dim=2)  # (B, Fb, 2 g^2)
        return out.transpose(1, 2).reshape(b, -1)

    def _torch_blocks(self, x: np.ndarray, filter_block: int, image_block: int | None, device, start: int = 0):
        """Yield ``(f0, f1, Phi_b)`` with Phi_b (N, 2 g^2 (f1 - f0)) float32 torch tensors on ``device``,
        for the filters from ``start`` on."""
        import torch

        from ..linalg.backend_torch import tf32_disabled

        h, w, _ = self.image_shape_
        p = int(self.config.patch_size)
        pool = torch.from_numpy(self._pool_matrix(h - p + 1, w - p + 1)).to(device)
        # CPU: small image blocks keep the (B, Fb, positions) maps in cache; a GPU wants big ones
        ib = int(image_block or (16 if device.type == "cpu" else 1024))
        n = len(x)
        F = int(self.config.n_filters)
        cells = 2 * int(self.config.pool_grid) ** 2
        for f0 in range(start, F, filter_block):
            f1 = min(f0 + filter_block, F)
            weight, offset = self._folded_filters(slice(f0, f1), device)
            out = torch.empty((n, cells * (f1 - f0)), dtype=torch.float32, device=device)
            with tf32_disabled():   # cuDNN convolutions default to TF32 (10-bit mantissa)
                for i0 in range(0, n, ib):
                    out[i0 : i0 + ib] = self._features_block(x[i0 : i0 + ib], weight, offset, pool, device)
            yield f0, f1, out

    def iter_filter_blocks(self, images, filter_block: int = 256, image_block: int | None = None, device=None
                           ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(feature column indices, Phi_b (N, 2 g^2 Fb) float32 numpy)`` for blocks of filters.

        Column indices refer to the layout of ``transform`` so that concatenating the blocks in those
        columns reproduces the full feature matrix. ``device``: torch device for the computation
        (default CPU).
        """
        x = self._as_images(images)
        F = int(self.config.n_filters)
        cells = 2 * int(self.config.pool_grid) ** 2
        for f0, f1, out in self._torch_blocks(x, filter_block, image_block, _device(device)):
            cols = (np.arange(cells)[:, None] * F + np.arange(f0, f1)[None, :]).ravel()
            yield cols, out.cpu().numpy()

    def transform(self, images, filter_block: int = 256, image_block: int | None = None,
                  max_bytes: int | None = None, device=None) -> np.ndarray:
        """The full feature matrix (N, n_features) float32 -- only for small problems.

        Refuses with the plan (``MemoryPlanError``) when it would not fit; use ``accumulate_gram``.
        """
        x = self._as_images(images)
        n = len(x)
        need = n * self.n_features * 4
        limit = max_bytes if max_bytes is not None else 0.5 * _available_bytes()
        if need > limit:
            raise MemoryPlanError(
                f"random-conv feature matrix would be {n} x {self.n_features} float32 = "
                f"{need / 2**30:.1f} GiB, more than the {limit / 2**30:.1f} GiB allowed. Plan: never "
                f"materialize it -- use RandConvFeatures.accumulate_gram (feature blocks of "
                f"filter_block filters, Gram {n} x {n} float64 = {n * n * 8 / 2**30:.1f} GiB), or reduce "
                f"n_filters ({self.config.n_filters}) / n ({n}).",
                plan={"n": n, "n_features": self.n_features, "bytes": need, "limit": limit},
            )
        out = np.empty((n, self.n_features), dtype=np.float32)
        for cols, block in self.iter_filter_blocks(x, filter_block, image_block, device):
            out[:, cols] = block
        return out

    # ------------------------------------------------------------ Gram accumulation (randconv_gram.py)
    def gram_plan(self, n: int, m: int = 0, filter_block: int = 256, panels: bool = False) -> dict:
        """Bytes of the Gram and of one feature block (``randconv_gram.gram_plan``)."""
        return gram_plan(self, n, m, filter_block, panels)

    def accumulate_gram(self, train_images, test_images=None, options: GramOptions = DEFAULT_GRAM_OPTIONS, *,
                        progress=None, checkpoint=None, checkpoint_every: float = 1800.0,
                        resume: GramBlocks | None = None) -> GramBlocks:
        """The Gram of these features, one filter block at a time: ``randconv_gram.accumulate_gram``."""
        return accumulate_gram(self, train_images, test_images, options, progress=progress, checkpoint=checkpoint,
                               checkpoint_every=checkpoint_every, resume=resume)
