"""Exact kernel interpolation: K alpha = Y, solved with the tiled Cholesky, and the result record.

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
import warnings
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from .errors import InputError, MemoryPlanError
from .gram import GridProducts, KernelOperator, argmax_exact_scores, build_gram_panels, gram_tiles
from .kernels import check_bandwidth, check_distance_scale, check_kernel, check_kernel_on_data, median_bandwidth
from .linalg.mixed import solve_refined
from .linalg.panels import SymmetricPanels, cholesky_flops
from .linalg.refine import check_refine_tol, float64_level_threshold
from .linalg.tiled import cho_solve
from .planning import FACTOR_DTYPE, GRID_PRODUCTS, MODES, STORED, factor_dtype_name, plan_solve, require_fits


@dataclass(frozen=True)
class SolveOptions:
    """What changes the result (kernel, bandwidth, mode, jitter, refinement) and how it runs."""

    kernel: str = "gaussian"            # "gaussian": exp(-|x-z|^2/(2 s^2)); "laplacian": exp(-|x-z|/s)
    bandwidth: float | str = "median"   # sigma > 0, or "median" (median pairwise distance of a sample)
    mode: str = "mixed"                 # "float64" | "float32" | "mixed"
    strategy: str = "auto"              # mixed: "auto" (fastest that fits) or a name in kernelfit/planning.py
    jitter: float = 0.0                 # ridge added to the diagonal; 0 = exact interpolation
    block_size: int | None = None       # panel width; None picks one from n
    max_refine: int = 10                # mixed mode: at most this many refinement steps
    refine_tol: float | None = None     # mixed mode: stop at this relative residual (None: at float64 level);
                                        # reaching it is accepted as is (no float64 re-factorization)
    fallback_float64: bool = True       # mixed: re-factor in float64 if refinement cannot reach float64
                                        # level (ill-conditioned K) and the float64 Gram fits in memory
    backend: str = "auto"               # "auto" | "numpy" | "torch" | "cupy" (see linalg/factor.py)
    device: str | None = None           # None = CPU; "cuda", "cuda:1", ... factors on that GPU
    out_of_core: bool | str = "auto"    # GPU: stream panels through the device when the Gram does not fit
    device_memory_budget: int | None = None  # bytes the factorization may use on the device (None: measured)
    tf32: bool = False                  # CUDA float32 factor GEMMs on TF32 tensor cores (refinement repairs it)
    checkpoint_dir: str | None = None   # save finished factor panels here; resume=True continues
    resume: bool = False
    progress: bool = False              # progress bars on stderr
    force_memory: bool = False          # skip the memory refusal

    def validated(self) -> "SolveOptions":
        check_kernel(self.kernel)
        if self.mode not in MODES:
            raise InputError(f"unknown mode {self.mode!r}; expected one of {', '.join(MODES)}.")
        if self.bandwidth != "median":
            check_bandwidth(self.bandwidth)
        jitter = float(self.jitter)
        if not np.isfinite(jitter) or jitter < 0:
            raise InputError(f"jitter must be a finite number >= 0; got {self.jitter!r}.")
        if int(self.max_refine) < 0:
            raise InputError(f"max_refine must be >= 0; got {self.max_refine!r}.")
        return self


def check_features(X, name="X") -> np.ndarray:
    X = np.asarray(X)
    if X.ndim != 2:
        hint = " Reshape your data using X.reshape(-1, 1) for one feature or X.reshape(len(X), -1) for images." \
            if X.ndim in (1, 3, 4) else ""
        raise InputError(f"expected {name} as a 2-D array (n_samples, n_features); got {X.ndim}-D shape {X.shape}.{hint}")
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise InputError(f"{name} is empty (shape {X.shape}); need at least one sample and one feature.")
    if not np.issubdtype(X.dtype, np.number) or np.issubdtype(X.dtype, np.complexfloating):
        raise InputError(f"{name} must be real numbers; got dtype {X.dtype}.")
    if not np.isfinite(X).all():
        bad = int((~np.isfinite(X)).any(axis=1).sum())
        raise InputError(f"{name} contains NaN or inf in {bad} row(s); clean or impute them first.")
    return X


def check_targets(Y, n) -> np.ndarray:
    Y = np.asarray(Y, dtype=np.float64)
    if Y.ndim == 1:
        Y = Y[:, None]
    if Y.ndim != 2:
        raise InputError(f"expected targets Y as (n,) or (n, k); got shape {Y.shape}.")
    if Y.shape[0] != n:
        raise InputError(f"X has {n} rows but Y has {Y.shape[0]}; they must match.")
    check_finite_targets(Y, "targets Y")
    return Y


def check_finite_targets(y, what: str = "targets") -> None:
    """Refuse NaN / inf targets, naming the first bad row (a NaN target would poison alpha silently)."""
    y = np.asarray(y)
    if not np.issubdtype(y.dtype, np.number) or np.issubdtype(y.dtype, np.integer):
        return
    bad = ~np.isfinite(y)
    if bad.any():
        rows = np.flatnonzero(bad.reshape(len(y), -1).any(axis=1)) if y.ndim else np.array([0])
        raise InputError(f"{what} contain NaN or inf in {len(rows)} row(s), the first at index {int(rows[0])} "
                         f"(value {y.reshape(len(y), -1)[rows[0]].tolist() if y.ndim else y.item()}); targets must be "
                         f"finite numbers. Remove or fix those rows first.")


def infer_num_classes(*labels) -> int:
    """Number of one-hot columns for integer class labels 0..k-1, from (labels, what) pairs: max + 1.

    Labels must be finite, integral and >= 0. Labels whose largest value is far above their number
    of distinct values (e.g. 3 values up to 1e9) are not class indices: a one-hot matrix of max + 1
    columns would be absurd, so this refuses and says how to remap them (or to use regression)."""
    values, top = [], -1
    for y, what in labels:
        if y is None:
            continue
        y = np.asarray(y)
        if y.size == 0:
            continue
        if not np.issubdtype(y.dtype, np.number) or np.issubdtype(y.dtype, np.complexfloating):
            raise InputError(f"{what}: class labels must be integers 0..k-1; got dtype {y.dtype}.")
        check_finite_targets(y, what)
        if y.ndim != 1 or not np.all(y == np.round(y)) or y.min() < 0:
            raise InputError(f"{what}: classification needs 1-D integer class labels 0..k-1; got shape {y.shape}"
                             f"{'' if y.ndim != 1 else f' with values in [{y.min():g}, {y.max():g}]'}. For real-valued "
                             f"targets use --task regression (task='regression').")
        values.append(np.unique(y))
        top = max(top, int(y.max()))
    if top < 0:
        return 1
    distinct = len(np.unique(np.concatenate(values)))
    k = top + 1
    if k > 4 * distinct + 100:
        raise InputError(f"the class labels hold {distinct} distinct values but the largest is {top}: as class indices "
                         f"0..{top} they would need {k} one-hot columns. Remap them to 0..{distinct - 1} "
                         f"(np.unique(y, return_inverse=True)), or, for real-valued targets, use --task regression "
                         f"(task='regression').")
    return k


def check_labels(y, num_classes, name="y") -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1:
        raise InputError(f"expected {name} as 1-D integer labels; got shape {y.shape}.")
    if np.issubdtype(y.dtype, np.number):
        check_finite_targets(y, name)
    if not (np.issubdtype(y.dtype, np.integer) or (np.issubdtype(y.dtype, np.floating) and np.all(y == np.round(y)))):
        raise InputError(f"{name} must hold integer class labels; got dtype {y.dtype}.")
    y = y.astype(np.int64)
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise InputError(f"{name} has labels in [{y.min()}, {y.max()}], outside the class range [0, {num_classes - 1}].")
    return y


def one_hot(y, num_classes) -> np.ndarray:
    Y = np.zeros((len(y), num_classes), dtype=np.float64)
    Y[np.arange(len(y)), y] = 1.0
    return Y


def _peak_rss() -> int:
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


@dataclass
class Interpolant:
    """A fitted interpolant f(x) = sum_i alpha_i k(x, x_i)."""

    X_fit: np.ndarray       # float64 training points
    alpha: np.ndarray       # (n, k) float64 coefficients
    Y: np.ndarray           # (n, k) float64 targets
    kernel: str
    bandwidth: float
    mode: str
    train_scores: np.ndarray  # K alpha, recomputed in float64
    stats: dict = field(default_factory=dict)
    # float64 kernel products with X_fit (its grid detection done once); built on first use
    operator: KernelOperator | None = field(default=None, repr=False, compare=False)

    def kernel_operator(self, rows: int = 1024) -> KernelOperator:
        if self.operator is None or self.operator.rows != rows:
            grid = "auto" if self.operator is None else self.operator.grid
            self.operator = KernelOperator(self.X_fit, self.kernel, self.bandwidth, np.float64, rows, grid=grid)
        return self.operator

    @property
    def rkhs_norm_per_output(self) -> np.ndarray:
        # ||f_c||_H^2 = alpha_c^T K alpha_c, evaluated as alpha_c . (K alpha_c) (float64 product)
        sq = np.einsum("ij,ij->j", self.alpha, self.train_scores)
        return np.sqrt(np.maximum(sq, 0.0))

    @property
    def rkhs_norm(self) -> float:
        """||f||_H = sqrt(sum_c alpha_c^T K alpha_c) (= sqrt(sum(alpha * Y)) at exact interpolation)."""
        return float(np.sqrt(max(float(np.sum(self.alpha * self.train_scores)), 0.0)))

    def predict(self, X, rows: int = 1024, argmax_groups: int | None = None) -> np.ndarray:
        """Scores f(X), float64. When training and test points lie on one integer grid (pixels / 255)
        the float64 scores come at float32 GEMM speed (``kernelfit.grid``). Otherwise, with
        ``argmax_groups`` = c (class scores in groups of c columns), the kernel tiles are float32
        GEMMs: scores are float32-accurate, and every row whose top two scores in a group are within
        their error bound is recomputed in float64, so the argmax classes are those of the float64
        scores (``gram.argmax_exact_scores``)."""
        X = check_features(X, "X")
        if X.shape[1] != self.X_fit.shape[1]:
            raise InputError(f"X has {X.shape[1]} features but the interpolant was fitted on {self.X_fit.shape[1]}.")
        op = self.kernel_operator(rows)
        points = op.points(X)
        if argmax_groups is not None and points[1] is None:
            scores, recomputed = argmax_exact_scores(self.X_fit, self.alpha, X, self.kernel, self.bandwidth,
                                                     int(argmax_groups), rows)
            self.stats["predict_scores"] = "float32 tiles, rows within the error bound recomputed in float64"
            self.stats["predict_rows_recomputed_float64"] = recomputed
            return scores
        self.stats["predict_scores"] = "float64; distances: " + op.distances_of(points[1])
        self.stats.pop("predict_rows_recomputed_float64", None)
        return op.matmul(X, self.alpha, points)


def residual_stats(R, Y) -> dict:
    """The record's residual fields: max |Y - K alpha| and ||Y - K alpha|| / ||Y||."""
    return {"residual_max_abs": float(np.max(np.abs(R))),
            "residual_relative": float(np.linalg.norm(R) / (np.linalg.norm(Y) or 1.0))}


