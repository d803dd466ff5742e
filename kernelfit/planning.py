"""Solve planning: the bytes a solve needs and which exact strategy runs, decided before anything large
is allocated (``plan_solve``, ``require_fits``; ``choose_device_strategy`` for a GPU). The fastest
strategy that fits is chosen.

Every strategy returns a float64-level solution of K alpha = Y with a residual computed in float64
from a K that the factor did not produce; they differ in what is stored and what a float64 pass costs.

stored-float64-gram   The Gram is built once in float64 and kept; a float32 copy is factored
                      (n^2/2 x 12 bytes). A refinement residual Y - K X is a product with the stored
                      float64 Gram: O(n^2 k), a small fraction of one Gram build.
recomputed-float64    Only a float32 Gram / factor is stored (n^2/2 x 4 bytes). Each float64
                      residual rebuilds the kernel tiles from the data in float64 (n^2/2 exps and a
                      GEMM over all features: float32 GEMMs of exact integer levels for points on an
                      integer grid such as pixels / 255, ``kernelfit.grid``; a float64 GEMM otherwise).
stored-grid-products  For points on an integer grid whose dot products are exact in one float32 GEMM
                      (pixels / 255 with up to 1,023 features): the float32 Gram / factor plus the
                      exact integer dot products q_i . q_j as float32 (n^2/2 x 8 bytes in all). A
                      float64 residual pass reads the products (an exp and a product per entry)
                      instead of recomputing a GEMM over all features; chosen where the stored
                      float64 Gram does not fit and this does.
float64               Gram and factor in float64 (n^2/2 x 8 bytes), one float64 residual pass from
                      the data. For small n, where the factorization is cheap and the refinement
                      passes of the other strategies cost as much as the float32 factor saves.

``mode="mixed"`` picks among these; ``mode="float64"`` / ``"float32"`` run the direct solve of that
precision (float32 then has float32 accuracy only).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from .catalog import MODES
from .errors import InputError, MemoryPlanError
from .gram import DEFAULT_PRODUCT_COLS
from .linalg.panels import SymmetricPanels, choose_block
from .results import format_gib

STORED = "stored-float64-gram"
RECOMPUTED = "recomputed-float64"
GRID_PRODUCTS = "stored-grid-products"
FLOAT64 = "float64"
FLOAT32 = "float32"
STRATEGIES = (STORED, GRID_PRODUCTS, RECOMPUTED, FLOAT64, FLOAT32)

# At or below this n the whole float64 factorization costs tens of milliseconds on a 2-core machine,
# so the float32 factor can save little against its refinement passes; float64 throughout is chosen.
# A conservative limit: check it on a quiet machine with
# ``benchmarks/cpu_peers.py --sizes 1000 2000 3000 --methods kernelfit kernelfit-float64``.
FLOAT64_THROUGHOUT_MAX_N = 1500

# How the reported (independent, float64) residual is obtained, per strategy.
RESIDUAL_SOURCE = {
    STORED: "Y - K alpha with K the float64 Gram built from the data and kept (the factor is a float32 "
            "copy); it is the residual of the last refinement step, so no extra pass is spent on it",
    RECOMPUTED: "Y - K alpha with the kernel tiles recomputed from the data in float64 (no stored Gram); "
                "it is the residual of the last refinement step, so no extra pass is spent on it",
    GRID_PRODUCTS: "Y - K alpha with the kernel computed in float64 from the stored exact integer dot "
                   "products of the points (the factor is of a separate float32 Gram); it is the residual "
                   "of the last refinement step, so no extra pass is spent on it",
    FLOAT64: "Y - K alpha with the kernel tiles recomputed from the data in float64 after the float64 "
             "factor overwrote the Gram",
    FLOAT32: "Y - K alpha with the kernel tiles recomputed from the data in float64 after the float32 "
             "factor overwrote the Gram",
}


def factor_dtype_name(strategy: str) -> str:
    return "float64" if strategy == FLOAT64 else "float32"


MIXED_STRATEGIES = (STORED, GRID_PRODUCTS, RECOMPUTED, FLOAT64)


def choose_strategy(mode: str, n: int, fits: Callable[[str], bool], forced: str = "auto",
                    grid_products: bool = False) -> tuple[str, str]:
    """(strategy, reason) for ``mode`` at n points; ``fits(strategy)`` says whether its memory fits.

    ``forced`` (mixed mode only) names the strategy to run instead of choosing; whether it fits is
    then the memory plan's verdict. ``grid_products``: the points' dot products are exact in one
    float32 GEMM (``gram.GridProducts.applies``), so ``stored-grid-products`` can run."""
    if forced not in ("auto",) + MIXED_STRATEGIES:
        raise InputError(f"unknown strategy {forced!r}; expected 'auto' or one of {', '.join(MIXED_STRATEGIES)}.")
    if mode in (FLOAT64, FLOAT32):
        if forced != "auto":
            raise InputError(f"strategy {forced!r} applies to mode 'mixed' only; mode {mode!r} is a direct "
                             f"{mode} solve. Use mode='mixed' or strategy='auto'.")
        return mode, f"mode {mode!r} requested: {mode} Gram and factor, one float64 residual pass"
    if forced == GRID_PRODUCTS and not grid_products:
        raise InputError(f"strategy {GRID_PRODUCTS!r} needs points on an integer grid whose dot products are "
                         "exact in one float32 GEMM (e.g. pixels / 255 in float64, up to 1,023 features); "
                         "these points are not. Use strategy='auto'.")
    if forced != "auto":
        return forced, "strategy forced by the caller"
    if n <= FLOAT64_THROUGHOUT_MAX_N and fits(FLOAT64):
        return FLOAT64, (f"n = {n} <= {FLOAT64_THROUGHOUT_MAX_N}: the float64 factorization is cheap, "
                         "float64 throughout is faster than factoring in float32 and refining")
    if fits(STORED):
        return STORED, ("the float64 Gram and its float32 copy fit in memory: residuals are O(n^2 k) "
                        "products with the stored float64 Gram")
    if grid_products and fits(GRID_PRODUCTS):
        return GRID_PRODUCTS, ("a stored float64 Gram plus its float32 copy (n^2/2 x 12 bytes) does not fit; the "
                               "points' exact integer dot products plus the float32 Gram (n^2/2 x 8 bytes) do: "
                               "float64 residuals from the stored products, no GEMM per pass")
    return RECOMPUTED, ("a stored float64 Gram plus its float32 copy (n^2/2 x 12 bytes) does not fit: "
                        "float32 Gram and factor only, float64 residuals recomputed from the data")


# --------------------------------------------------------------------------------------------
# Device strategy: which precision a GPU solve should run in, from the device's rates and memory
# --------------------------------------------------------------------------------------------
#
# On GPUs whose float64 GEMM rate is within ~2x of float32 (Hopper: FP64 tensor cores at ~67 TFLOP/s
# against ~67 plain FP32), a float32 factor saves memory but no time, and its float64 refinement
# passes cost extra: float64 throughout is the fastest exact solve where it fits. Where float64 is
# much slower (consumer and inference GPUs: 1/32 - 1/64 of float32) the float32 factor plus float64
# refinement is faster. TF32 factors are never chosen unasked: on the Gaussian kernel of MNIST their
# refinement diverges from n ~ 10k, so they end in a float64 re-factorization (reported as such).

DEVICE_STRATEGIES = ("float64-resident", "mixed-resident", "float64-out-of-core", "mixed-out-of-core")
# float64 runs throughout when float32 GEMMs are at most this many times faster than float64 ones
FLOAT64_RATE_RATIO = 2.0


@dataclass(frozen=True)
class DeviceProfile:
    """A GPU's memory and dense GEMM rates (TFLOP/s). ``source`` says where the numbers come from:
    the vendor's datasheet (``table``), a measurement on the device (``measured``) or the caller."""

    name: str
    memory_bytes: int
    float64_tflops: float
    float32_tflops: float
    tf32_tflops: float | None = None
    source: str = "given"

    def to_dict(self) -> dict:
        return {**asdict(self), "memory_gib": round(self.memory_bytes / 2**30, 1)}


