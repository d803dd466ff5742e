"""Lower-triangle panel storage of a symmetric matrix: the bottom of linalg, imported by every layer.

Storage (``SymmetricPanels``): a symmetric n x n matrix is kept as its lower triangle, cut into
column panels of width ``block``. Panel j is one C-contiguous array of shape (n - s_j, w_j) holding
rows s_j.. of columns s_j..s_j + w_j. This needs n^2/2 (+ n*block/2) numbers instead of n^2: the
full-MNIST float32 Gram is 7.2 GB instead of 14.4 GB, and every BLAS call sees one contiguous panel.
The factorization itself lives in tiled.py (host) and outofcore.py (device).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from ..parallel import parallel_row_blocks

DEFAULT_BLOCK = 2048


def choose_block(n: int, block: int | None = None) -> int:
    """Block (panel) width: big enough for GEMM efficiency, small enough that the diagonal
    blocks (factored by one less-parallel potrf each) and the wasted upper halves stay cheap."""
    if block is not None:
        block = int(block)
        if block < 1:
            raise InputError(f"block_size must be a positive integer; got {block}.")
        return min(block, max(n, 1))
    if n <= 4096:
        return max(1, min(n, 512))
    if n <= 16384:
        return 1024
    # The trailing updates also compute the upper halves of the diagonal squares: ~1.5 block / n
    # extra flops (12% at n = 20,000 with 2,048). Up to 32,768 points a narrower block wins that
    # back (benchmarks/cpu_block_width.py, n = 20,000 float32 on a 2-core Zen 4: best of three
    # interleaved repeats 14.8 s with 1,536, 15.4 s with 1,024, 15.6 s with 2,048).
    if n <= 32768:
        return 1536
    return DEFAULT_BLOCK


@dataclass
class SymmetricPanels:
    n: int
    block: int
    panels: list

    # --- construction --------------------------------------------------------------------
    @staticmethod
    def starts_for(n: int, block: int) -> list[int]:
        return list(range(0, n, block))

    @classmethod
    def empty(cls, n: int, block: int | None = None, dtype=np.float64) -> "SymmetricPanels":
        block = choose_block(n, block)
        panels = [np.empty((n - s, min(block, n - s)), dtype=dtype) for s in cls.starts_for(n, block)]
        return cls(n=n, block=block, panels=panels)

    @staticmethod
    def nbytes_for(n: int, block: int, dtype) -> int:
        itemsize = np.dtype(dtype).itemsize
        return sum((n - s) * min(block, n - s) for s in range(0, n, block)) * itemsize

    @classmethod
    def from_dense(cls, A, block: int | None = None, dtype=None) -> "SymmetricPanels":
        """Copy the lower triangle of a dense symmetric matrix into panel storage."""
        A = np.asarray(A)
        if A.ndim != 2 or A.shape[0] != A.shape[1]:
            raise InputError(f"expected a square 2-D matrix; got shape {A.shape}.")
        out = cls.empty(A.shape[0], block, dtype or A.dtype)
        for s, P in zip(out.starts, out.panels):
            P[...] = A[s:, s : s + P.shape[1]]
        return out

    def astype(self, dtype) -> "SymmetricPanels":
        """A copy in ``dtype`` (e.g. the float32 factor's copy of a float64 Gram that is kept).

        Row blocks are copied on the element-wise thread pool: the copy's fresh memory is first
        touched by all cores, which on the VMs measured is most of its cost (n = 20,000 float64 to
        float32: 1.1-1.4 s vs 1.8-2.2 s with numpy's one-thread astype)."""
        out = SymmetricPanels.empty(self.n, self.block, dtype)
        for P, Q in zip(self.panels, out.panels):
            def copy(rows, P=P, Q=Q):
                Q[rows] = P[rows]

            parallel_row_blocks(P.shape[0], P.size, copy)
        return out

    # --- views -----------------------------------------------------------------------------
    @property
    def starts(self) -> list[int]:
        return self.starts_for(self.n, self.block)

    @property
    def dtype(self):
        return self.panels[0].dtype

    @property
    def nbytes(self) -> int:
        return sum(P.nbytes for P in self.panels)

    def diagonal(self) -> np.ndarray:
        return np.concatenate([np.diagonal(P[: P.shape[1]]) for P in self.panels])

    def add_to_diagonal(self, value: float) -> None:
        for P in self.panels:
            w = P.shape[1]
            P[np.arange(w), np.arange(w)] += value

    def submatrix(self, idx) -> np.ndarray:
        """Dense ``A[np.ix_(idx, idx)]`` of the symmetric matrix stored, read from the lower triangle
        (any order, repeats allowed) without building A: entry (i, j) lives in the panel of min(i, j)."""
        idx = np.asarray(idx)
        if idx.ndim != 1 or idx.dtype.kind not in "iu" or (idx.size and (idx.min() < 0 or idx.max() >= self.n)):
            raise InputError(f"submatrix needs a 1-D array of integer indices in [0, {self.n}); got "
                             f"shape {idx.shape}, dtype {idx.dtype}.")
        hi = np.maximum(idx[:, None], idx[None, :])
        lo = np.minimum(idx[:, None], idx[None, :])
        panel = lo // self.block
        out = np.empty(hi.shape, dtype=self.dtype)
        for p in np.unique(panel):
            s, at = p * self.block, panel == p
            out[at] = self.panels[p][hi[at] - s, lo[at] - s]
        return out

    def to_dense(self, symmetric: bool = True) -> np.ndarray:
        """Dense copy: the symmetric matrix (default) or only the stored lower triangle."""
        A = np.zeros((self.n, self.n), dtype=self.dtype)
        for s, P in zip(self.starts, self.panels):
            w = P.shape[1]
            A[s:, s : s + w] = P
            A[s : s + w, s : s + w] = np.tril(P[:w])
        if symmetric:
            A += np.tril(A, -1).T
        return A

    def symmetric_matmul(self, X: np.ndarray, rows: int = 512) -> np.ndarray:
        """A @ X for the symmetric matrix stored (X: (n, k)); each stored tile is used twice.

        The products stream the matrix from memory, so each block of ``rows`` panel rows is used
        for both products (A[I, J] X[J] and A[I, J]^T X[I]) while it is in cache: one read of the
        matrix per product instead of two. The transposed product is kept transposed (X^T[:, I]
        A[I, J]: a few rows times a block runs about twice as fast in OpenBLAS as A[I, J]^T X[I]),
        and the diagonal squares go by row blocks too (only their small diagonal sub-squares are
        copied to zero the upper part): 0.34 s instead of 0.63 s at n = 20,000, k = 10, float64."""
        X = np.asarray(X)
        dt = np.result_type(self.dtype, X.dtype)
        X = np.ascontiguousarray(X, dtype=dt)
        XT = np.ascontiguousarray(X.T)
        out = np.zeros((self.n, X.shape[1]), dtype=dt)
        outT = np.zeros_like(XT)
        for s, P, a, e in self.row_blocks(rows):
            w = P.shape[1]
            r, re = s + a, s + e
            c = min(a, w)                 # columns strictly left of the block's diagonal sub-square
            if c:
                block = P[a:e, :c]
                out[r:re] += block @ X[s : s + c]
                outT[:, s : s + c] += XT[:, r:re] @ block
            if a < w:                     # the diagonal sub-square, lower triangle only
                D = np.tril(P[a:e, a:e])
                out[r:re] += D @ X[r:re] + D.T @ X[r:re] - D.diagonal()[:, None] * X[r:re]
        out += outT.T
        return out

    def row_blocks(self, rows: int):
        """(panel start s, panel P, first row a, end row e) for blocks of at most ``rows`` panel rows;
        no block straddles the end of the panel's diagonal square (row w), so a block lies either
        inside the square or wholly below it."""
        for s, P in zip(self.starts, self.panels):
            w = P.shape[1]
            for a in [*range(0, w, rows), *range(w, P.shape[0], rows)]:
                yield s, P, a, min(a + rows, w if a < w else P.shape[0])


def panel_flops(n: int, s: int, w: int) -> float:
    """Flops of factoring the panel of width w starting at s (its potrf, trsm and trailing update)."""
    m = n - s
    return float(m) ** 3 / 3.0 - float(m - w) ** 3 / 3.0


def cholesky_flops(n: int) -> float:
    return float(n) ** 3 / 3.0
