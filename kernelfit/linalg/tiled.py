"""The tiled, in-place Cholesky factorization and solves on ``SymmetricPanels`` (panels.py).

Factorization (right-looking): for each panel j, factor its top diagonal block (potrf), solve the
rest of the panel against it (trsm), then subtract the panel's outer product from every later panel
(one GEMM per later panel, inner dimension ``block``). That is n^3/3 flops, almost all in GEMMs of
size (n - s) x block x block, which run at BLAS peak.
"""

from __future__ import annotations

import contextlib

import numpy as np
import scipy.linalg

from ..errors import NotPositiveDefiniteError
from ..parallel import blas_controller
from .backend import get_backend
from .panels import SymmetricPanels, panel_flops

# Triangular solves with at most this many right-hand sides run on one BLAS thread: OpenBLAS's
# threading of such skinny trsm calls cost 10-30x on a 2-core VM (a 512 x 512 trsm with 10 columns:
# 4.5 ms threaded, 0.14 ms on one thread). Skinny GEMMs (a panel or kernel tile times a few columns)
# keep all threads: they stream the matrix, and two threads did it faster on an idle 2-core Xeon
# (float64, 10 columns: stored 10,000-point Gram 0.17 s vs 0.26 s; a 1,024 x 60,000 tile and its
# transpose 0.16 s vs 0.24 s).
SKINNY_COLUMNS = 64


def single_blas_thread(columns: int):
    """Context manager: one BLAS thread for a skinny triangular solve (<= SKINNY_COLUMNS columns), else a no-op."""
    if columns > SKINNY_COLUMNS:
        return contextlib.nullcontext()
    return blas_controller().limit(limits=1, user_api="blas")


def cholesky_inplace(A: SymmetricPanels, backend: str = "numpy", progress=None, jitter: float = 0.0,
                     start_panel: int = 0, on_panel_done=None) -> SymmetricPanels:
    """Overwrite the panels of A with its lower Cholesky factor L (A = L L^T).

    ``jitter`` is only used to word the error; add it to the diagonal before calling. On failure
    raises NotPositiveDefiniteError with the 1-based order of the first failing leading minor; the
    panels then hold a partial factor. ``start_panel``/``on_panel_done(j)`` support checkpointing: a
    right-looking factorization is restartable after any finished panel.
    """
    be = get_backend(backend)
    starts = A.starts
    panels = A.panels
    # Work (flops) per panel, so a progress bar moves in proportion to time.
    n = A.n
    for j in range(start_panel, len(panels)):
        s, P = starts[j], panels[j]
        w = P.shape[1]
        info = be.potrf(P[:w])
        if info != 0:
            raise NotPositiveDefiniteError(minor=s + info, n=n, dtype=str(P.dtype), jitter=jitter)
        below = P[w:]
        if below.shape[0]:
            be.trsm(below, P[:w])
        # Trailing update: panel i (i > j) starts at row starts[i]; rows of `below` start at s + w.
        for i in range(j + 1, len(panels)):
            Pi = panels[i]
            off = starts[i] - (s + w)
            be.syrk_update(Pi, below[off:], below[off : off + Pi.shape[1]])
        if progress is not None:
            progress.update(panel_flops(n, s, w))
        if on_panel_done is not None:
            on_panel_done(j)
    return A


def solve_lower(L: SymmetricPanels, B: np.ndarray, out_dtype=None) -> np.ndarray:
    """Solve L Z = B (forward substitution) with the panel factor. B: (n, k)."""
    Z = np.array(B, dtype=out_dtype or L.dtype, copy=True, order="C")
    for s, P in zip(L.starts, L.panels):
        w = P.shape[1]
        with single_blas_thread(Z.shape[1]):
            Z[s : s + w] = scipy.linalg.solve_triangular(P[:w], Z[s : s + w], lower=True, check_finite=False)
        if P.shape[0] > w:
            Z[s + w :] -= P[w:] @ Z[s : s + w]
    return Z


def solve_upper_t(L: SymmetricPanels, Z: np.ndarray) -> np.ndarray:
    """Solve L^T X = Z (back substitution) with the panel factor. Z is overwritten and returned."""
    X = Z
    for s, P in reversed(list(zip(L.starts, L.panels))):
        w = P.shape[1]
        if P.shape[0] > w:
            X[s : s + w] -= P[w:].T @ X[s + w :]
        with single_blas_thread(X.shape[1]):
            X[s : s + w] = scipy.linalg.solve_triangular(P[:w], X[s : s + w], lower=True, trans="T",
                                                         check_finite=False)
    return X


def cho_solve(L: SymmetricPanels, B: np.ndarray) -> np.ndarray:
    """Solve (L L^T) X = B; computed in the factor's dtype, returned in that dtype."""
    B = np.asarray(B)
    squeeze = B.ndim == 1
    B2 = B[:, None] if squeeze else B
    X = solve_upper_t(L, solve_lower(L, B2))   # triangular blocks on one thread, GEMMs on all
    return X[:, 0] if squeeze else X


def logdet(L: SymmetricPanels) -> float:
    """log det(A) from its factor: 2 sum log diag(L)."""
    return 2.0 * float(np.sum(np.log(L.diagonal().astype(np.float64))))