_GB = 10**9
# Vendor datasheet dense rates (no sparsity): float64 = FP64 tensor core where there is one, float32
# = plain FP32, tf32 = TF32 tensor core. Keys are matched as lower-case substrings of the CUDA name,
# the most specific first (so "NVIDIA H100 PCIe" is not taken for the SXM part).
DEVICE_PROFILES = {
    "h200": DeviceProfile("H200", 141 * _GB, 67.0, 67.0, 495.0, "table"),
    "h100-pcie": DeviceProfile("H100 PCIe", 80 * _GB, 51.0, 51.0, 378.0, "table"),
    "h100": DeviceProfile("H100 SXM", 80 * _GB, 67.0, 67.0, 495.0, "table"),
    "a100": DeviceProfile("A100 80GB", 80 * _GB, 19.5, 19.5, 156.0, "table"),
    "v100": DeviceProfile("V100 32GB", 32 * _GB, 7.8, 15.7, None, "table"),
    "l4": DeviceProfile("L4", 24 * _GB, 0.49, 30.3, 60.0, "table"),
    "rtx4090": DeviceProfile("RTX 4090", 24 * _GB, 1.29, 82.6, 82.6, "table"),
}
_CUDA_NAME_KEYS = (("h200", "h200"), ("h100 pcie", "h100-pcie"), ("h100", "h100"), ("a100", "a100"),
                   ("v100", "v100"), (" l4", "l4"), ("4090", "rtx4090"))


