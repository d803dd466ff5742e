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


def _hash(row: np.ndarray) -> int:
    # compared as float64 values: -0.0 + 0.0 is +0.0, so rows equal as numbers hash alike
    row = np.ascontiguousarray(row, dtype=np.float64) + 0.0
    return int.from_bytes(hashlib.blake2b(row.data, digest_size=8).digest(), "little")


def _row(A, i) -> np.ndarray:
    return np.asarray(A[int(i)], dtype=np.float64) + 0.0


def _row_hashes(A, columns: int | None) -> np.ndarray:
    n = A.shape[0]
    m = A.shape[1] if columns is None else min(int(columns), A.shape[1])
    out = np.empty(n, dtype=np.uint64)
    # blocks sized by the full row: a memory map faults in page runs of each row visited
    for a, e in row_blocks(n, A.shape[1] * 8):
        block = np.asarray(A[a:e, :m], dtype=np.float64)
        for i, row in enumerate(block):
            out[a + i] = _hash(row)
        release_pages(A)
    return out


def _groups(keys: np.ndarray, index: np.ndarray):
    """Index groups (size >= 2) of equal keys."""
    order = np.argsort(keys, kind="stable")
    k, idx = keys[order], index[order]
    cuts = np.flatnonzero(k[1:] != k[:-1]) + 1
    return [g for g in np.split(idx, cuts) if len(g) > 1]


def find_duplicate_rows(A, columns: int | None = None) -> DuplicateRows | None:
    """Two equal rows of the 2-D array-like ``A`` (any format that slices), or None.

    Each row is hashed (blake2b of its float64 bytes); rows with equal hashes are compared exactly,
    so a hash collision never reports a false duplicate. ``columns`` hashes only the first columns
    as a screen (rows equal in full are equal there too) and re-hashes the full rows of the few
    candidates: for a Gram matrix, whose rows are long, that keeps the pass at n x ``columns`` reads.
    """
    n = A.shape[0]
    if n < 2:
        return None
    full = columns is None or columns >= A.shape[1]
    candidates = _groups(_row_hashes(A, None if full else columns), np.arange(n))
    found = []
    for group in candidates:
        group = np.sort(group)
        if not full:   # the screen matched on leading columns: hash the candidates' full rows
            full_hashes = np.array([_hash(_row(A, i)) for i in group], dtype=np.uint64)
            subgroups = [group[g] for g in _groups(full_hashes, np.arange(len(group)))]
        else:
            subgroups = [group]
        for g in subgroups:
            ref = _row(A, g[0])
            found.extend((int(g[0]), int(j)) for j in g[1:] if np.array_equal(ref, _row(A, j)))
        release_pages(A)
    if not found:
        return None
    first, second = min(found, key=lambda p: (p[1], p[0]))
    return DuplicateRows(first, second, len(found))
