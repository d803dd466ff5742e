"""Gram matrices and kernel-matrix products, built tile by tile.

* ``build_gram_panels``: the lower triangle of k(X, X) written straight into panel storage (no dense
  n x n array, no BLAS call near 2^31 outputs), diagonal set to exactly k(x, x) = 1.
* ``KernelOperator``: products K(A, B) @ V computed from row tiles of the kernel, in any precision,
  never storing the kernel. Used for float64 residuals in mixed precision (so no float64 Gram is ever
  stored) and for predictions.
"""

from __future__ import annotations

import threading

import numpy as np

from .errors import InputError
from .grid import IntegerGrid, exact_in_one_gemm, find_integer_grid, finish_from_dots, gaussian_factors, same_grid
from .grid import kernel_tile_into as grid_kernel_tile_into
from .kernels import KERNELS, apply_kernel_inplace, check_kernel, kernel_tile, kernel_tile_into, median_sample, row_norms_sq
from .linalg.panels import SymmetricPanels, choose_block
from .parallel import blas_threads, parallel_tasks

# Row-tile size for kernel products: a (rows x n) float64 tile is rows * n * 8 bytes
# (1024 x 60,000 -> 491 MB), the largest temporary of a residual or prediction pass.
DEFAULT_PRODUCT_ROWS = 1024
# Column-block width of kernel products: a 1,024 x 2,048 float64 tile (16 MB, plus its float32 GEMM
# buffer on the grid path) stays in a 32 MB L3, so its element-wise passes (distance finish, exp)
# and its two products with V do not stream the tile through memory.
DEFAULT_PRODUCT_COLS = 2048


def _progress(total, desc, enabled):
    from .progress import progress_bar

    return progress_bar(total=total, desc=desc, enabled=enabled)


def build_gram_panels(X, kernel: str, bandwidth: float, block: int | None = None, dtype=np.float32,
                      progress: bool = False, grid: IntegerGrid | None = None) -> SymmetricPanels:
    """Lower triangle of the Gram k(X, X) in panel storage, in ``dtype``.

    ``grid``: X's integer grid (``kernelfit.grid.find_integer_grid``); its exact distances come from
    float32 GEMMs, finished in float64 (worth it for a float64 Gram: the float32 GEMM rate)."""
    X = np.ascontiguousarray(X, dtype=dtype)
    n = X.shape[0]
    G = SymmetricPanels.empty(n, block, dtype)
    sq = row_norms_sq(X) if grid is None else None
    bar = _progress(sum(P.size for P in G.panels), "gram", progress)
    rows = DEFAULT_PRODUCT_ROWS   # grid path: row blocks of a panel, finished in float64 in cache
    if grid is not None:
        buf32 = np.empty((min(rows, n), G.block), dtype=np.float32)
        buf = np.empty((min(rows, n), G.block), dtype=np.float64) if np.dtype(dtype) != np.float64 else None
    for s, P in zip(G.starts, G.panels):
        w = P.shape[1]
        if grid is None:   # one GEMM per panel (faster here than row blocks: 2.4 vs 2.75 s at n = 20,000)
            kernel_tile_into(P, X[s:], X[s : s + w], sq[s:], sq[s : s + w], kernel, bandwidth)
        else:
            for a in range(0, P.shape[0], rows):
                e = min(a + rows, P.shape[0])
                tile = P[a:e] if buf is None else buf[: e - a, :w]
                grid_kernel_tile_into(tile, buf32[: e - a, :w], grid, grid, slice(s + a, s + e), slice(s, s + w),
                                      kernel, bandwidth)
                if buf is not None:
                    P[a:e] = tile
        # k(x, x) = 1 exactly for both kernels; the GEMM expansion leaves ~1e-7 noise in float32.
        P[np.arange(w), np.arange(w)] = 1.0
        if bar is not None:
            bar.update(P.size)
    if bar is not None:
        bar.close()
    return G