def _dask_factor_info(client, n: int, block: int) -> dict:
    return {"backend": "dask.distributed", "scheduler": str(client.scheduler.address),
            "workers": len(client.scheduler_info()["workers"]), "n": n, "block": block}


def resolve_bandwidth(X, bandwidth) -> float:
    return median_bandwidth(X) if bandwidth == "median" else check_bandwidth(bandwidth)


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
    plan = plan_solve(n, d, Y.shape[1], options.mode, n_test=n_test, block=options.block_size,
                      strategy=options.strategy, grid_products=on_cpu(options) and GridProducts.applies(high.grid))
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
        "bandwidth_rule": "median heuristic" if options.bandwidth == "median" else "given",
        "mode": options.mode, "factor_dtype": np.dtype(fdt).name, "jitter": float(options.jitter),
        "block_size": plan.block, "strategy": plan.strategy, "strategy_reason": plan.strategy_reason,
        "residual_source": residual_source, "distances": high.distances, "timings_s": timings,
        "factor_gflops": cholesky_flops(n) / max(timings["factor"], 1e-12) / 1e9,
        **residual_stats(R, Y),
        "refinement": refinement, "factorization": factor_info, "memory_plan": plan.to_dict(),
        "peak_rss_bytes": _peak_rss(),
    }
    _warn_residual(stats, options.mode, options.refine_tol)
    return Interpolant(X_fit=X64, alpha=alpha, Y=Y, kernel=options.kernel, bandwidth=bandwidth, mode=options.mode,
                       train_scores=train_scores, stats=stats, operator=high)


