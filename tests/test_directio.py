"""Direct (O_DIRECT) file I/O of the disk store (kernelfit/directio.py): the files are ordinary .npy
files numpy reads, every read returns what was written whatever the page cache holds, and a file
system that refuses O_DIRECT falls back to buffered I/O."""

from __future__ import annotations

import os

import numpy as np
import pytest

from kernelfit import directio
from kernelfit.directio import ALIGN, aligned_empty, npy_header, read_cached_then_direct, read_range, span
from kernelfit.storage import FILE_DIGEST, file_digest, save_npy

pytestmark = pytest.mark.skipif(not directio.O_DIRECT, reason="O_DIRECT is Linux-only")


def aligned_array(shape, dtype, seed=0):
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    a = aligned_empty(max(nbytes, 1))[:nbytes].view(dtype).reshape(shape)
    a[...] = np.random.default_rng(seed).standard_normal(shape)
    return a


def direct_supported(path) -> bool:
    try:
        os.close(directio.open_direct(path))
        return True
    except directio.DirectIOUnsupported:
        return False


@pytest.mark.parametrize("shape", [(0, 4), (3, 5), (1000, 96), (512, 1024), (777, 129)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_direct_npy_files_load_with_numpy_and_carry_their_checksum(tmp_path, shape, dtype):
    a = aligned_array(shape, dtype)
    rec = save_npy(tmp_path / "a.npy", a, direct=True)
    b = np.load(tmp_path / "a.npy", allow_pickle=False)          # numpy's own reader
    assert b.dtype == np.dtype(dtype) and b.shape == shape and np.array_equal(a, b)
    assert rec["bytes"] == os.path.getsize(tmp_path / "a.npy")
    assert rec[FILE_DIGEST] == file_digest(tmp_path / "a.npy", FILE_DIGEST)
    if direct_supported(tmp_path / "a.npy"):       # the numbers start on an ALIGN boundary
        assert rec["bytes"] == ALIGN + a.nbytes
    # numpy's header for the same array says the same thing, padded less
    with open(tmp_path / "a.npy", "rb") as f:
        f.seek(len(np.lib.format.magic(1, 0)))
        assert np.lib.format.read_array_header_1_0(f) == (tuple(shape), False, np.dtype(dtype))


def test_npy_header_pads_to_the_alignment_it_is_asked_for():
    for align in (64, ALIGN):
        h = npy_header(np.float32, (123456, 1536), align)
        assert len(h) % align == 0 and h.endswith(b"\n") and h.startswith(b"\x93NUMPY\x01\x00")


def test_unaligned_arrays_are_written_buffered(tmp_path):
    a = np.arange(12.0).reshape(3, 4)[1:]          # not on an ALIGN boundary
    assert not directio.is_aligned(a)
    rec = save_npy(tmp_path / "a.npy", a, direct=True)
    assert np.array_equal(np.load(tmp_path / "a.npy"), a) and rec["bytes"] == os.path.getsize(tmp_path / "a.npy")


@pytest.mark.parametrize("cache", ["all", "none", "middle"])
def test_cached_then_direct_reads_return_the_file_whatever_is_cached(tmp_path, cache):
    data = np.random.default_rng(1).integers(0, 256, (64 << 20) + 3 * ALIGN + 123, dtype=np.uint8)
    path = tmp_path / "x.bin"
    with open(path, "wb") as f:
        f.write(b"h" * ALIGN)
        f.write(data.tobytes())
    if not direct_supported(path):
        pytest.skip("this file system refuses O_DIRECT")
    fd = os.open(path, os.O_RDONLY)
    try:
        if cache != "all":
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)        # drop what is cached (clean pages)
        if cache == "middle":
            os.pread(fd, 5 * ALIGN, ALIGN + (1 << 20))               # cache a stretch in the middle
    finally:
        os.close(fd)
    out = aligned_empty(data.size)[: data.size]
    read_cached_then_direct(path, out, ALIGN)
    assert np.array_equal(out, data)


def test_read_range_returns_any_byte_range(tmp_path):
    data = np.random.default_rng(2).integers(0, 256, 10 * ALIGN + 77, dtype=np.uint8)
    path = tmp_path / "y.bin"
    path.write_bytes(data.tobytes())
    if not direct_supported(path):
        pytest.skip("this file system refuses O_DIRECT")
    fd = directio.open_direct(path)
    try:
        for offset, nbytes in [(0, 1), (5, ALIGN), (ALIGN - 1, 2), (3 * ALIGN, 2 * ALIGN), (7, data.size - 7)]:
            buf = aligned_empty(span(offset, nbytes))
            assert np.array_equal(read_range(fd, offset, nbytes, buf), data[offset : offset + nbytes])
        with pytest.raises(Exception, match="unexpected end of file"):
            read_range(fd, data.size - 10, 20, aligned_empty(span(data.size - 10, 20)))
    finally:
        os.close(fd)


def test_buffer_pool_reuses_and_drops_what_is_too_small():
    pool = directio.BufferPool()
    a = pool.take(10_000)
    assert a.size >= 10_000 and a.ctypes.data % ALIGN == 0
    pool.give(a)
    assert pool.take(5_000) is a                   # reused
    pool.give(a)
    b = pool.take(100_000)                         # too small: a new one, the old one dropped
    assert b is not a and pool.free == []
