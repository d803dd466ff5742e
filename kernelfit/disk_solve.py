"""Exact kernel solves with the Gram and its factor on disk: what ``kernelfit solve
--out-of-core disk --scratch-dir DIR --memory-budget GIB [--resume]`` runs.

Layer 4 (operators, beside gram.py): it builds kernel tiles from data (``kernels``) or reads them
from a user's Gram file and hands them to ``linalg.diskstore`` as callables. The caller (CLI,
``solve.fit_interpolant``) validates X / Y and picks the budget (planning's job); this module does
the disk-specific checks before any heavy work (scratch directory writable, big enough, not another
run's; budget large enough), then fills the store, factors it (continuing a killed run with
``resume``), solves streaming the factor and refines with float64 residuals: from the data (a
kernel product recomputed tile by tile) or from the Gram file (its lower triangle streamed). The
store is removed after a successful solve unless ``keep_store``; after a failure it is kept, and
``resume=True`` continues from its last finished slab.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np

from .catalog import MAX_REFINE
from .data.arrays import open_array, parse_spec, sha256_file
from .errors import DataError, InputError, MemoryPlanError, NotPositiveDefiniteError
from .gram import KernelOperator
from .interpolant import Interpolant
from .kernels import kernel_tile
from .linalg.diskstore import DiskPanels, TileFn, disk_bytes, disk_cho_solve, pread_into
from .linalg.panels import cholesky_flops
from .linalg.refine import float64_level_threshold
from .results import format_gib, peak_rss_bytes, residual_stats, warn_residual
from .storage import FILE_DIGEST, file_digest
from .validate import bandwidth_rule

__all__ = ["solve_on_disk", "solve_gram_file_on_disk", "solve_refined_on_disk", "npy_gram_source", "gram_file_source",
           "check_gram_file_source", "fit_on_disk", "disk_stats", "disk_factorization"]


def _data_tile(X: np.ndarray, kernel: str, bandwidth: float, dtype):
    def tile(rows: slice, cols: slice) -> np.ndarray:
        T = kernel_tile(X[rows], X[cols], kernel, bandwidth, dtype=dtype)
        d = np.arange(max(rows.start, cols.start), min(rows.stop, cols.stop))
        T[d - rows.start, d - cols.start] = 1.0      # k(x, x) = 1 exactly, as gram.build_gram_panels
        return T

    return tile


def solve_on_disk(X, Y, *, kernel: str, bandwidth: float, scratch_dir, memory_budget: int, dtype=np.float32,
                  jitter: float = 0.0, resume: bool = False, max_refine: int = MAX_REFINE, refine_tol: float | None = None,
                  keep_store: bool = False, block: int | None = None, flag: str = "--scratch-dir",
                  fallback_float64: bool = False, with_residual: bool = False, high: KernelOperator | None = None,
                  device=None, device_memory_budget: int | None = None):
    """Solve (K + jitter I) alpha = Y for the kernel matrix of X (validated by the caller) with K and
    its factor in ``scratch_dir``, at most ``memory_budget`` bytes of RAM for the factorization.
    ``fallback_float64``: a float32 factor whose refinement cannot reach float64 level (or that breaks
    down) is replaced by a float64 one, a second stage of the same store, when the disk has room.
    Returns (alpha float64, stats dict for the record: strategy 'disk', bytes read / written, I/O wait);
    ``with_residual``: (alpha, R = Y - (K + jitter I) alpha in float64, stats). ``high``: the caller's
    float64 ``KernelOperator`` of X (as ``solve.fit_interpolant`` builds it), reused when it found a grid.
    ``device`` / ``device_memory_budget``: where the slabs are factored (``DiskPanels.factor``: None is
    host RAM, else a torch device, disk -> host -> device); the solves and refinement stream the factor
    on the host (O(n^2) per pass, bound by the disk)."""
    X64 = np.asarray(X, dtype=np.float64)
    X64 = X64 - X64.mean(axis=0)                     # the kernels are translation-invariant (as solve.py)
    source = {"kind": "data", "sha256": hashlib.sha256(np.ascontiguousarray(X).view(np.uint8).data).hexdigest(),
              "shape": list(np.shape(X)), "kernel": kernel, "bandwidth": float(bandwidth), "jitter": float(jitter)}
    if high is None:   # uncentered: finds a grid
        high = KernelOperator(np.asarray(X, dtype=np.float64), kernel, bandwidth, np.float64)
    if high.grid is None:   # off a grid the float64 expansion loses digits to |x|^2 far from the origin
        high = KernelOperator(X64, kernel, bandwidth, np.float64, grid=None)
    # a stage's tiles in its own dtype (a float64 fallback stage must not inherit float32 rounding)
    tile_for = lambda dt: _data_tile(np.ascontiguousarray(X64, dtype=dt), kernel, float(bandwidth), dt)  # noqa: E731
    return _run(scratch_dir, X64.shape[0], source, tile_for,
                high.symmetric_matmul, Y, dtype=dtype, jitter=jitter, resume=resume, max_refine=max_refine,
                refine_tol=refine_tol, keep_store=keep_store, block=block, memory_budget=memory_budget, flag=flag,
                residual_from="kernel tiles recomputed from the data in float64", fallback_float64=fallback_float64,
                with_residual=with_residual, device=device, device_memory_budget=device_memory_budget)


def solve_gram_file_on_disk(path, Y, *, scratch_dir, memory_budget: int, dtype=np.float32, jitter: float = 0.0,
                            resume: bool = False, max_refine: int = MAX_REFINE, refine_tol: float | None = None,
                            keep_store: bool = False, block: int | None = None, flag: str = "--scratch-dir",
                            rows: int = 1024, fallback_float64: bool = False, with_residual: bool = False,
                            device=None, device_memory_budget: int | None = None):
    """As ``solve_on_disk`` for a user's square .npy Gram file (its lower triangle is the matrix; the
    file is read tile by tile, never whole; its checksum in the manifest refuses a resume on a changed
    file). Residuals stream the file's lower triangle in float64, ``rows`` rows at a time."""
    n, _, tile, source = gram_file_source(path)
    source = {**source, "jitter": float(jitter)}

    def apply_high(V):
        V = np.asarray(V, dtype=np.float64)
        out = np.zeros((n, V.shape[1]))
        for r0 in range(0, n, rows):
            r1 = min(r0 + rows, n)
            T = tile(slice(r0, r1), slice(0, r1)).astype(np.float64)
            T[:, r0:r1] = np.tril(T[:, r0:r1])       # the lower triangle only, as the factor sees it
            diag = np.diagonal(T[:, r0:r1]).copy()
            out[r0:r1] += T @ V[:r1]
            out[:r1] += T.T @ V[r0:r1]
            out[r0:r1] -= diag[:, None] * V[r0:r1]
        return out

    return _run(scratch_dir, n, source, lambda dt: tile, apply_high, Y, dtype=dtype, jitter=jitter, resume=resume,
                max_refine=max_refine, refine_tol=refine_tol, keep_store=keep_store, block=block,
                memory_budget=memory_budget, flag=flag, residual_from=f"the Gram file {Path(path)} in float64",
                fallback_float64=fallback_float64, with_residual=with_residual, device=device,
                device_memory_budget=device_memory_budget)