def profile_for_name(cuda_name: str) -> DeviceProfile | None:
    """The table's profile for a CUDA device name ("NVIDIA H200", "NVIDIA H100 80GB HBM3"), or None."""
    low = " " + (cuda_name or "").lower()
    for sub, key in _CUDA_NAME_KEYS:
        if sub in low:
            return DEVICE_PROFILES[key]
    return None


def named_profile(name: str) -> DeviceProfile:
    key = name.strip().lower().replace(" ", "-").replace("_", "-")
    if key not in DEVICE_PROFILES:
        raise InputError(f"unknown device profile {name!r}; expected one of {', '.join(DEVICE_PROFILES)}, or give "
                         "the device's memory and rates (--device-memory-gib, --float64-tflops, --float32-tflops).")
    return DEVICE_PROFILES[key]


def measure_gemm_tflops(device, dtype, m: int = 8192, seconds: float = 0.5) -> float:
    """A dense m x m GEMM rate on a torch device (TF32 off), after one warm-up product."""
    import time

    from .linalg.backend_torch import require_torch, tf32_disabled

    torch = require_torch()
    a = torch.randn(m, m, dtype=dtype, device=device)
    b = torch.randn(m, m, dtype=dtype, device=device)

    def sync():
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)

    with tf32_disabled():
        a @ b
        sync()
        reps, t = 0, time.perf_counter()
        while reps < 3 or time.perf_counter() - t < seconds:
            a @ b
            reps += 1
        sync()
    return 2.0 * m**3 * reps / (time.perf_counter() - t) / 1e12


def live_profile(device="cuda", measure: bool = False) -> DeviceProfile:
    """The profile of a CUDA device seen by torch: its free memory, and the table's rates for its
    name (``measure=True``, or a name the table lacks: float64 / float32 GEMMs measured, ~2 s)."""
    from .linalg.backend import free_device_bytes
    from .linalg.backend_torch import require_torch, resolve_device

    torch = require_torch()
    if not str(device).startswith("cuda"):
        raise InputError(f"a device strategy needs a CUDA device, got {str(device)!r}. On a machine without one, "
                         f"plan for a named GPU: --device-profile {{{','.join(DEVICE_PROFILES)}}}.")
    if not torch.cuda.is_available():
        raise InputError(f"device {str(device)!r} asked for, but torch sees no CUDA GPU here. Plan for a named GPU "
                         f"instead: --device-profile {{{','.join(DEVICE_PROFILES)}}} (or --device-memory-gib with "
                         "--float64-tflops and --float32-tflops).")
    dev = resolve_device(device)
    name = torch.cuda.get_device_name(dev)
    free = free_device_bytes(dev)
    known = profile_for_name(name)
    if known is not None and not measure:
        return DeviceProfile(name, free, known.float64_tflops, known.float32_tflops, known.tf32_tflops,
                             "table rates, free memory measured")
    r64 = measure_gemm_tflops(dev, torch.float64, 4096)
    r32 = measure_gemm_tflops(dev, torch.float32, 4096)
    return DeviceProfile(name, free, round(r64, 2), round(r32, 2), None, "measured")


