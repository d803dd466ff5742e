"""The one driver for "factor, solve, refine, fall back": used by the pipeline (``kernelfit.solve``),
feature Grams (``kernelfit.table``) and the GPU benchmark.

``solve_refined`` builds a Gram in the factor dtype, factors it where the caller's ``factor_gram``
says (CPU, GPU in-core or out-of-core), solves through the factor and refines with float64 residuals
``Y - K X`` from ``apply_high``. With ``store_float64_gram`` (the ``stored-float64-gram`` strategy of
``kernelfit.planning``) it builds the Gram once in float64, keeps it, factors a low-precision copy and
takes the residuals from the stored Gram: O(n^2 k) per step instead of a kernel rebuild. With a
low-precision factor that cannot reach float64 level (K too ill-conditioned for float32, or a float32
breakdown), it re-factors in float64 when the caller's ``fallback`` check allows it, and the report
says so; it never falls back silently.

Reports are plain dicts: the final ``RefinementReport`` fields plus ``factor_dtype``, ``fallback``
(None or why the float64 factor was used), ``refinement_float32`` (the abandoned attempt's report),
``fallback_skipped`` (why a needed fallback did not run) and ``scale_diagonal``.

The factor list has one entry per factorization attempted, in order: ``factor_gram``'s dict for a
finished factor, and for one that broke down an entry saying so (``broke_down``): its dtype, the
failing leading minor, the seconds until the breakdown and the caller's ``attempt_info`` (e.g. the
TF32 flag, which only the caller knows). The last entry is always the factor the solution came from.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from ..catalog import MAX_REFINE
from ..errors import MemoryPlanError, NotPositiveDefiniteError
from .refine import check_refine_tol, low_precision_solver, refine, with_row_sums
from .tiled import cho_solve

__all__ = ["solve_refined", "broke_down", "BROKE_DOWN"]

BROKE_DOWN = "broke down"   # the status of a factor entry whose factorization raised NotPositiveDefiniteError


def _unit_diagonal(G):
    """Scale G in place to D^-1/2 G D^-1/2 (unit diagonal); returns sqrt(diag G) in float64.

    Keeps float32 / TF32 pivots near 1 whatever the kernel's scale; the solves undo it."""
    d = np.sqrt(np.maximum(G.diagonal().astype(np.float64), 0.0))
    if not np.all(d > 0):
        raise NotPositiveDefiniteError(minor=int(np.argmin(d > 0)) + 1, n=G.n, dtype=str(G.dtype))
    inv = (1.0 / d).astype(G.dtype)
    for s, P in zip(G.starts, G.panels):
        P *= inv[s:, None]
        P *= inv[None, s : s + P.shape[1]]
    return d


def broke_down(info: dict) -> bool:
    """Whether a factor entry of ``solve_refined`` is an attempt that broke down (no factor)."""
    return info.get("status") == BROKE_DOWN


