"""Precomputed Gram matrices: the third door into a solve, beside named datasets and user arrays.

A training Gram G (n x n, full square) and an optional test Gram K_test (m x n, rows = test points,
columns = training points) come as anything ``open_array`` opens (``G.npy`` memory-mapped,
``G.h5:/dset``, ``G.zarr:/arr`` of any chunking) or as an in-memory array.

* ``check_gram``        everything that can be refused before the O(n^3) work, cheapest first: shape,
                        dtype, the diagonal (finite, > 0), symmetry on sampled tiles against the
                        transpose (tolerance stated in the message), then one pass over all rows:
                        NaN / inf anywhere, duplicate rows by hashing.
* ``read_gram_panels``  the lower triangle copied tile by tile straight into ``SymmetricPanels``
                        (never a second n x n copy), every tile checked for NaN / inf as it lands.
* ``gram_matmul``       G @ V (or K_test @ V) in float64, streamed in row blocks from the source:
                        the float64 residual of a solve and the predictions, without a stored copy.

Memory maps are read block by block and their pages released after each block, so the resident
set of a solve from ``G.npy`` is the panels plus a few blocks, not panels plus the file.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from ..linalg.panels import SymmetricPanels, choose_block
from .arrays import open_array, parse_spec, sha256_file
from .rows import find_duplicate_rows, release_pages, row_blocks, row_hash

__all__ = [
    "check_gram",
    "check_square",
    "check_test_gram",
    "gram_matmul",
    "gram_source_info",
    "open_gram",
    "read_gram_panels",
    "symmetry_tolerance",
]

SYMMETRY_TILES = 16     # sampled off-diagonal tile pairs compared with the transpose
SYMMETRY_TILE = 64      # their side


def open_gram(source, *, what: str = "--gram"):
    """An array-like Gram from a spec (``G.npy``, ``G.h5:/dset``, ``G.zarr:/arr``) or an array."""
    if isinstance(source, (str, bytes)) or hasattr(source, "__fspath__"):
        return open_array(source, what=what)
    if not hasattr(source, "shape") or not hasattr(source, "dtype"):
        source = np.asarray(source)
    return source


def gram_source_info(source, G) -> dict:
    """What was loaded, for the record: path and sha256 for files, shape and dtype always."""
    info = {"shape": [int(v) for v in G.shape], "dtype": str(np.dtype(G.dtype))}
    if isinstance(source, (str, bytes)) or hasattr(source, "__fspath__"):
        spec = parse_spec(source)
        info.update(path=str(spec.path), member=spec.member, sha256=sha256_file(spec.path))
    else:
        info["path"] = None
    return info


def _check_dtype(G, what: str) -> None:
    dt = np.dtype(G.dtype)
    if dt.kind not in "fiu" or dt == np.bool_:
        raise InputError(f"{what}: expected real numbers (float32 / float64); got dtype {dt}. "
                         f"Fix: save the Gram as a float array.")


def symmetry_tolerance(dtype) -> float:
    """Relative tolerance of the symmetry check: max(1e-6, 100 eps) x max |diagonal|."""
    dt = np.dtype(dtype)
    eps = np.finfo(dt).eps if dt.kind == "f" else 0.0
    return max(1e-6, 100.0 * float(eps))


def _row_span(G) -> int:
    # bytes of the source one row of a read touches: a C-ordered map faults in whole page runs of
    # every row it visits, however few columns are read, so blocks are sized by the full row
    return int(G.shape[1]) * np.dtype(G.dtype).itemsize


def _read_diagonal(G) -> np.ndarray:
    n = G.shape[0]
    out = np.empty(n, dtype=np.float64)
    for s, e in row_blocks(n, _row_span(G)):
        out[s:e] = np.diagonal(np.asarray(G[s:e, s:e], dtype=np.float64))
        release_pages(G)
    return out


def _first_bad(mask: np.ndarray):
    return tuple(int(v) for v in np.argwhere(mask)[0])


def check_square(G, what: str = "--gram") -> int:
    """Shape and dtype of a training Gram (read from the header only); returns n."""
    shape = tuple(G.shape)
    if len(shape) != 2 or shape[0] != shape[1]:
        raise InputError(f"{what}: expected a square n x n training Gram matrix; got shape {shape}. "
                         f"A test Gram (m test x n training points) goes to --gram-test (gram_test=).")
    if shape[0] == 0:
        raise InputError(f"{what}: the Gram matrix has 0 rows; need at least one training point.")
    _check_dtype(G, what)
    return int(shape[0])


def check_gram(G, *, what: str = "--gram", jitter: float = 0.0, seed: int = 0,
               duplicates: bool = True) -> dict:
    """Refuse a training Gram that cannot be solved, before any panel is allocated.

    Checks: 2-D and square; real dtype; diagonal finite and > 0 (a kernel has k(x, x) > 0);
    symmetric on ``SYMMETRY_TILES`` random tile pairs (|G_ij - G_ji| <= tol x max |G_ii|, tol from
    ``symmetry_tolerance``); then one pass over the rows (O(n^2) reads, nothing kept): every entry
    finite (the float64 residual reads the upper triangle too) and, with ``jitter == 0`` and
    ``duplicates``, no two equal rows (equal points make G singular). Positive definiteness is left
    to the factorization, which names the failing leading minor. Returns what was checked.
    """
    n = check_square(G, what)
    block = SYMMETRY_TILE
    diag = _read_diagonal(G)
    if not np.all(np.isfinite(diag)):
        i = int(np.flatnonzero(~np.isfinite(diag))[0])
        raise InputError(f"{what}: the diagonal holds NaN or inf (first at G[{i}, {i}] = {diag[i]}); "
                         f"a Gram matrix must be finite. Fix: recompute or clean the matrix.")
    if np.any(diag <= 0):
        i = int(np.flatnonzero(diag <= 0)[0])
        raise InputError(f"{what}: non-positive diagonal entry G[{i}, {i}] = {diag[i]:g}; a positive-definite "
                         f"kernel has k(x, x) > 0 for every point. Fix: check that the file is the Gram "
                         f"matrix k(x_i, x_j) of the training points (not a distance matrix).")
    scale = float(np.max(np.abs(diag)))
    rtol = symmetry_tolerance(G.dtype)
    rng = np.random.default_rng(seed)
    b = min(block, n)
    checked = 0
    for t in range(SYMMETRY_TILES if n > 1 else 0):
        i0, j0 = (int(v) for v in rng.integers(0, n - b + 1, size=2))
        if t == 0:
            i0, j0 = n - b, 0      # always include the corner farthest from the diagonal
        A = np.asarray(G[i0:i0 + b, j0:j0 + b], dtype=np.float64)
        B = np.asarray(G[j0:j0 + b, i0:i0 + b], dtype=np.float64).T
        for T, (r0, c0) in ((A, (i0, j0)), (B.T, (j0, i0))):
            if not np.all(np.isfinite(T)):
                r, c = _first_bad(~np.isfinite(T))
                raise InputError(f"{what}: G[{r0 + r}, {c0 + c}] = {T[r, c]} is not finite; a Gram matrix must "
                                 f"hold finite numbers. Fix: recompute or clean the matrix.")
        diff = np.abs(A - B)
        if np.any(diff > rtol * scale):
            r, c = _first_bad(diff > rtol * scale)
            raise InputError(
                f"{what}: not symmetric: G[{i0 + r}, {j0 + c}] = {A[r, c]:.10g} but G[{j0 + c}, {i0 + r}] = "
                f"{B[r, c]:.10g} (|difference| {diff[r, c]:.3g} > tolerance {rtol:g} x max|diagonal| "
                f"{scale:.6g} = {rtol * scale:.3g}; {SYMMETRY_TILES} sampled {b} x {b} tiles are compared with "
                f"the transpose). Fix: pass the full symmetric Gram k(x_i, x_j) of the training points, "
                f"e.g. (G + G.T) / 2 if it is only rounding.")
        checked += A.size
        release_pages(G)
    hash_rows = bool(duplicates and not jitter)
    hashes = np.empty(n, dtype=np.uint64) if hash_rows else None
    for a, e in row_blocks(n, _row_span(G)):
        rows = np.asarray(G[a:e], dtype=np.float64)
        if not np.all(np.isfinite(rows)):
            r, c = _first_bad(~np.isfinite(rows))
            raise InputError(f"{what}: G[{a + r}, {c}] = {rows[r, c]} is not finite; a Gram matrix must hold "
                             f"finite numbers. Fix: recompute or clean the matrix.")
        if hash_rows:
            for i, row in enumerate(rows):
                hashes[a + i] = row_hash(row)
        release_pages(G)
    summary = {"n": n, "dtype": str(np.dtype(G.dtype)), "diagonal_min": float(diag.min()),
               "diagonal_max": scale, "symmetry_entries_checked": int(checked), "symmetry_rtol": rtol,
               "all_finite": True, "duplicate_rows_checked": hash_rows}
    if hash_rows:
        dup = find_duplicate_rows(G, hashes=hashes)
        if dup is not None:
            raise InputError(
                f"{what}: rows {dup.first} and {dup.second} of the Gram matrix are equal ({dup.count} row(s) "
                f"repeat an earlier one): the training points are duplicates, which makes G singular, and "
                f"exact interpolation (jitter 0) is impossible. Fix: remove the duplicate points (and their "
                f"rows and columns), or add a tiny ridge, e.g. --jitter 1e-8 (jitter=1e-8).")
    return summary


def _refuse_nonfinite(rows: np.ndarray, r0: int, what: str, name: str) -> None:
    if not np.all(np.isfinite(rows)):
        r, c = _first_bad(~np.isfinite(rows))
        raise InputError(f"{what}: {name}[{r0 + r}, {c}] = {rows[r, c]} is not finite ({int((~np.isfinite(rows)).sum())} "
                         f"such entries in rows {r0}..{r0 + len(rows) - 1}); a Gram matrix must hold finite numbers, "
                         f"and a NaN row would be predicted as an arbitrary class. Fix: recompute or clean the "
                         f"matrix (or drop those test points).")


def check_test_gram(K_test, n: int, *, what: str = "--gram-test", values: bool = True) -> None:
    """A test Gram is m x n: one row per test point, one column per training point; with ``values``,
    one pass over its rows (block by block, pages released) refuses NaN / inf before any solve."""
    shape = tuple(K_test.shape)
    if len(shape) != 2:
        raise InputError(f"{what}: expected a 2-D test Gram (m test points x n = {n} training points); "
                         f"got shape {shape}.")
    if shape[1] != n:
        raise InputError(f"{what}: the test Gram has {shape[1]} columns but the training Gram has n = {n} "
                         f"rows; its columns must be the {n} training points (k(x_test_i, x_train_j)). "
                         f"Fix: pass K(X_test, X_train), not K(X_train, X_test) (transpose it).")
    if shape[0] == 0:
        raise InputError(f"{what}: the test Gram has 0 rows; drop it or pass at least one test point.")
    _check_dtype(K_test, what)
    if values:
        for a, e in row_blocks(shape[0], _row_span(K_test)):
            _refuse_nonfinite(np.asarray(K_test[a:e], dtype=np.float64), a, what, "K_test")
            release_pages(K_test)


def read_gram_panels(G, dtype=np.float64, block: int | None = None, *, what: str = "--gram") -> SymmetricPanels:
    """Lower triangle of G into panel storage of ``dtype``, one (block x width) tile at a time.

    Each tile (a run of rows of one panel, about ``BLOCK_BYTES`` of the source) is read and cast
    straight into its place in the panel; a memory map's pages are released after every tile.
    Raises InputError at the first NaN / inf.
    """
    n = G.shape[0]
    out = SymmetricPanels.empty(n, block, dtype)
    starts = out.starts
    span = _row_span(G)
    for s, P in zip(starts, out.panels):
        w = P.shape[1]
        for a, e in row_blocks(n - s, span):
            tile = P[a:e]
            tile[...] = G[s + a:s + e, s:s + w]
            release_pages(G)
            if not np.all(np.isfinite(tile)):
                i, j = _first_bad(~np.isfinite(tile))
                raise InputError(f"{what}: G[{s + a + i}, {s + j}] = {G[s + a + i, s + j]} is not finite (or "
                                 f"overflows {np.dtype(dtype).name}); a Gram matrix must hold finite numbers. "
                                 f"Fix: recompute or clean the matrix.")
    return out


def gram_matmul(G, V, rows: int | None = None, *, what: str = "Gram") -> np.ndarray:
    """G @ V in float64 for any (m x n) array-like G, streamed in row blocks (about 4 MiB each); every
    block is checked for NaN / inf as it is read (InputError naming the entry)."""
    V = np.asarray(V, dtype=np.float64)
    m, n = G.shape
    out = np.empty((m, V.shape[1]), dtype=np.float64)
    blocks = row_blocks(m, n * 8) if rows is None else [(a, min(a + rows, m)) for a in range(0, m, rows)]
    for a, e in blocks:
        block = np.asarray(G[a:e], dtype=np.float64)
        _refuse_nonfinite(block, a, what, "G")
        np.matmul(block, V, out=out[a:e])
        release_pages(G)
    return out


def _source_tile(spec, r0, r1, c0, c1, dtype, diagonal, jitter):
    """One tile of a Gram file, read on a dask worker (the path must be visible there)."""
    G = open_array(spec, what="--gram")
    T = np.array(G[r0:r1, c0:c1], dtype=dtype, order="C")
    release_pages(G)
    if not np.all(np.isfinite(T)):
        i, j = (int(v) for v in np.argwhere(~np.isfinite(T))[0])
        raise InputError(f"--gram: G[{r0 + i}, {c0 + j}] = {T[i, j]} is not finite; a Gram matrix must hold "
                         f"finite numbers.")
    if diagonal and jitter:
        T[np.arange(T.shape[0]), np.arange(T.shape[0])] += jitter
    return T


def gram_tiles_from_source(spec, dtype=np.float64, block: int | None = None, jitter: float = 0.0, client=None,
                           scheduler_address=None):
    """Lower tiles of a Gram file (``G.npy``, ``G.h5:/dset``, ``G.zarr:/arr``) as a distributed
    ``TiledMatrix``, each tile read by a worker task.

    The file must be on storage every worker sees (a shared file system, or the local disk of a
    ``LocalCluster``); only the spec travels to the workers, never the matrix.
    """
    from ..linalg import distributed as kd

    if not isinstance(spec, (str, bytes)) and not hasattr(spec, "__fspath__"):
        raise InputError("a distributed Gram solve reads the Gram on the workers: pass it as a path "
                         "(G.npy, G.h5:/dset, STORE.zarr:/arr) on storage the workers can read, not an array.")
    client = kd.get_client(client, scheduler_address)
    spec = str(spec)
    n = open_array(spec, what="--gram").shape[0]
    block = choose_block(n, block)
    dt, jitter = np.dtype(dtype), float(jitter)
    return kd.lower_tiles(_source_tile, lambda i, j, r0, r1, c0, c1: (spec, r0, r1, c0, c1, dt, i == j, jitter),
                          n, block, dtype, client, name="gram-file")
