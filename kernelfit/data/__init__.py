"""Datasets: readers for the canonical formats, data-dir resolution, checksummed download.

Public API
----------
``Dataset``                  train/test images + int64 labels + class names + where they came from
``DATASETS``                 names ``load_dataset`` understands
``resolve_data_dir``         ``data_dir`` option > ``$KERNELFIT_DATA`` > ``$XDG_CACHE_HOME/kernelfit``
                             (or ``~/.cache/kernelfit``)
``load_dataset``             ``"mnist-subset"`` (shipped, offline), ``"mnist"``, ``"cifar10"``
``to_features``              images -> (N, D) C-contiguous floats, pixels / 255
``read_idx``                 MNIST IDX files (raw or gzip)
``read_keras_npz``           Keras ``mnist.npz`` layout (x_train, y_train, x_test, y_test)
``read_cifar10_batches``     ``cifar-10-batches-py/`` or ``cifar-10-python.tar.gz`` (restricted unpickling)
``read_image_folder``        ``train/<class>/*``, ``test/<class>/*`` in a directory or a .tar(.gz); decoded
                             arrays cached as .npz in the user cache dir, keyed by the archive's sha256
``download``                 canonical sources, sha256 + md5 verification, atomic rename

Images are kept as uint8 in their natural layout: (N, 28, 28) for MNIST, (N, 32, 32, 3) HWC for
CIFAR-10. Randomizations (label corruption, pixel shuffles, Gaussian images) live in
``kernelfit.randomize``.

Environment variables: ``KERNELFIT_DATA`` (data directory), ``KERNELFIT_CACHE_DIR`` (where decoded
image folders are cached; default ``$XDG_CACHE_HOME/kernelfit`` or ``~/.cache/kernelfit``).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import http.client
import io
import logging
import os
import pickle
import re
import struct
import tarfile
import urllib.error
import urllib.request
import warnings
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path, PurePosixPath

import numpy as np

from kernelfit.errors import ChecksumError, DataError, InputError, KernelfitError
from kernelfit.results import atomic_file

__all__ = [
    "CIFAR10_CLASSES",
    "DATASETS",
    "MNIST_CLASSES",
    "Dataset",
    "default_cache_dir",
    "download",
    "load_dataset",
    "read_cifar10_batches",
    "read_idx",
    "read_image_folder",
    "read_keras_npz",
    "resolve_data_dir",
    "to_features",
]

log = logging.getLogger(__name__)

DATASETS = ("mnist-subset", "mnist", "cifar10")

MNIST_CLASSES: tuple[str, ...] = tuple(str(d) for d in range(10))
CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)

#: canonical MNIST IDX file names (each may also be gzipped, ``<name>.gz``)
MNIST_IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
MNIST_NPZ = "mnist.npz"
CIFAR10_BATCH_DIR = "cifar-10-batches-py"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
_CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR10_TEST_BATCH = "test_batch"

_FIX_HINT = (
    "Fix: pass --data-dir DIR (load_dataset(..., data_dir=DIR)) naming a directory that holds "
    "them, or set the environment variable KERNELFIT_DATA=DIR, or fetch them from the canonical "
    "source with --download (load_dataset(..., download=True) / kernelfit.data.download(name)). "
    "'mnist-subset' (5,000 train / 1,000 test MNIST images) ships with kernelfit and needs no data."
)


# --------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------


@dataclass(eq=False, repr=False)
class Dataset:
    """A train/test image classification dataset.

    Fields
    ------
    name     ``"mnist"``, ``"mnist-subset"``, ``"cifar10"``, ...
    x_train  images, uint8 in 0..255: (N, 28, 28) for MNIST, (N, 32, 32, 3) HWC for CIFAR-10.
             Floating images (e.g. the ``"gaussian"`` randomization, pixel units 0..255) are allowed.
    y_train  int64 labels in ``[0, num_classes)`` (converted on construction)
    x_test, y_test   the same for the test split
    classes  class names; label ``k`` is ``classes[k]``
    source   the file or directory the data was read from

    Construction validates shapes, lengths and label ranges and raises ``InputError``.
    Arrays are not copied unless a conversion is needed (labels become int64).
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: tuple[str, ...]
    source: str = ""

    def __post_init__(self) -> None:
        self.name = str(self.name)
        self.source = str(self.source)
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
        self.x_train = _check_images(self.x_train, f"{self.name}.x_train")
        self.x_test = _check_images(self.x_test, f"{self.name}.x_test")
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise InputError(
                f"Dataset {self.name!r}: train and test images must have the same shape, got "
                f"x_train {self.x_train.shape[1:]} and x_test {self.x_test.shape[1:]} per image."
            )
        k = len(self.classes)
        self.y_train = _check_labels(self.y_train, len(self.x_train), k, f"{self.name}.y_train")
        self.y_test = _check_labels(self.y_test, len(self.x_test), k, f"{self.name}.y_test")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

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
               seed: int | None = None) -> "Dataset":
        """A smaller copy: the first ``n`` examples (``seed=None``) or a seeded random,
        class-stratified sample (class proportions kept up to rounding, returned in random order).

        ``None`` keeps the whole split. Asking for more examples than there are raises
        ``InputError`` saying how many are available. The arrays of the result are copies.
        """
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))
                                 or seed < 0):
            raise InputError(f"subset: seed must be None or a non-negative int, got {seed!r}.")
        rng = None if seed is None else np.random.default_rng(int(seed))
        idx_tr = self._subset_indices(self.y_train, n_train, "n_train", "training", rng)
        idx_te = self._subset_indices(self.y_test, n_test, "n_test", "test", rng)
        return dataclasses.replace(
            self,
            x_train=self.x_train[idx_tr].copy(), y_train=self.y_train[idx_tr].copy(),
            x_test=self.x_test[idx_te].copy(), y_test=self.y_test[idx_te].copy(),
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
    x = np.asarray(x)
    if x.ndim not in (3, 4):
        raise InputError(
            f"{what}: expected images of shape (N, H, W) or (N, H, W, C), got an array of shape "
            f"{x.shape} ({x.ndim}-D). Reshape flat pixel vectors, e.g. x.reshape(-1, 28, 28)."
        )
    if not (x.dtype == np.uint8 or np.issubdtype(x.dtype, np.floating)):
        raise InputError(
            f"{what}: expected uint8 pixels (0..255) or floating pixels, got dtype {x.dtype}. "
            f"Convert with x.astype(np.uint8) if the values are 0..255 integers."
        )
    return x


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


def to_features(x, dtype=np.float32) -> np.ndarray:
    """Images (N, ...) -> (N, D) C-contiguous ``dtype`` array of pixels / 255.

    uint8 input gives values in [0, 1]; floating input (e.g. Gaussian images in pixel units)
    is divided by 255 as well. The input is never modified.
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
    np.divide(flat, dtype.type(255), out=out, casting="same_kind")
    return out


# --------------------------------------------------------------------------------------------
# Data-dir resolution
# --------------------------------------------------------------------------------------------


def _user_cache_root() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "kernelfit"


def _resolve_with_origin(data_dir=None) -> tuple[Path, str]:
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser(), "from the data_dir option / --data-dir"
    env = os.environ.get("KERNELFIT_DATA")
    if env:
        return Path(env).expanduser(), "from $KERNELFIT_DATA"
    if os.environ.get("XDG_CACHE_HOME"):
        return _user_cache_root(), "default: $XDG_CACHE_HOME/kernelfit"
    return _user_cache_root(), "default: ~/.cache/kernelfit"


def resolve_data_dir(data_dir=None) -> Path:
    """The data directory: ``data_dir`` if given, else ``$KERNELFIT_DATA``, else
    ``$XDG_CACHE_HOME/kernelfit`` (``~/.cache/kernelfit`` when XDG_CACHE_HOME is unset).

    Nothing is created or checked here.
    """
    return _resolve_with_origin(data_dir)[0]


def default_cache_dir() -> Path:
    """Where decoded image folders are cached: ``$KERNELFIT_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/kernelfit`` or ``~/.cache/kernelfit`` (files go in its ``decoded/``)."""
    env = os.environ.get("KERNELFIT_CACHE_DIR")
    return Path(env).expanduser() if env else _user_cache_root()


# --------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------

_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_maybe_gzip(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            head = f.read(2)
            f.seek(0)
            if head == b"\x1f\x8b":
                with gzip.GzipFile(fileobj=f) as g:
                    return g.read()
            return f.read()
    except FileNotFoundError as e:
        raise DataError(f"{path}: file not found.") from e
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(
            f"{path}: cannot read (corrupt or truncated gzip data?): {e}. "
            f"Delete the file and download it again (--download)."
        ) from e


def read_idx(path) -> np.ndarray:
    """Read one IDX file (MNIST's format; plain or gzip, detected from the content).

    Validates the magic number (``0x0000TTNN``: type code TT, NN dimensions), the dimensions and
    the data length; returns a writable native-endian array of shape ``dims``.
    Raises ``DataError`` naming the file when it is missing, truncated or malformed.
    """
    path = Path(path)
    raw = _read_maybe_gzip(path)
    if len(raw) < 4:
        raise DataError(f"{path}: truncated IDX file: {len(raw)} bytes, not even the 4-byte magic number.")
    code, ndim = raw[2], raw[3]
    if raw[0] != 0 or raw[1] != 0 or code not in _IDX_DTYPES or ndim == 0:
        raise DataError(
            f"{path}: not an IDX file: magic number 0x{raw[:4].hex()}; expected 0x0000TTNN with "
            f"type code TT in {{08, 09, 0b, 0c, 0d, 0e}} and NN >= 1 dimensions "
            f"(0x00000803 for images, 0x00000801 for labels)."
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header: {ndim} dimensions need {header} bytes, file has {len(raw)}.")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[code])
    count = int(np.prod(dims, dtype=np.int64))
    need = count * dtype.itemsize
    have = len(raw) - header
    if have < need:
        raise DataError(
            f"{path}: truncated IDX file: dimensions {dims} need {need} data bytes, found {have}. "
            f"Delete the file and download it again (--download)."
        )
    if have > need:
        raise DataError(
            f"{path}: malformed IDX file: dimensions {dims} need {need} data bytes, found {have} "
            f"({have - need} trailing bytes)."
        )
    arr = np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


_KERAS_KEYS = ("x_train", "y_train", "x_test", "y_test")


def read_keras_npz(path):
    """Read a Keras-layout ``.npz`` (``x_train, y_train, x_test, y_test``; no pickles allowed).

    Returns ``(x_train, y_train, x_test, y_test)`` with uint8 images and int64 labels.
    Labels of shape (N, 1) are flattened.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            if not isinstance(z, np.lib.npyio.NpzFile):
                raise DataError(f"{path}: expected an .npz archive with {_KERAS_KEYS}, found a single .npy array.")
            missing = [k for k in _KERAS_KEYS if k not in z.files]
            if missing:
                raise DataError(
                    f"{path}: not a Keras-layout dataset: missing arrays {missing}; expected "
                    f"{list(_KERAS_KEYS)}, found {sorted(z.files)}."
                )
            arrays = [z[k] for k in _KERAS_KEYS]
    except KernelfitError:
        raise
    except FileNotFoundError as e:
        raise DataError(f"{path}: file not found.") from e
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, KeyError) as e:
        raise DataError(f"{path}: cannot read .npz (corrupt or truncated?): {e}") from e
    x_tr, y_tr, x_te, y_te = arrays
    x_tr = _as_uint8_images(x_tr, path, "x_train")
    x_te = _as_uint8_images(x_te, path, "x_test")
    y_tr = _as_labels(y_tr, len(x_tr), path, "y_train")
    y_te = _as_labels(y_te, len(x_te), path, "y_test")
    if x_tr.shape[1:] != x_te.shape[1:]:
        raise DataError(f"{path}: x_train images are {x_tr.shape[1:]} but x_test images are {x_te.shape[1:]}.")
    return x_tr, y_tr, x_te, y_te


def _as_uint8_images(x: np.ndarray, source, what: str) -> np.ndarray:
    if x.ndim not in (3, 4):
        raise DataError(f"{source}: {what} should be images (N, H, W) or (N, H, W, C), found shape {x.shape}.")
    if x.dtype == np.uint8:
        return x
    if np.issubdtype(x.dtype, np.integer) and x.size and (x.min() < 0 or x.max() > 255):
        raise DataError(f"{source}: {what} should hold 0..255 pixels, found values in [{x.min()}, {x.max()}].")
    if not np.issubdtype(x.dtype, np.integer):
        raise DataError(f"{source}: {what} should hold uint8 pixels, found dtype {x.dtype}.")
    return x.astype(np.uint8)


def _as_labels(y: np.ndarray, n: int, source, what: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer) or y.dtype == bool:
        raise DataError(f"{source}: {what} should be a 1-D integer label vector, found shape {y.shape} dtype {y.dtype}.")
    if len(y) != n:
        raise DataError(f"{source}: {len(y)} labels in {what} for {n} images; they must match one to one.")
    if len(y) and y.min() < 0:
        raise DataError(f"{source}: {what} holds negative labels (min {int(y.min())}).")
    return y.astype(np.int64)


# ---- CIFAR-10 python pickles -------------------------------------------------------------

def _numpy_reconstruct():
    return np.zeros(1).__reduce__()[0]


def _numpy_frombuffer():
    return np.zeros(1).__reduce_ex__(5)[0]


def _numpy_scalar():
    return np.float64(0).__reduce__()[0]


_PICKLE_GLOBALS = {
    # numpy arrays pickle as _reconstruct(ndarray, shape, dtype) + state; numpy 1.x writes
    # numpy.core.multiarray, numpy 2.x numpy._core.multiarray
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    # protocol >= 5 pickles of arrays: _frombuffer(buffer, dtype, shape, order)
    ("numpy.core.numeric", "_frombuffer"): _numpy_frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _numpy_frombuffer,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    # protocol-2 pickles written by Python 3 encode bytes as _codecs.encode(str, "latin1")
    ("_codecs", "encode"): lambda: __import__("codecs").encode,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles only what a CIFAR-10 batch needs: dicts, lists, bytes, numbers, numpy arrays."""

    def find_class(self, module, name):
        factory = _PICKLE_GLOBALS.get((module, name))
        if factory is None:
            raise pickle.UnpicklingError(
                f"refusing to unpickle global {module}.{name}: a CIFAR-10 batch only holds dicts, "
                f"lists, bytes and numpy arrays"
            )
        return factory()


def _unpickle_batch(data: bytes, source: str) -> dict:
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # noqa: BLE001 - any failure inside a pickle is a corrupt file
        raise DataError(f"{source}: not a readable CIFAR-10 python batch: {type(e).__name__}: {e}") from e
    if not isinstance(obj, dict):
        raise DataError(f"{source}: expected a pickled dict with keys b'data', b'labels'; found {type(obj).__name__}.")
    return {(k.decode("latin1") if isinstance(k, bytes) else str(k)): v for k, v in obj.items()}


def _parse_batch(data: bytes, source: str):
    d = _unpickle_batch(data, source)
    if "data" not in d or "labels" not in d:
        raise DataError(f"{source}: CIFAR-10 batch lacks b'data' / b'labels'; found keys {sorted(d)}.")
    x = d["data"]
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
        desc = f"{x.dtype} {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
        raise DataError(f"{source}: b'data' should be a uint8 array (n, 3072), found {desc}.")
    try:
        y = np.asarray(d["labels"], dtype=np.int64)
    except (TypeError, ValueError) as e:
        raise DataError(f"{source}: b'labels' should be a list of ints: {e}") from e
    if y.shape != (len(x),):
        raise DataError(f"{source}: {y.size} labels for {len(x)} images.")
    if len(y) and (y.min() < 0 or y.max() > 9):
        raise DataError(f"{source}: CIFAR-10 labels must lie in [0, 10), found [{y.min()}, {y.max()}].")
    # rows are 1024 red, 1024 green, 1024 blue values (row-major 32x32) -> HWC
    return x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), y


def read_cifar10_batches(path):
    """Read CIFAR-10 "python version": a ``cifar-10-batches-py/`` directory (or its parent) or the
    ``cifar-10-python.tar.gz`` archive (read in place, not extracted).

    Unpickling is restricted to dicts/lists/bytes/numbers/numpy arrays (``encoding="bytes"``).
    Returns ``(x_train, y_train, x_test, y_test)``: uint8 (N, 32, 32, 3) HWC, int64 labels, label
    order as ``CIFAR10_CLASSES``.
    """
    path = Path(path)
    wanted = (*_CIFAR10_TRAIN_BATCHES, _CIFAR10_TEST_BATCH)
    blobs: dict[str, tuple[bytes, str]] = {}
    if path.is_dir():
        d = path / CIFAR10_BATCH_DIR if (path / CIFAR10_BATCH_DIR).is_dir() else path
        for name in wanted:
            f = d / name
            if f.is_file():
                blobs[name] = (f.read_bytes(), str(f))
        where = str(d)
    elif path.is_file():
        try:
            with tarfile.open(path, "r:*") as tf:
                for m in tf:
                    base = PurePosixPath(m.name).name
                    if m.isfile() and base in wanted and base not in blobs:
                        blobs[base] = (tf.extractfile(m).read(), f"{path}:{m.name}")
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path}: cannot read the CIFAR-10 archive (corrupt or truncated?): {e}. "
                            f"Delete it and download it again (--download).") from e
        where = str(path)
    else:
        raise DataError(f"{path}: no such file or directory (expected {CIFAR10_BATCH_DIR}/ or {CIFAR10_ARCHIVE}).")
    missing = [n for n in wanted if n not in blobs]
    if missing:
        raise DataError(f"{where}: incomplete CIFAR-10 python batches: missing {missing} "
                        f"(expected {list(wanted)}).")
    parts = [_parse_batch(*blobs[n]) for n in _CIFAR10_TRAIN_BATCHES]
    x_tr = np.ascontiguousarray(np.concatenate([p[0] for p in parts]))
    y_tr = np.concatenate([p[1] for p in parts])
    x_te, y_te = _parse_batch(*blobs[_CIFAR10_TEST_BATCH])
    return x_tr, y_tr, np.ascontiguousarray(x_te), y_te


# ---- image folders ---------------------------------------------------------------------------

_IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "F"}
_CACHE_VERSION = "imgfolder-v1"


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in _IMAGE_EXTS


def _split_parts(parts: tuple[str, ...]):
    """(prefix, split, class, file) when ``parts`` ends in train|test/<class>/<file>."""
    if len(parts) >= 3 and parts[-3] in ("train", "test"):
        return parts[:-3], parts[-3], parts[-2], parts[-1]
    return None


def _sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def _iter_image_folder(path: Path):
    """Yield (split, class, filename, bytes, display name) for every image in the folder/archive."""
    if path.is_dir():
        roots = [path] if (path / "train").is_dir() else [
            p for p in sorted(path.iterdir()) if p.is_dir() and (p / "train").is_dir()]
        if len(roots) != 1:
            raise DataError(
                f"{path}: not an image folder: expected train/<class>/<image> and "
                f"test/<class>/<image> in it (or in exactly one subdirectory); found "
                f"{'none' if not roots else [str(r) for r in roots]}."
            )
        root = roots[0]
        for split in ("train", "test"):
            sdir = root / split
            if not sdir.is_dir():
                continue
            for cdir in sorted(p for p in sdir.iterdir() if p.is_dir()):
                for f in sorted(cdir.iterdir()):
                    if f.is_file() and _is_image_name(f.name):
                        yield split, cdir.name, f.name, f.read_bytes(), str(f)
        return
    try:
        with tarfile.open(path, "r:*") as tf:
            prefix = None
            for m in tf:
                if not m.isfile():
                    continue
                sp = _split_parts(tuple(q for q in m.name.split("/") if q not in ("", ".")))
                if sp is None or not _is_image_name(sp[3]):
                    continue
                if prefix is None:
                    prefix = sp[0]
                elif sp[0] != prefix:
                    raise DataError(
                        f"{path}: image folder archive has two roots, {'/'.join(prefix) or '.'} and "
                        f"{'/'.join(sp[0]) or '.'}; expected one train/ and test/ pair."
                    )
                yield sp[1], sp[2], sp[3], tf.extractfile(m).read(), f"{path}:{m.name}"
    except KernelfitError:
        raise
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read the image archive (corrupt or truncated?): {e}") from e


def _decode(data: bytes, name: str):
    from PIL import Image  # Pillow comes with matplotlib / scikit-image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            mode = "L" if im.mode in _GRAY_MODES else "RGB"
            if im.mode != mode:
                im = im.convert(mode)
            return np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"{name}: cannot decode image (corrupt or truncated?): {e}") from e


def _decode_image_folder(path: Path, classes):
    per_split: dict[str, dict[str, list]] = {"train": {}, "test": {}}
    first_shape = first_name = None
    for split, cls, fname, data, name in _iter_image_folder(path):
        img = _decode(data, name)
        if first_shape is None:
            first_shape, first_name = img.shape, name
        elif img.shape != first_shape:
            if img.ndim == 2 and len(first_shape) == 3 and img.shape == first_shape[:2]:
                img = np.repeat(img[:, :, None], 3, axis=2)  # a gray image among color ones
            else:
                raise DataError(
                    f"{name}: image of shape {img.shape} but {first_name} has shape {first_shape}; "
                    f"all images must have the same size and number of channels (resize or "
                    f"convert them first)."
                )
        per_split[split].setdefault(cls, []).append((_natural_key(fname), img))
    if not per_split["train"]:
        raise DataError(f"{path}: no images found under train/<class>/ (image extensions: "
                        f"{sorted(_IMAGE_EXTS)}).")
    if not per_split["test"]:
        raise DataError(f"{path}: no images found under test/<class>/.")
    found = set(per_split["train"]) | set(per_split["test"])
    if classes is None:
        classes = tuple(sorted(per_split["train"]))
        extra = sorted(set(per_split["test"]) - set(classes))
        if extra:
            raise DataError(f"{path}: test/ has classes {extra} that train/ lacks; pass classes=... to fix the label set.")
    else:
        classes = tuple(str(c) for c in classes)
        unknown = sorted(found - set(classes))
        if unknown:
            raise DataError(f"{path}: class folders {unknown} are not among classes={list(classes)}.")
    out = []
    for split in ("train", "test"):
        groups = [sorted(per_split[split].get(c, []), key=lambda t: t[0]) for c in classes]
        # round-robin over classes (file i of every class, then file i+1, ...) so that any prefix
        # of the split is class-balanced; within a class, natural file-name order
        order = [(c, i) for i in range(max(map(len, groups))) for c in range(len(classes))
                 if i < len(groups[c])]
        x = np.stack([groups[c][i][1] for c, i in order])
        y = np.array([c for c, _ in order], dtype=np.int64)
        out += [x, y]
    return (*out, classes)


def _image_folder_key(path: Path, classes) -> str:
    if path.is_dir():
        h = hashlib.sha256()
        for f in sorted(path.rglob("*")):
            if f.is_file():
                st = f.stat()
                h.update(f"{f.relative_to(path).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        content = "dir-" + h.hexdigest()
    else:
        content = _sha256_file(path)
    params = hashlib.sha256(repr((_CACHE_VERSION, None if classes is None else tuple(map(str, classes))))
                            .encode()).hexdigest()[:12]
    return f"{content}-{params}"


def _load_cache(cache_file: Path, key: str):
    try:
        with np.load(cache_file, allow_pickle=False) as z:
            if str(z["key"]) != key or str(z["version"]) != _CACHE_VERSION:
                raise ValueError("key/version mismatch")
            x_tr, y_tr, x_te, y_te = (z[k] for k in _KERAS_KEYS)  # zip CRC checked on full read
            classes = tuple(str(c) for c in z["classes"])
        if (x_tr.dtype != np.uint8 or x_te.dtype != np.uint8 or len(x_tr) != len(y_tr)
                or len(x_te) != len(y_te) or x_tr.shape[1:] != x_te.shape[1:]
                or y_tr.min() < 0 or y_te.min() < 0 or max(y_tr.max(), y_te.max()) >= len(classes)):
            raise ValueError("inconsistent arrays")
        return x_tr, y_tr.astype(np.int64), x_te, y_te.astype(np.int64), classes
    except Exception as e:  # noqa: BLE001 - any problem with a cache file means: rebuild it
        warnings.warn(f"kernelfit: decoded-image cache {cache_file} is unreadable ({type(e).__name__}: "
                      f"{e}); rebuilding it.", RuntimeWarning, stacklevel=3)
        return None


def _save_cache(cache_file: Path, key: str, arrays) -> None:
    x_tr, y_tr, x_te, y_te, classes = arrays
    try:
        with atomic_file(cache_file, "wb") as f:
            np.savez(f, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te,
                     classes=np.array(classes, dtype=str), key=np.array(key),
                     version=np.array(_CACHE_VERSION))
    except OSError as e:
        warnings.warn(f"kernelfit: could not write the decoded-image cache {cache_file}: {e}. "
                      f"Set KERNELFIT_CACHE_DIR to a writable directory to speed up later loads.",
                      RuntimeWarning, stacklevel=3)


def read_image_folder(path, classes=None, *, cache: bool = True):
    """Read ``train/<class>/<image>`` and ``test/<class>/<image>`` from a directory (or its single
    subdirectory) or from a ``.tar`` / ``.tar.gz`` archive, decoding with Pillow.

    ``classes`` fixes the label order (label k = classes[k]); by default the sorted class-folder
    names of train/. Gray images give (N, H, W), color images (N, H, W, 3); all images must share
    one size. Within a split, images are ordered round-robin over classes (file i of each class,
    then file i+1, ...; files in natural name order), so any prefix is class-balanced.

    With ``cache=True`` the decoded arrays are stored as .npz under
    ``default_cache_dir()/decoded/``, keyed by the archive's sha256 (for a directory: by the
    names, sizes and mtimes of its files); an unreadable cache is rebuilt.

    Returns ``(x_train, y_train, x_test, y_test, classes)``.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory (expected an image folder or .tar.gz).")
    if classes is not None:
        if isinstance(classes, str):
            raise InputError(f"read_image_folder: classes must be a sequence of names, got the string {classes!r}.")
        classes = tuple(str(c) for c in classes)
    cache_file = key = None
    if cache:
        key = _image_folder_key(path, classes)
        cache_file = default_cache_dir() / "decoded" / f"{path.name}-{key}.npz"
        if cache_file.is_file():
            hit = _load_cache(cache_file, key)
            if hit is not None:
                log.info("loaded decoded images of %s from cache %s", path, cache_file)
                return hit
    log.info("decoding images of %s (cached afterwards at %s)", path, cache_file)
    arrays = _decode_image_folder(path, classes)
    if cache:
        _save_cache(cache_file, key, arrays)
    return arrays


# --------------------------------------------------------------------------------------------
# load_dataset
# --------------------------------------------------------------------------------------------


def _normalize_name(name) -> str:
    if not isinstance(name, str):
        raise InputError(f"dataset name must be a string, one of {DATASETS}; got {name!r}.")
    n = name.strip().lower().replace("_", "-")
    n = {"cifar-10": "cifar10", "mnistsubset": "mnist-subset"}.get(n, n)
    if n not in DATASETS:
        raise InputError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}.")
    return n