def _gram_tile(Xi, Xj, kernel, bandwidth, diagonal, dtype, jitter=0.0):
    """One Gram tile k(Xi, Xj), computed on a dask worker (``gram_tiles``)."""
    T = kernel_tile(Xi, Xj, kernel, bandwidth, dtype=dtype)
    if diagonal:
        np.fill_diagonal(T, 1.0 + jitter)   # k(x, x) = 1 exactly, as build_gram_panels does (+ the ridge)
    return T


def gram_tiles(X, kernel: str, bandwidth: float, block: int | None = None, dtype=np.float64, client=None,
               scheduler_address=None, jitter: float = 0.0):
    """Gram tiles k(X_i, X_j), i >= j, computed on dask workers from scattered row blocks of X
    (``jitter`` added to the diagonal): a ``linalg.distributed.TiledMatrix`` for its ``cholesky``."""
    from .linalg import distributed as kd

    client = kd.get_client(client, scheduler_address)
    X = np.asarray(X, dtype=np.float64)
    X = np.ascontiguousarray(X - X.mean(axis=0), dtype=dtype)   # translation-invariant: center for float32
    n = X.shape[0]
    block = choose_block(n, block)
    Xf = client.scatter([X[s : s + block] for s in range(0, n, block)], hash=False)
    bandwidth, jitter = float(bandwidth), float(jitter)
    return kd.lower_tiles(_gram_tile, lambda i, j, *_: (Xf[i], Xf[j], kernel, bandwidth, i == j, dtype, jitter),
                          n, block, dtype, client, name="gram", keepalive=Xf)


def _untransposed(outT, row_factors):
    """The (n, k) result of a product kept transposed (``KernelOperator.matmul``), with the Gaussian
    row factors of the factored grid form applied."""
    if row_factors is not None:
        outT *= row_factors[None, :]
    return np.ascontiguousarray(outT.T)


