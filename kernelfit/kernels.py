"""Kernel functions as pure, in-place-friendly functions of tiles; one ``Kernel`` object per kind.

A kernel here is a map from squared Euclidean distances to kernel values, applied in place to a tile
that already holds squared distances. Everything that differs between kinds (the numpy and torch
tiles, the finish of exact integer-grid dot products, the float32 error factor, how the bandwidth
enters) is a method of that kind's ``Kernel``; ``KERNELS`` maps each name of
``kernelfit.catalog.KERNELS`` to it. To add a kernel: a subclass here and its name in the catalog.

Working on squared distances keeps one place (``squared_distances_into``) for the expensive part
(one GEMM per tile) and lets the Gram builder, the residual operator and prediction share it.
Squared distances are clamped at zero: the expansion |x|^2 + |z|^2 - 2 x.z can go slightly negative
in floating point for (near-)duplicate points.
"""

from __future__ import annotations

import math

import numpy as np

from . import catalog
from .errors import InputError
from .parallel import parallel_row_blocks
from .validate import check_bandwidth  # the one bandwidth check (CLI, SolveOptions, estimators, table)


def _parallel_rows(tile: np.ndarray, fn) -> None:
    """Apply ``fn(row_block)`` in place to row blocks of ``tile`` on the thread pool."""
    parallel_row_blocks(tile.shape[0], tile.size, lambda rows: fn(tile[rows]))


