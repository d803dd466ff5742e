"""Keras-layout ``.npz`` archives (``x_train, y_train, x_test, y_test``), read without pickles."""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

import numpy as np

from kernelfit.errors import DataError, KernelfitError

from .bounds import npz_members, read_npz_member

_KERAS_KEYS = ("x_train", "y_train", "x_test", "y_test")


def read_keras_npz(path):
    """Read a Keras-layout ``.npz`` (``x_train, y_train, x_test, y_test``; no pickles allowed).

    Returns ``(x_train, y_train, x_test, y_test)`` with uint8 images and int64 labels.
    Labels of shape (N, 1) are flattened.
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as zf:
            names = npz_members(zf)
            missing = [k for k in _KERAS_KEYS if k not in names]
            if missing:
                raise DataError(
                    f"{path}: not a Keras-layout dataset: missing arrays {missing}; expected "
                    f"{list(_KERAS_KEYS)}, found {sorted(names)}."
                )
            # each member's size and dtype come from its .npy header before it is inflated
            arrays = [read_npz_member(zf, k, path) for k in _KERAS_KEYS]
    except KernelfitError:
        raise
    except FileNotFoundError as e:
        raise DataError(f"{path}: file not found.") from e
    except zipfile.BadZipFile as e:
        with open(path, "rb") as fh:
            head = fh.read(8)
        single = " (a single .npy array)" if head.startswith(b"\x93NUMPY") else ""
        raise DataError(f"{path}: expected an .npz archive with {_KERAS_KEYS}, found first bytes {head!r}{single}: "
                        f"{e}") from e
    except (OSError, ValueError, EOFError, zlib.error, KeyError) as e:
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
        raise DataError(f"{source}: {what} should be images (N, H, W) or (N, H, W, C), found shape {x.shape}. "
                        f"For feature rows or other arrays of your own, drop --dataset and pass --data {source} "
                        f"(load_arrays(data=...)): they are used as stored.")
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