def _run(scratch_dir, n, source, tile_for, apply_high, Y, *, dtype, jitter, resume, max_refine, refine_tol, keep_store,
         block, memory_budget, flag, residual_from, fallback_float64=False, with_residual=False, device=None,
         device_memory_budget=None):
    Y = np.asarray(Y, dtype=np.float64)
    squeeze = Y.ndim == 1
    Y2 = Y[:, None] if squeeze else Y
    timings = {}
    kw = dict(jitter=jitter, resume=resume, max_refine=max_refine, refine_tol=refine_tol, block=block,
              memory_budget=memory_budget, flag=flag, device=device, device_memory_budget=device_memory_budget)
    try:
        store, alpha, R, report, resumed = _attempt(scratch_dir, n, source, tile_for(dtype), apply_high, Y2, dtype,
                                                          timings, **kw)
    except NotPositiveDefiniteError as e:
        if not (fallback_float64 and np.dtype(dtype) != np.float64):
            raise
        store, reason = None, f"{np.dtype(dtype).name} factor broke down (leading minor of order {e.minor})"
    else:
        reason = None if (report.backward_stable or report.tol_reached or np.dtype(dtype) == np.float64) else (
            f"{np.dtype(dtype).name} refinement stopped at backward error {report.backward_error:.2e} "
            f"({report.stop_reason})")
    fallback, skipped = None, None
    if reason is not None and fallback_float64:
        # a second stage (float64) of the same store; the float32 stage stays on disk until the end
        first = None if store is None else report.to_dict()
        if store is not None:
            store.close()
        try:
            # its own panel width: 8-byte numbers in the same RAM budget need narrower panels
            store64, alpha, R, report, resumed = _attempt(
                scratch_dir, n, source, tile_for(np.float64), apply_high, Y2, np.float64, timings,
                **{**kw, "resume": True, "max_refine": 2, "block": None})
        except (InputError, MemoryPlanError) as e:   # no room for a float64 stage: keep the float32 answer, say so
            if store is None:
                raise InputError(f"{reason}, and a float64 re-factorization on disk cannot run: {e}") from None
            skipped = f"{reason}; a float64 re-factorization on disk could not run: {e}"
        else:
            fallback = {"reason": reason + "; re-factored in float64 (a second stage of the same disk store)",
                        "refinement_float32": first, "float32_stage": None if store is None else store.stats.to_dict()}
            store = store64
    elif reason is not None:
        skipped = f"{reason}; no float64 re-factorization asked for"
    st = store.stats.to_dict()
    stats = {"strategy": "disk", "scratch_dir": os.fspath(scratch_dir), "memory_budget_bytes": int(memory_budget),
             "disk_bytes": disk_bytes(n, store.block, store.dtype, memory_budget), "block_size": store.block,
             "factor_dtype": store.dtype.name, "slabs": st["slabs"], "bytes_read": st["bytes_read"],
             "bytes_written": st["bytes_written"], "io_wait_s": st["io_wait_s"], "io": st["io"],
             "disk_timings_s": st["timings_s"],
             "factor_device": factor_device(store),
             "timings_s": timings, "resumed": resumed if resume else None, "residual_source": residual_from,
             "refinement": {**report.to_dict(), "factor_dtype": store.dtype.name,
                            "fallback": None if fallback is None else fallback["reason"],
                            **({k: fallback[k] for k in ("refinement_float32", "float32_stage")} if fallback else {}),
                            **({"fallback_skipped": skipped} if skipped else {})},
             "store_kept": bool(keep_store)}
    if keep_store:
        store.close()
    else:
        store.remove()
    alpha = alpha[:, 0] if squeeze else alpha
    if with_residual:
        return alpha, (R[:, 0] if squeeze else R), stats
    return alpha, stats