def choose_device_strategy(n: int, d: int, k: int, profile: DeviceProfile, mode: str | None = None,
                           tf32: bool = False, block: int | None = None) -> dict:
    """How a solve of n points should run on a GPU described by ``profile``: a dict with
    ``strategy`` (one of DEVICE_STRATEGIES), ``factor_dtype``, ``tf32``, ``reason`` and the resident
    bytes it was judged by. ``mode`` None / "auto" chooses; "float64" or "mixed" is kept (the
    path, resident or out-of-core, still follows the memory). ``tf32`` asks for TF32 factor GEMMs:
    a float32 factor then, whose result is reported with its own factor record and any float64
    fallback named as such."""
    from .gram_device import resident_bytes
    from .linalg.factor import DEVICE_SAFETY

    mode = "auto" if mode in (None, "auto") else mode
    if mode not in ("auto", "float64", "mixed"):
        raise InputError(f"device mode {mode!r} is not a device strategy; expected auto, float64 or mixed "
                         "(a float32-only solve has float32 accuracy: run it without a device strategy).")
    if tf32 and mode == "float64":
        raise InputError("TF32 applies to a float32 factor; with mode float64 there is none. Use mode mixed with TF32, "
                         "or drop TF32.")
    block = choose_block(n, block)
    usable = int(DEVICE_SAFETY * profile.memory_bytes)
    need64 = resident_bytes(n, d, k, block, np.float64)
    need32 = resident_bytes(n, d, k, block, np.float32)
    ratio = profile.float32_tflops / max(profile.float64_tflops, 1e-9)
    fast64 = ratio <= FLOAT64_RATE_RATIO
    rates = (f"float32 / float64 GEMM rate {profile.float32_tflops:g} / {profile.float64_tflops:g} TFLOP/s "
             f"= {ratio:.2g}x")
    mem = f"resident float64 {need64 / 2**30:.1f} GiB, float32 {need32 / 2**30:.1f} GiB, usable {usable / 2**30:.1f} GiB"
    if tf32 or mode == "mixed":
        resident = need32 <= usable
        why = ("TF32 factor asked for: its refinement may not converge (the Gaussian MNIST Gram diverges from "
               "n ~ 10k), in which case the float64 re-factorization runs and is reported as a fallback, never under "
               "the TF32 label" if tf32 else "mode mixed asked for")
        strategy = "mixed-resident" if resident else "mixed-out-of-core"
    elif mode == "float64" or fast64:
        if need64 <= usable:
            strategy = "float64-resident"
            why = ("mode float64 asked for" if mode == "float64" else
                   f"{rates} <= {FLOAT64_RATE_RATIO:g}x: a float32 factor saves no time, float64 throughout is the "
                   "fastest exact solve where it fits")
        elif mode != "float64" and need32 <= usable:
            strategy = "mixed-resident"
            why = "the float64 Gram does not fit on the device, the float32 one does: float32 factor + float64 refinement"
        else:
            strategy = "float64-out-of-core"
            why = ("mode float64 asked for, and the Gram does not fit resident" if mode == "float64" else
                   f"no resident Gram fits; {rates}: float64 slabs (one host solve) rather than a float32 factor "
                   "whose refinement passes each read the whole factor on the host")
    else:
        strategy = "mixed-resident" if need32 <= usable else "mixed-out-of-core"
        why = (f"{rates} > {FLOAT64_RATE_RATIO:g}x: a float32 factor with float64 refinement is faster than float64 "
               "throughout")
    fdt = "float64" if strategy.startswith("float64") else "float32"
    return {"strategy": strategy, "factor_dtype": fdt, "tf32": bool(tf32), "reason": f"{why} ({mem})",
            "resident": strategy.endswith("resident"), "block": block, "float64_resident_bytes": need64,
            "float32_resident_bytes": need32, "usable_bytes": usable, "rate_ratio_float32_over_float64": round(ratio, 3),
            "device": profile.to_dict()}


# --- memory plan -----------------------------------------------------------------------
# the factor dtype of the direct modes and of mixed mode's default strategies (MemoryPlan.factor_dtype
# says which one a given plan uses)
FACTOR_DTYPE = {"float64": np.float64, "float32": np.float32, "mixed": np.float32}
# Interpreter, numpy/scipy/torch, BLAS buffers: measured ~0.4 GB for `import kernelfit`; rounded up.
BASELINE_BYTES = 600 * 2**20
SAFETY = 0.92  # keep ~8% of available memory free for the OS and page cache


def available_bytes() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