def _find_idx(d: Path) -> tuple[dict[str, Path], list[str]]:
    found, missing = {}, []
    for key, base in MNIST_IDX_FILES.items():
        alt = base.replace("-idx", ".idx")  # train-images.idx3-ubyte, as some unzip tools name it
        for cand in (base, base + ".gz", alt, alt + ".gz"):
            if (d / cand).is_file():
                found[key] = d / cand
                break
        else:
            missing.append(base)
    return found, missing


def _load_mnist_subset() -> Dataset:
    ref = resources.files("kernelfit").joinpath("datasets", "mnist_subset.npz")
    with resources.as_file(ref) as p:
        arrays = read_keras_npz(p)
        source = str(p)
    return _make_dataset("mnist-subset", arrays, MNIST_CLASSES, source, (28, 28))


def _make_dataset(name, arrays, classes, source, image_shape=None) -> Dataset:
    x_tr, y_tr, x_te, y_te = arrays
    if image_shape is not None and (x_tr.shape[1:] != image_shape or x_te.shape[1:] != image_shape):
        raise DataError(f"{source}: {name} images should be {image_shape}, found x_train "
                        f"{x_tr.shape[1:]} and x_test {x_te.shape[1:]}.")
    try:
        return Dataset(name, x_tr, y_tr, x_te, y_te, tuple(classes), str(source))
    except InputError as e:
        raise DataError(f"{source}: {e}") from e