def _attempt(scratch_dir, n, source, tile, apply_high, Y2, dtype, timings, *, jitter, resume, max_refine, refine_tol,
             block, memory_budget, flag, device=None, device_memory_budget=None):
    """Open (or continue) the ``dtype`` stage of the store, fill, factor, solve with refinement."""
    t = time.perf_counter()
    store = DiskPanels.open(scratch_dir, n, source=source, budget_bytes=memory_budget, block=block, dtype=dtype,
                            resume=resume, flag=flag)
    resumed = {"filled_panels": store.filled, "finished_panels": store.finished}
    try:
        store.fill(tile, jitter=jitter)
        timings["gram"] = timings.get("gram", 0.0) + time.perf_counter() - t
        t = time.perf_counter()
        if not store.complete:
            store.factor(memory_budget, jitter=jitter, device=device, device_memory_budget=device_memory_budget)
        timings["factor"] = timings.get("factor", 0.0) + time.perf_counter() - t
        t = time.perf_counter()
        alpha, R, report = solve_refined_on_disk(store, apply_high, Y2, jitter=jitter, max_refine=max_refine,
                                                 tol=refine_tol)
        timings["solve"] = timings.get("solve", 0.0) + time.perf_counter() - t
    except BaseException:
        store.close()              # the store stays: resume=True continues it
        raise
    return store, alpha, R, report, resumed


def factor_device(store: DiskPanels) -> dict:
    """Which device factored the store's stage, and its bytes up / down (``slabs.left_looking``'s
    record); a stage already complete when the run opened it was factored by an earlier run."""
    return dict(store.stats.device or {"device": None, "note": "factored by an earlier run (resumed a complete store)"})