# Relative residual above which a backward-stable solve is still worth a warning: past sqrt(eps) the
# training targets are no longer reproduced to half of float64's digits.
_RESIDUAL_WARN = 1e-8


def _warn_residual(stats: dict, mode: str, refine_tol=None) -> None:
    """Say so (a RuntimeWarning and ``stats["residual_warning"]``) when a float64 or mixed solve ends
    with a relative residual above float64 level: never a result that looks exact and is not.

    A backward-stable solve with a large relative residual means K itself is nearly singular (float64
    cannot do better): near-duplicate points with different labels, or a bandwidth too large for the
    data. A solve that is not even backward stable stalled in the low-precision refinement."""
    rf = stats["refinement"]
    rel = float(stats["residual_relative"])
    threshold = float64_level_threshold(int(stats["n"]))
    level = rf.get("float64_level", rel <= threshold)
    backward = rf.get("backward_error", float("nan"))
    message = None
    if mode == "mixed" and level and refine_tol is not None and not rf.get("tol_reached"):
        message = (f"refine_tol = {refine_tol:.3g} was not reached: the float64-level solution has relative residual "
                   f"{rel:.3g} (backward error {backward:.2e}), which is what float64 can reach for this K.")
    elif mode in ("mixed", "float64") and not (level or rf.get("tol_reached")):
        stable = rf.get("backward_stable", backward <= threshold)
        if stable and rel <= _RESIDUAL_WARN:
            # backward stable and the targets reproduced to ~8 digits: float64's best for this K (the
            # record's float64_level says false); a warning on every ill-conditioned but sound run would
            # teach users to ignore it
            return
        if stable:
            why = (f"the solve is backward stable (backward error {backward:.2e}): K is too ill-conditioned "
                   f"for float64 to do better")
        else:
            why = (f"the refinement stalled at backward error {backward:.2e} > {threshold:.1e} "
                   f"({rf.get('fallback_skipped') or 'no float64 fallback'})")
        message = (f"the solve did not reach float64 level: relative residual ||Y - K alpha|| / ||Y|| = {rel:.3g} "
                   f"(float64 level: <= {threshold:.1e}; {rf.get('stop_reason') or 'direct solve'}); {why}. "
                   f"Near-duplicate points with different labels, or a bandwidth too large for the data, make K "
                   f"ill-conditioned: the training targets are interpolated only to that residual. Add a small "
                   f"ridge (--jitter 1e-8, jitter=1e-8), remove near-duplicates, or use a smaller bandwidth.")
    if message is not None:
        stats["residual_warning"] = message
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def on_cpu(options: SolveOptions) -> bool:
    return options.device is None or not str(options.device).startswith("cuda")