class KernelOperator:
    """V -> k(A, B) @ V without storing k(A, B), computed in ``dtype`` by row tiles.

    In float64, points on an integer grid (pixels / 255; ``kernelfit.grid``) get their squared
    distances exactly from float32 GEMMs instead of a float64 GEMM: the same float64 values (to the
    rounding of the stored points) at the float32 GEMM rate. ``grid``: "auto" (detect), or None
    (always the GEMM of ``dtype``)."""

    def __init__(self, B, kernel: str, bandwidth: float, dtype=np.float64, rows: int = DEFAULT_PRODUCT_ROWS,
                 grid="auto", cols: int = DEFAULT_PRODUCT_COLS):
        self.dtype = np.dtype(dtype)
        self.B = np.ascontiguousarray(B, dtype=self.dtype)
        self.B_sq = row_norms_sq(self.B)
        self.kernel, self.bandwidth, self.rows, self.cols = kernel, float(bandwidth), int(rows), int(cols)
        if isinstance(grid, IntegerGrid):
            self.grid = grid
        else:
            self.grid = find_integer_grid(self.B) if grid == "auto" and self.dtype == np.float64 else None
        self._b_factors = None

    @property
    def distances(self) -> str:
        """How the squared distances among the points B are computed (for the record)."""
        return self.distances_of(self.grid)

    def distances_of(self, Ga) -> str:
        """How squared distances with points whose grid levels are ``Ga`` (None: off the grid) are computed."""
        if Ga is not None:
            return (f"exact on the integer grid of step {self.grid.step:.6g} (float32 GEMMs of integer "
                    f"levels, summed in float64)")
        return f"{self.dtype.name} GEMM expansion |x|^2 + |z|^2 - 2 x.z"

    def on_grid(self, A) -> bool:
        """Whether products with points A get exact grid distances (A on B's integer grid)."""
        return self.points(A)[1] is not None

    def distances_for(self, A) -> str:
        """How the squared distances between points A and B are computed (for the record)."""
        return self.distances_of(self.points(A)[1])

    def points(self, A):
        """(A as a contiguous ``dtype`` array, A's levels on B's grid or None): prepare once, pass to ``matmul``."""
        A = np.ascontiguousarray(A, dtype=self.dtype)
        return A, (same_grid(A, self.grid) if self.grid is not None else None)

    def _factors(self, Ga):
        """Gaussian row factors of A's and B's grids (``grid.gaussian_factors``), or None: plain tiles."""
        if Ga is None or not KERNELS[self.kernel].separable:
            return None
        if self._b_factors is None:
            self._b_factors = gaussian_factors(self.grid, self.bandwidth)
        fa = self._b_factors if Ga is self.grid else gaussian_factors(Ga, self.bandwidth)
        return None if fa is None or self._b_factors is None else (fa, self._b_factors)

    def _tile(self, buf, buf32, A, A_sq, Ga, a, e, c0, c1, factored=False):
        """k(A[a:e], B[c0:c1]) in ``buf`` (exp(2 s q.p) only when ``factored``); from exact grid
        distances when Ga (A's levels on B's grid) is given."""
        tile = buf[: e - a, : c1 - c0]
        if Ga is None:
            return kernel_tile_into(tile, A[a:e], self.B[c0:c1], A_sq[a:e], self.B_sq[c0:c1], self.kernel,
                                    self.bandwidth)
        return grid_kernel_tile_into(tile, buf32[: e - a, : c1 - c0], Ga, self.grid, slice(a, e), slice(c0, c1),
                                     self.kernel, self.bandwidth, factored)

    def _buffers(self, rows, cols, on_grid):
        cols = min(cols, self.cols)
        buf = np.empty((rows, cols), dtype=self.dtype)
        return buf, (np.empty((rows, cols), dtype=np.float32) if on_grid else None)

    def matmul(self, A, V, points=None) -> np.ndarray:
        """k(A, B) @ V for arbitrary points A (e.g. test points); ``points``: ``self.points(A)`` if
        already prepared.

        Tiles run side by side, one core each (``parallel_tasks``): a task is one row tile of A times
        one of ``groups`` equal runs of column tiles, and each group sums into its own result, so the
        sums a row gets do not depend on how many rows A has (block-wise and whole predictions agree
        bit for bit)."""
        A, Ga = self.points(A) if points is None else points
        V = np.asarray(V, dtype=self.dtype)
        A_sq = row_norms_sq(A) if Ga is None else None
        factors = self._factors(Ga)
        # V and the result are kept transposed (k x n): a few rows times a cached tile is about twice
        # as fast in OpenBLAS as the tile times a few columns (1.1-1.7 vs 2.0-3.2 ms for 1,024 x 2,048)
        WT = np.ascontiguousarray((V if factors is None else factors[1][:, None] * V).T)
        m, n = A.shape[0], self.B.shape[0]
        col_tiles = [(c0, min(c0 + self.cols, n)) for c0 in range(0, n, self.cols)]
        workers = blas_threads()
        groups = [[col_tiles[t] for t in g] for g in np.array_split(np.arange(len(col_tiles)),
                                                                      min(workers, len(col_tiles)))]
        partsT = np.zeros((len(groups), V.shape[1], m), dtype=self.dtype)
        local = threading.local()

        def task(item):
            a, g = item
            e = min(a + self.rows, m)
            if not hasattr(local, "buffers"):       # one pair per worker thread, reused by its tasks
                local.buffers = self._buffers(min(self.rows, m), n, Ga is not None)
            buf, buf32 = local.buffers
            for c0, c1 in groups[g]:
                tile = self._tile(buf, buf32, A, A_sq, Ga, a, e, c0, c1, factors is not None)
                partsT[g][:, a:e] += WT[:, c0:c1] @ tile.T

        parallel_tasks(task, [(a, g) for a in range(0, m, self.rows) for g in range(len(groups))], workers)
        outT = partsT[0] if len(groups) == 1 else partsT.sum(axis=0)
        return _untransposed(outT, None if factors is None else factors[0])

    def symmetric_matmul(self, V, progress: bool = False) -> np.ndarray:
        """k(B, B) @ V using symmetry: each row tile computes only columns up to its end and is
        used twice (as K[I, :] and K[:, I]), halving the kernel work."""
        V = np.asarray(V, dtype=self.dtype)
        n = self.B.shape[0]
        factors = self._factors(self.grid)
        f = None if factors is None else factors[0]
        WT = np.ascontiguousarray((V if f is None else f[:, None] * V).T)   # transposed: see ``matmul``
        outT = np.zeros((V.shape[1], n), dtype=self.dtype)
        buf, buf32 = self._buffers(min(self.rows, n), n, self.grid is not None)
        bar = _progress(n, "K @ v (float64)" if self.dtype == np.float64 else "K @ v", progress)
        for a in range(0, n, self.rows):
            e = min(a + self.rows, n)
            for c0 in range(0, e, self.cols):            # K[a:e, c0:c1], c1 <= e
                c1 = min(c0 + self.cols, e)
                tile = self._tile(buf, buf32, self.B, self.B_sq, self.grid, a, e, c0, c1, f is not None)
                if c1 > a:                                # exact diagonal k(x, x) = 1, as in the Gram
                    d = np.arange(max(a, c0), c1)
                    tile[d - a, d - c0] = 1.0 if f is None else 1.0 / (f[d] * f[d])
                outT[:, a:e] += WT[:, c0:c1] @ tile.T
                if c0 < a:                                # the transposed use, strictly below the diagonal
                    w = min(c1, a) - c0
                    outT[:, c0 : c0 + w] += WT[:, a:e] @ tile[:, :w]
            if bar is not None:
                bar.update(e - a)
        if bar is not None:
            bar.close()
        return _untransposed(outT, f)