def _search_dirs(name: str, root: Path) -> list[Path]:
    if name == "mnist":
        return [root, root / "mnist", root / "MNIST" / "raw"]
    return [root, root / "cifar10", root / "cifar-10"]


def _try_mnist(d: Path):
    found, missing = _find_idx(d)
    if not missing:
        arrays = {k: read_idx(f) for k, f in found.items()}
        for k, a in arrays.items():
            nd = 3 if k.startswith("x") else 1
            if a.ndim != nd:
                raise DataError(f"{found[k]}: expected {nd}-D IDX {'images' if nd == 3 else 'labels'}, "
                                f"found shape {a.shape}.")
            if not np.issubdtype(a.dtype, np.integer):
                raise DataError(f"{found[k]}: expected unsigned-byte IDX data, found {a.dtype}.")
        for split in ("train", "test"):
            nx, ny = len(arrays["x_" + split]), len(arrays["y_" + split])
            if nx != ny:
                raise DataError(f"{found['y_' + split]}: {ny} labels for {nx} images in "
                                f"{found['x_' + split].name}; they must match one to one.")
        x_tr = _as_uint8_images(arrays["x_train"], found["x_train"], "images")
        x_te = _as_uint8_images(arrays["x_test"], found["x_test"], "images")
        packed = (x_tr, arrays["y_train"].astype(np.int64), x_te, arrays["y_test"].astype(np.int64))
        return _make_dataset("mnist", packed, MNIST_CLASSES, d, (28, 28)), None
    if (d / MNIST_NPZ).is_file():
        return _make_dataset("mnist", read_keras_npz(d / MNIST_NPZ), MNIST_CLASSES, d / MNIST_NPZ, (28, 28)), None
    note = f"only {sorted(p.name for p in found.values())} of the IDX files" if found else None
    return None, note


