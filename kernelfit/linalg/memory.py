"""Memory planning: the bytes a solve needs, computed before anything large is allocated."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..errors import MemoryPlanError
from ..results import format_gib
from .panels import SymmetricPanels, choose_block
from .strategy import GRID_PRODUCTS, RESIDUAL_SOURCE, STORED, choose_strategy, factor_dtype_name

MODES = ("float64", "float32", "mixed")
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
    strategy: str            # see linalg/strategy.py
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
    from ..gram import DEFAULT_PRODUCT_COLS

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
    the solve strategy that runs (``linalg.strategy.choose_strategy``: the fastest that fits, unless
    ``strategy`` forces one)."""
    from ..errors import InputError

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
    else:
        mixed, fewer = "mode='mixed'", "fewer points (a smaller n"
        device, force = "device='cuda' (streams out of core when needed)", "force_memory=True"
    options = []
    if plan.mode == "float64":
        options.append(f"{mixed} (float32 factor + float64 refinement: half the memory, float64 accuracy)")
    options.append(f"{fewer}; memory grows as n^2/2 x {item} bytes)")
    options.append(f"a GPU: {device}, on a machine that has one")
    options.append(f"{force} to try anyway (may be killed by the OS)")
    raise MemoryPlanError(f"this solve would not fit in memory: {plan.summary()}. Options: " + "; ".join(options) + ".",
                          plan=plan)