class GridProducts:
    """The exact integer dot products q_i . q_j of training points on an integer grid, stored once as
    float32 panels (lower triangle; exact: every product and partial sum is an integer below 2^24,
    which needs the features to fit one exact chunk, ``grid.chunks``). A float64 residual pass then
    reads them instead of recomputing a GEMM over all features: n^2/2 x 4 bytes buy back the GEMM of
    every pass. Also builds the Gram in any dtype from them (exact distances, one finish pass)."""

    def __init__(self, grid: IntegerGrid, kernel: str, bandwidth: float, block: int | None = None,
                 rows: int = DEFAULT_PRODUCT_ROWS, progress: bool = False):
        if not self.applies(grid):
            raise InputError(f"stored grid products need every dot product exact in one float32 GEMM; "
                             f"{grid.Q.shape[1]} features with levels up to {grid.max_level:g} do not fit.")
        self.grid, self.kernel, self.bandwidth, self.rows = grid, kernel, float(bandwidth), int(rows)
        self.D = SymmetricPanels.empty(grid.n, block, np.float32)
        bar = _progress(sum(P.size for P in self.D.panels), "grid products", progress)
        for s, P in zip(self.D.starts, self.D.panels):
            np.matmul(grid.Q[s:], grid.Q[s : s + P.shape[1]].T, out=P)   # one GEMM per panel, exact
            if bar is not None:
                bar.update(P.size)
        if bar is not None:
            bar.close()

    @staticmethod
    def applies(grid: IntegerGrid | None) -> bool:
        return grid is not None and exact_in_one_gemm(grid.Q.shape[1], grid.max_level, grid.max_level)

    def _finish(self, out, dots, r, c, factored):
        """Kernel values (or exp(2 s q.p) when ``factored``) of stored dot products, in float64 ``out``."""
        return finish_from_dots(out, dots, self.grid, self.grid, r, c, self.kernel, self.bandwidth, factored)

    def gram(self, dtype=np.float32) -> SymmetricPanels:
        """The Gram in ``dtype`` from the stored products (exact distances), diagonal exactly 1."""
        G = SymmetricPanels.empty(self.grid.n, self.D.block, dtype)
        buf = np.empty((min(self.rows, self.grid.n), self.D.block))
        for s, D, P in zip(G.starts, self.D.panels, G.panels):
            w = P.shape[1]
            for a in range(0, P.shape[0], self.rows):
                e = min(a + self.rows, P.shape[0])
                P[a:e] = self._finish(buf[: e - a, :w], D[a:e], slice(s + a, s + e), slice(s, s + w), False)
            P[np.arange(w), np.arange(w)] = 1.0
        return G

    def symmetric_matmul(self, V, progress: bool = False) -> np.ndarray:
        """K @ V in float64 from the stored products (the same values as ``KernelOperator``'s grid pass)."""
        V = np.asarray(V, dtype=np.float64)
        n = self.grid.n
        f = gaussian_factors(self.grid, self.bandwidth) if KERNELS[self.kernel].separable else None
        WT = np.ascontiguousarray((V if f is None else f[:, None] * V).T)    # transposed: see KernelOperator
        outT = np.zeros((V.shape[1], n))
        buf = np.empty((min(self.rows, n), self.D.block))
        bar = _progress(sum(P.shape[0] for P in self.D.panels), "K @ v (float64, stored grid products)", progress)
        for s, P, a, e in self.D.row_blocks(self.rows):
            w = P.shape[1]
            r = slice(s + a, s + e)
            tile = self._finish(buf[: e - a, :w], P[a:e], r, slice(s, s + w), f is not None)
            if a < w:          # rows inside the panel's diagonal square: stored in full, used once
                d = np.arange(a, e)
                tile[d - a, d] = 1.0 if f is None else 1.0 / (f[s + d] * f[s + d])
            outT[:, r] += WT[:, s : s + w] @ tile.T
            if a >= w:         # strictly below the square: also used as K[J, I]
                outT[:, s : s + w] += WT[:, r] @ tile
            if bar is not None:
                bar.update(e - a)
        if bar is not None:
            bar.close()
        return _untransposed(outT, f)


