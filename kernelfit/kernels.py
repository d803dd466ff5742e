"""Kernel functions as pure, in-place-friendly functions of tiles.

A kernel here is a map from squared Euclidean distances to kernel values, applied in place to a tile
that already holds squared distances. That keeps one place (``squared_distances_into``) for the
expensive part (one GEMM per tile) and lets the Gram builder, the residual operator and prediction
share it. Squared distances are clamped at zero: the expansion |x|^2 + |z|^2 - 2 x.z can go slightly
negative in floating point for (near-)duplicate points.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import InputError
from .parallel import parallel_row_blocks

KERNELS = ("gaussian", "laplacian")

def _parallel_rows(tile: np.ndarray, fn) -> None:
    """Apply ``fn(row_block)`` in place to row blocks of ``tile`` on the thread pool."""
    parallel_row_blocks(tile.shape[0], tile.size, lambda rows: fn(tile[rows]))


def check_bandwidth(bandwidth) -> float:
    """Validate a bandwidth (sigma): a finite number > 0."""
    try:
        value = float(bandwidth)
    except (TypeError, ValueError):
        raise InputError(
            f"bandwidth must be a positive number or 'median'; got {bandwidth!r}. "
            "Pass e.g. bandwidth=5.0 (MNIST pixels / 255) or bandwidth='median'."
        ) from None
    if not math.isfinite(value) or value <= 0:
        raise InputError(
            f"bandwidth must be a finite number > 0; got {value!r}. "
            "Pass e.g. bandwidth=5.0 or bandwidth='median' to use the median heuristic."
        )
    return value


def check_kernel(kernel: str) -> str:
    if kernel not in KERNELS:
        raise InputError(f"unknown kernel {kernel!r}; expected one of {', '.join(KERNELS)}.")
    return kernel


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
    """Turn a tile of squared distances into kernel values, in place.

    gaussian:  exp(-d^2 / (2 sigma^2));  laplacian: exp(-d / sigma).
    """
    if kernel == "gaussian":
        scale = -1.0 / (2.0 * bandwidth * bandwidth)

        def fn(block):
            block *= scale
            np.exp(block, out=block)

    elif kernel == "laplacian":
        scale = -1.0 / bandwidth

        def fn(block):
            np.sqrt(block, out=block)
            block *= scale
            np.exp(block, out=block)

    else:
        check_kernel(kernel)
    _parallel_rows(sqdist, fn)
    return sqdist


def kernel_tile_into(out, X, Z, X_sq, Z_sq, kernel: str, bandwidth: float) -> np.ndarray:
    """Write k(X, Z) into ``out`` from one GEMM (X_sq, Z_sq: squared row norms in out's dtype).

    Gaussian: the exponent (2 x.z - |x|^2 - |z|^2) / (2 s^2) is formed directly, with X scaled by
    1 / s^2 before the GEMM (rows x d numbers instead of rows x n), then clamped at <= 0 (the same
    clamp as squared distances at >= 0) and exponentiated: four passes over the tile instead of
    the six of distances-then-kernel. Those passes are a third of a tile's time on a 2-core
    machine. Laplacian needs the distance itself: distances, then ``apply_kernel_inplace``."""
    if kernel != "gaussian":
        squared_distances_into(out, X, Z, X_sq, Z_sq)
        return apply_kernel_inplace(out, kernel, bandwidth)
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


def kernel_tile(X, Z, kernel="gaussian", bandwidth=1.0, *, X_sq=None, Z_sq=None, out=None, dtype=None):
    """Kernel matrix k(X, Z) in ``dtype`` (default: the result type of X and Z)."""
    dtype = np.dtype(dtype or np.result_type(X.dtype, Z.dtype))
    X = np.ascontiguousarray(X, dtype=dtype)
    Z = np.ascontiguousarray(Z, dtype=dtype)
    X_sq = row_norms_sq(X) if X_sq is None else X_sq
    Z_sq = row_norms_sq(Z) if Z_sq is None else Z_sq
    if out is None:
        out = np.empty((X.shape[0], Z.shape[0]), dtype=dtype)
    check_kernel(kernel)
    return kernel_tile_into(out, X, Z, X_sq, Z_sq, kernel, bandwidth)


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