def _tar_has_cifar_batches(path: Path) -> bool:
    try:
        with tarfile.open(path, "r:*") as tf:
            for i, m in enumerate(tf):
                if CIFAR10_BATCH_DIR in PurePosixPath(m.name).parts or PurePosixPath(m.name).name.startswith("data_batch_"):
                    return True
                if i >= 8:
                    return False
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read archive (corrupt or truncated?): {e}") from e
    return False


def _cifar_image_folder(p: Path) -> Dataset:
    x_tr, y_tr, x_te, y_te, classes = read_image_folder(p, classes=CIFAR10_CLASSES)
    counts = np.bincount(y_tr, minlength=10)
    if (counts == 0).any():
        raise DataError(f"{p}: CIFAR-10 image folder lacks train images for classes "
                        f"{[CIFAR10_CLASSES[i] for i in np.flatnonzero(counts == 0)]}.")
    return _make_dataset("cifar10", (x_tr, y_tr, x_te, y_te), classes, p, (32, 32, 3))


def _image_folder_candidates(d: Path) -> list[Path]:
    skip = {CIFAR10_ARCHIVE, "cifar-10-binary.tar.gz", CIFAR10_BATCH_DIR}
    cands = []
    for pat in ("cifar10*", "cifar-10*"):
        for p in sorted(d.glob(pat)):
            if p.name in skip or p in cands:
                continue
            if p.is_file() and (p.name.endswith((".tar.gz", ".tgz", ".tar"))):
                cands.append(p)
            elif p.is_dir() and ((p / "train").is_dir() or any((q / "train").is_dir() for q in p.iterdir() if q.is_dir())):
                cands.append(p)
    if (d / "train" / CIFAR10_CLASSES[0]).is_dir() and (d / "test").is_dir():
        cands.insert(0, d)
    return cands


