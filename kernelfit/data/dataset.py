"""The in-memory dataset every loader returns, and images -> feature rows."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kernelfit.errors import InputError


@dataclass(eq=False, repr=False)
class Dataset:
    """A train/test dataset: images or feature rows, with class labels (or regression targets).

    Fields
    ------
    name     registry name (``"mnist"``, ``"fashion-mnist"``, ...) or, for a user's arrays, the path
    x_train  (N, ...) real array: uint8 images (N, H, W) / (N, H, W, C) of any size and channel
             count, or feature rows (N, D) of any real dtype. Memory maps are kept, not copied.
    y_train  int64 labels in ``[0, num_classes)`` (converted on construction); with
             ``classes=None``, float64 regression targets (N,) or (N, K)
    x_test, y_test   the same for the test split (which may be empty)
    classes  class names, label ``k`` is ``classes[k]``; None for regression targets
    source   the file or directory the data was read from
    files    every file read (for the record's checksums, see ``describe``)
    scale    features are ``x / scale``: 255 for pixels, 1 for arrays used as stored

    Construction validates shapes, lengths and label ranges and raises ``InputError``.
    Arrays are not copied unless a conversion is needed (labels become int64).
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: tuple[str, ...] | None
    source: str = ""
    files: tuple[str, ...] = ()
    scale: float = 255.0

    def __post_init__(self) -> None:
        self.name = str(self.name)
        self.source = str(self.source)
        self.files = tuple(str(f) for f in self.files)
        self.scale = float(self.scale)
        if not (self.scale > 0 and np.isfinite(self.scale)):
            raise InputError(f"Dataset {self.name!r}: scale must be a finite number > 0, got {self.scale!r}.")
        self.x_train = _check_images(self.x_train, f"{self.name}.x_train")
        self.x_test = _check_images(self.x_test, f"{self.name}.x_test")
        if len(self.x_train) == 0:
            raise InputError(f"Dataset {self.name!r}: x_train has 0 rows; a training split needs at least one.")
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise InputError(
                f"Dataset {self.name!r}: train and test examples must have the same shape, got "
                f"x_train {self.x_train.shape[1:]} and x_test {self.x_test.shape[1:]} per example."
            )
        if self.classes is None:  # regression targets
            self.y_train = _check_targets(self.y_train, len(self.x_train), f"{self.name}.y_train")
            self.y_test = _check_targets(self.y_test, len(self.x_test), f"{self.name}.y_test")
            if self.y_train.shape[1:] != self.y_test.shape[1:]:
                raise InputError(f"Dataset {self.name!r}: y_train has {self.y_train.shape[1:]} outputs "
                                 f"per row but y_test has {self.y_test.shape[1:]}.")
            return
        if isinstance(self.classes, str) or not isinstance(self.classes, Sequence):
            raise InputError(
                f"Dataset {self.name!r}: classes must be a sequence of class names, got "
                f"{type(self.classes).__name__}. Pass e.g. classes=('0', '1', ..., '9')."
            )
        self.classes = tuple(str(c) for c in self.classes)
        if len(self.classes) < 1 or len(set(self.classes)) != len(self.classes):
            raise InputError(
                f"Dataset {self.name!r}: classes must be non-empty and unique, got {self.classes!r}."
            )
        k = len(self.classes)
        self.y_train = _check_labels(self.y_train, len(self.x_train), k, f"{self.name}.y_train")
        self.y_test = _check_labels(self.y_test, len(self.x_test), k, f"{self.name}.y_test")

    @property
    def num_classes(self) -> int:
        """Number of classes (0 for regression targets)."""
        return 0 if self.classes is None else len(self.classes)

    @property
    def task(self) -> str:
        return "regression" if self.classes is None else "classification"

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.x_train.shape[1:])

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, x_train={self.x_train.shape} {self.x_train.dtype}, "
            f"x_test={self.x_test.shape} {self.x_test.dtype}, num_classes={self.num_classes}, "
            f"source={self.source!r})"
        )

    def subset(self, n_train: int | None = None, n_test: int | None = None,
               seed: int | None = None) -> Dataset:
        """A smaller copy: the first ``n`` examples (``seed=None``) or a seeded random,
        class-stratified sample (class proportions kept up to rounding, returned in random order).

        ``None`` keeps the whole split. Asking for more examples than there are raises
        ``InputError`` saying how many are available. The arrays of the result are copies, except
        for a split kept whole, which is shared (a memory-mapped file stays mapped, not read).
        Regression targets are sampled uniformly.
        """
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))
                                 or seed < 0):
            raise InputError(f"subset: seed must be None or a non-negative int, got {seed!r}.")
        rng = None if seed is None else np.random.default_rng(int(seed))
        idx_tr = self._subset_indices(self.y_train, n_train, "n_train", "training", rng)
        idx_te = self._subset_indices(self.y_test, n_test, "n_test", "test", rng)
        def take(a, idx):
            return a if isinstance(idx, slice) and idx == slice(None) else a[idx].copy()

        return dataclasses.replace(
            self,
            x_train=take(self.x_train, idx_tr), y_train=take(self.y_train, idx_tr),
            x_test=take(self.x_test, idx_te), y_test=take(self.y_test, idx_te),
        )

    def _subset_indices(self, y, n, arg, what, rng):
        avail = len(y)
        if n is None:
            return slice(None)
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise InputError(f"subset: {arg} must be None or a positive int, got {n!r}.")
        n = int(n)
        if n > avail:
            raise InputError(
                f"subset: {arg}={n} but {self.name!r} has only {avail} {what} examples. "
                f"Use {arg} <= {avail} (or None for all of them)."
            )
        if rng is None:
            return slice(0, n)
        if self.classes is None:
            return rng.choice(avail, size=n, replace=False)
        return _stratified_sample(y, n, self.num_classes, rng)


