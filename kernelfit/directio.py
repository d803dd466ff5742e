"""Direct (O_DIRECT) reads and writes for the disk store: the numbers go between the disk and our own
buffers, not through the page cache.

Why: a disk factorization writes its factor once and re-reads the finished panels once per slab, far
more bytes than RAM holds at the sizes the store is for, so the page cache cannot keep them. Going
through it still costs a copy per byte and, for each new page, the kernel's allocation and zeroing:
CPU that the GEMMs on the same cores lose. Measured on the 2-core VMs: ~2.5 s of CPU per GB written
through the page cache (fresh pages there are faulted in from the host), ~0.02 s per GB with O_DIRECT.

O_DIRECT wants file offsets, lengths and memory addresses aligned to ``ALIGN``. The store's .npy files
have their header padded to ``ALIGN`` bytes (``npy_header``), so the numbers start aligned; buffers come
from ``aligned_empty``; an unaligned tail goes through a small aligned bounce buffer, and a written
file is cut to its exact size with ``ftruncate``. Where the filesystem refuses O_DIRECT (tmpfs, some
network filesystems: EINVAL), callers fall back to buffered I/O (``DirectIOUnsupported``).
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

import numpy as np

ALIGN = 4096                     # the largest logical block size in common use; a multiple of the others
_CHUNK = 64 << 20                # one read / write call moves at most this much
O_DIRECT = getattr(os, "O_DIRECT", 0)


class DirectIOUnsupported(OSError):
    """The file system (or platform) refuses O_DIRECT here; use buffered I/O."""


def npy_header(dtype, shape, align: int = ALIGN) -> bytes:
    """A version 1.0 .npy header for a C-order array, padded with spaces so the numbers start at a
    multiple of ``align`` (numpy's own writer pads to 64; any padding ending in a newline is valid)."""
    d = np.lib.format.dtype_to_descr(np.dtype(dtype))
    text = "{'descr': %r, 'fortran_order': False, 'shape': %r, }" % (d, tuple(int(s) for s in shape))
    magic = np.lib.format.magic(1, 0)
    pad = -(len(magic) + 2 + len(text) + 1) % align
    text = text + " " * pad + "\n"
    return magic + struct.pack("<H", len(text)) + text.encode("latin1")


HUGE_BYTES = 2 << 20             # buffers this large are mapped with transparent huge pages asked for


def aligned_empty(nbytes: int) -> np.ndarray:
    """A uint8 array of ``nbytes`` rounded up to ALIGN, starting at an ALIGN-aligned address. Large
    ones are anonymous mappings (page-aligned) with ``MADV_HUGEPAGE``: the kernel then faults them in
    2 MiB at a time, ~5x less CPU than 4 KiB pages on the 2-core VMs (400 MB: 0.2 s against 0.9 s);
    small ones are a view of a slightly larger numpy array."""
    size = -(-int(nbytes) // ALIGN) * ALIGN
    if size >= HUGE_BYTES:
        import mmap

        m = mmap.mmap(-1, size)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                m.madvise(mmap.MADV_HUGEPAGE)
            except OSError:           # a kernel without transparent huge pages: 4 KiB pages
                pass
        return np.frombuffer(m, dtype=np.uint8)
    raw = np.empty(size + ALIGN, dtype=np.uint8)
    at = -raw.ctypes.data % ALIGN
    return raw[at : at + size]


def is_aligned(arr: np.ndarray) -> bool:
    return arr.flags.c_contiguous and arr.ctypes.data % ALIGN == 0


def _bytes(arr: np.ndarray) -> np.ndarray:
    return arr.reshape(-1).view(np.uint8)


def set_direct(fd: int, on: bool = True) -> None:
    """Turn O_DIRECT on (or off) for an open file (Linux lets F_SETFL change it); DirectIOUnsupported
    where it cannot be turned on."""
    if not O_DIRECT:
        if not on:
            return
        raise DirectIOUnsupported(errno.EINVAL, "O_DIRECT is not available on this platform")
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | O_DIRECT if on else flags & ~O_DIRECT)
    except OSError as e:
        if e.errno == errno.EINVAL:
            raise DirectIOUnsupported(e.errno, f"O_DIRECT refused: {e.strerror}") from None
        raise


def open_direct(path) -> int:
    """A read-only O_DIRECT file descriptor; DirectIOUnsupported where the file system refuses it."""
    if not O_DIRECT:
        raise DirectIOUnsupported(errno.EINVAL, "O_DIRECT is not available on this platform")
    try:
        return os.open(path, os.O_RDONLY | O_DIRECT)
    except OSError as e:
        if e.errno == errno.EINVAL:
            raise DirectIOUnsupported(e.errno, f"O_DIRECT refused for {path}: {e.strerror}") from None
        raise


def _io(call, fd: int, buf: np.ndarray, offset: int) -> int:
    """Move ``buf`` (aligned uint8) to / from the file at ``offset`` in chunks; returns bytes moved
    (short only at the end of a file, on reads)."""
    done = 0
    while done < buf.size:
        part = memoryview(buf[done : done + _CHUNK])
        try:
            got = call(fd, part, offset + done)
        except OSError as e:
            if e.errno == errno.EINVAL:
                raise DirectIOUnsupported(e.errno, f"O_DIRECT transfer refused: {e.strerror}") from None
            raise
        if got <= 0:
            break
        done += got
    return done


def _pread(fd, view, offset):
    return os.preadv(fd, [view], offset)


def _pwrite(fd, view, offset):
    return os.pwrite(fd, view, offset)


def read_cached_then_direct(path, out: np.ndarray, offset: int) -> None:
    """Fill ``out`` (C-contiguous, ALIGN-aligned) from ``offset`` (a multiple of ALIGN) of ``path``: what
    the page cache holds is copied from it (``RWF_NOWAIT`` reads, which never wait for the disk), the
    rest read with O_DIRECT. A file this process has just written is mostly cached and copied at memory
    speed; one larger than RAM comes from the disk without filling the page cache on the way."""
    from .errors import DataError

    b = _bytes(out)
    nowait = getattr(os, "RWF_NOWAIT", 0)
    fd = os.open(path, os.O_RDONLY)
    try:
        dfd = None
        done = 0
        while done < b.size:
            got = 0
            if nowait:
                try:
                    got = os.preadv(fd, [memoryview(b[done : done + _CHUNK])], offset + done, nowait)
                except BlockingIOError:
                    got = 0
                except OSError as e:           # a kernel or file system without RWF_NOWAIT: read directly
                    if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                        raise
                    nowait = 0
            if got:
                done += got
                continue
            if dfd is None:
                dfd = open_direct(path)
            # not cached at offset + done: one chunk with O_DIRECT, then try the cache again. Whole
            # aligned blocks go straight into ``out``; a partial one (the tail, or a cached read that
            # stopped inside a block) through ``read_range``'s aligned buffer
            at, left = offset + done, b.size - done
            whole = min(_CHUNK, left) // ALIGN * ALIGN if at % ALIGN == 0 else 0
            if whole:
                got = _io(_pread, dfd, b[done : done + whole], at)
                if got <= 0:
                    raise DataError(f"unexpected end of file reading {b.size} bytes at offset {offset} of {path}.")
            else:
                got = min(left, ALIGN - at % ALIGN)
                b[done : done + got] = read_range(dfd, at, got, aligned_empty(span(at, got)))
            done += got
    finally:
        os.close(fd)
        if dfd is not None:
            os.close(dfd)


def read_range(fd: int, offset: int, nbytes: int, buf: np.ndarray) -> np.ndarray:
    """Bytes offset..offset+nbytes of an O_DIRECT file, read as the enclosing aligned range into ``buf``
    (aligned uint8, at least ``span(offset, nbytes)`` long); returns the uint8 view of those bytes."""
    from .errors import DataError

    lo = offset // ALIGN * ALIGN
    n = span(offset, nbytes)
    got = _io(_pread, fd, buf[:n], lo)
    if got < offset - lo + nbytes:
        raise DataError(f"unexpected end of file reading {nbytes} bytes at offset {offset}.")
    return buf[offset - lo : offset - lo + nbytes]


def span(offset: int, nbytes: int) -> int:
    """Bytes of the ALIGN-aligned range that holds offset..offset+nbytes."""
    lo = offset // ALIGN * ALIGN
    return -(-(offset + nbytes) // ALIGN) * ALIGN - lo


def write_npy(fd: int, arr: np.ndarray, hasher) -> int:
    """Write ``arr`` (C-contiguous, ALIGN-aligned) as a .npy file with an ALIGN-padded header to the
    empty file ``fd`` (O_DIRECT set here), hashing the file bytes into ``hasher``; the file is cut to its
    exact size. Returns that size."""
    header = npy_header(arr.dtype, arr.shape)
    set_direct(fd)
    b = _bytes(arr)
    bulk = b.size // ALIGN * ALIGN
    head = aligned_empty(len(header))
    head[:] = np.frombuffer(header, dtype=np.uint8)
    _io(_pwrite, fd, head, 0)
    if bulk:
        _io(_pwrite, fd, b[:bulk], len(header))
    if bulk < b.size:
        bounce = aligned_empty(ALIGN)
        bounce[: b.size - bulk] = b[bulk:]
        bounce[b.size - bulk :] = 0
        _io(_pwrite, fd, bounce, len(header) + bulk)
    size = len(header) + b.size
    os.ftruncate(fd, size)
    hasher.update(header)
    hasher.update(memoryview(b))
    return size


class BufferPool:
    """Aligned byte buffers handed out and given back, reused by later requests: fresh pages cost the
    kernel's allocation and zeroing each time (see the module doc). A request takes the smallest free
    buffer that holds it, else a new one; free buffers too small for a request are dropped, so the pool
    holds about what is in use at once."""

    def __init__(self):
        import threading

        self.free: list = []
        self.lock = threading.Lock()

    def take(self, nbytes: int) -> np.ndarray:
        with self.lock:
            fits = [b for b in self.free if b.size >= nbytes]
            buf = min(fits, key=lambda b: b.size) if fits else None
            self.free = [b for b in self.free if b is not buf and b.size >= nbytes]
        return aligned_empty(nbytes) if buf is None else buf

    def give(self, buf) -> None:
        if buf is not None:
            with self.lock:
                self.free.append(buf)