class Kernel:
    """One kind of kernel k(x, z) = phi(|x - z|^2; sigma). Subclasses define every method."""

    name: str
    formula: str
    # k(x, z) = f(x) exp(c x.z) f(z): integer-grid products may be scaled by per-point factors
    # (``grid.gaussian_factors``) instead of subtracting norms in every tile
    separable: bool = False

    def exponent(self, d2: np.ndarray, bandwidth: float) -> np.ndarray:
        """-log k for squared distances ``d2`` (a new array)."""
        raise NotImplementedError

    def sqdist_scale(self, bandwidth: float) -> float:
        """The factor squared distances are multiplied by inside the kernel (1 when it takes their root)."""
        raise NotImplementedError

    def apply_inplace(self, block: np.ndarray, bandwidth: float) -> None:
        """Squared distances (>= 0) in ``block`` -> kernel values, in place (one row block)."""
        raise NotImplementedError

    def tile_into(self, out, X, Z, X_sq, Z_sq, bandwidth: float) -> np.ndarray:
        """k(X, Z) into ``out`` from one GEMM: squared distances, then ``apply_inplace`` by row blocks."""
        squared_distances_into(out, X, Z, X_sq, Z_sq)
        _parallel_rows(out, lambda block: self.apply_inplace(block, bandwidth))
        return out

    def torch_apply_(self, out, bandwidth: float):
        """The same as ``apply_inplace`` on a torch tensor of clamped squared distances."""
        raise NotImplementedError

    def grid_scale(self, step: float, bandwidth: float) -> float:
        """s such that the grid finish starts from 2 s q.p - s |q|^2 - s |p|^2 (``grid.finish_from_dots``)."""
        raise NotImplementedError

    def grid_finish(self, o: np.ndarray, step: float, bandwidth: float) -> None:
        """``o`` (float64) holds 2 s q.p - s |q|^2 - s |p|^2 for integer levels q, p of spacing ``step``
        (without the norms for a separable kernel's factored tiles) -> kernel values, in place."""
        raise NotImplementedError

    def float32_error(self, c: float, bandwidth: float):
        """(w, beta): a squared distance moved by at most c (|x|^2 + |z|^2) moves k by at most
        k * beta * (w(|x|^2) + w(|z|^2)) * e^t (``gram.argmax_exact_scores``)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"Kernel({self.name!r}: {self.formula})"


class Gaussian(Kernel):
    name = "gaussian"
    formula = "exp(-|x - z|^2 / (2 sigma^2))"
    separable = True

    def exponent(self, d2, bandwidth):
        return d2 / (2.0 * bandwidth * bandwidth)

    def sqdist_scale(self, bandwidth):
        return 1.0 / (2.0 * bandwidth * bandwidth)

    def apply_inplace(self, block, bandwidth):
        block *= -1.0 / (2.0 * bandwidth * bandwidth)
        np.exp(block, out=block)

    def tile_into(self, out, X, Z, X_sq, Z_sq, bandwidth):
        """The exponent (2 x.z - |x|^2 - |z|^2) / (2 s^2) is formed directly, with X scaled by
        1 / s^2 before the GEMM (rows x d numbers instead of rows x n), then clamped at <= 0 (the same
        clamp as squared distances at >= 0) and exponentiated: four passes over the tile instead of
        the six of distances-then-kernel. Those passes are a third of a tile's time on a 2-core
        machine."""
        s = 1.0 / (2.0 * bandwidth * bandwidth)
        np.matmul(X * out.dtype.type(2.0 * s), Z.T, out=out)
        hx = (X_sq * s).astype(out.dtype, copy=False)
        hz = (Z_sq * s).astype(out.dtype, copy=False)

        def finish(rows):
            block = out[rows]
            block -= hx[rows, None]
            block -= hz[None, :]
            np.minimum(block, 0.0, out=block)
            np.exp(block, out=block)

        parallel_row_blocks(out.shape[0], out.size, finish)
        return out

    def torch_apply_(self, out, bandwidth):
        return out.mul_(-1.0 / (2.0 * bandwidth * bandwidth)).exp_()

    def grid_scale(self, step, bandwidth):
        return step * step / (2.0 * bandwidth * bandwidth)

    def grid_finish(self, o, step, bandwidth):
        np.exp(o, out=o)

    def float32_error(self, c, bandwidth):
        return (lambda sq: sq), c / (2.0 * bandwidth * bandwidth)


class Laplacian(Kernel):
    name = "laplacian"
    formula = "exp(-|x - z| / sigma)"

    def exponent(self, d2, bandwidth):
        return np.sqrt(d2) / bandwidth

    def sqdist_scale(self, bandwidth):
        return 1.0

    def apply_inplace(self, block, bandwidth):
        np.sqrt(block, out=block)
        block *= -1.0 / bandwidth
        np.exp(block, out=block)

    def torch_apply_(self, out, bandwidth):
        return out.sqrt_().mul_(-1.0 / bandwidth).exp_()

    def grid_scale(self, step, bandwidth):
        return 1.0

    def grid_finish(self, o, step, bandwidth):
        np.negative(o, out=o)               # o = |q - p|^2, exact
        np.sqrt(o, out=o)
        o *= -step / bandwidth
        np.exp(o, out=o)

    def float32_error(self, c, bandwidth):
        # |sqrt(a) - sqrt(b)| <= sqrt(|a - b|)
        return np.sqrt, np.sqrt(c) / bandwidth


def _registry() -> dict[str, Kernel]:
    kinds = {k.name: k for k in (Gaussian(), Laplacian())}
    missing = [name for name in catalog.KERNELS if name not in kinds]
    if missing:
        raise ImportError(f"kernelfit.catalog.KERNELS names {missing} but kernelfit.kernels defines no Kernel for them")
    return {name: kinds[name] for name in catalog.KERNELS}


KERNELS: dict[str, Kernel] = _registry()


def check_kernel(kernel: str) -> Kernel:
    """The ``Kernel`` of a kernel name; InputError naming the choices for any other name."""
    try:
        return KERNELS[kernel]
    except (KeyError, TypeError):
        raise InputError(f"unknown kernel {kernel!r}; expected one of {', '.join(KERNELS)}.") from None


def row_norms_sq(X: np.ndarray, dtype=None) -> np.ndarray:
    """Squared row norms |x_i|^2, computed in ``dtype`` (default X's)."""
    X = np.asarray(X, dtype=dtype)
    return np.einsum("ij,ij->i", X, X)


def squared_distances_into(out, X, Z, X_sq, Z_sq) -> np.ndarray:
    """Write |x_i - z_j|^2 into ``out`` (shape (len(X), len(Z))) with one GEMM, clamped at 0."""
    np.matmul(X, Z.T, out=out)

    def finish(rows):
        block = out[rows]
        block *= -2.0
        block += X_sq[rows, None]
        block += Z_sq[None, :]
        np.maximum(block, 0.0, out=block)

    parallel_row_blocks(out.shape[0], out.size, finish)
    return out


def apply_kernel_inplace(sqdist: np.ndarray, kernel: str, bandwidth: float) -> np.ndarray:
    """Turn a tile of squared distances into kernel values, in place (``Kernel.apply_inplace`` by row
    blocks on the thread pool)."""
    k = check_kernel(kernel)
    _parallel_rows(sqdist, lambda block: k.apply_inplace(block, bandwidth))
    return sqdist


def kernel_tile_into(out, X, Z, X_sq, Z_sq, kernel: str, bandwidth: float) -> np.ndarray:
    """Write k(X, Z) into ``out`` from one GEMM (X_sq, Z_sq: squared row norms in out's dtype);
    ``Kernel.tile_into`` of the kind (the Gaussian forms its exponent directly)."""
    return check_kernel(kernel).tile_into(out, X, Z, X_sq, Z_sq, bandwidth)


def kernel_tile(X, Z, kernel="gaussian", bandwidth=1.0, *, X_sq=None, Z_sq=None, out=None, dtype=None):
    """Kernel matrix k(X, Z) in ``dtype`` (default: the result type of X and Z)."""
    dtype = np.dtype(dtype or np.result_type(X.dtype, Z.dtype))
    X = np.ascontiguousarray(X, dtype=dtype)
    Z = np.ascontiguousarray(Z, dtype=dtype)
    X_sq = row_norms_sq(X) if X_sq is None else X_sq
    Z_sq = row_norms_sq(Z) if Z_sq is None else Z_sq
    k = check_kernel(kernel)
    if out is None:
        out = np.empty((X.shape[0], Z.shape[0]), dtype=dtype)
    return k.tile_into(out, X, Z, X_sq, Z_sq, bandwidth)


def squared_distances(X, Z) -> np.ndarray:
    X = np.asarray(X)
    Z = np.asarray(Z)
    dtype = np.result_type(X.dtype, Z.dtype, np.float32)
    X = np.ascontiguousarray(X, dtype=dtype)
    Z = np.ascontiguousarray(Z, dtype=dtype)
    out = np.empty((X.shape[0], Z.shape[0]), dtype=dtype)
    return squared_distances_into(out, X, Z, row_norms_sq(X), row_norms_sq(Z))


def gaussian_kernel(X, Z, bandwidth) -> np.ndarray:
    """exp(-|x - z|^2 / (2 sigma^2)) for all pairs."""
    return kernel_tile(np.asarray(X), np.asarray(Z), "gaussian", check_bandwidth(bandwidth))


def laplacian_kernel(X, Z, bandwidth) -> np.ndarray:
    """exp(-|x - z| / sigma) for all pairs."""
    return kernel_tile(np.asarray(X), np.asarray(Z), "laplacian", check_bandwidth(bandwidth))


def median_sample(n: int, max_points: int = 2000, seed: int = 0) -> np.ndarray:
    """Indices of the points the median heuristic looks at: all n, or a seeded sample of ``max_points``."""
    if n <= max_points:
        return np.arange(n)
    return np.random.default_rng(seed).choice(n, size=max_points, replace=False)


def median_of_pairs(sqd: np.ndarray) -> float:
    """Median distance over the distinct pairs (i < j) of a square block of squared distances.

    The median of the distances, not the sqrt of the d^2 median (they differ for even counts).
    """
    iu = np.triu_indices(len(sqd), k=1)
    return float(np.median(np.sqrt(np.maximum(sqd[iu], 0.0))))


def median_bandwidth(X, max_points: int = 2000, seed: int = 0) -> float:
    """Median heuristic: sigma = median pairwise Euclidean distance (on a seeded sample of points).

    Only distinct pairs (i < j) count; a sample of ``max_points`` keeps it O(max_points^2).
    """
    X = np.asarray(X, dtype=np.float64)
    n = X.shape[0]
    if n < 2:
        raise InputError(f"the median heuristic needs at least 2 points; got {n}. Pass an explicit bandwidth.")
    X = X[median_sample(n, max_points, seed)]
    median = median_of_pairs(squared_distances(X, X))
    if median <= 0:
        raise InputError("the median pairwise distance is 0 (all sampled points identical); pass an explicit bandwidth.")
    return median


# --------------------------------------------------------------------------------------------
# checks that the kernel matrix of the data is usable, before any O(n^2) work
# --------------------------------------------------------------------------------------------

def _log2_max_sq_norm(X, center=None, chunk: int = 4096) -> float:
    """log2 of max_i |x_i - center|^2, computed without overflow (row blocks scaled by their max |x|)."""
    X = np.asarray(X)
    best = -math.inf
    for a in range(0, X.shape[0], chunk):
        B = np.asarray(X[a : a + chunk], dtype=np.float64)
        if center is not None:
            B = B - center
        m = float(np.max(np.abs(B))) if B.size else 0.0
        if m > 0:
            best = max(best, 2.0 * math.log2(m) + math.log2(float(np.max(np.einsum("ij,ij->i", B / m, B / m)))))
    return best


def check_distance_scale(X, kernel: str, bandwidth: float, what: str = "X", center=None) -> None:
    """Refuse points whose squared distances (or Gaussian exponents) overflow a working dtype.

    The kernel code forms |x|^2 + |z|^2 - 2 x.z (and, Gaussian, those terms times 1 / (2 sigma^2)):
    in float64 from the points as given (residuals, predictions), in float32 from the points centred
    on the training mean (``center``, default X's mean: float32 Grams and prediction tiles). Each
    term is at most 4 max |x|^2 (times the scale); past the dtype's largest number they become inf and
    the Gram NaN, and the solve would end in a record of NaN/null. Checked here instead, in O(n d).
    ``bandwidth`` None (not known yet, e.g. the median of the training points): distances only."""
    scale = check_kernel(kernel).sqdist_scale(bandwidth) if bandwidth is not None else 1.0
    X = np.asarray(X)
    if center is None:
        with np.errstate(over="ignore", invalid="ignore"):
            center = X.mean(axis=0, dtype=np.float64)
    for dtype, c, how in ((np.float64, None, "as given"), (np.float32, center, "centred on the training mean")):
        limit = math.log2(float(np.finfo(dtype).max))
        r2 = _log2_max_sq_norm(X, c)
        worst = r2 + 2.0 + max(0.0, math.log2(scale))   # 4 |x|^2, and 4 |x|^2 / (2 sigma^2) for the Gaussian
        if worst >= limit:
            raise InputError(
                f"{what}: the features are too large for the kernel computations in {np.dtype(dtype).name}: the "
                f"largest squared norm of a point ({how}) is about 2^{r2:.0f} = {2.0 ** min(r2, 1023):.3g}, so "
                f"squared distances{' divided by 2 sigma^2' if scale > 1 else ''} (up to 4x that) overflow "
                f"{np.dtype(dtype).name} (largest number {float(np.finfo(dtype).max):.3g}) and the Gram would be "
                f"inf/NaN. Scale the features first (e.g. divide by their largest absolute value, or standardize "
                f"each column) and pass --bandwidth median (bandwidth='median').")


# kernel values of every sampled pair below this: the Gram is numerically the identity; all above
# 1 - this: numerically all ones (rank one).
TRIVIAL_KERNEL_TOL = 1e-12


def check_kernel_informative(sqd: np.ndarray, kernel: str, bandwidth: float, what: str = "X") -> None:
    """Refuse a bandwidth that makes the Gram numerically the identity or all ones.

    ``sqd``: a square block of squared distances among sampled training points (``median_sample``);
    its distinct pairs (i < j) are checked. If every off-diagonal kernel value is below 1e-12, the
    bandwidth is far below the data's scale (e.g. raw 0-255 pixels with sigma 5): the interpolant
    fits the training labels with residual 0 and predicts ~0 everywhere else (chance-level test error).
    If every value is within 1e-12 of 1, sigma is far above the scale and K is rank one in float64.
    Either way the result would be silently wrong; the message names the sampled median distance."""
    iu = np.triu_indices(len(sqd), k=1)
    d2 = np.maximum(np.asarray(sqd, dtype=np.float64)[iu], 0.0)
    if d2.size == 0:
        return
    with np.errstate(over="ignore"):
        expo = check_kernel(kernel).exponent(d2, bandwidth)
    k_max, k_min = math.exp(-float(expo.min())), math.exp(-float(expo.max()))
    if k_max >= TRIVIAL_KERNEL_TOL and k_min <= 1.0 - TRIVIAL_KERNEL_TOL:
        return
    median = float(np.median(np.sqrt(d2)))
    fix = (f"Fix: --bandwidth median (bandwidth='median'), a sigma near that distance (e.g. {median:.3g}), "
           f"or scale the data (e.g. pixels / 255, for which sigma = 5 suits MNIST).")
    if k_max < TRIVIAL_KERNEL_TOL:
        raise InputError(
            f"{what}: with bandwidth sigma = {bandwidth:g} the kernel matrix is numerically the identity: on "
            f"{d2.size} sampled pairs of training points the largest off-diagonal kernel value is {k_max:.2g} "
            f"(< {TRIVIAL_KERNEL_TOL:g}), because sigma is far below the data's scale (median pairwise distance "
            f"{median:.4g}). The interpolant would fit the training targets with residual 0 and predict ~0 "
            f"everywhere else (chance-level test error). {fix}")
    raise InputError(
        f"{what}: with bandwidth sigma = {bandwidth:g} the kernel matrix is numerically all ones: on {d2.size} "
        f"sampled pairs of training points every kernel value is within {TRIVIAL_KERNEL_TOL:g} of 1 (smallest "
        f"{k_min:.15g}), because sigma is far above the data's scale (median pairwise distance {median:.4g}), "
        f"so K is rank one in float64 and the solve is meaningless. {fix}")


def check_kernel_on_data(X, kernel: str, bandwidth: float, what: str = "X", max_points: int = 512,
                         seed: int = 0) -> None:
    """``check_distance_scale`` and ``check_kernel_informative`` on a seeded sample of up to
    ``max_points`` training points (O(max_points^2 d): 0.4 GFLOP at 512 points and d = 784)."""
    check_distance_scale(X, kernel, bandwidth, what)
    idx = median_sample(len(X), max_points, seed)
    S = np.asarray(X[idx] if len(idx) < len(X) else X, dtype=np.float64)
    S = S - S.mean(axis=0)   # centred: the GEMM expansion of distances cancels less
    check_kernel_informative(squared_distances(S, S), kernel, bandwidth, what)