def solve_refined(build_gram: Callable, factor_gram: Callable, apply_high: Callable, Y, *, dtype,
                  max_refine: int = MAX_REFINE, tol: float | None = None, jitter: float = 0.0,
                  scale_diagonal: bool = False, fallback: Callable[[], str | None] | None = None,
                  timings: dict | None = None, solver: Callable | None = None,
                  store_float64_gram: bool = False, attempt_info: dict | None = None):
    """Solve (K + jitter I) X = Y.

    build_gram(dtype) -> ``SymmetricPanels`` of K (host numpy panels, no jitter: it is added here).
    factor_gram(G) -> dict describing the factorization (G is overwritten by its factor).
    apply_high(V) -> K V in float64 (no jitter; the ridge is applied here, in float64).
    dtype: the factor dtype. ``max_refine = 0`` is a direct solve with one float64 residual pass.
    tol: stop at this relative residual (checked against what float64 can reach before any work);
        a solve stopped there is accepted as it is, it never triggers the float64 re-factorization.
    store_float64_gram: build_gram(float64) once and keep it; the factor is a ``dtype`` copy and the
        residuals are products with the stored Gram. A float64 re-factorization then factors the
        stored Gram itself in place (no rebuild) and its residuals come from ``apply_high``.
    fallback: None never re-factors (a float32 breakdown propagates); otherwise a check run when
        the low-precision attempt fails, returning None when a float64 re-factorization may run, or
        why not: a sentence, or a ``MemoryPlanError`` (not raised) whose plan is kept if this must raise.
    timings: accumulates "gram", "factor", "solve" seconds ("factor" includes an attempt that broke down).
    attempt_info: fields merged into the entry of the ``dtype`` factorization if it breaks down (what the
        caller knows of it that ``factor_gram`` could not return, e.g. ``{"tf32": True, "device": "cuda:0"}``).
    solver(L, d) -> (R -> K^{-1} R in float64) for factors that are not host panels (device-resident
        ones, see ``kernelfit.gram_device``); default ``low_precision_solver(cho_solve, L, d)``.
    Returns (X, R = Y - (K + jitter I) X, report dict, list of factor info dicts).
    """
    Y = np.asarray(Y, dtype=np.float64)
    tol = check_refine_tol(tol, Y.shape[0])
    timings = {} if timings is None else timings
    factors = []
    stored = {}
    if store_float64_gram and np.dtype(dtype) != np.float64:
        t = time.perf_counter()
        stored["G64"] = build_gram(np.float64)
        timings["gram"] = timings.get("gram", 0.0) + time.perf_counter() - t

    def gram_for(dt):
        if "G64" not in stored:
            return build_gram(dt), "recomputed"
        if np.dtype(dt) == np.float64:    # the re-factorization overwrites the stored Gram
            return stored.pop("G64"), "recomputed"
        return stored["G64"].astype(dt), "stored"

    def attempt(dt, max_iter):
        t = time.perf_counter()
        G, source = gram_for(dt)
        apply, k_inf = with_row_sums(stored["G64"].symmetric_matmul if source == "stored" else apply_high,
                                     float(jitter))
        if jitter:
            G.add_to_diagonal(jitter)
        d = _unit_diagonal(G) if scale_diagonal else None
        timings["gram"] = timings.get("gram", 0.0) + time.perf_counter() - t
        t = time.perf_counter()
        try:
            factors.append(factor_gram(G))
        except NotPositiveDefiniteError as exc:
            # the attempt is recorded before the exception goes on: a reader must never take the
            # float64 re-factorization for it (or miss the seconds it cost)
            seconds = time.perf_counter() - t
            timings["factor"] = timings.get("factor", 0.0) + seconds
            known = attempt_info if np.dtype(dt) == np.dtype(dtype) else None   # it describes the first attempt
            factors.append({**(known or {}), "status": BROKE_DOWN, "dtype": np.dtype(dt).name, "n": G.n,
                            "minor": exc.minor, "timings_s": {"factor": seconds}})
            raise
        timings["factor"] = timings.get("factor", 0.0) + time.perf_counter() - t
        t = time.perf_counter()
        solve_low = solver(G, d) if solver is not None else low_precision_solver(cho_solve, G, d)
        X, R, rep = refine(solve_low, apply, Y, k_inf, max_iter=max_iter, tol=tol)
        timings["solve"] = timings.get("solve", 0.0) + time.perf_counter() - t
        return X, R, {**rep.to_dict(), "factor_dtype": np.dtype(dt).name, "fallback": None,
                      "scale_diagonal": bool(scale_diagonal),
                      "residual_from": "stored float64 Gram" if source == "stored" else "apply_high (float64)"}

    if fallback is None or np.dtype(dtype) == np.float64:
        X, R, report = attempt(dtype, int(max_refine))
        return X, R, report, factors

    try:
        X, R, report = attempt(dtype, int(max_refine))
        reason = None if report["backward_stable"] or report["tol_reached"] else (
            f"{np.dtype(dtype).name} refinement stopped at backward error {report['backward_error']:.2e} "
            f"({report['stop_reason']})")
    except NotPositiveDefiniteError as exc:
        X, report, reason = None, None, f"{np.dtype(dtype).name} factor broke down (leading minor of order {exc.minor})"
    if reason is None:
        return X, R, report, factors
    why_not = fallback()
    if why_not is None:
        first = report
        X, R, report = attempt(np.float64, 2)
        report.update(fallback=reason + "; re-factored in float64", refinement_float32=first)
    elif X is None:
        raise MemoryPlanError(f"{reason}, and {why_not}. Add a small jitter or use fewer points.",
                              plan=getattr(why_not, "plan", None))
    else:
        report["fallback_skipped"] = str(why_not)
    return X, R, report, factors
