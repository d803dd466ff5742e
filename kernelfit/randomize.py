"""Randomization tests of Zhang et al., "Understanding deep learning (still) requires rethinking
generalization": label corruption, random labels, shuffled / random pixels, Gaussian images.

Pure functions: every random choice takes an explicit ``numpy.random.Generator`` (or an int seed),
nothing reads or sets global random state, and input arrays are never modified in place.
Used by both kernelfit and deepfit, so that both halves run the very same randomized data.

Variants (``VARIANTS``)
-----------------------
``true``             the data as is
``corrupt``          each training label, with probability ``p``, replaced by a uniformly random class
                     (which may equal the old one: the expected fraction changed is p * (1 - 1/K))
``random-labels``    every training label replaced by a uniformly random class (``corrupt`` at p = 1)
``shuffled-pixels``  one random permutation of pixel positions, the same for every train and test image
``random-pixels``    an independent random permutation of pixel positions for every image
``gaussian``         every image replaced by Gaussian noise with the per-channel mean and variance of the
                     training images (float32, pixel units 0..255, not clipped)

Pixel permutations move whole pixels: the channels of a color pixel stay together.
Test labels stay clean unless ``corrupt_test=True`` (corrupting the test set silently is a known
trap). Pixel variants are applied to the test images too (with the same permutation for
``shuffled-pixels``, fresh permutations for ``random-pixels``, and the training moments for
``gaussian``), so the test set is drawn from the same randomized distribution.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from kernelfit.catalog import LABEL_VARIANTS as _LABEL_VARIANTS
from kernelfit.catalog import PIXEL_VARIANTS as _PIXEL_VARIANTS
from kernelfit.catalog import VARIANTS
from kernelfit.errors import InputError

__all__ = [
    "VARIANTS",
    "Randomization",
    "apply_randomization",
    "corrupt_labels",
    "gaussian_pixels",
    "random_labels",
    "random_pixels",
    "shuffle_pixels",
]

_CHUNK = 1024  # images per block in random_pixels / moments (bounds temporary memory)


# ---- validation helpers ---------------------------------------------------------------------

def _rng(rng, fn: str) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool) and rng >= 0:
        return np.random.default_rng(int(rng))
    raise InputError(
        f"{fn}: rng must be a numpy.random.Generator or a non-negative int seed, got {rng!r}. "
        f"Pass e.g. np.random.default_rng(0); kernelfit never uses global random state."
    )


def _check_p(p, fn: str) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float, np.integer, np.floating)):
        raise InputError(f"{fn}: p must be a number in [0, 1], got {p!r}.")
    p = float(p)
    if not (0.0 <= p <= 1.0):  # also rejects NaN
        raise InputError(f"{fn}: p must lie in [0, 1] (the probability of replacing a label), got {p}.")
    return p


def _check_k(num_classes, fn: str) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
        raise InputError(f"{fn}: num_classes must be an int >= 2, got {num_classes!r}.")
    return int(num_classes)


def _check_y(y, k: int, fn: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1 or y.dtype == bool or not np.issubdtype(y.dtype, np.integer):
        raise InputError(f"{fn}: y must be a 1-D integer label vector, got shape {y.shape} dtype {y.dtype}.")
    if len(y) and (y.min() < 0 or y.max() >= k):
        raise InputError(f"{fn}: labels must lie in [0, {k}), found values in [{y.min()}, {y.max()}].")
    return y


def _as_pixels(x, fn: str, what: str = "x") -> tuple[np.ndarray, tuple[int, ...]]:
    """View images (N, H, W) / (N, H, W, C) / (N, D) as (N, P, C) with P pixel positions."""
    x = np.asarray(x)
    if x.ndim == 2:
        return x.reshape(len(x), -1, 1), x.shape
    if x.ndim == 3:
        return x.reshape(len(x), -1, 1), x.shape
    if x.ndim == 4:
        return x.reshape(len(x), -1, x.shape[3]), x.shape
    raise InputError(f"{fn}: {what} must be images (N, H, W) or (N, H, W, C) (or flat (N, D)), got shape {x.shape}.")


# ---- label randomizations ---------------------------------------------------------------------

def corrupt_labels(y, p, num_classes, rng) -> tuple[np.ndarray, float]:
    """Zhang et al.'s partially corrupted labels: independently with probability ``p`` each label is
    replaced by a class drawn uniformly from ``num_classes`` (possibly the same class).

    Returns ``(new_labels, fraction_changed)`` where ``fraction_changed`` is the fraction of labels
    that actually differ (expected value ``p * (1 - 1/num_classes)``). ``new_labels`` has y's dtype.
    """
    fn = "corrupt_labels"
    k = _check_k(num_classes, fn)
    p = _check_p(p, fn)
    y = _check_y(y, k, fn)
    rng = _rng(rng, fn)
    mask = rng.random(len(y)) < p
    new = y.copy()
    new[mask] = rng.integers(0, k, size=int(mask.sum()))
    changed = float(np.count_nonzero(new != y)) / len(y) if len(y) else 0.0
    return new, changed


def random_labels(y, num_classes, rng) -> np.ndarray:
    """Every label replaced by a class drawn uniformly from ``num_classes`` (y's dtype and length)."""
    fn = "random_labels"
    k = _check_k(num_classes, fn)
    y = _check_y(y, k, fn)
    rng = _rng(rng, fn)
    return rng.integers(0, k, size=len(y)).astype(y.dtype, copy=False)


# ---- pixel randomizations ---------------------------------------------------------------------

def shuffle_pixels(x_train, x_test, rng) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Apply ONE random permutation of pixel positions to every train and test image.

    The channels of a pixel move together. Returns ``(x_train_shuffled, x_test_shuffled, perm)``
    where ``perm`` indexes flattened pixel positions: ``new.reshape(N, P, C)[:, i] ==
    old.reshape(N, P, C)[:, perm[i]]``. ``x_test`` may be None (then None is returned for it).
    """
    fn = "shuffle_pixels"
    xtr, shape_tr = _as_pixels(x_train, fn, "x_train")
    rng = _rng(rng, fn)
    if x_test is not None:
        xte, shape_te = _as_pixels(x_test, fn, "x_test")
        if shape_te[1:] != shape_tr[1:]:
            raise InputError(f"{fn}: train and test images differ in shape: {shape_tr[1:]} vs {shape_te[1:]}.")
    perm = rng.permutation(xtr.shape[1])
    out_tr = np.take(xtr, perm, axis=1).reshape(shape_tr)
    out_te = None if x_test is None else np.take(xte, perm, axis=1).reshape(shape_te)
    return out_tr, out_te, perm


def random_pixels(x, rng) -> np.ndarray:
    """Apply an independent random permutation of pixel positions to each image (channels of a
    pixel move together). Each image keeps its multiset of pixels."""
    fn = "random_pixels"
    xp, shape = _as_pixels(x, fn)
    rng = _rng(rng, fn)
    n, npix, _ = xp.shape
    out = np.empty_like(xp)
    base = np.arange(npix, dtype=np.int64)
    for s in range(0, n, _CHUNK):
        m = min(_CHUNK, n - s)
        idx = np.broadcast_to(base, (m, npix)).copy()
        rng.permuted(idx, axis=1, out=idx)
        out[s:s + m] = np.take_along_axis(xp[s:s + m], idx[:, :, None], axis=1)
    return out.reshape(shape)


def _channel_moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and (population) variance over all images and positions, in float64,
    computed blockwise (Chan et al.'s parallel update) so no float64 copy of x is made."""
    xp, _ = _as_pixels(x, "gaussian_pixels", "reference")
    c = xp.shape[2]
    count, mean, m2 = 0, np.zeros(c), np.zeros(c)
    for s in range(0, len(xp), _CHUNK):
        blk = xp[s:s + _CHUNK].reshape(-1, c).astype(np.float64)
        nb = len(blk)
        if nb == 0:
            continue
        mb = blk.mean(axis=0)
        m2b = ((blk - mb) ** 2).sum(axis=0)
        delta = mb - mean
        tot = count + nb
        mean = mean + delta * (nb / tot)
        m2 = m2 + m2b + delta ** 2 * (count * nb / tot)
        count = tot
    if count == 0:
        raise InputError("gaussian_pixels: the reference images are empty; need at least one image.")
    return mean, m2 / count


def gaussian_pixels(x, rng, reference=None) -> np.ndarray:
    """Images of i.i.d. Gaussian noise, float32 in pixel units (not clipped), shaped like ``x``,
    with the mean and variance of ``reference`` (default ``x``): one scalar pair for gray images,
    one per channel for color images (N, H, W, C)."""
    fn = "gaussian_pixels"
    xp, shape = _as_pixels(x, fn)
    rng = _rng(rng, fn)
    ref = x if reference is None else reference
    rp, rshape = _as_pixels(ref, fn, "reference")
    if rp.shape[2] != xp.shape[2] or (len(rshape) == 4) != (len(shape) == 4):
        raise InputError(f"{fn}: reference has {rp.shape[2]} channel(s) (shape {rshape}) but x has "
                         f"{xp.shape[2]} (shape {shape}).")
    mean, var = _channel_moments(ref)
    out = rng.standard_normal(size=xp.shape, dtype=np.float32)
    out *= np.sqrt(var).astype(np.float32)
    out += mean.astype(np.float32)
    return out.reshape(shape)


# ---- dataset-level -------------------------------------------------------------------------

@dataclass(frozen=True)
class Randomization:
    """Which randomization test to run.

    variant       one of ``VARIANTS``
    p             corruption probability, used only by ``"corrupt"`` (must stay 0 otherwise)
    seed          seeds everything random here (train and test draw from independent streams)
    corrupt_test  also corrupt the TEST labels (``"corrupt"`` / ``"random-labels"`` only).
                  Off by default: test labels stay clean.
    """

    variant: str = "true"
    p: float = 0.0
    seed: int = 0
    corrupt_test: bool = False

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise InputError(f"unknown randomization variant {self.variant!r}; expected one of "
                             f"{', '.join(VARIANTS)}.")
        p = _check_p(self.p, "Randomization")
        object.__setattr__(self, "p", p)
        if self.variant != "corrupt" and p != 0.0:
            raise InputError(
                f"Randomization: p={p} is only used by variant 'corrupt'; variant {self.variant!r} "
                f"ignores it. Use variant='corrupt' with p={p}, or leave p at 0."
                + (" ('random-labels' is 'corrupt' at p=1.)" if self.variant == "random-labels" else "")
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise InputError(f"Randomization: seed must be a non-negative int, got {self.seed!r}.")
        object.__setattr__(self, "seed", int(self.seed))
        if not isinstance(self.corrupt_test, (bool, np.bool_)):
            raise InputError(f"Randomization: corrupt_test must be True or False, got {self.corrupt_test!r}.")
        object.__setattr__(self, "corrupt_test", bool(self.corrupt_test))
        if self.corrupt_test and self.variant not in _LABEL_VARIANTS:
            raise InputError(
                f"Randomization: corrupt_test=True only applies to the label variants "
                f"{_LABEL_VARIANTS}; variant {self.variant!r} does not change labels."
            )


def apply_randomization(ds, r: Randomization):
    """Return ``(randomized_dataset, info)``; ``ds`` and its arrays are left untouched.

    Arrays that a variant does not change are shared with ``ds``, not copied. Labels change only
    for ``"corrupt"`` / ``"random-labels"``, test labels only with ``corrupt_test=True``. Images
    change for the pixel variants, in train and test; ``"gaussian"`` images are float32 in pixel
    units (so ``kernelfit.data.to_features`` treats them like uint8 images), other variants keep
    the dtype.

    ``info``: variant, p, seed, corrupt_test, fraction_changed_train, fraction_changed_test,
    test_labels_clean, test_images_randomized, num_classes.
    """
    if not isinstance(r, Randomization):
        raise InputError(f"apply_randomization: expected a Randomization, got {type(r).__name__}.")
    for f in ("x_train", "y_train", "x_test", "y_test", "num_classes"):
        if not hasattr(ds, f):
            raise InputError(f"apply_randomization: expected a kernelfit.data.Dataset, got {type(ds).__name__}.")
    k = ds.num_classes
    rng_train, rng_test = (np.random.default_rng(s) for s in np.random.SeedSequence(r.seed).spawn(2))
    x_tr, y_tr, x_te, y_te = ds.x_train, ds.y_train, ds.x_test, ds.y_test
    frac_tr = frac_te = 0.0
    v = r.variant
    if v == "corrupt":
        y_tr, frac_tr = corrupt_labels(ds.y_train, r.p, k, rng_train)
        if r.corrupt_test:
            y_te, frac_te = corrupt_labels(ds.y_test, r.p, k, rng_test)
    elif v == "random-labels":
        y_tr = random_labels(ds.y_train, k, rng_train)
        frac_tr = _frac_changed(ds.y_train, y_tr)
        if r.corrupt_test:
            y_te = random_labels(ds.y_test, k, rng_test)
            frac_te = _frac_changed(ds.y_test, y_te)
    elif v == "shuffled-pixels":
        x_tr, x_te, _ = shuffle_pixels(ds.x_train, ds.x_test, rng_train)
    elif v == "random-pixels":
        x_tr = random_pixels(ds.x_train, rng_train)
        x_te = random_pixels(ds.x_test, rng_test)
    elif v == "gaussian":
        x_tr = gaussian_pixels(ds.x_train, rng_train)
        x_te = gaussian_pixels(ds.x_test, rng_test, reference=ds.x_train)
    out = dataclasses.replace(ds, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te)
    info = {
        "variant": v,
        "p": r.p,
        "seed": r.seed,
        "corrupt_test": r.corrupt_test,
        "fraction_changed_train": float(frac_tr),
        "fraction_changed_test": float(frac_te),
        "test_labels_clean": not r.corrupt_test,
        "test_images_randomized": v in _PIXEL_VARIANTS,
        "num_classes": k,
    }
    return out, info


def _frac_changed(old: np.ndarray, new: np.ndarray) -> float:
    return float(np.count_nonzero(old != new)) / len(old) if len(old) else 0.0


def expected_fraction_changed(p: float, num_classes: int) -> float:
    """E[fraction of labels changed] by ``corrupt_labels``: p * (1 - 1/K)."""
    return _check_p(p, "expected_fraction_changed") * (1.0 - 1.0 / _check_k(num_classes, "expected_fraction_changed"))
