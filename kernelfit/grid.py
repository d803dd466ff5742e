"""Points on an integer grid (8-bit pixels / 255, counts): exact squared distances from float32 GEMMs.

If x = step * q with integer q, then |x - z|^2 = step^2 |q - p|^2, and the integer dot products q.p
come out of a float32 GEMM *exactly* as long as every partial sum stays below 2^24 (float32's
24-bit significand): each product and each partial sum is then an integer float32 holds. Two
things make that hold for any feature count:

* every coordinate is shifted by one integer (distances do not change), the middle of the grid's
  range, so |q| <= M (128 for 0..255 pixels);
* the features are cut into chunks of at most floor((2^24 - 1) / (M_a M_b)) columns: a chunk's dot
  product and all its partial sums are bounded by chunk * M_a * M_b < 2^24 (784 pixels: one chunk).

The chunks' GEMMs are summed and finished in float64, so float64-exact distances (up to the float64
rounding of the stored points themselves) cost float32 GEMMs, 1.7-2x the dgemm rate on the CPUs this
runs on. ``KernelOperator`` (``gram.py``) uses this for its float64 passes (refinement residuals,
stored float64 Grams, predictions) whenever the points are on a grid; other data take the float64
GEMM path. GPU TF32 GEMMs would break the exactness: this path is CPU-only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .kernels import check_kernel
from .parallel import parallel_row_blocks

_EXACT_LIMIT = 2**24 - 1      # largest |partial sum| a float32 accumulation holds exactly
_MAX_LEVEL = 2**11            # |shifted level| <= this, so one product is at most 2^22


@dataclass(frozen=True)
class IntegerGrid:
    """Points x = step * (Q + shift) with Q integer-valued, stored as float32 (exact)."""

    step: float
    shift: float
    Q: np.ndarray          # (n, d) float32, shifted integer levels
    sq: np.ndarray         # (n,) float64 exact |Q_i|^2
    max_level: float       # max |Q|

    @property
    def n(self) -> int:
        return self.Q.shape[0]


def _levels(X: np.ndarray, step: float, rows: int = 512):
    """Integer levels of X on a grid of ``step`` as float32 (exact: |level| <= 2 * _MAX_LEVEL), or
    None when X is not on it: every x must equal step * q up to 4 ulps of the largest |x| (float64
    rounding at the data's scale, which moves a squared distance by ~1e-16 of itself). Row blocks
    keep the float64 temporaries in cache and stop at the first block off the grid."""
    tol = 4.0 * np.finfo(np.float64).eps * _max_abs(X)
    Q = np.empty(X.shape, dtype=np.float32)
    buf = np.empty((2, min(rows, X.shape[0]), X.shape[1]))
    for a in range(0, X.shape[0], rows):
        x = X[a : a + rows]
        q, r = buf[0, : x.shape[0]], buf[1, : x.shape[0]]
        np.multiply(x, 1.0 / step, out=q)
        np.rint(q, out=q)
        np.multiply(q, step, out=r)
        r -= x
        if _max_abs(r) > tol or _max_abs(q) > 2 * _MAX_LEVEL:
            return None
        Q[a : a + rows] = q
    return Q


def _max_abs(A) -> float:
    """max |A| without an |A| temporary (0 for an empty array)."""
    return max(float(A.max(initial=0.0)), -float(A.min(initial=0.0)))


def _grid(Q: np.ndarray, step: float, shift: float) -> "IntegerGrid | None":
    """The grid of float32 levels Q (shifted in place by ``shift``), or None when they are too large."""
    Q -= np.float32(shift)                       # integers below 2^24: exact in float32
    max_level = _max_abs(Q)
    if max_level > _MAX_LEVEL:
        return None
    return IntegerGrid(step, shift, Q, np.einsum("ij,ij->i", Q, Q, dtype=np.float64), max_level)


def _smallest_nonzero_magnitude(X: np.ndarray, rows: int = 4096) -> float:
    """min |x| over the nonzero entries of X (inf if none), by row blocks (no |X| temporary)."""
    step = np.inf
    buf = np.empty((min(rows, X.shape[0]), X.shape[1]))
    for a in range(0, X.shape[0], rows):
        m = np.abs(X[a : a + rows], out=buf[: min(rows, X.shape[0] - a)])
        step = min(step, float(np.min(m, where=m > 0, initial=np.inf)))
    return step


def find_integer_grid(X) -> IntegerGrid | None:
    """The grid X lies on (step = the smallest nonzero |x|), or None if it does not lie on one whose
    shifted levels fit float32 products exactly."""
    X = np.asarray(X)
    if X.ndim != 2 or X.size == 0 or X.dtype != np.float64:
        return None
    # the smallest nonzero |x| is the step: 1/255 for pixels that use level 1 somewhere
    step = _smallest_nonzero_magnitude(X)
    if not np.isfinite(step):
        return None
    Q = _levels(X, step)
    if Q is None:
        return None
    return _grid(Q, step, float(np.floor((float(Q.min()) + float(Q.max())) / 2)))


def same_grid(X, grid: IntegerGrid) -> IntegerGrid | None:
    """X on ``grid``'s step and shift (e.g. test points against training points), or None."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[1] != grid.Q.shape[1]:
        return None
    Q = _levels(X, grid.step)
    return None if Q is None else _grid(Q, grid.step, grid.shift)


def exact_in_one_gemm(d: int, max_a: float, max_b: float) -> bool:
    """Whether d features with levels bounded by max_a and max_b give exact dot products in one
    float32 GEMM (a single chunk): what storing the products as float32 needs."""
    return len(chunks(d, max_a, max_b)) == 1


def chunks(d: int, max_a: float, max_b: float) -> list[slice]:
    """Feature chunks whose float32 dot products are exact for levels bounded by max_a and max_b."""
    width = max(1, int(_EXACT_LIMIT // max(max_a * max_b, 1.0)))
    count = -(-d // width)
    width = -(-d // count)          # equal chunks: no tiny last GEMM
    return [slice(s, min(s + width, d)) for s in range(0, d, width)]


def gaussian_factors(g: IntegerGrid, bandwidth: float) -> np.ndarray | None:
    """f_i = exp(-s |q_i|^2), s = step^2 / (2 sigma^2), so that k(x_i, z_j) = f_i exp(2 s q_i.p_j) f'_j:
    the tile then needs one scaling and one exp (``kernel_tile_into(..., factored=True)``) and the
    factors go into the product with V. None where exp(2 s q.p) could leave float64's comfortable
    range (s |q|^2 > 50; the scaled products then also lose more digits than the plain form)."""
    s = g.step * g.step / (2.0 * bandwidth * bandwidth)
    if g.n == 0 or s * float(g.sq.max()) > 50.0:
        return None
    return np.exp(-s * g.sq)


def finish_from_dots(out, dots, a: IntegerGrid, b: IntegerGrid, rows: slice, cols: slice, kernel: str,
                     bandwidth: float, factored: bool = False) -> np.ndarray:
    """Kernel values in the float64 tile ``out`` from exact integer dot products ``dots`` (float32 or
    float64; may be ``out`` itself) of points ``rows`` of ``a`` and ``cols`` of ``b``; see
    ``kernel_tile_into``. Row blocks run in parallel, each block's passes back to back in cache."""
    k = check_kernel(kernel)
    factored = factored and k.separable
    s = k.grid_scale(a.step, bandwidth)
    hs_a, hs_b = a.sq[rows] * s, b.sq[cols] * s

    def finish(r):
        o = out[r]
        # float64 arithmetic on float32 products (a Python float would keep them float32)
        np.multiply(dots[r], 2.0 * s, out=o, dtype=np.float64)
        if not factored:
            o -= hs_a[r, None]
            o -= hs_b[None, :]
        k.grid_finish(o, a.step, bandwidth)

    parallel_row_blocks(out.shape[0], out.size, finish)
    return out


def kernel_tile_into(out, buf, a: IntegerGrid, b: IntegerGrid, rows: slice, cols: slice, kernel: str,
                     bandwidth: float, factored: bool = False) -> np.ndarray:
    """Write k(x_i, z_j) for points ``rows`` of ``a`` and ``cols`` of ``b`` (same step and shift) into
    the float64 tile ``out``, from exact integer distances.

    ``buf``: a float32 array of out's shape for the GEMMs (each chunk's result is exact in float32;
    several chunks are summed in float64, still exact integers). Gaussian:
    exp(2 s q.p - s |q|^2 - s |p|^2) with s = step^2 / (2 sigma^2): three roundings of terms of size
    |s q|^2 (a few units for pixels), so ~1e-15 absolute in the exponent, and exactly 0 for identical
    points. Laplacian: exp(-(step / sigma) sqrt(|q - p|^2)) from the exact integer |q - p|^2.
    ``factored`` (Gaussian): write exp(2 s q.p) only; k = that times ``gaussian_factors`` of both sides."""
    Qa, Qb = a.Q[rows], b.Q[cols]
    parts = chunks(Qa.shape[1], a.max_level, b.max_level)
    if len(parts) == 1:
        np.matmul(Qa, Qb.T, out=buf)
        return finish_from_dots(out, buf, a, b, rows, cols, kernel, bandwidth, factored)
    for i, c in enumerate(parts):
        np.matmul(Qa[:, c], Qb[:, c].T, out=buf)

        def accumulate(r, first=i == 0):
            if first:
                out[r] = buf[r]
            else:
                out[r] += buf[r]

        parallel_row_blocks(out.shape[0], out.size, accumulate)
    return finish_from_dots(out, out, a, b, rows, cols, kernel, bandwidth, factored)
