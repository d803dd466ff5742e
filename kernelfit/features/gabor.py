"""Gabor wavelet features: a filter bank over scales and orientations, applied by batched FFT.

The bank is built from :func:`skimage.filters.gabor_kernel` (complex kernels), so one filter of the
bank applied to one image equals ``skimage.filters.gabor(image, frequency, theta, ...)`` with its
default boundary mode ``'reflect'`` (half-sample symmetric, ``np.pad(mode="symmetric")``).

All images of a block are padded once, transformed with one batched ``scipy.fft.fft2`` call, multiplied
by the precomputed kernel spectra of the whole bank and transformed back in one batched ``ifft2``: no
per-image Python loop. A circular FFT of size ``>= H + 2R`` on an image padded by ``R`` (the largest
kernel radius) is exact on the cropped ``H x W`` window, because no output there wraps around.

Output per image: for every (frequency, orientation) the modulus ``|real + i imag|`` (``output=
"magnitude"``), or the real and imaginary parts, pooled over non-overlapping ``pool x pool`` windows
(mean or max), optionally followed by the pooled pixels themselves, then optionally L2-normalized.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterator

import numpy as np
import scipy.fft
from skimage.filters import gabor_kernel

from ..errors import InputError, MemoryPlanError

__all__ = ["GaborConfig", "GaborBank", "gabor_features"]

_OUTPUTS = ("magnitude", "complex", "real")
_POOL_MODES = ("mean", "max")
_NORMALIZE = ("none", "l2")


@dataclass(frozen=True)
class GaborConfig:
    """Everything that changes the features (hashed into the cache key).

    frequencies: spatial frequencies in cycles / pixel (one scale each; higher = finer, smaller kernel).
    n_orientations: orientations ``theta = k pi / n`` for ``k = 0..n-1``.
    bandwidth: octave bandwidth passed to ``gabor_kernel`` (sets the Gaussian envelope width).
    n_stds: kernel support in envelope standard deviations (``gabor_kernel``'s ``n_stds``).
    output: "magnitude" (modulus), "complex" (real and imaginary parts) or "real".
    pool: non-overlapping pooling window (1 = no pooling); the image side must be divisible by it.
    pool_mode: "mean" or "max".
    include_pixels: append the (pooled the same way) pixels, times ``pixel_weight``.
    pixel_weight: weight of the appended pixels relative to the filter responses.
    normalize: "none" or "l2" (each image's feature vector scaled to unit norm).
    """

    frequencies: tuple[float, ...] = (0.15, 0.25, 0.35)
    n_orientations: int = 8
    bandwidth: float = 1.0
    n_stds: float = 3.0
    output: str = "magnitude"
    pool: int = 4
    pool_mode: str = "mean"
    include_pixels: bool = False
    pixel_weight: float = 1.0
    normalize: str = "none"

    def __post_init__(self):
        object.__setattr__(self, "frequencies", tuple(float(f) for f in self.frequencies))
        if not self.frequencies or any(not (0 < f < 0.5) for f in self.frequencies):
            raise InputError(
                f"GaborConfig.frequencies must be a non-empty list of values in (0, 0.5) cycles/pixel; "
                f"got {self.frequencies}. Fix: e.g. frequencies=(0.15, 0.25, 0.35)."
            )
        if int(self.n_orientations) < 1:
            raise InputError(f"GaborConfig.n_orientations must be >= 1, got {self.n_orientations}.")
        if self.output not in _OUTPUTS:
            raise InputError(f"GaborConfig.output must be one of {_OUTPUTS}, got {self.output!r}.")
        if self.pool_mode not in _POOL_MODES:
            raise InputError(f"GaborConfig.pool_mode must be one of {_POOL_MODES}, got {self.pool_mode!r}.")
        if self.normalize not in _NORMALIZE:
            raise InputError(f"GaborConfig.normalize must be one of {_NORMALIZE}, got {self.normalize!r}.")
        if int(self.pool) < 1:
            raise InputError(f"GaborConfig.pool must be >= 1, got {self.pool}.")
        if self.bandwidth <= 0 or self.n_stds <= 0:
            raise InputError(
                f"GaborConfig.bandwidth and n_stds must be > 0, got {self.bandwidth}, {self.n_stds}."
            )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["kind"] = "gabor"
        return d


class GaborBank:
    """A bank of complex Gabor kernels and the batched FFT transform that applies it.

    ``transform(images)`` takes grayscale images ``(N, H, W)`` or ``(N, H, W, 1)`` (any real dtype; uint8
    is scaled by 1/255) and returns ``(N, n_features)`` float32, computed ``block_size`` images at a time.
    """

    def __init__(self, config: GaborConfig | None = None, **overrides):
        config = config or GaborConfig()
        if overrides:
            config = GaborConfig(**{**asdict(config), **overrides})
        self.config = config
        self.kernels: list[np.ndarray] = []
        self.params: list[tuple[float, float]] = []
        for f in config.frequencies:
            for k in range(int(config.n_orientations)):
                theta = k * math.pi / int(config.n_orientations)
                g = gabor_kernel(f, theta=theta, bandwidth=config.bandwidth, n_stds=config.n_stds)
                self.kernels.append(np.asarray(g, dtype=np.complex128))
                self.params.append((f, theta))
        # Largest half-sizes over the bank: pad once for all filters.
        self.ry = max(g.shape[0] // 2 for g in self.kernels)
        self.rx = max(g.shape[1] // 2 for g in self.kernels)
        self._spectra_cache: dict[tuple[int, int], np.ndarray] = {}

    @property
    def n_filters(self) -> int:
        return len(self.kernels)

    # ---------------------------------------------------------------- input checks
    def _check_images(self, images) -> np.ndarray:
        x = np.asarray(images)
        if x.ndim == 4:
            if x.shape[-1] != 1:
                raise InputError(
                    f"Gabor features expect grayscale images (N, H, W) or (N, H, W, 1); got shape "
                    f"{x.shape} with {x.shape[-1]} channels. Fix: convert to grayscale first, e.g. "
                    f"x.mean(axis=-1), or use kernelfit.features.randconv for colour images."
                )
            x = x[..., 0]
        if x.ndim != 3:
            hint = ""
            if x.ndim == 2:
                side = int(round(math.sqrt(x.shape[1])))
                if side * side == x.shape[1]:
                    hint = f" Flattened images? Reshape with x.reshape(-1, {side}, {side})."
            raise InputError(
                f"Gabor features expect a batch of images of shape (N, H, W); got an array of shape "
                f"{x.shape}.{hint}"
            )
        if x.dtype.kind not in "uif":
            raise InputError(f"images must be a real numeric array; got dtype {x.dtype}.")
        n, h, w = x.shape
        if n == 0:
            raise InputError("images is empty (N = 0); pass at least one image.")
        for g, (f, theta) in zip(self.kernels, self.params):
            if g.shape[0] > h or g.shape[1] > w:
                raise InputError(
                    f"Gabor kernel at frequency {f:g} (theta {theta:.3f}) has size {g.shape[0]}x{g.shape[1]},"
                    f" larger than the {h}x{w} images. Fix: use higher frequencies (>= about "
                    f"{self._min_frequency(min(h, w)):.3f} for these images), a smaller n_stds, or a "
                    f"larger bandwidth."
                )
        p = int(self.config.pool)
        if h % p or w % p:
            raise InputError(
                f"pool = {p} must divide the image size {h}x{w}. Fix: choose a pool among "
                f"{[d for d in range(1, min(h, w) + 1) if h % d == 0 and w % d == 0]}."
            )
        if x.dtype.kind == "f" and not np.all(np.isfinite(x)):
            raise InputError("images contain NaN or inf; clean the data first.")
        return x

    def _min_frequency(self, side: int) -> float:
        # sigma = prefactor / f and the kernel is 2*ceil(n_stds*sigma)+1 wide: solve for size <= side.
        b = self.config.bandwidth
        pref = 1.0 / math.pi * math.sqrt(math.log(2) / 2) * (2.0**b + 1) / (2.0**b - 1)
        return self.config.n_stds * pref / max((side - 1) / 2, 1)

    # ---------------------------------------------------------------- shapes
    def n_features(self, h: int, w: int) -> int:
        p = int(self.config.pool)
        per_map = (h // p) * (w // p)
        maps = self.n_filters * (2 if self.config.output == "complex" else 1)
        return per_map * (maps + (1 if self.config.include_pixels else 0))

    def _fft_shape(self, h: int, w: int) -> tuple[int, int]:
        return (scipy.fft.next_fast_len(h + 2 * self.ry), scipy.fft.next_fast_len(w + 2 * self.rx))

    def _spectra(self, h: int, w: int) -> np.ndarray:
        key = (h, w)
        if key not in self._spectra_cache:
            ly, lx = self._fft_shape(h, w)
            spec = np.empty((self.n_filters, ly, lx), dtype=np.complex128)
            for i, g in enumerate(self.kernels):
                # Centre the kernel at index (0, 0) (circularly) so the FFT product is a convolution
                # whose output index i corresponds to the input index i.
                buf = np.zeros((ly, lx), dtype=np.complex128)
                cy, cx = g.shape[0] // 2, g.shape[1] // 2
                buf[: g.shape[0], : g.shape[1]] = g
                buf = np.roll(buf, (-cy, -cx), axis=(0, 1))
                spec[i] = scipy.fft.fft2(buf)
            self._spectra_cache[key] = spec
        return self._spectra_cache[key]

    # ---------------------------------------------------------------- transform
    def responses(self, images, workers: int | None = None, single: bool = False) -> np.ndarray:
        """Complex filter responses ``(N, n_filters, H, W)`` (complex128; complex64 when ``single``).

        Equals ``real + 1j * imag`` of ``skimage.filters.gabor(image, f, theta, bandwidth, n_stds=...)``
        for every image and filter. Used by ``transform``; exposed for tests and inspection.
        """
        x = self._check_images(images)
        x = _to_float(x, np.float32 if single else np.float64)
        n, h, w = x.shape
        ly, lx = self._fft_shape(h, w)
        spec = self._spectra(h, w)
        if single:  # features are float32 anyway; halves FFT time and memory
            spec = spec.astype(np.complex64)
        padded = np.pad(x, ((0, 0), (self.ry, self.ry), (self.rx, self.rx)), mode="symmetric")
        fx = scipy.fft.fft2(padded, s=(ly, lx), axes=(1, 2), workers=workers)  # (n, ly, lx)
        out = scipy.fft.ifft2(fx[:, None] * spec[None], axes=(2, 3), workers=workers,
                              overwrite_x=True)
        return out[:, :, self.ry : self.ry + h, self.rx : self.rx + w]

    def _pool(self, maps: np.ndarray) -> np.ndarray:
        p = int(self.config.pool)
        if p == 1:
            return maps
        n, c, h, w = maps.shape
        r = maps.reshape(n, c, h // p, p, w // p, p)
        return r.mean(axis=(3, 5)) if self.config.pool_mode == "mean" else r.max(axis=(3, 5))

    def _features_block(self, x: np.ndarray, workers: int | None) -> np.ndarray:
        resp = self.responses(x, workers=workers, single=True)
        if self.config.output == "magnitude":
            maps = np.abs(resp)
        elif self.config.output == "real":
            maps = resp.real
        else:
            maps = np.concatenate([resp.real, resp.imag], axis=1)
        parts = [self._pool(maps).reshape(len(x), -1)]
        if self.config.include_pixels:
            pix = _to_float(self._check_images(x), np.float64)[:, None]
            parts.append(self.config.pixel_weight * self._pool(pix).reshape(len(x), -1))
        feats = np.concatenate(parts, axis=1)
        if self.config.normalize == "l2":
            feats /= np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
        return feats.astype(np.float32)

    def iter_blocks(self, images, block_size: int = 1024, workers: int | None = None
                    ) -> Iterator[tuple[slice, np.ndarray]]:
        """Yield ``(rows, features)`` for consecutive blocks of ``block_size`` images."""
        x = self._check_images(images)
        for start in range(0, len(x), block_size):
            sl = slice(start, min(start + block_size, len(x)))
            yield sl, self._features_block(x[sl], workers)

    def plan_bytes(self, images_shape) -> int:
        n, h, w = images_shape[0], images_shape[1], images_shape[2]
        return int(n) * self.n_features(h, w) * 4

    def transform(self, images, block_size: int = 1024, workers: int | None = None,
                  out: np.ndarray | None = None, max_bytes: int | None = None) -> np.ndarray:
        """Features ``(N, n_features)`` float32, computed block by block into ``out`` (or a new array).

        Refuses (``MemoryPlanError``) before allocating when the output would not fit in ``max_bytes``
        (default: 80% of the available memory); pass ``out=`` a memmap to stream to disk instead.
        """
        x = self._check_images(images)
        n, h, w = x.shape
        d = self.n_features(h, w)
        if out is None:
            need = n * d * 4
            limit = max_bytes if max_bytes is not None else _available_bytes() * 0.8
            if need > limit:
                raise MemoryPlanError(
                    f"Gabor feature matrix would be {n} x {d} float32 = {need / 2**30:.2f} GiB, more than "
                    f"the {limit / 2**30:.2f} GiB allowed. Plan: stream to disk with "
                    f"kernelfit.features.cache.cached_transform (memmap), or reduce the bank "
                    f"({self.n_filters} filters) / increase pool (now {self.config.pool}).",
                    plan={"n": n, "n_features": d, "bytes": need, "limit": limit},
                )
            out = np.empty((n, d), dtype=np.float32)
        elif out.shape != (n, d):
            raise InputError(f"out has shape {out.shape}, expected {(n, d)}.")
        from ..progress import progress_bar

        # a line every few seconds when the images take more than one block (a full data set: minutes on a CPU)
        bar = progress_bar(total=n, desc=f"Gabor features ({self.n_filters} filters)", unit="img",
                           enabled=n > block_size, logger="kernelfit.features")
        for sl, block in self.iter_blocks(x, block_size=block_size, workers=workers):
            out[sl] = block
            if bar is not None:
                bar.update(sl.stop - sl.start)
        if bar is not None:
            bar.close()
        return out


def gabor_features(images, config: GaborConfig | None = None, block_size: int = 1024, **overrides
                   ) -> np.ndarray:
    """Convenience: ``GaborBank(config, **overrides).transform(images)``."""
    return GaborBank(config, **overrides).transform(images, block_size=block_size)


def _to_float(x: np.ndarray, dtype) -> np.ndarray:
    if x.dtype == np.uint8:
        return x.astype(dtype) / 255.0
    return x.astype(dtype, copy=False)


def _available_bytes() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # pragma: no cover - psutil is a dependency, but keep a sane fallback
        return 8 * 2**30
