"""The solving API: K alpha = Y by the tiled Cholesky for points (``fit_interpolant``, on dask
``fit_distributed``), a precomputed Gram (``fit_precomputed``) or a feature Gram (``fit_feature_gram``).
Records of experiments built on these are ``kernelfit.experiment``'s.

Modes
-----
float64  Gram and factor in float64 (n^2/2 x 8 bytes).
float32  Gram and factor in float32 (n^2/2 x 4 bytes); the answer has float32 accuracy.
mixed    float64 accuracy by the fastest exact strategy that fits in memory (``kernelfit.planning``):
         a stored float64 Gram with a float32 factor and refinement; or, where that does not fit,
         a float32 Gram and factor refined with float64 residuals computed tile by tile from the
         data (no float64 Gram stored: float64 accuracy at float32 memory); or float64 throughout
         at small n. The record's ``strategy`` says which ran and why.

In every mode the reported training residual is computed in float64 from a K the factor did not
produce (the stored float64 Gram, or kernel tiles recomputed from the data), so the number is an
independent check of the solve, not the solver's own estimate; ``residual_source`` says which.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np

from .catalog import DEFAULT_BANDWIDTH, FEATURE_KINDS, GRAM_MODES, KERNELS, MAX_REFINE, MODES
from .disk_solve import check_gram_file_source, disk_stats, fit_on_disk
from .errors import InputError, MemoryPlanError
from .gram import (
    GridProducts,
    KernelOperator,
    build_gram_panels,
    gram_tiles,
    kernel_from_gram_inplace,
    linear_from_gram_inplace,
    sampled_sqd_from_gram,
)
from .interpolant import Interpolant, PrecomputedInterpolant
from .kernels import (
    check_kernel_informative,
    check_kernel_on_data,
    median_bandwidth,
    median_of_pairs,
)
from .linalg.mixed import solve_refined
from .linalg.options import FactorOptions
from .linalg.panels import SymmetricPanels, cholesky_flops
from .linalg.refine import check_refine_tol, float64_level_threshold
from .planning import (
    FACTOR_DTYPE,
    GRID_PRODUCTS,
    STORED,
    available_bytes,
    choose_disk,
    factor_dtype_name,
    plan_solve,
    require_fits,
)
from .results import format_gib, peak_rss_bytes, residual_stats, warn_residual
from .validate import bandwidth_rule, check_bandwidth_spec, check_choice, check_features, check_int, check_jitter, check_targets


@dataclass(frozen=True)
class SolveOptions:
    """What changes the result (kernel, bandwidth, mode, jitter, refinement), with where the factor
    runs kept apart in ``placement`` (``linalg.options.FactorOptions``: backend, device, out-of-core,
    memory budget, TF32, block size, checkpoints, progress), falkon-style."""

    kernel: str = "gaussian"            # "gaussian": exp(-|x-z|^2/(2 s^2)); "laplacian": exp(-|x-z|/s)
    bandwidth: float | str = "median"   # sigma > 0, "median" (median pairwise distance of a sample) or "F*median"
    mode: str = "mixed"                 # "float64" | "float32" | "mixed"
    strategy: str = "auto"              # mixed: "auto" (fastest that fits) or a name in kernelfit/planning.py
    jitter: float = 0.0                 # ridge added to the diagonal; 0 = exact interpolation
    max_refine: int = MAX_REFINE        # mixed mode: at most this many refinement steps
    refine_tol: float | None = None     # mixed mode: stop at this relative residual (None: at float64 level);
                                        # reaching it is accepted as is (no float64 re-factorization)
    fallback_float64: bool = True       # mixed: re-factor in float64 if refinement cannot reach float64
                                        # level (ill-conditioned K) and the float64 Gram fits in memory
    force_memory: bool = False          # skip the memory refusal
    placement: FactorOptions = FactorOptions()

    @classmethod
    def for_features(cls, kind: str, **fields) -> "SolveOptions":
        """Options for a kernel on the feature map ``kind`` (``catalog.FEATURE_KINDS``): its measured
        default bandwidth rule ``catalog.DEFAULT_BANDWIDTH[kind]`` unless ``bandwidth`` is given."""
        check_choice(kind, FEATURE_KINDS, "feature kind")
        return cls(**{"bandwidth": DEFAULT_BANDWIDTH[kind], **fields})

    def validated(self) -> "SolveOptions":
        check_choice(self.kernel, KERNELS, "kernel")
        check_choice(self.mode, MODES, "mode")
        check_bandwidth_spec(self.bandwidth)
        check_jitter(self.jitter)
        check_int(self.max_refine, "max_refine", minimum=0)
        if not isinstance(self.placement, FactorOptions):
            raise InputError(f"placement: expected a kernelfit.linalg.options.FactorOptions; found "
                             f"{type(self.placement).__name__}. Pass placement=FactorOptions(device=..., block_size=...).")
        return self

    def to_record(self) -> dict:
        """The options as a record (flat, as before: mathematics and placement side by side)."""
        out = {k: v for k, v in asdict(self).items() if k != "placement"}
        out.update({k: v for k, v in asdict(self.placement).items() if k != "progress"})
        return out


def one_hot(y, num_classes) -> np.ndarray:
    Y = np.zeros((len(y), num_classes), dtype=np.float64)
    Y[np.arange(len(y)), y] = 1.0
    return Y


def _dask_factor_info(client, n: int, block: int) -> dict:
    return {"backend": "dask.distributed", "scheduler": str(client.scheduler.address),
            "workers": len(client.scheduler_info()["workers"]), "n": n, "block": block}


def resolve_bandwidth(X, bandwidth) -> float:
    """sigma for ``bandwidth`` (a number, 'median' or 'F*median'; ``kernelfit.validate.bandwidth_rule``) on X."""
    rule = bandwidth_rule(bandwidth)
    return rule.resolve(median_bandwidth(X) if rule.is_median else None)


def fit_interpolant(X, Y, options: SolveOptions = SolveOptions(), n_test: int = 0) -> Interpolant:
    """Solve K alpha = Y exactly (up to ``options.jitter``) for the kernel matrix of X."""
    options = options.validated()
    X = check_features(X)
    n, d = X.shape
    Y = check_targets(Y, n)
    check_refine_tol(options.refine_tol, n)
    bandwidth = resolve_bandwidth(X, options.bandwidth)
    check_kernel_on_data(X, options.kernel, bandwidth, "the training points")   # O(n d): before the Gram
    X64 = np.ascontiguousarray(X, dtype=np.float64)
    high = KernelOperator(X64, options.kernel, bandwidth, np.float64)   # finds an integer grid, if any
    plan = plan_solve(n, d, Y.shape[1], options.mode, n_test=n_test, block=options.placement.block_size,
                      strategy=options.strategy, grid_products=not options.placement.on_cuda and GridProducts.applies(high.grid))
    disk = choose_disk(plan, options.placement)   # None: in RAM; refused before work when neither fits
    if disk is not None:
        return fit_on_disk(X64, Y, bandwidth, high, plan, disk, options)
    if not options.force_memory:
        require_fits(plan)
    timings = {}
    fdt = np.dtype(plan.factor_dtype)
    alpha, train_scores, refinement, factor_info = _factor_and_solve(X64, Y, plan.strategy, bandwidth, plan.block,
                                                                    high, options, timings)
    residual_source = plan.residual_source
    if refinement.get("fallback"):
        fdt = np.float64
        residual_source = ("Y - K alpha with the kernel tiles recomputed from the data in float64 "
                           "(the float64 re-factorization overwrote the Gram)")
    R = Y - train_scores - options.jitter * alpha  # residual of the system solved, (K + jitter I) alpha = Y
    stats = {
        "n": n, "d": d, "k": Y.shape[1], "kernel": options.kernel, "bandwidth": bandwidth,
        "bandwidth_rule": bandwidth_rule(options.bandwidth).describe(),
        "mode": options.mode, "factor_dtype": np.dtype(fdt).name, "jitter": float(options.jitter),
        "block_size": plan.block, "strategy": plan.strategy, "strategy_reason": plan.strategy_reason,
        "residual_source": residual_source, "distances": high.distances, "timings_s": timings,
        "factor_gflops": cholesky_flops(n) / max(timings["factor"], 1e-12) / 1e9,
        **residual_stats(R, Y),
        "refinement": refinement, "factorization": factor_info, "memory_plan": plan.to_dict(),
        "peak_rss_bytes": peak_rss_bytes(),
    }
    warn_residual(stats, options.mode, float64_level_threshold(int(stats["n"])), options.refine_tol)
    return Interpolant(X_fit=X64, alpha=alpha, Y=Y, kernel=options.kernel, bandwidth=bandwidth, mode=options.mode,
                       train_scores=train_scores, stats=stats, operator=high)


def _build_gram(X64, fdt, bandwidth, block, options: SolveOptions, grid=None) -> SymmetricPanels:
    if grid is not None and np.dtype(fdt) == np.float64 and not options.placement.on_cuda:   # exact distances, sgemm rate
        return build_gram_panels(X64, options.kernel, bandwidth, block, fdt, options.placement.progress, grid=grid)
    # Both kernels depend on x - z only, so the Gram is built from centered points: the GEMM expansion
    # |x|^2 + |z|^2 - 2 x.z then cancels far less (float32 loses all digits for data far from 0).
    Xc = (X64 - X64.mean(axis=0)).astype(fdt)
    if options.placement.on_cuda:
        # tiles computed on the GPU (TF32 off) and written back to host panels one at a time
        from .gram_device import build_gram_panels_device

        G = build_gram_panels_device(Xc, options.kernel, bandwidth, block, fdt, device=options.placement.device)
    else:
        G = build_gram_panels(Xc, options.kernel, bandwidth, block, fdt, options.placement.progress)
    return G


def factor_panels(G: SymmetricPanels, options: SolveOptions) -> dict:
    """Factor G in place where the options say (CPU, GPU in-core or out-of-core, checkpointed)."""
    from .linalg.factor import factor

    bar = None
    if options.placement.progress:
        from .progress import progress_bar

        bar = progress_bar(total=cholesky_flops(G.n), desc="cholesky", unit="flop")
    try:
        info = factor(G, options.placement, progress=bar, jitter=options.jitter)
        return info.to_dict()
    finally:
        if bar is not None:
            bar.close()


def _factor_and_solve(X64, Y, strategy, bandwidth, block, high: KernelOperator, options: SolveOptions, timings):
    """Gram, factor, solve (``linalg.mixed.solve_refined``) by the plan's ``strategy``. Always ends
    with K alpha computed in float64 from a K the factor did not produce (the stored float64 Gram, or
    tiles recomputed from the data): the last residual pass gives the reported residual and the
    training predictions. Mixed mode refines with float64 residuals and, when that cannot reach
    float64 level, re-factors in float64 if the memory plan allows (and says so).
    Returns (alpha, K alpha, refinement report, factor info)."""
    n = Y.shape[0]
    fdt = np.dtype(factor_dtype_name(strategy))
    mixed = options.mode == "mixed"   # refined (a float64 factor usually stops after its first residual)
    from .gram_device import ResidentOptions, resident_device, solve_resident

    device = resident_device(options.placement, n, X64.shape[1], Y.shape[1], block, fdt)
    if device is not None:   # the Gram fits on the device: the whole solve stays there
        p = options.placement
        sol = solve_resident(X64, Y, ResidentOptions(kernel=options.kernel, bandwidth=bandwidth, dtype=fdt,
                                                     jitter=float(options.jitter),
                                                     max_refine=int(options.max_refine) if mixed else 0,
                                                     tol=options.refine_tol if mixed else None,
                                                     fallback_float64=mixed and options.fallback_float64),
                             FactorOptions(device=device, block_size=block, tf32=bool(p.tf32),
                                           device_memory_budget=p.device_memory_budget))
        timings.update({k: v for k, v in sol.timings_s.items() if k != "total"})
        info = {**sol.factors[-1], "pipeline": "resident", "device_timings_s": sol.device_timings_s,
                "resident_memory": sol.memory}
        return sol.alpha, Y - sol.residual - float(options.jitter) * sol.alpha, sol.report, info

    def fallback_check():
        if strategy == STORED:   # the stored float64 Gram is factored in place: no new memory
            return None
        # with stored grid products still held, a float64 factor needs about what the stored-Gram plan needs
        plan64 = (plan_solve(n, X64.shape[1], Y.shape[1], "mixed", block=block, strategy=STORED)
                  if strategy == GRID_PRODUCTS else plan_solve(n, X64.shape[1], Y.shape[1], "float64", block=block))
        if plan64.fits or options.force_memory:
            return None
        return MemoryPlanError(f"a float64 re-factorization would not fit in memory ({plan64.summary()})",
                               plan=plan64)

    build_gram = lambda dt: _build_gram(X64, dt, bandwidth, block, options, high.grid)  # noqa: E731
    apply_high = lambda V: high.symmetric_matmul(V, progress=options.placement.progress)  # noqa: E731
    if strategy == GRID_PRODUCTS:   # the exact dot products once; the Gram and every residual from them
        t = time.perf_counter()
        products = GridProducts(high.grid, options.kernel, bandwidth, block, progress=options.placement.progress)
        timings["grid_products"] = time.perf_counter() - t
        build_gram = products.gram
        apply_high = lambda V: products.symmetric_matmul(V, progress=options.placement.progress)  # noqa: E731
    X, R, report, factors = solve_refined(
        build_gram, lambda G: factor_panels(G, options), apply_high, Y, dtype=fdt,
        max_refine=int(options.max_refine) if mixed else 0,   # direct modes: one float64 residual pass
        tol=options.refine_tol if mixed else None, jitter=float(options.jitter),
        scale_diagonal=bool(options.placement.tf32), fallback=fallback_check if mixed and options.fallback_float64 else None,
        timings=timings, store_float64_gram=strategy == STORED)
    # training scores f(x_i) = (K alpha)_i, without the ridge term
    return X, Y - R - float(options.jitter) * X, report, factors[-1]


# --------------------------------------------------------------------------------------------
# the Gram of a feature map, already in panels (random-conv features: never materialized)
# --------------------------------------------------------------------------------------------

def fit_feature_gram(gram, Y, options: SolveOptions = SolveOptions(), *, linear: bool = False,
                     seed: int = 0) -> tuple[PrecomputedInterpolant, np.ndarray | None]:
    """Solve (K + jitter I) alpha = Y where K is the kernel of a feature map whose Gram is given.

    ``gram`` (e.g. ``features.randconv.GramBlocks``): ``train`` the float64 ``SymmetricPanels`` of
    g_ij = phi_i . phi_j, ``train_diag`` (n,), ``cross`` (m, n) test x train Gram or None, ``test_diag``
    (m,), ``n_features``. The bandwidth rule (``options.bandwidth``: sigma, 'median', 'F*median') is
    resolved on the median feature distance of a seeded sample (``seed``); the panels and the test
    block become kernel values in place (``options.kernel``; ``linear``: (phi.phi' + 1) / n_features);
    ``gram.cross`` is then dropped (kept as float32 for the test scores only). A copy of the panels in
    the mode's factor dtype is factored where ``options.placement`` says; mixed mode refines with
    float64 products of the kernel panels and, if it cannot reach float64 level, re-factors in float64
    when that copy fits in memory. Memory: n^2/2 x 12 bytes + m x n x 4 in mixed mode.
    Returns (the interpolant of the kernel panels: alpha, K alpha in float64, sigma, stats with the
    sampled ``median_distance``; the test scores k(test, train) alpha, or None without a test block)."""
    options = options.validated()
    P64, d = gram.train, np.asarray(gram.train_diag, dtype=np.float64)
    if not isinstance(P64, SymmetricPanels) or P64.dtype != np.float64:
        raise InputError(f"fit_feature_gram: expected the train Gram as float64 SymmetricPanels; found "
                         f"{type(P64).__name__}. Accumulate the Gram with panels=True.")
    Y = check_targets(Y, P64.n)
    rule = bandwidth_rule(options.bandwidth)
    sqd = sampled_sqd_from_gram(P64, d, seed=seed)
    median = median_of_pairs(sqd)
    sigma = None if linear else rule.resolve(median)
    if not linear:   # K = I or all ones: refused before the Gram is overwritten
        check_kernel_informative(sqd, options.kernel, sigma, "the features")
    del sqd

    def finish(A, row_sq, col_sq):   # feature Gram -> kernel values, in place
        if linear:
            linear_from_gram_inplace(A, gram.n_features)
        else:
            kernel_from_gram_inplace(A, row_sq, col_sq, options.kernel, sigma)

    for s0, P in zip(P64.starts, P64.panels):
        finish(P, d[s0:], d[s0 : s0 + P.shape[1]])
    cross, gram.cross = gram.cross, None
    if cross is not None:   # test scores only: float32 halves the m x n block during the solve
        finish(cross, np.asarray(gram.test_diag, dtype=np.float64), d)
        cross = cross.astype(np.float32)
    mixed = options.mode == "mixed"

    def fallback():
        need, avail = P64.nbytes, available_bytes()
        return None if need < 0.9 * avail or options.force_memory else (
            f"a float64 copy of the Gram ({format_gib(need)}) would not fit in the {format_gib(avail)} available")

    timings = {}
    alpha, R, report, factors = solve_refined(
        lambda dt: P64.astype(dt), lambda G: factor_panels(G, options), P64.symmetric_matmul, Y,
        dtype=FACTOR_DTYPE[options.mode], max_refine=int(options.max_refine) if mixed else 0,
        tol=options.refine_tol if mixed else None, jitter=float(options.jitter),
        fallback=fallback if mixed and options.fallback_float64 else None, timings=timings)
    train_scores = Y - R - float(options.jitter) * alpha
    test_scores = None if cross is None else np.vstack(
        [cross[r : r + 2048].astype(np.float64) @ alpha for r in range(0, len(cross), 2048)])
    stats = {"n": P64.n, "k": Y.shape[1], "kernel": "linear (phi.phi' + 1) / n_features" if linear else options.kernel,
             "bandwidth": sigma, "bandwidth_rule": None if linear else rule.describe(), "median_distance": median,
             "mode": options.mode, "factor_dtype": report["factor_dtype"], "jitter": float(options.jitter),
             "block_size": P64.block, "solver": "kernelfit.solve.fit_feature_gram (tiled Cholesky + float64 refinement, panels)",
             "factorization": factors[-1], "refinement": report, "timings_s": timings, **residual_stats(R, Y),
             "peak_rss_bytes": peak_rss_bytes()}
    warn_residual(stats, options.mode, float64_level_threshold(int(stats["n"])), options.refine_tol)
    model = PrecomputedInterpolant(X_fit=None, alpha=alpha, Y=Y, kernel=stats["kernel"], mode=options.mode,
                                   bandwidth=float("nan") if linear else sigma, train_scores=train_scores, stats=stats)
    return model, test_scores


# --------------------------------------------------------------------------------------------
# distinct points, precomputed Grams, distributed solves
# --------------------------------------------------------------------------------------------

def check_distinct(X, jitter: float = 0.0, what: str = "X_train") -> None:
    """Exact interpolation (jitter 0) needs distinct points: two equal rows make K singular.

    Found by hashing the rows (one pass, ``data.rows.find_duplicate_rows``) before the Gram is built,
    instead of by the factorization after the O(n^3) work (or never, when the labels agree).
    """
    if jitter:
        return
    from .data.rows import find_duplicate_rows

    dup = find_duplicate_rows(X)
    if dup is not None:
        raise InputError(
            f"{what} rows {dup.first} and {dup.second} are equal ({dup.count} row(s) repeat an earlier one); "
            f"exact interpolation (jitter 0) needs distinct points because duplicate rows make the kernel "
            f"matrix singular. Fix: remove the duplicates (e.g. np.unique(X, axis=0, return_index=True)), or "
            f"add a tiny ridge, e.g. --jitter 1e-8 (jitter=1e-8), which no longer interpolates exactly.")


def check_gram_mode(mode: str) -> str:
    if mode not in GRAM_MODES:
        why = (" Mixed precision refines with float64 products of the kernel function rebuilt from the "
               "data; a precomputed Gram has no kernel function to rebuild from. Use --mode float64 (exact) or "
               "float32 (half the memory), or give the data (--x-train / --data) with a kernel for 'mixed'."
               if mode == "mixed" else "")
        raise InputError(f"mode {mode!r} is not available for a precomputed Gram; expected one of "
                         f"{', '.join(GRAM_MODES)}.{why}")
    return mode


def fit_precomputed(G, Y, options: SolveOptions = SolveOptions(mode="float64"), n_test: int = 0,
                    client=None, what: str = "--gram") -> PrecomputedInterpolant:
    """Solve G alpha = Y for a precomputed training Gram (``G.npy``, ``G.h5:/dset``, ``G.zarr:/arr`` or array).

    The lower triangle is read tile by tile into panel storage of the mode's dtype (float64 or
    float32; never a second n x n copy), factored where ``options`` say, and solved; the reported
    residual and the training scores are G @ alpha recomputed in float64 from the source, streamed.
    Every check of ``data.gram.check_gram`` runs first (``what`` names G in its errors). With ``client``
    (a dask Client) the tiles are read and factored on the workers (the source must be a path the
    workers can open).
    """
    from .data.gram import (
        check_gram,
        check_square,
        gram_matmul,
        gram_source_info,
        gram_tiles_from_source,
        open_gram,
        read_gram_panels,
    )

    mode = check_gram_mode(options.mode)
    jitter = check_jitter(options.jitter)
    source = G
    G = open_gram(G, what=what)
    n = check_square(G, what)
    Y = check_targets(Y, n)
    plan = plan_solve(n, 0, Y.shape[1], mode, n_test=n_test, block=options.placement.block_size)
    fdt = FACTOR_DTYPE[mode]
    disk = choose_disk(plan, options.placement, factor_dtype=fdt)   # refused from the header alone
    if disk is not None:
        check_gram_file_source(source, what, client)
    elif not options.force_memory:   # refused from the header alone, before any pass over the matrix
        require_fits(plan)
    checks = check_gram(G, what=what, jitter=jitter)
    timings = {}
    disk_fields = {}
    if disk is not None:
        from .disk_solve import disk_factorization, solve_gram_file_on_disk

        p = options.placement
        alpha, R, dstats = solve_gram_file_on_disk(
            source, Y, scratch_dir=p.scratch_dir, memory_budget=disk.budget_bytes, dtype=fdt, jitter=jitter,
            resume=p.resume, max_refine=MAX_REFINE if mode == "float64" else 0, block=disk.block, with_residual=True,
            device=p.device, device_memory_budget=p.device_memory_budget)
        timings, refinement = dstats["timings_s"], dstats["refinement"]
        factor_info = disk_factorization(dstats)
        disk_fields = {"strategy": "disk", "residual_source": dstats["residual_source"], **disk_stats(dstats, disk)}
        plan.block = dstats["block_size"]
    elif client is None:
        alpha, R, refinement, factors = solve_refined(
            lambda dt: read_gram_panels(G, dt, plan.block), lambda P: factor_panels(P, options),
            lambda V: gram_matmul(G, V), Y, dtype=fdt, max_refine=0, jitter=jitter, timings=timings)
        factor_info = factors[-1]
        # a precomputed Gram may have negative entries: the row sums used for ||K||_inf are only an estimate
        refinement["backward_error_note"] = "||G||_inf estimated by the row sums of G"
    else:
        from .linalg import distributed as kd

        t = time.perf_counter()
        L = kd.cholesky(gram_tiles_from_source(source, dtype=fdt, block=plan.block, jitter=jitter,
                                               client=client))
        alpha = kd.cho_solve(L, Y).astype(np.float64)
        timings["factor"] = time.perf_counter() - t
        t = time.perf_counter()
        R = Y - gram_matmul(G, alpha) - jitter * alpha
        timings["solve"] = time.perf_counter() - t
        refinement = {"iterations": 0, "factor_dtype": np.dtype(fdt).name, "fallback": None}
        factor_info = _dask_factor_info(client, n, plan.block)
    train_scores = Y - R - jitter * alpha
    stats = {
        "n": n, "d": None, "k": Y.shape[1], "kernel": "precomputed", "bandwidth": None, "bandwidth_rule": None,
        "mode": mode, "factor_dtype": np.dtype(fdt).name, "jitter": jitter, "block_size": plan.block,
        "timings_s": timings, "factor_gflops": cholesky_flops(n) / max(timings.get("factor", 0.0), 1e-12) / 1e9,
        **residual_stats(R, Y),
        "refinement": refinement, "factorization": factor_info, **disk_fields, "memory_plan": plan.to_dict(),
        "gram": {**gram_source_info(source, G), "checks": checks}, "peak_rss_bytes": peak_rss_bytes(),
    }
    warn_residual(stats, mode, float64_level_threshold(int(stats["n"])))
    return PrecomputedInterpolant(X_fit=None, alpha=alpha, Y=Y, kernel="precomputed", bandwidth=float("nan"),
                                  mode=mode, train_scores=train_scores, stats=stats)


def fit_distributed(X, Y, options: SolveOptions = SolveOptions(), client=None) -> Interpolant:
    """``fit_interpolant`` on dask.distributed: the Gram tiles are built and factored on the workers.

    float64 / float32 modes solve through the distributed factor directly; "mixed" refines with
    float64 residuals computed on the driver from the data (``KernelOperator``), exactly as the
    single-process path does. Only alpha and the residual come back to the driver.
    """
    from .linalg import distributed as kd
    from .linalg.refine import low_precision_solver, refine, with_row_sums

    options = options.validated()
    X = check_features(X)
    n, d = X.shape
    Y = check_targets(Y, n)
    plan = plan_solve(n, d, Y.shape[1], options.mode, block=options.placement.block_size)
    bandwidth = resolve_bandwidth(X, options.bandwidth)
    check_kernel_on_data(X, options.kernel, bandwidth, "the training points")
    fdt = FACTOR_DTYPE[options.mode]
    X64 = np.ascontiguousarray(X, dtype=np.float64)
    jitter = float(options.jitter)
    timings = {}
    t = time.perf_counter()
    L = kd.cholesky(gram_tiles(X64, options.kernel, bandwidth, block=plan.block, dtype=fdt, client=client,
                               jitter=jitter))
    high = KernelOperator(X64, options.kernel, bandwidth, np.float64)
    apply, k_inf = with_row_sums(lambda V: high.symmetric_matmul(V), jitter)

    solve_low = low_precision_solver(kd.cho_solve, L)   # L.dtype is the factor's (fdt)
    max_iter = int(options.max_refine) if options.mode == "mixed" else 0
    alpha, R, report = refine(solve_low, apply, Y, k_inf, max_iter=max_iter, tol=options.refine_tol)
    timings["factor_and_solve"] = time.perf_counter() - t
    train_scores = Y - R - jitter * alpha
    stats = {
        "n": n, "d": d, "k": Y.shape[1], "kernel": options.kernel, "bandwidth": bandwidth,
        "bandwidth_rule": bandwidth_rule(options.bandwidth).describe(),
        "mode": options.mode, "factor_dtype": np.dtype(fdt).name, "jitter": jitter, "block_size": plan.block,
        "timings_s": timings, **residual_stats(R, Y),
        "refinement": {**report.to_dict(), "factor_dtype": np.dtype(fdt).name, "fallback": None},
        "factorization": _dask_factor_info(client, n, plan.block),
        "memory_plan": plan.to_dict(), "peak_rss_bytes": peak_rss_bytes(),
    }
    warn_residual(stats, options.mode, float64_level_threshold(int(stats["n"])), options.refine_tol)
    return Interpolant(X_fit=X64, alpha=alpha, Y=Y, kernel=options.kernel, bandwidth=bandwidth, mode=options.mode,
                       train_scores=train_scores, stats=stats)