def _build_gram(X64, fdt, bandwidth, block, options: SolveOptions, grid=None) -> SymmetricPanels:
    if grid is not None and np.dtype(fdt) == np.float64 and on_cpu(options):   # exact distances, sgemm rate
        return build_gram_panels(X64, options.kernel, bandwidth, block, fdt, options.progress, grid=grid)
    # Both kernels depend on x - z only, so the Gram is built from centered points: the GEMM expansion
    # |x|^2 + |z|^2 - 2 x.z then cancels far less (float32 loses all digits for data far from 0).
    Xc = (X64 - X64.mean(axis=0)).astype(fdt)
    if options.device is not None and str(options.device).startswith("cuda"):
        # tiles computed on the GPU (TF32 off) and written back to host panels one at a time
        from .gram_device import build_gram_panels_device

        G = build_gram_panels_device(Xc, options.kernel, bandwidth, block, fdt, device=options.device)
    else:
        G = build_gram_panels(Xc, options.kernel, bandwidth, block, fdt, options.progress)
    return G


def factor_panels(G: SymmetricPanels, options: SolveOptions) -> dict:
    """Factor G in place where the options say (CPU, GPU in-core or out-of-core, checkpointed)."""
    from .linalg.factor import factor
    from .linalg.options import FactorOptions

    bar = None
    if options.progress:
        from .progress import progress_bar

        bar = progress_bar(total=cholesky_flops(G.n), desc="cholesky", unit="flop")
    try:
        placement = FactorOptions(backend=options.backend, device=options.device, out_of_core=options.out_of_core,
                                  device_memory_budget=options.device_memory_budget, tf32=options.tf32,
                                  checkpoint_dir=options.checkpoint_dir, resume=options.resume)
        info = factor(G, placement, progress=bar, jitter=options.jitter)
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
    from .linalg.options import FactorOptions

    device = resident_device(options, n, X64.shape[1], Y.shape[1], block, fdt)
    if device is not None:   # the Gram fits on the device: the whole solve stays there
        sol = solve_resident(X64, Y, ResidentOptions(kernel=options.kernel, bandwidth=bandwidth, dtype=fdt,
                                                     jitter=float(options.jitter),
                                                     max_refine=int(options.max_refine) if mixed else 0,
                                                     tol=options.refine_tol if mixed else None,
                                                     fallback_float64=mixed and options.fallback_float64),
                             FactorOptions(device=device, block_size=block, tf32=bool(options.tf32),
                                           device_memory_budget=options.device_memory_budget))
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
    apply_high = lambda V: high.symmetric_matmul(V, progress=options.progress)  # noqa: E731
    if strategy == GRID_PRODUCTS:   # the exact dot products once; the Gram and every residual from them
        t = time.perf_counter()
        products = GridProducts(high.grid, options.kernel, bandwidth, block, progress=options.progress)
        timings["grid_products"] = time.perf_counter() - t
        build_gram = products.gram
        apply_high = lambda V: products.symmetric_matmul(V, progress=options.progress)  # noqa: E731
    X, R, report, factors = solve_refined(
        build_gram, lambda G: factor_panels(G, options), apply_high, Y, dtype=fdt,
        max_refine=int(options.max_refine) if mixed else 0,   # direct modes: one float64 residual pass
        tol=options.refine_tol if mixed else None, jitter=float(options.jitter),
        scale_diagonal=bool(options.tf32), fallback=fallback_check if mixed and options.fallback_float64 else None,
        timings=timings, store_float64_gram=strategy == STORED)
    # training scores f(x_i) = (K alpha)_i, without the ridge term
    return X, Y - R - float(options.jitter) * X, report, factors[-1]


