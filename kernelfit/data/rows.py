"""Reading big arrays by blocks of rows: page release for memory maps, duplicate rows by hashing.

``release_pages(a)``         drop the pages a read-only ``np.memmap`` has touched from this process's
                             resident set (they stay in the page cache; a later read maps them again).
                             Without it, streaming a memory-mapped file once leaves the whole file
                             counted in the resident set, next to the copy being built from it.
``row_blocks(n, row_bytes)`` row ranges whose blocks stay near ``BLOCK_BYTES``.
``find_duplicate_rows(A)``   two indices of equal rows, found by hashing each row (one pass over A),
                             before any factorization would discover the singular matrix they make.
"""

from __future__ import annotations

import hashlib
import mmap

import numpy as np

__all__ = ["BLOCK_BYTES", "DuplicateRows", "find_duplicate_rows", "release_pages", "row_blocks"]

BLOCK_BYTES = 4 * 2**20   # a row block of a streamed read: small next to any Gram, big enough for BLAS


def release_pages(a) -> None:
    """madvise(MADV_DONTNEED) on the mapping behind a read-only ``np.memmap``; no-op for anything else."""
    mm = getattr(a, "_mmap", None)   # np.memmap keeps its mmap.mmap object here (None for plain arrays)
    if mm is None or not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return
    try:
        mm.madvise(mmap.MADV_DONTNEED)
    except (OSError, ValueError):
        pass


def row_blocks(n: int, row_bytes: int, block_bytes: int = BLOCK_BYTES, multiple: int = 1):
    """(start, stop) ranges covering 0..n, each about ``block_bytes`` (a multiple of ``multiple`` rows)."""
    rows = max(1, int(block_bytes) // max(int(row_bytes), 1))
    rows = max(multiple, rows // multiple * multiple)
    return [(a, min(a + rows, n)) for a in range(0, n, rows)]


class DuplicateRows:
    """Result of ``find_duplicate_rows``: one pair (first, second) and how many rows repeat an earlier one."""

    def __init__(self, first: int, second: int, count: int):
        self.first, self.second, self.count = int(first), int(second), int(count)

    def __repr__(self) -> str:
        return f"DuplicateRows(first={self.first}, second={self.second}, count={self.count})"


def row_hash(row: np.ndarray) -> int:
    """64-bit blake2b of a row's float64 values (-0.0 + 0.0 is +0.0: rows equal as numbers hash alike)."""
    row = np.ascontiguousarray(row, dtype=np.float64) + 0.0
    return int.from_bytes(hashlib.blake2b(row.data, digest_size=8).digest(), "little")


def _row(A, i) -> np.ndarray:
    return np.asarray(A[int(i)], dtype=np.float64)


def row_hashes(A) -> np.ndarray:
    """``row_hash`` of every row of A, read in row blocks (pages of a memory map released per block)."""
    n = A.shape[0]
    out = np.empty(n, dtype=np.uint64)
    for a, e in row_blocks(n, A.shape[1] * 8):
        for i, row in enumerate(np.asarray(A[a:e], dtype=np.float64)):
            out[a + i] = row_hash(row)
        release_pages(A)
    return out


def _groups(keys: np.ndarray, index: np.ndarray):
    """Index groups (size >= 2) of equal keys."""
    order = np.argsort(keys, kind="stable")
    k, idx = keys[order], index[order]
    cuts = np.flatnonzero(k[1:] != k[:-1]) + 1
    return [g for g in np.split(idx, cuts) if len(g) > 1]


def find_duplicate_rows(A, hashes: np.ndarray | None = None) -> DuplicateRows | None:
    """Two equal rows of the 2-D array-like ``A`` (any format that slices), or None.

    Each row is hashed (``row_hashes``, one pass over A, or ``hashes`` from the caller's own pass);
    rows with equal hashes are then compared exactly, so a hash collision never reports a false
    duplicate. Returns the pair with the smallest second index and how many rows repeat an earlier one.
    """
    n = A.shape[0]
    if n < 2:
        return None
    hashes = row_hashes(A) if hashes is None else np.asarray(hashes, dtype=np.uint64)
    found = []
    for group in _groups(hashes, np.arange(n)):
        group = np.sort(group)
        ref = _row(A, group[0])
        found.extend((int(group[0]), int(j)) for j in group[1:] if np.array_equal(ref, _row(A, j)))
        release_pages(A)
    if not found:
        return None
    first, second = min(found, key=lambda p: (p[1], p[0]))
    return DuplicateRows(first, second, len(found))
