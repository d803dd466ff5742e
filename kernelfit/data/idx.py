"""IDX files (the MNIST family's format: MNIST, Fashion-MNIST, KMNIST), plain or gzip."""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from kernelfit.errors import DataError

from .bounds import check_memory, check_ratio, read_exact

_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _open(path: Path):
    """(stream, compressed size or None): the file itself, or a streaming gzip reader over it."""
    try:
        f = open(path, "rb")
    except FileNotFoundError as e:
        raise DataError(f"{path}: file not found.") from e
    except OSError as e:
        raise DataError(f"{path}: cannot open: {e}") from e
    head = f.read(2)
    f.seek(0)
    if head == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=f), f, os.fstat(f.fileno()).st_size
    return f, f, None


def _read(stream, n: int) -> bytes:
    out = b""
    while len(out) < n and (b := stream.read(n - len(out))):
        out += b
    return out


def read_idx(path) -> np.ndarray:
    """Read one IDX file (MNIST's format; plain or gzip, detected from the content).

    Validates the magic number (``0x0000TTNN``: type code TT, NN dimensions), the dimensions and
    the data length; returns a writable native-endian array of shape ``dims``.
    The data size the header's dimensions imply is checked before any data is read: against the
    file size (plain), against what the compressed bytes can expand to (gzip), and against the
    machine's memory; then exactly that many bytes are read, streamed (never "all the stream holds").
    Raises ``DataError`` naming the file when it is missing, truncated or malformed
    (``MemoryPlanError`` when its data cannot fit in memory).
    """
    path = Path(path)
    stream, raw_file, compressed = _open(path)
    try:
        with raw_file, stream:
            return _read_idx(path, stream, compressed, os.fstat(raw_file.fileno()).st_size)
    except (OSError, EOFError, zlib.error) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(
            f"{path}: cannot read (corrupt or truncated gzip data?): {e}. "
            f"Delete the file and download it again (--download)."
        ) from e


def _read_idx(path: Path, stream, compressed: int | None, file_size: int) -> np.ndarray:
    magic = _read(stream, 4)
    if len(magic) < 4:
        raise DataError(f"{path}: truncated IDX file: {len(magic)} bytes, not even the 4-byte magic number.")
    code, ndim = magic[2], magic[3]
    if magic[0] != 0 or magic[1] != 0 or code not in _IDX_DTYPES or ndim == 0:
        raise DataError(
            f"{path}: not an IDX file: magic number 0x{magic.hex()}; expected 0x0000TTNN with "
            f"type code TT in {{08, 09, 0b, 0c, 0d, 0e}} and NN >= 1 dimensions "
            f"(0x00000803 for images, 0x00000801 for labels)."
        )
    header = 4 + 4 * ndim
    raw_dims = _read(stream, 4 * ndim)
    if len(raw_dims) < 4 * ndim:
        raise DataError(f"{path}: truncated IDX header: {ndim} dimensions need {header} bytes, file has "
                        f"{4 + len(raw_dims)}.")
    dims = struct.unpack(f">{ndim}I", raw_dims)
    dtype = np.dtype(_IDX_DTYPES[code])
    count = math.prod(dims)
    need = count * dtype.itemsize
    if compressed is None:
        have = file_size - header
        if have != need:
            kind = "truncated" if have < need else "malformed"
            extra = f" ({have - need} trailing bytes)" if have > need else ""
            raise DataError(
                f"{path}: {kind} IDX file: dimensions {dims} need {need} data bytes, found {have}{extra}. "
                f"Delete the file and download it again (--download)."
            )
    else:
        check_ratio(need + header, compressed, path, f"the IDX header (dimensions {dims})")
    check_memory(need, path, f"the IDX data (dimensions {dims}, {dtype})")
    try:
        buf = read_exact(stream, need, path, f"IDX file (dimensions {dims})")
    except DataError as e:
        raise DataError(f"{e} Delete the file and download it again (--download).") from None
    if compressed is not None and (tail := len(_read(stream, 1 << 16))):
        more = "at least " if tail == 1 << 16 else ""
        raise DataError(
            f"{path}: malformed IDX file: dimensions {dims} need {need} data bytes, found more "
            f"({more}{tail} trailing bytes); nothing beyond the header's size was read."
        )
    arr = np.frombuffer(buf, dtype=dtype, count=count).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=dtype.byteorder not in ("=", "|"))
