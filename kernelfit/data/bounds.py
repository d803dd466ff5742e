"""Bounds on what a reader decompresses or allocates, checked from headers before any data is read.

A compressed file is small on disk and may say (in its header) or hold (in its stream) far more than
it looks: a 300-byte tar.gz can expand to gigabytes. Every reader of a compressed format here

* takes the decompressed size from the format's header (IDX dimensions, an .npy header inside an
  .npz member, a tar member's size) and refuses it before reading when it exceeds what the
  compressed bytes can possibly hold (``check_ratio``: DEFLATE expands at most ~1032:1) or the
  machine's memory (``check_memory``; the solve's memory plan, checked before loading, is the finer bound);
* then reads exactly that many bytes into a preallocated buffer (``read_exact``), never "everything
  the stream yields", and checks that nothing follows.

``read_npz_member`` does this for one member of an .npz, and refuses object arrays (pickles) from
the .npy header alone.
"""

from __future__ import annotations

import math
import zipfile
import zlib

import numpy as np

from kernelfit.errors import DataError, MemoryPlanError
from kernelfit.results import format_gib

__all__ = ["DEFLATE_MAX_RATIO", "check_memory", "check_ratio", "memory_limit", "npz_members", "read_exact", "read_npz_member"]

# DEFLATE (gzip, zip) emits at least ~2 bits per 258-byte match: no stream expands more than ~1032:1
DEFLATE_MAX_RATIO = 1032
# what may sit beside the data in a compressed file (headers, trailers) without holding data
_SLACK = 1 << 16
_CHUNK = 1 << 20


def memory_limit() -> int:
    """Bytes of memory this machine has (physical RAM): no reader allocates more, whatever the plan
    (``--force-memory`` overrides the plan, which counts what is *available*, not this)."""
    import psutil

    return int(psutil.virtual_memory().total)


def check_memory(nbytes: int, source, what: str) -> None:
    """Refuse to allocate ``nbytes`` for ``what`` of ``source`` beyond the machine's memory."""
    limit = memory_limit()
    if nbytes > limit:
        raise MemoryPlanError(
            f"{source}: {what} needs {format_gib(nbytes)} ({nbytes} bytes) by its header, more than this machine's "
            f"{format_gib(limit)} of memory; nothing was read. If the file is not meant to be that large it is corrupt "
            f"or hostile (a decompression bomb); otherwise use a machine with more memory or an uncompressed "
            f".npy / HDF5 file, which is read by memory map.")


def check_ratio(nbytes: int, compressed: int, source, what: str) -> None:
    """Refuse a header claiming more data than ``compressed`` DEFLATE bytes can expand to."""
    if nbytes > DEFLATE_MAX_RATIO * compressed + _SLACK:
        raise DataError(
            f"{source}: {what} claims {nbytes} bytes, but {compressed} compressed bytes can hold at most "
            f"~{DEFLATE_MAX_RATIO * compressed} (DEFLATE expands at most {DEFLATE_MAX_RATIO}:1): the header is "
            f"corrupt or the file is truncated; nothing was read. Fix: obtain the file again.")


def read_exact(stream, nbytes: int, source, what: str) -> bytearray:
    """Exactly ``nbytes`` from ``stream`` in bounded chunks; DataError when the stream ends early."""
    buf = bytearray(nbytes)
    view = memoryview(buf)
    got = 0
    while got < nbytes:
        n = stream.readinto(view[got:got + _CHUNK])
        if not n:
            raise DataError(f"{source}: truncated {what}: the header says {nbytes} data bytes, the file "
                            f"holds {got}. Fix: obtain the file again.")
        got += n
    return buf


def npz_members(zf: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
    """Array name -> zip entry of an .npz (``name.npy`` entries, as ``np.load`` names them)."""
    return {i.filename[:-4]: i for i in zf.infolist() if i.filename.endswith(".npy")}


def _npy_header(fh, source, name):
    fmt = np.lib.format
    try:
        version = fmt.read_magic(fh)
        if version == (1, 0):
            return fmt.read_array_header_1_0(fh)
        if version == (2, 0):
            return fmt.read_array_header_2_0(fh)
        return fmt._read_array_header(fh, version)   # 3.0: utf-8 field names; no public reader
    except (ValueError, EOFError, SyntaxError, TypeError) as e:
        raise DataError(f"{source}: member {name!r} has no valid .npy header ({e}).") from None


def read_npz_member(zf: zipfile.ZipFile, name: str, source) -> np.ndarray:
    """One array of an open .npz, its size checked from its .npy header before anything is inflated.

    Refused with ``DataError`` before reading: an object dtype (it would need pickle), a shape whose
    bytes differ from what the zip entry records, more bytes than the compressed entry can expand to;
    ``MemoryPlanError`` when the array does not fit in memory. ``source`` names the file in messages.
    """
    info = npz_members(zf).get(name)
    if info is None:
        raise DataError(f"{source}: no array {name!r} in this .npz.")
    try:
        with zf.open(info) as fh:
            shape, fortran, dtype = _npy_header(fh, source, name)
            if dtype.hasobject:
                raise DataError(f"{source}: array {name!r} has dtype {dtype} holding Python objects; reading it "
                                f"would unpickle code from the file, which kernelfit never does. Fix: save a "
                                f"numeric array (e.g. x.astype(np.float32)).")
            count = math.prod(int(s) for s in shape)
            nbytes = count * dtype.itemsize
            header = fh.tell()
            if header + nbytes != info.file_size:
                raise DataError(f"{source}: array {name!r}: its header says shape {tuple(shape)} {dtype} "
                                f"({nbytes} bytes) but the zip entry holds {info.file_size - header} data "
                                f"bytes; the file is corrupt. Fix: save it again with numpy.savez.")
            if info.compress_type != zipfile.ZIP_STORED:
                check_ratio(info.file_size, info.compress_size, source, f"array {name!r}")
            check_memory(nbytes, source, f"array {name!r} (shape {tuple(shape)}, {dtype})")
            # a bytearray is writable, so the array made on it needs no copy
            arr = np.frombuffer(read_exact(fh, nbytes, source, f"array {name!r}"), dtype=dtype, count=count)
            fh.read(1)   # reach the entry's end: zipfile checks its CRC there
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        raise DataError(f"{source}: cannot read array {name!r} (corrupt or truncated .npz?): {e}") from None
    return arr.reshape(shape, order="F" if fortran else "C")
