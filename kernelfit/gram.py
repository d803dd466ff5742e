"""Gram matrices and kernel-matrix products, built tile by tile.

* ``build_gram_panels``: the lower triangle of k(X, X) written straight into panel storage (no dense
  n x n array, no BLAS call near 2^31 outputs), diagonal set to exactly k(x, x) = 1.
* ``KernelOperator``: products K(A, B) @ V computed from row tiles of the kernel, in any precision,
  never storing the kernel. Used for float64 residuals in mixed precision (so no float64 Gram is ever
  stored) and for predictions.
"""

from __future__ import annotations

import numpy as np

from .kernels import apply_kernel_inplace, row_norms_sq, squared_distances_into
from .linalg.tiled import SymmetricPanels

# Row-tile size for kernel products: a (rows x n) float64 tile is rows * n * 8 bytes
# (1024 x 60,000 -> 491 MB), the largest temporary of a residual or prediction pass.
DEFAULT_PRODUCT_ROWS = 1024


def _progress(total, desc, enabled):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="", unit_scale=True, leave=False, mininterval=1.0)


def build_gram_panels(X, kernel: str, bandwidth: float, block: int | None = None, dtype=np.float32,
                      progress: bool = False) -> SymmetricPanels:
    """Lower triangle of the Gram k(X, X) in panel storage, in ``dtype``."""
    X = np.ascontiguousarray(X, dtype=dtype)
    n = X.shape[0]
    G = SymmetricPanels.empty(n, block, dtype)
    sq = row_norms_sq(X)
    bar = _progress(sum(P.size for P in G.panels), "gram", progress)
    for s, P in zip(G.starts, G.panels):
        w = P.shape[1]
        squared_distances_into(P, X[s:], X[s : s + w], sq[s:], sq[s : s + w])
        apply_kernel_inplace(P, kernel, bandwidth)
        # k(x, x) = 1 exactly for both kernels; the GEMM expansion leaves ~1e-7 noise in float32.
        P[np.arange(w), np.arange(w)] = 1.0
        if bar is not None:
            bar.update(P.size)
    if bar is not None:
        bar.close()
    return G


class KernelOperator:
    """V -> k(A, B) @ V without storing k(A, B), computed in ``dtype`` by row tiles."""

    def __init__(self, B, kernel: str, bandwidth: float, dtype=np.float64, rows: int = DEFAULT_PRODUCT_ROWS):
        self.dtype = np.dtype(dtype)
        self.B = np.ascontiguousarray(B, dtype=self.dtype)
        self.B_sq = row_norms_sq(self.B)
        self.kernel, self.bandwidth, self.rows = kernel, float(bandwidth), int(rows)

    def _tile(self, buf, A, A_sq, cols):
        tile = buf[: A.shape[0], :cols]
        squared_distances_into(tile, A, self.B[:cols], A_sq, self.B_sq[:cols])
        return apply_kernel_inplace(tile, self.kernel, self.bandwidth)

    def matmul(self, A, V) -> np.ndarray:
        """k(A, B) @ V for arbitrary points A (e.g. test points)."""
        A = np.ascontiguousarray(A, dtype=self.dtype)
        V = np.asarray(V, dtype=self.dtype)
        A_sq = row_norms_sq(A)
        out = np.empty((A.shape[0], V.shape[1]), dtype=self.dtype)
        buf = np.empty((min(self.rows, A.shape[0]), self.B.shape[0]), dtype=self.dtype)
        for a in range(0, A.shape[0], self.rows):
            e = min(a + self.rows, A.shape[0])
            tile = self._tile(buf, A[a:e], A_sq[a:e], self.B.shape[0])
            np.matmul(tile, V, out=out[a:e])
        return out

    def symmetric_matmul(self, V, progress: bool = False) -> np.ndarray:
        """k(B, B) @ V using symmetry: each row tile computes only columns up to its end and is
        used twice (as K[I, :] and K[:, I]), halving the kernel work."""
        V = np.asarray(V, dtype=self.dtype)
        n = self.B.shape[0]
        out = np.zeros((n, V.shape[1]), dtype=self.dtype)
        buf = np.empty((min(self.rows, n), n), dtype=self.dtype)
        bar = _progress(n, "K @ v (float64)" if self.dtype == np.float64 else "K @ v", progress)
        for a in range(0, n, self.rows):
            e = min(a + self.rows, n)
            tile = self._tile(buf, self.B[a:e], self.B_sq[a:e], e)   # K[a:e, :e]
            tile[np.arange(e - a), np.arange(a, e)] = 1.0          # exact diagonal, as in the Gram
            out[a:e] += tile @ V[:e]
            if a:
                out[:a] += tile[:, :a].T @ V[a:e]
            if bar is not None:
                bar.update(e - a)
        if bar is not None:
            bar.close()
        return out