# Rounding-error model of the float32 prediction bound: Higham & Mary's probabilistic bound
# (SIAM J. Sci. Comput. 41(5), 2019): an m-term float32 sum errs by at most
# gamma(m) = exp(LAMBDA sqrt(m) u + m u^2 / (1 - u)) - 1 (times the sum of magnitudes) with probability
# >= 1 - 2 exp(-LAMBDA^2 (1 - u)^2 / 2); LAMBDA = 8 gives 1 - 3e-14 per sum. The worst-case m u bound
# flagged 7% of the MNIST test rows for float64 recomputation (2,000 training points) for errors
# that were ~1e-5 of the scores; this one flags far fewer.
_LAMBDA = 8.0
_U32 = 2.0**-24


def _gamma32(m: int) -> float:
    return float(np.expm1(_LAMBDA * np.sqrt(m) * _U32 + m * _U32**2 / (1.0 - _U32)))


def _float32_error_factors(kernel: str, bandwidth: float, d: int):
    """(weight function w, beta): |k32(x, z) - k(x, z)| <= k32(x, z) * beta * (w(x) + w(z)) * e^t.

    Rounding to float32 (u = 2^-24) of centered points, norms and the cross-product GEMM moves a
    squared distance by at most c (|x|^2 + |z|^2) with c = 2 gamma(d) + 12 u (``_gamma32``: the bound
    of a d-term dot product); ``Kernel.float32_error`` says what that does to the kernel's value."""
    c = 2.0 * _gamma32(d) + 12.0 * _U32
    return check_kernel(kernel).float32_error(c, bandwidth)