def _stratified_sample(y: np.ndarray, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` indices of ``y`` drawn without replacement, per-class counts proportional to the
    class frequencies (largest-remainder rounding), in random order."""
    counts = np.bincount(y, minlength=k)
    exact = counts * (n / len(y))
    quota = np.floor(exact).astype(np.int64)
    rest = n - int(quota.sum())
    if rest > 0:
        frac = exact - quota
        frac[quota >= counts] = -1.0  # a full class cannot take more
        order = np.lexsort((np.arange(k), -frac))  # largest remainder first, ties by class index
        quota[order[:rest]] += 1
    picked = [rng.choice(np.flatnonzero(y == c), size=int(q), replace=False)
              for c, q in enumerate(quota) if q > 0]
    idx = np.concatenate(picked) if picked else np.empty(0, np.int64)
    return rng.permutation(idx)


def _check_images(x, what: str) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        x = np.asarray(x)
    if x.ndim < 2:
        raise InputError(
            f"{what}: expected N examples as an array (N, ...) (images (N, H, W[, C]) or feature rows "
            f"(N, D)), got shape {x.shape}. Reshape a single feature column with x.reshape(-1, 1)."
        )
    if x.dtype == bool or not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise InputError(
            f"{what}: expected real numbers (uint8 pixels, integers or floats), got dtype {x.dtype}. "
            f"Convert with x.astype(np.float32)."
        )
    return x


def _check_targets(y, n: int, what: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim not in (1, 2) or y.dtype == bool or not np.issubdtype(y.dtype, np.number) \
            or np.issubdtype(y.dtype, np.complexfloating):
        raise InputError(f"{what}: expected real regression targets of shape (N,) or (N, K), got "
                         f"shape {y.shape} dtype {y.dtype}.")
    if len(y) != n:
        raise InputError(f"{what}: {len(y)} targets for {n} examples; they must match one to one.")
    y = y.astype(np.float64, copy=False)
    if not np.isfinite(y).all():
        raise InputError(f"{what}: targets hold NaN or inf in {int((~np.isfinite(y)).sum())} entries; clean them first.")
    return y


def _check_labels(y, n: int, k: int, what: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:  # Keras CIFAR stores labels as (N, 1)
        y = y[:, 0]
    if y.ndim != 1:
        raise InputError(f"{what}: expected a 1-D label vector, got shape {y.shape}.")
    if y.dtype == bool or not np.issubdtype(y.dtype, np.integer):
        raise InputError(
            f"{what}: expected integer class labels, got dtype {y.dtype}. "
            f"Convert one-hot labels with y.argmax(axis=1)."
        )
    if len(y) != n:
        raise InputError(f"{what}: {len(y)} labels for {n} images; they must match one to one.")
    if len(y):
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= k:
            bad = y[(y < 0) | (y >= k)]
            raise InputError(
                f"{what}: labels must lie in [0, {k}) for {k} classes, found values in "
                f"[{lo}, {hi}] ({len(bad)} out of range, e.g. {int(bad[0])})."
            )
    return y.astype(np.int64, copy=False)


# --------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------


def to_features(x, dtype=np.float32, scale: float = 255.0) -> np.ndarray:
    """Images (N, ...) -> (N, D) C-contiguous ``dtype`` array of ``x / scale`` (pixels / 255).

    uint8 input gives values in [0, 1]; floating input (e.g. Gaussian images in pixel units)
    is divided by 255 as well. ``scale=1`` keeps a user's feature values as stored
    (``Dataset.scale``). The input is never modified; a memory map is read straight into the
    output, with no intermediate copy.
    """
    dtype = np.dtype(dtype)
    if not np.issubdtype(dtype, np.floating):
        raise InputError(f"to_features: dtype must be a floating type (float32/float64), got {dtype}.")
    x = np.asarray(x)
    if x.ndim < 2:
        raise InputError(
            f"to_features: expected an array of N images (N, ...), got shape {x.shape}. "
            f"For a single image use x[None]."
        )
    if not (x.dtype == np.uint8 or np.issubdtype(x.dtype, np.floating)
            or np.issubdtype(x.dtype, np.integer)) or x.dtype == bool:
        raise InputError(f"to_features: expected uint8 or floating pixels, got dtype {x.dtype}.")
    flat = x.reshape(len(x), -1)
    out = np.empty(flat.shape, dtype=dtype)
    np.divide(flat, dtype.type(scale), out=out, casting="same_kind")
    return out



def describe(ds: Dataset, checksums: bool = True) -> dict:
    """What was loaded, for a result record: name, source, every file with its sha256, the
    shapes and dtypes of both splits, the task and the feature scaling."""
    from .arrays import sha256_file

    files = [{"path": f, "sha256": sha256_file(f) if checksums else None} for f in ds.files]
    return {
        "name": ds.name, "source": ds.source, "files": files, "task": ds.task,
        "x_train": {"shape": list(ds.x_train.shape), "dtype": str(ds.x_train.dtype)},
        "y_train": {"shape": list(ds.y_train.shape), "dtype": str(ds.y_train.dtype)},
        "x_test": {"shape": list(ds.x_test.shape), "dtype": str(ds.x_test.dtype)},
        "y_test": {"shape": list(ds.y_test.shape), "dtype": str(ds.y_test.dtype)},
        "num_classes": ds.num_classes,
        "preprocessing": f"x / {ds.scale:g}" if ds.scale != 1 else "none (values as stored)",
    }