@dataclass
class MemoryPlan:
    n: int
    d: int
    k: int
    n_test: int
    mode: str
    block: int
    factor_dtype: str
    strategy: str            # see STRATEGIES above
    strategy_reason: str
    residual_source: str     # how the reported float64 residual is computed
    gram_bytes: int          # lower-triangle panels of the Gram / factor (+ the stored float64 Gram)
    data_bytes: int          # training + test features in the working precisions
    vectors_bytes: int       # targets, solution, residual, scores
    workspace_bytes: int     # the largest row tile of a kernel product
    baseline_bytes: int
    total_bytes: int
    available_bytes: int
    fits: bool

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update({k.replace("_bytes", "_gib"): round(v / 2**30, 3) for k, v in d.items() if k.endswith("_bytes")})
        return d

    def summary(self) -> str:
        return (f"n={self.n} d={self.d} k={self.k} mode={self.mode}, strategy {self.strategy} "
                f"({self.factor_dtype} factor, block {self.block}; {self.strategy_reason}): "
                f"Gram {format_gib(self.gram_bytes)} + data {format_gib(self.data_bytes)} + "
                f"vectors {format_gib(self.vectors_bytes)} + "
                f"workspace {format_gib(self.workspace_bytes)} + baseline {format_gib(self.baseline_bytes)} = "
                f"{format_gib(self.total_bytes)} needed; {format_gib(self.available_bytes)} available -> "
                f"{'fits' if self.fits else 'does NOT fit'}")


def _strategy_bytes(strategy: str, n: int, d: int, k: int, n_test: int, block: int, product_rows: int) -> dict:
    fdt = np.dtype(factor_dtype_name(strategy))
    gram = SymmetricPanels.nbytes_for(n, block, fdt)
    if strategy == STORED:   # the float64 Gram kept for the residuals, next to the float32 factor
        gram += SymmetricPanels.nbytes_for(n, block, np.float64)
    if strategy == GRID_PRODUCTS:   # the exact integer dot products, float32, next to the float32 factor
        gram += SymmetricPanels.nbytes_for(n, block, np.float32)
    # features: float64 copies of train + test (float64 residuals in every strategy); float32 copies
    # of both for the float32 Gram build and the prediction tiles, plus the training points' integer
    # grid levels (``kernelfit.grid``) when they are on one
    data = (n + n_test) * d * 8 + (2 * n + n_test) * d * 4
    vectors = (n * k * 8) * 6 + n_test * k * 8 * 2
    # one row tile of a kernel product: float64 values and the float32 GEMM buffer of the grid path
    workspace = min(product_rows, max(n, n_test, 1)) * min(n, DEFAULT_PRODUCT_COLS) * 12
    return {"factor_dtype": fdt.name, "gram_bytes": gram, "data_bytes": data, "vectors_bytes": vectors,
            "workspace_bytes": workspace,
            "total_bytes": gram + data + vectors + workspace + BASELINE_BYTES}


def plan_solve(n: int, d: int, k: int = 10, mode: str = "mixed", n_test: int = 0, block: int | None = None,
               product_rows: int = 1024, available: int | None = None, strategy: str = "auto",
               grid_products: bool = False) -> MemoryPlan:
    """Bytes needed by `fit_interpolant` + prediction for n points of dimension d and k targets, and
    the solve strategy that runs (``choose_strategy``: the fastest that fits, unless
    ``strategy`` forces one)."""
    if mode not in MODES:
        raise InputError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}.")
    block = choose_block(n, block)
    avail = available_bytes() if available is None else int(available)

    def size(strategy):
        return _strategy_bytes(strategy, n, d, k, n_test, block, product_rows)

    strategy, reason = choose_strategy(mode, n, lambda s: size(s)["total_bytes"] <= SAFETY * avail, strategy,
                                       grid_products)
    b = size(strategy)
    return MemoryPlan(n=n, d=d, k=k, n_test=n_test, mode=mode, block=block, strategy=strategy,
                      strategy_reason=reason, residual_source=RESIDUAL_SOURCE[strategy], **b,
                      baseline_bytes=BASELINE_BYTES, available_bytes=avail,
                      fits=b["total_bytes"] <= SAFETY * avail)