def argmax_exact_scores(B, alpha, A, kernel: str, bandwidth: float, groups: int,
                        rows: int = DEFAULT_PRODUCT_ROWS) -> tuple[np.ndarray, int]:
    """Scores k(A, B) @ alpha at float32 GEMM speed whose argmax over each group of ``groups``
    columns equals that of the float64 product (``KernelOperator(B, ..., float64).matmul``).

    The tiles are built in float32 (centered points, one sgemm each) and multiplied in float32, next
    to two extra columns that give each row a bound on its float32 error (rounding of the
    distances, the exp and the product; ``_gamma32`` says in what sense it bounds). Rows in which some group's two largest
    scores are closer than twice that bound are recomputed in float64; all other scores are
    float32-accurate. Returns (scores as float64, number of rows recomputed)."""
    B = np.asarray(B, dtype=np.float64)
    A = np.asarray(A, dtype=np.float64)
    alpha = np.asarray(alpha, dtype=np.float64)
    n, k = alpha.shape
    if k % groups:
        raise InputError(f"{k} score columns do not split into groups of {groups}; pass the number of classes.")
    center = B.mean(axis=0)
    B32 = (B - center).astype(np.float32)
    A32 = (A - center).astype(np.float32)
    w, beta = _float32_error_factors(kernel, bandwidth, B.shape[1])
    wB = w(row_norms_sq(B32).astype(np.float64))
    wA = w(row_norms_sq(A32).astype(np.float64))
    t = beta * (wA.max(initial=0.0) + wB.max(initial=0.0))   # largest relative kernel perturbation
    a = np.abs(alpha).max(axis=1)
    V = np.hstack([alpha, a[:, None], (a * wB)[:, None]]).astype(np.float32)
    u = _U32
    gamma_n = _gamma32(n + 2)                      # float32 product: alpha rounding + n-term sums
    op = KernelOperator(B32, kernel, bandwidth, np.float32, rows)
    out = op.matmul(A32, V).astype(np.float64)
    scores, Ka, Kaw = out[:, :k], out[:, k], out[:, k + 1]
    # the two nonnegative columns are themselves float32 sums (relative error <= gamma_n)
    bound = (beta * (wA * Ka + Kaw) * np.exp(t) + (gamma_n + 4 * u) * Ka) * (1.0 + 2 * gamma_n)
    top2 = np.sort(scores.reshape(len(A), k // groups, groups), axis=2)[:, :, -2:]
    gap = (top2[:, :, 1] - top2[:, :, 0]).min(axis=1) if groups > 1 else np.full(len(A), np.inf)
    close = np.flatnonzero(gap <= 2.0 * bound)
    if close.size:
        scores[close] = KernelOperator(B, kernel, bandwidth, np.float64, rows).matmul(A[close], alpha)
    return scores, int(close.size)


# ---- the Gram of a feature map, already in panels (random-conv features: never materialized) ----

def sampled_sqd_from_gram(G, diag: np.ndarray, max_points: int = 2000, seed: int = 0) -> np.ndarray:
    """Squared feature distances g_ii + g_jj - 2 g_ij among the seeded sample of ``kernels.median_sample``
    (the median heuristic's sample of the features themselves), without an n x n distance matrix.
    ``G``: a dense Gram or its ``SymmetricPanels``."""
    idx = median_sample(len(diag), max_points, seed)
    d = diag[idx]
    sub = G[np.ix_(idx, idx)] if isinstance(G, np.ndarray) else G.submatrix(idx)
    return d[:, None] + d[None, :] - 2.0 * sub


def kernel_from_gram_inplace(A, row_sq, col_sq, kernel: str, sigma: float) -> None:
    """A (a block g_ij of the feature Gram) becomes k(|phi_i - phi_j|) in place."""
    A *= -2.0
    A += row_sq[:, None]
    A += col_sq[None, :]
    np.maximum(A, 0.0, out=A)
    apply_kernel_inplace(A, kernel, sigma)


def linear_from_gram_inplace(A, n_features: int):
    """A (a Gram block of standardized features) becomes the linear kernel (phi.phi' + 1) / n_features.

    The features are centred over the training set, so their Gram is singular (G 1 = 0); the constant
    feature (an intercept) makes it invertible, and dividing by the feature count puts the diagonal
    near 1, like the Gaussian kernel's, so the same ridge lambdas mean the same thing."""
    A += 1.0
    A /= float(n_features)
    return A