def solve_gram(G: SymmetricPanels, Y, jitter: float = 0.0, backend: str = "auto", apply_high=None,
               max_refine: int = 10):
    """Solve G alpha = Y for a Gram already in panel storage (e.g. accumulated from feature blocks).

    G is overwritten by its factor. With ``apply_high`` (V -> G V in float64) the solution is refined
    to float64 accuracy; without it, alpha has the accuracy of G's dtype. ``jitter`` is added to G
    before factoring: without ``apply_high`` it is a ridge; with it, only the factor is shifted (a
    preconditioner) and the system refined is the one ``apply_high`` applies. Returns (alpha, info).
    """
    from .linalg.factor import factor
    from .linalg.options import FactorOptions

    Y = check_targets(Y, G.n)
    if jitter:
        G.add_to_diagonal(jitter)
    if apply_high is None:
        t = time.perf_counter()
        info = {"factorization": factor(G, FactorOptions(backend=backend), jitter=jitter).to_dict(),
                "factor_s": time.perf_counter() - t}
        return cho_solve(G, Y.astype(G.dtype)).astype(np.float64), info
    timings = {}
    alpha, _, report, factors = solve_refined(
        lambda dt: G, lambda P: factor(P, FactorOptions(backend=backend), jitter=jitter).to_dict(), apply_high, Y,
        dtype=G.dtype, max_refine=max_refine, timings=timings)
    return alpha, {"factorization": factors[-1], "factor_s": timings["factor"], "refinement": report}

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