def _try_cifar10(d: Path):
    if (d / CIFAR10_BATCH_DIR).is_dir() or (d / "data_batch_1").is_file():
        src = d / CIFAR10_BATCH_DIR if (d / CIFAR10_BATCH_DIR).is_dir() else d
        return _make_dataset("cifar10", read_cifar10_batches(src), CIFAR10_CLASSES, src, (32, 32, 3)), None
    if (d / CIFAR10_ARCHIVE).is_file():
        return _make_dataset("cifar10", read_cifar10_batches(d / CIFAR10_ARCHIVE), CIFAR10_CLASSES,
                             d / CIFAR10_ARCHIVE, (32, 32, 3)), None
    cands = _image_folder_candidates(d)
    if cands:
        return _cifar_image_folder(cands[0]), None
    return None, None


def _load_file(name: str, p: Path) -> Dataset:
    """``data_dir`` given as a file: read it according to its format."""
    if name == "mnist":
        if p.suffix == ".npz":
            return _make_dataset("mnist", read_keras_npz(p), MNIST_CLASSES, p, (28, 28))
        raise DataError(f"{p}: for 'mnist' a file path must be a Keras-layout .npz; for the IDX files pass "
                        f"the directory that holds them.")
    if _tar_has_cifar_batches(p):
        return _make_dataset("cifar10", read_cifar10_batches(p), CIFAR10_CLASSES, p, (32, 32, 3))
    return _cifar_image_folder(p)