def require_fits(plan: MemoryPlan, cli: bool = False) -> None:
    """Refuse at once, with the numbers and the options, when a plan does not fit.

    The options are named as the caller passes them: library parameters (``mode=``, ``force_memory=``)
    by default, command-line flags with ``cli=True``."""
    if plan.fits:
        return
    item = np.dtype(plan.factor_dtype).itemsize
    if cli:
        mixed, fewer = "--mode mixed", "fewer points (--n-train"
        device, force = "--device cuda (streams out of core when needed)", "--force-memory"
        disk = "--out-of-core disk --scratch-dir DIR"
    else:
        mixed, fewer = "mode='mixed'", "fewer points (a smaller n"
        device, force = "device='cuda' (streams out of core when needed)", "force_memory=True"
        disk = "placement=FactorOptions(out_of_core='disk', scratch_dir=DIR)"
    options = []
    if plan.mode == "float64":
        options.append(f"{mixed} (float32 factor + float64 refinement: half the memory, float64 accuracy)")
    options.append(f"{fewer}; memory grows as n^2/2 x {item} bytes)")
    options.append(f"the Gram and its factor on disk: {disk} (disk bytes: ``kernelfit plan`` with it)")
    options.append(f"a GPU: {device}, on a machine that has one")
    options.append(f"{force} to try anyway (may be killed by the OS)")
    raise MemoryPlanError(f"this solve would not fit in memory: {plan.summary()}. Options: " + "; ".join(options) + ".",
                          plan=plan)


# --- disk out-of-core (linalg.diskstore) -----------------------------------------------------
def disk_memory_budget(plan: MemoryPlan, available: int | None = None) -> int:
    """Default host bytes for a disk factorization: what the in-RAM plan keeps besides the Gram (the
    data in its working precisions, the n x k vectors, a kernel product's row tile, the interpreter)
    and the store's own overhead (read-ahead thread, hashing buffers: ``diskstore.OVERHEAD_BYTES``)
    stay in RAM next to the factor's slabs, so they are taken off the available memory first."""
    from .linalg.diskstore import OVERHEAD_BYTES

    avail = plan.available_bytes if available is None else int(available)
    rest = plan.total_bytes - plan.gram_bytes
    return max(int(SAFETY * avail) - rest - OVERHEAD_BYTES, 0)


def disk_factor_dtype(mode: str) -> np.dtype:
    """The disk store's factor dtype: mixed mode factors in float32 (refined with float64 residuals)."""
    return np.dtype(FACTOR_DTYPE[mode])


def choose_disk(plan: MemoryPlan, placement, factor_dtype=None, available: int | None = None):
    """The ``DiskPlan`` of a disk solve when the placement asks for one, else None.

    ``placement.out_of_core == "disk"`` asks for it (``scratch_dir`` required), on the host or, with a
    ``device``, the slabs factored on that device (``DiskPanels.factor``); ``"auto"`` takes it when the
    in-RAM plan does not fit, a ``scratch_dir`` is given and the factor runs on the CPU (on a GPU the
    device plans decide: a resident Gram needs no host copy, so the host plan alone cannot ask for the disk).
    Refused before any work: no scratch directory, a RAM budget too small for one slab, or less free
    disk than the store needs (MemoryPlanError naming both sizes)."""
    from .linalg.diskstore import plan_disk

    oc, scratch = placement.out_of_core, placement.scratch_dir
    if oc == "disk" and scratch is None:
        raise InputError("out-of-core 'disk' keeps the Gram and its factor in a scratch directory, but none was given. "
                         "Fix: --scratch-dir DIR (placement=FactorOptions(out_of_core='disk', scratch_dir=DIR)).")
    cpu = not placement.on_cuda
    if not (oc == "disk" or (oc == "auto" and not plan.fits and scratch is not None and cpu)):
        return None
    budget = placement.memory_budget
    if budget is None:
        budget = disk_memory_budget(plan, available)
    elif int(budget) <= 0:
        raise InputError(f"memory budget must be > 0 bytes; got {budget}. Fix: --memory-budget GIB, e.g. 4.")
    dtype = disk_factor_dtype(plan.mode) if factor_dtype is None else np.dtype(factor_dtype)
    dp = plan_disk(plan.n, dtype, int(budget), scratch)   # MemoryPlanError when the budget holds no slab
    if not dp.fits:
        raise MemoryPlanError(f"the disk store for n={plan.n} ({dtype.name} factor) needs {format_gib(dp.disk_bytes)} "
                              f"on the scratch directory {scratch}, which has {format_gib(dp.free_disk_bytes)} free "
                              f"(in RAM the solve would need {format_gib(plan.total_bytes)}, "
                              f"{format_gib(plan.available_bytes)} available). Fix: a scratch directory on a larger "
                              "disk, or fewer points.", plan=plan)
    return dp