class PrecomputedInterpolant(Interpolant):
    """A fitted interpolant of a precomputed Gram: f(test) = K_test @ alpha, K_test of shape (m, n).

    ``X_fit`` is None (there are no training points, only the Gram); ``kernel`` is "precomputed".
    """

    def predict(self, K_test, rows: int | None = None) -> np.ndarray:
        from .data.gram import check_test_gram, gram_matmul, open_gram

        K_test = open_gram(K_test, what="K_test")
        check_test_gram(K_test, self.alpha.shape[0], what="K_test")
        return gram_matmul(K_test, self.alpha, rows)


GRAM_MODES = ("float64", "float32")


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
    jitter = float(options.jitter)
    if not np.isfinite(jitter) or jitter < 0:
        raise InputError(f"jitter must be a finite number >= 0; got {options.jitter!r}.")
    source = G
    G = open_gram(G, what=what)
    n = check_square(G, what)
    Y = check_targets(Y, n)
    plan = plan_solve(n, 0, Y.shape[1], mode, n_test=n_test, block=options.block_size)
    if not options.force_memory:   # refused from the header alone, before any pass over the matrix
        require_fits(plan)
    checks = check_gram(G, what=what, jitter=jitter)
    fdt = FACTOR_DTYPE[mode]
    timings = {}
    if client is None:
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
        "refinement": refinement, "factorization": factor_info, "memory_plan": plan.to_dict(),
        "gram": {**gram_source_info(source, G), "checks": checks}, "peak_rss_bytes": _peak_rss(),
    }
    _warn_residual(stats, mode)
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
    plan = plan_solve(n, d, Y.shape[1], options.mode, block=options.block_size)
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
        "bandwidth_rule": "median heuristic" if options.bandwidth == "median" else "given",
        "mode": options.mode, "factor_dtype": np.dtype(fdt).name, "jitter": jitter, "block_size": plan.block,
        "timings_s": timings, **residual_stats(R, Y),
        "refinement": {**report.to_dict(), "factor_dtype": np.dtype(fdt).name, "fallback": None},
        "factorization": _dask_factor_info(client, n, plan.block),
        "memory_plan": plan.to_dict(), "peak_rss_bytes": _peak_rss(),
    }
    _warn_residual(stats, options.mode, options.refine_tol)
    return Interpolant(X_fit=X64, alpha=alpha, Y=Y, kernel=options.kernel, bandwidth=bandwidth, mode=options.mode,
                       train_scores=train_scores, stats=stats)


# --------------------------------------------------------------------------------------------
# targets and result records
# --------------------------------------------------------------------------------------------

TASKS = ("classification", "regression")


def classification_errors(scores, y) -> float:
    return float(np.mean(np.argmax(scores, axis=1) != y)) if len(y) else float("nan")


def _targets(label_sets: dict, n: int, task: str, num_classes):
    """Stack the target sets into Y (one-hot for classification) and say which columns are whose."""
    if task not in TASKS:
        raise InputError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}.")
    if not label_sets:
        raise InputError("label_sets is empty; pass at least {'true': y_train}.")
    blocks, sets = [], {}
    for name, y in label_sets.items():
        if task == "classification":
            y = check_labels(y, num_classes, f"labels[{name!r}]")
            if len(y) != n:
                raise InputError(f"X_train has {n} rows but labels[{name!r}] has {len(y)}.")
            blocks.append(one_hot(y, num_classes))
        else:
            y = np.asarray(y)
            if y.ndim == 2 and y.shape[0] != n or y.ndim == 1 and len(y) != n:
                raise InputError(f"the training set has {n} rows but targets[{name!r}] has {len(y)}.")
            if not np.issubdtype(y.dtype, np.number) or np.issubdtype(y.dtype, np.complexfloating):
                raise InputError(f"regression targets[{name!r}] must be real numbers; got dtype {y.dtype}.")
            blocks.append(check_targets(y, n))
        sets[name] = y
    widths = np.cumsum([0] + [b.shape[1] for b in blocks])
    columns = {name: slice(int(widths[i]), int(widths[i + 1])) for i, name in enumerate(sets)}
    return np.hstack(blocks), sets, columns


