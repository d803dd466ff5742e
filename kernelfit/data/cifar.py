"""CIFAR-10 "python version" batches (a directory or the .tar.gz), with restricted unpickling."""

from __future__ import annotations

import io
import pickle
import tarfile
import zlib
from pathlib import Path, PurePosixPath

import numpy as np

from kernelfit.errors import DataError

CIFAR10_BATCH_DIR = "cifar-10-batches-py"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
_CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR10_TEST_BATCH = "test_batch"
# a canonical batch is 31,035,704 bytes (test_batch 31,035,526); anything much larger is not one and is
# refused from its size (tar header or stat) before a byte of it is read or inflated
BATCH_MAX_BYTES = 2 * 31_035_704


def _check_batch_size(size: int, source: str) -> None:
    if size > BATCH_MAX_BYTES:
        raise DataError(f"{source}: {size} bytes, but a CIFAR-10 python batch is ~31 MB (at most {BATCH_MAX_BYTES} "
                        f"accepted); this is not a CIFAR-10 batch (or the archive is hostile) and was not read. "
                        f"Fix: download the canonical cifar-10-python.tar.gz again (--download).")


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
    except Exception as e:
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
    from ..progress import progress_bar

    # read + decode of each of the 6 batches: a line every few seconds (a .tar.gz takes tens of seconds)
    bar = progress_bar(total=2 * len(wanted), desc=f"CIFAR-10 read + decode ({path})", unit=" steps",
                       logger="kernelfit.data")
    if path.is_dir():
        d = path / CIFAR10_BATCH_DIR if (path / CIFAR10_BATCH_DIR).is_dir() else path
        for name in wanted:
            f = d / name
            if f.is_file():
                _check_batch_size(f.stat().st_size, str(f))
                blobs[name] = (f.read_bytes(), str(f))
                bar.update(1)
        where = str(d)
    elif path.is_file():
        try:
            with tarfile.open(path, "r:*") as tf:
                for m in tf:
                    base = PurePosixPath(m.name).name
                    if m.isfile() and base in wanted and base not in blobs:
                        _check_batch_size(m.size, f"{path}:{m.name}")
                        blobs[base] = (tf.extractfile(m).read(), f"{path}:{m.name}")
                        bar.update(1)
        except DataError:
            raise
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
    parts = []
    for n in _CIFAR10_TRAIN_BATCHES:
        parts.append(_parse_batch(*blobs[n]))
        bar.update(1)
    x_tr = np.ascontiguousarray(np.concatenate([p[0] for p in parts]))
    y_tr = np.concatenate([p[1] for p in parts])
    x_te, y_te = _parse_batch(*blobs[_CIFAR10_TEST_BATCH])
    bar.update(1)
    bar.close()
    return x_tr, y_tr, np.ascontiguousarray(x_te), y_te