_EXPECTED = {
    "mnist": (f"the four MNIST IDX files {list(MNIST_IDX_FILES.values())} (each plain or .gz) or "
              f"{MNIST_NPZ} (Keras layout)"),
    "cifar10": (f"{CIFAR10_BATCH_DIR}/ or {CIFAR10_ARCHIVE} (CIFAR-10 python version), or an image "
                f"folder / archive named cifar10*.tar.gz with train/<class>/ and test/<class>/ "
                f"(e.g. cifar10-jpeg-q75.tar.gz)"),
}


def _not_found(name: str, root: Path, origin: str, dirs, notes, extra: str = "") -> DataError:
    lines = []
    for d in dirs:
        state = "" if d.is_dir() else " (does not exist)"
        note = notes.get(d)
        lines.append(f"  {d}{state}{'; found ' + note if note else ''}")
    return DataError(
        f"dataset {name!r} not found. Expected {_EXPECTED[name]}.\n"
        f"Data directory: {root} ({origin}). Searched:\n" + "\n".join(lines) + "\n"
        + (extra + "\n" if extra else "") + _FIX_HINT
    )


def load_dataset(name: str = "mnist-subset", data_dir=None, download: bool = False) -> Dataset:
    """Load a dataset by name.

    ``"mnist-subset"``  the first 5,000 train / 1,000 test MNIST images, shipped with kernelfit
                        (always offline; ``data_dir`` and ``download`` are ignored)
    ``"mnist"``         the four IDX files (plain or .gz), else ``mnist.npz`` (Keras layout)
    ``"cifar10"``       ``cifar-10-batches-py/`` or ``cifar-10-python.tar.gz``, else an image folder or
                        ``cifar10*.tar.gz`` with train/<class>/ (decoded once, then cached)

    The data directory comes from :func:`resolve_data_dir`; it is searched together with its
    ``mnist/`` and ``MNIST/raw/`` (or ``cifar10/``, ``cifar-10/``) subdirectories. ``data_dir`` may
    also name a file directly (an .npz, a CIFAR archive, an image-folder archive).
    With ``download=True`` missing files are fetched (:func:`download`) into the data directory.
    Raises ``DataError`` listing the expected files, the directories searched and how to fix it.
    """
    name = _normalize_name(name)
    if name == "mnist-subset":
        return _load_mnist_subset()
    root, origin = _resolve_with_origin(data_dir)
    if root.is_file():
        return _load_file(name, root)
    dirs = _search_dirs(name, root)
    try_fn = _try_mnist if name == "mnist" else _try_cifar10
    notes = {}
    for d in dirs:
        if d.is_dir():
            ds, note = try_fn(d)
            if ds is not None:
                return ds
            if note:
                notes[d] = note
    if not download:
        raise _not_found(name, root, origin, dirs, notes)
    try:
        target = _download(name, root)
    except ChecksumError:
        raise
    except DataError as e:
        raise _not_found(name, root, origin, dirs, notes, extra=f"Download failed: {e}") from e
    ds, _ = try_fn(target)
    if ds is None:
        raise _not_found(name, root, origin, dirs, notes, extra="Downloaded files were not usable.")
    return ds