def _test_targets(y_test, m: int | None, task: str, num_classes, k: int):
    if m is None:
        return None
    if y_test is None:
        raise InputError(f"{m} test points were given without test targets y_test.")
    if task == "classification":
        y_test = check_labels(y_test, num_classes, "y_test")
    else:
        y_test = np.asarray(y_test, dtype=np.float64)
        if y_test.ndim not in (1, 2) or (y_test.ndim == 2 and y_test.shape[1] != k) or (y_test.ndim == 1 and k != 1):
            raise InputError(f"y_test has shape {y_test.shape}; expected ({m},) or ({m}, {k}) like the training "
                             f"targets.")
        check_finite_targets(y_test, "y_test")
    if len(y_test) != m:
        raise InputError(f"the test set has {m} rows but y_test has {len(y_test)}.")
    return y_test


def _results(model: Interpolant, Y, sets, columns, test_scores, y_test, task, jitter) -> dict:
    from .results import regression_metrics

    results = {}
    per_output = model.rkhs_norm_per_output
    for name, y in sets.items():
        cols = columns[name]
        a = model.alpha[:, cols]
        R = Y[:, cols] - model.train_scores[:, cols] - jitter * a
        entry = {}
        if task == "classification":
            entry["train_error"] = classification_errors(model.train_scores[:, cols], y)
            entry["test_error"] = classification_errors(test_scores[:, cols], y_test) \
                if test_scores is not None else None
        else:
            train = regression_metrics(Y[:, cols], model.train_scores[:, cols])
            test = regression_metrics(y_test, test_scores[:, cols]) if test_scores is not None else None
            entry.update(train_rmse=train["rmse"], train_r2=train["r2"],
                         test_rmse=None if test is None else test["rmse"], test_r2=None if test is None else test["r2"],
                         test_rmse_per_output=None if test is None else test["rmse_per_output"],
                         test_r2_per_output=None if test is None else test["r2_per_output"])
        entry.update({
            "rkhs_norm": float(np.sqrt(np.sum(per_output[cols] ** 2))),
            ("rkhs_norm_per_class" if task == "classification" else "rkhs_norm_per_output"):
                [float(v) for v in per_output[cols]],
            "alpha_l2": float(np.linalg.norm(a)),
            **residual_stats(R, Y[:, cols]),
        })
        results[name] = entry
    return results


def _provenance():
    try:   # before the solve: the record names the code that ran, even if HEAD moves meanwhile
        from .results import provenance

        return provenance()
    except ImportError:  # results.py is optional for library use
        return None