def solve_refined_on_disk(store: DiskPanels, apply_high: Callable, Y, *, jitter: float = 0.0, max_refine: int = MAX_REFINE,
                          tol: float | None = None):
    """Solve (K + jitter I) X = Y through the factor on disk (K + jitter I, any dtype), refined with
    float64 residuals ``Y - K X - jitter X`` where ``apply_high(V)`` = K V in float64 is the caller's
    (the data's kernel, or a stream of the user's Gram file). Returns (X, R, RefinementReport)."""
    from .linalg.refine import check_refine_tol, low_precision_solver, refine, with_row_sums

    Y = np.asarray(Y, dtype=np.float64)
    apply, k_inf = with_row_sums(apply_high, float(jitter))
    return refine(low_precision_solver(disk_cho_solve, store), apply, Y, k_inf, max_iter=int(max_refine),
                  tol=check_refine_tol(tol, Y.shape[0]))


def npy_gram_source(path) -> tuple[int, np.dtype, TileFn, dict]:
    """(n, dtype, tile, source) for a square .npy Gram file, read tile by tile, never whole, with one
    ``pread`` per tile row (a row's column range is contiguous in a C-order file). Not a memmap: the
    pages a memmap touches (with the kernel's fault-around, 64 KiB per row) count as resident memory,
    140 MB over a 17 MB budget at n = 6,000. Only the lower triangle is read. ``source`` holds the
    file's checksum (``storage.FILE_DIGEST``) for the manifest (a resume refuses a changed file)."""
    path = Path(path)
    try:
        A = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"Gram file {path} is not a readable .npy array ({e}). Fix: save it with numpy.save.") from None
    if A.ndim != 2 or A.shape[0] != A.shape[1] or A.dtype.kind != "f" or not A.flags.c_contiguous:
        raise DataError(f"Gram file {path} holds a {A.dtype} array of shape {A.shape}"
                        f"{'' if A.flags.c_contiguous else ' in Fortran order'}; expected a square 2-D float matrix "
                        f"(n x n, C order, as numpy.save writes it).")
    n, dt, offset = A.shape[0], A.dtype, A.offset
    del A
    item = dt.itemsize

    def tile(rows: slice, cols: slice) -> np.ndarray:
        r0, r1, _ = rows.indices(n)
        c0, c1, _ = cols.indices(n)
        out = np.empty((r1 - r0, c1 - c0), dtype=dt)
        fd = os.open(path, os.O_RDONLY)
        try:
            for i in range(r0, r1):
                pread_into(fd, memoryview(out[i - r0]).cast("B"), offset + (i * n + c0) * item)
        finally:
            os.close(fd)
        return out

    return n, dt, tile, {"kind": "npy", "path": str(path.resolve()), FILE_DIGEST: file_digest(path)}


def check_gram_file_source(source, what: str, client=None) -> None:
    """What the disk path can read tile by tile (``gram_file_source``), judged from the spec alone: a
    file, not an in-memory array or an .npz member, and no dask cluster (the CLI refuses with the same
    words before any work)."""
    if client is not None:
        raise InputError("out-of-core 'disk' runs in this process; it does not combine with a dask cluster "
                         "(--scheduler). Drop one of them.")
    if not isinstance(source, (str, os.PathLike)):
        raise InputError(f"out-of-core 'disk' reads Gram files (.npy, HDF5 F.h5:/G, zarr S.zarr:/G) tile by tile; "
                         f"{what} is an in-memory {type(source).__name__}. Fix: save it with numpy.save and pass the "
                         f"file, or solve in RAM.")
    if parse_spec(source).path.suffix.lower() == ".npz":
        raise InputError(f"out-of-core 'disk' reads .npy, HDF5 and zarr Gram files tile by tile; {what} is an .npz "
                         f"member, which cannot be read without inflating it whole. Fix: save the Gram with numpy.save.")


