"""IDX files (the MNIST family's format: MNIST, Fashion-MNIST, KMNIST), plain or gzip."""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from kernelfit.errors import DataError

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