# --------------------------------------------------------------------------------------------
# Download
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RemoteFile:
    """One file of a canonical source: name, size in bytes, sha256 and md5 (either may be None)."""

    filename: str
    size: int | None
    sha256: str | None
    md5: str | None


#: canonical base URLs (``download(..., base_url=...)`` overrides them for mirrors)
BASE_URLS = {
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "cifar10": "https://www.cs.toronto.edu/~kriz/",
}

#: expected files. MNIST md5: as in torchvision's MNIST resources; sha256 + sizes: as in
#: tensorflow_datasets' url_checksums/mnist.txt (same files, cvdf mirror). CIFAR-10: md5 as
#: published on https://www.cs.toronto.edu/~kriz/cifar.html; sha256 as in Keras' cifar10.load_data.
REMOTE_FILES: dict[str, tuple[RemoteFile, ...]] = {
    "mnist": (
        RemoteFile("train-images-idx3-ubyte.gz", 9912422,
                   "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
                   "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
        RemoteFile("train-labels-idx1-ubyte.gz", 28881,
                   "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
                   "d53e105ee54ea40749a09fcbcd1e9432"),
        RemoteFile("t10k-images-idx3-ubyte.gz", 1648877,
                   "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
                   "9fb629c4189551a2d022fa330f9573f3"),
        RemoteFile("t10k-labels-idx1-ubyte.gz", 4542,
                   "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
                   "ec29112dd5afa0611ce80d1b7f02629c"),
    ),
    "cifar10": (
        RemoteFile(CIFAR10_ARCHIVE, 170498071,
                   "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
                   "c58f30108f718f92721af3b95e74349a"),
    ),
}


def _checksum_error(algo: str, expected: str, found: str, path: Path, url: str, nbytes: int,
                    size: int | None) -> ChecksumError:
    size_note = f"{nbytes} bytes" + (f", expected {size}" if size is not None and size != nbytes else "")
    err = ChecksumError(
        f"checksum mismatch for {path.name} from {url}: expected {algo} {expected}, found {found} "
        f"({size_note}). The download was discarded; nothing was written to {path}. Fix: retry "
        f"(the transfer may have been cut); if it persists the server sends a different file: use "
        f"--base-url with a trusted mirror, or place a verified copy at {path}."
    )
    err.algorithm, err.expected, err.found, err.path, err.url = algo, expected, found, path, url
    return err


def _verify(path: Path, rf: RemoteFile) -> bool:
    if rf.sha256:
        return _sha256_file(path) == rf.sha256
    if rf.md5:
        h = hashlib.md5(usedforsecurity=False)
        with open(path, "rb") as f:
            while b := f.read(1 << 20):
                h.update(b)
        return h.hexdigest() == rf.md5
    return True


def _fetch(url: str, dest: Path, rf: RemoteFile, timeout: float, progress: bool) -> None:
    """Stream url to dest; dest appears (atomically) only once every checksum matches."""
    sha, md5, n = hashlib.sha256(), hashlib.md5(usedforsecurity=False), 0
    bar = None
    try:
        req = urllib.request.Request(url, headers={"User-Agent": "kernelfit-data/1"})
        with atomic_file(dest, "wb") as out, urllib.request.urlopen(req, timeout=timeout) as resp:
            if progress:
                from tqdm import tqdm

                total = resp.headers.get("Content-Length")
                bar = tqdm(total=int(total) if total else rf.size, unit="B", unit_scale=True, desc=dest.name)
            while chunk := resp.read(1 << 20):
                out.write(chunk)
                sha.update(chunk)
                md5.update(chunk)
                n += len(chunk)
                if bar is not None:
                    bar.update(len(chunk))
            # raising inside the block discards the temporary file: a mismatch never becomes dest
            if rf.sha256 and sha.hexdigest() != rf.sha256:
                raise _checksum_error("sha256", rf.sha256, sha.hexdigest(), dest, url, n, rf.size)
            if rf.md5 and md5.hexdigest() != rf.md5:
                raise _checksum_error("md5", rf.md5, md5.hexdigest(), dest, url, n, rf.size)
    except KernelfitError:
        raise
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        if isinstance(e, urllib.error.HTTPError):
            reason = f"HTTP {e.code} {e.reason}"
        else:
            reason = getattr(e, "reason", None) or e
        raise DataError(
            f"could not download {url}: {reason}. If this machine has no network access, download "
            f"{dest.name} elsewhere and put it in {dest.parent}; or use --base-url to point at a mirror."
        ) from e
    finally:
        if bar is not None:
            bar.close()


def download(name: str, data_dir=None, base_url: str | None = None, *, force: bool = False,
             timeout: float = 60.0, progress: bool = False) -> Path:
    """Download a dataset's canonical files into the data directory and return that directory.

    ``"mnist"``: the four IDX .gz files (default mirror https://ossci-datasets.s3.amazonaws.com/mnist/);
    ``"cifar10"``: ``cifar-10-python.tar.gz`` from https://www.cs.toronto.edu/~kriz/.
    ``base_url`` replaces the base URL (a mirror holding the same file names; ``file://`` works).
    Each file goes to a temporary file in the target directory, is checked against its sha256 and
    md5, then atomically renamed; a mismatch raises ``ChecksumError`` (attributes ``expected``,
    ``found``, ``path``, ``url``) and leaves no partial file. Files already present with the right
    checksum are not downloaded again unless ``force=True``. Network failures raise ``DataError``.
    """
    return _download(name, data_dir, base_url, force=force, timeout=timeout, progress=progress)


def _download(name, data_dir=None, base_url=None, *, force=False, timeout=60.0, progress=False) -> Path:
    name = _normalize_name(name)
    if name == "mnist-subset":
        raise InputError("'mnist-subset' ships with kernelfit; there is nothing to download. "
                         "Use download('mnist') for the full MNIST.")
    target = resolve_data_dir(data_dir)
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the data directory {target}: {e}. Choose a writable one with "
                        f"--data-dir or KERNELFIT_DATA.") from e
    base = base_url if base_url is not None else BASE_URLS[name]
    if not base.endswith("/"):
        base += "/"
    for rf in REMOTE_FILES[name]:
        dest = target / rf.filename
        if dest.is_file() and not force:
            if _verify(dest, rf):
                log.info("%s already present and verified", dest)
                continue
            log.warning("%s exists but its checksum does not match; downloading it again", dest)
        url = base + rf.filename
        log.info("downloading %s -> %s", url, dest)
        _fetch(url, dest, rf, timeout, progress)
    return target