def gram_file_source(spec) -> tuple[int, np.dtype, TileFn, dict]:
    """(n, dtype, tile, source) for a user's square Gram file: a .npy file (``npy_gram_source``), or an
    HDF5 dataset / zarr array (``F.h5:/G``, ``S.zarr:/G``) read through ``data.arrays.open_array`` one
    tile slice at a time, never whole. ``source`` holds a digest of the file (every file of a zarr
    store) for the manifest, so a resume refuses a changed Gram."""
    s = parse_spec(spec)
    if s.path.suffix.lower() == ".npy":
        return npy_gram_source(s.path)
    A = open_array(s, what="Gram file")
    if len(A.shape) != 2 or A.shape[0] != A.shape[1] or np.dtype(A.dtype).kind != "f":
        raise DataError(f"Gram file {s.text} holds a {A.dtype} array of shape {tuple(A.shape)}; expected a square "
                        f"2-D float matrix (n x n).")
    n, dt = int(A.shape[0]), np.dtype(A.dtype)

    def tile(rows: slice, cols: slice) -> np.ndarray:
        return np.ascontiguousarray(A[rows, cols], dtype=dt)

    return n, dt, tile, {"kind": "array", "spec": s.text, "path": str(s.path.resolve()),
                         "sha256": sha256_file(s.path)}


def disk_stats(dstats: dict, disk) -> dict:
    """The record's fields of a disk solve (``disk_solve``'s stats without the refinement and timings,
    which have their own places), with the plan it ran by."""
    keep = ("scratch_dir", "memory_budget_bytes", "disk_bytes", "slabs", "bytes_read", "bytes_written", "io_wait_s",
            "io", "resumed", "store_kept", "disk_timings_s")
    return {**{k: dstats[k] for k in keep}, "disk_plan": disk.to_dict()}


def disk_factorization(dstats: dict) -> dict:
    """The record's ``factorization`` of a disk solve: the disk's left-looking slabs, on the device that ran them."""
    fd = dstats["factor_device"]
    return {"backend": "disk", "algorithm": "left-looking slabs", "device": fd["device"],
            **{k: v for k, v in fd.items() if k != "device"}}


def fit_on_disk(X64, Y, bandwidth, high: KernelOperator, plan, disk, options) -> Interpolant:
    """``solve.fit_interpolant`` when the plan says disk: the Gram and its factor in
    ``options.placement.scratch_dir`` (``options`` is the caller's validated SolveOptions)."""
    p, mixed = options.placement, options.mode == "mixed"
    alpha, R, dstats = solve_on_disk(
        X64, Y, kernel=options.kernel, bandwidth=bandwidth, scratch_dir=p.scratch_dir, memory_budget=disk.budget_bytes,
        dtype=np.dtype(disk.dtype), jitter=float(options.jitter), resume=p.resume,
        max_refine=int(options.max_refine) if mixed else 0, refine_tol=options.refine_tol if mixed else None,
        block=disk.block, fallback_float64=mixed and options.fallback_float64, with_residual=True, high=high,
        device=p.device, device_memory_budget=p.device_memory_budget)
    n, d = X64.shape
    timings = dstats["timings_s"]
    reason = ("out-of-core 'disk' asked for" if p.out_of_core == "disk" else
              f"the in-RAM plan does not fit ({format_gib(plan.total_bytes)} needed, {format_gib(plan.available_bytes)} "
              f"available) and the scratch directory has room")
    stats = {
        "n": n, "d": d, "k": Y.shape[1], "kernel": options.kernel, "bandwidth": bandwidth,
        "bandwidth_rule": bandwidth_rule(options.bandwidth).describe(), "mode": options.mode,
        "factor_dtype": dstats["factor_dtype"], "jitter": float(options.jitter), "block_size": dstats["block_size"],
        "strategy": "disk", "strategy_reason": reason, "residual_source": dstats["residual_source"],
        "distances": high.distances, "timings_s": timings,
        "factor_gflops": cholesky_flops(n) / max(timings.get("factor", 0.0), 1e-12) / 1e9, **residual_stats(R, Y),
        "refinement": dstats["refinement"], "factorization": disk_factorization(dstats),
        **disk_stats(dstats, disk), "memory_plan": plan.to_dict(), "peak_rss_bytes": peak_rss_bytes(),
    }
    warn_residual(stats, options.mode, float64_level_threshold(n), options.refine_tol)
    return Interpolant(X_fit=X64, alpha=alpha, Y=Y, kernel=options.kernel, bandwidth=bandwidth, mode=options.mode,
                       train_scores=Y - R - float(options.jitter) * alpha, stats=stats, operator=high)