def _record(model, Y, sets, columns, test_scores, y_test, task, num_classes, options_record, n_test, extra, prov):
    record = {
        "kind": "kernelfit.solve",
        "task": task,
        "options": options_record,
        "n_train": int(Y.shape[0]), "n_test": int(n_test),
        "num_classes": int(num_classes) if task == "classification" else None,
        "num_outputs": int(Y.shape[1] // len(sets)),
        "target_columns": {name: [c.start, c.stop] for name, c in columns.items()},
        "results": _results(model, Y, sets, columns, test_scores, y_test, task, float(model.stats.get("jitter", 0.0))),
        "stats": model.stats,
    }
    if extra:
        record.update(extra)
    if prov is not None:
        record["provenance"] = prov
    return record


def run_interpolation(X_train, label_sets: dict, X_test, y_test, num_classes: int | None,
                      options: SolveOptions = SolveOptions(), extra: dict | None = None, *,
                      task: str = "classification", client=None, return_model: bool = False):
    """Fit one interpolant for several target sets at once (one Gram, one factorization) and report.

    label_sets: name -> training targets, e.g. {"true": y, "random-labels": y_random}. For
    ``task="classification"`` they are integer labels, one-hot encoded, and the record reports error
    rates; for ``task="regression"`` float targets (n,) or (n, k), and the record reports RMSE and
    R^2 (``num_classes`` is ignored). Test metrics are measured against ``y_test`` for every set.
    Duplicate training rows are refused first when ``options.jitter`` is 0. With ``client`` (a dask
    Client) the Gram and the factorization run on its workers (``fit_distributed``).
    Returns a JSON-able record (see README, "Result record"), or (record, model) with ``return_model``.
    """
    X_train = check_features(X_train, "X_train")
    X_test = check_features(X_test, "X_test") if X_test is not None and len(X_test) else None
    if X_test is not None and X_test.shape[1] != X_train.shape[1]:
        raise InputError(f"X_test has {X_test.shape[1]} features but X_train has {X_train.shape[1]}.")
    Y, sets, columns = _targets(label_sets, X_train.shape[0], task, num_classes)
    y_test = _test_targets(y_test, None if X_test is None else len(X_test), task, num_classes,
                           Y.shape[1] // len(sets))
    options.validated()
    check_distinct(X_train, options.jitter, "X_train")
    if X_test is not None:   # float32 prediction tiles centre the test points on the training mean
        check_distance_scale(X_test, options.kernel, None if options.bandwidth == "median" else options.bandwidth,
                             "X_test", center=np.asarray(X_train).mean(axis=0, dtype=np.float64))
    prov = _provenance()

    if client is None:
        model = fit_interpolant(X_train, Y, options, n_test=0 if X_test is None else len(X_test))
    else:
        model = fit_distributed(X_train, Y, options, client)
    t = time.perf_counter()
    if X_test is None:
        test_scores = None
    elif task == "classification" and isinstance(model, Interpolant):
        # only argmax classes are reported: float32 tiles, near-ties re-checked in float64
        test_scores = model.predict(X_test, argmax_groups=num_classes)
    else:
        test_scores = model.predict(X_test)
    model.stats["timings_s"]["predict"] = time.perf_counter() - t
    model.stats["peak_rss_bytes"] = _peak_rss()
    options_record = {k: v for k, v in asdict(replace(options)).items() if k not in ("progress",)}
    record = _record(model, Y, sets, columns, test_scores, y_test, task, num_classes, options_record,
                     0 if X_test is None else len(X_test), extra, prov)
    return (record, model) if return_model else record


def run_gram_interpolation(G, label_sets: dict, G_test, y_test, num_classes: int | None,
                           options: SolveOptions = SolveOptions(mode="float64"), extra: dict | None = None, *,
                           task: str = "classification", client=None, return_model: bool = False):
    """``run_interpolation`` for a precomputed Gram: G (n x n) and optional G_test (m x n), as paths or arrays.

    Same targets, record and metrics; the record's options say ``kernel: "precomputed"`` and its
    ``stats.gram`` names the file (sha256), shape, dtype and the checks that ran.
    """
    from .data.gram import check_test_gram, open_gram

    check_gram_mode(options.mode)
    G_open = open_gram(G, what="--gram")
    if len(G_open.shape) != 2:
        raise InputError(f"--gram: expected a square n x n training Gram matrix; got shape {tuple(G_open.shape)}.")
    n = G_open.shape[0]
    Y, sets, columns = _targets(label_sets, n, task, num_classes)
    Kt = None
    if G_test is not None:
        Kt = open_gram(G_test, what="--gram-test")
        check_test_gram(Kt, n)
    y_test = _test_targets(y_test, None if Kt is None else Kt.shape[0], task, num_classes, Y.shape[1] // len(sets))
    prov = _provenance()

    model = fit_precomputed(G, Y, options, n_test=0 if Kt is None else Kt.shape[0], client=client)
    t = time.perf_counter()
    test_scores = model.predict(Kt) if Kt is not None else None
    model.stats["timings_s"]["predict"] = time.perf_counter() - t
    if G_test is not None:
        from .data.gram import gram_source_info

        model.stats["gram_test"] = gram_source_info(G_test, Kt)
    model.stats["peak_rss_bytes"] = _peak_rss()
    options_record = {k: v for k, v in asdict(replace(options)).items() if k not in ("progress",)}
    options_record.update(kernel="precomputed", bandwidth=None)
    record = _record(model, Y, sets, columns, test_scores, y_test, task, num_classes, options_record,
                     0 if Kt is None else Kt.shape[0], extra, prov)
    return (record, model) if return_model else record
