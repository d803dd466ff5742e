"""Which exact solve runs: chosen from the memory plan, the fastest one that fits.

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
    from ..errors import InputError

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
