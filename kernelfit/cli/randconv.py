"""``kernelfit solve --features randconv``: random-conv features, never materialized. The standardized
feature Gram is accumulated block by block (cached like the table's), turned into the kernel in place
and solved by the table's panel solver."""

from __future__ import annotations

from .args import refuse


def check_options(args) -> None:
    """The random-conv solve runs from the accumulated feature Gram: mixed precision, no ridge."""
    bad = [(args.mode != "mixed", f"--mode {args.mode} (it refines a float32 factor in float64: mixed)"),
           (args.kernel != "gaussian", f"--kernel {args.kernel} (use --randconv-kernel gaussian|linear)"),
           (args.jitter != 0, "--jitter"), (args.checkpoint_dir is not None, "--checkpoint-dir"),
           (args.n_test == 0, "--n-test 0 (it needs a test split)")]
    refused = [what for cond, what in bad if cond]
    if refused:
        refuse(args, f"--features randconv solves from the feature Gram and does not take {'; '.join(refused)}")


def require_fits(args, n: int, m: int) -> None:
    """Feature Gram panels (float64) + test block (float64) + feature blocks + the float32 factor copy."""
    from ..errors import MemoryPlanError
    from ..features.randconv import RandConvConfig, RandConvFeatures
    from ..planning import available_bytes

    fmap = RandConvFeatures(RandConvConfig(n_filters=args.filters, patch_size=args.patch_size,
                                           pool_grid=args.randconv_pool_grid))
    plan = fmap.gram_plan(n, m, args.filter_block, panels=True)
    need = plan["total_bytes"] + n * (n + 2048) // 2 * 4
    avail = available_bytes()
    if need > 0.9 * avail:
        raise MemoryPlanError(
            f"--features randconv at n={n}, m={m}: feature Gram {plan['gram_bytes'] / 2**30:.2f} GiB + float32 "
            f"factor copy + feature blocks = {need / 2**30:.2f} GiB, more than 90% of the {avail / 2**30:.2f} GiB "
            f"available. Fix: fewer training points (--n-train), a smaller --filter-block, or --force-memory.",
            plan={**plan, "need_bytes": need, "available_bytes": avail})


def solve(args, rds, label_sets: dict, y_test, k: int, timings: dict) -> dict:
    """Random-conv features (never materialized): the standardized Gram is accumulated block by block
    (cached like the table's), turned into the kernel in place and solved by the table's panel solver."""
    from ..features.pipeline import randconv_gram
    from ..features.randconv import RandConvConfig
    from ..table import feature_gram_rows
    from ..validate import bandwidth_rule

    cfg = RandConvConfig(n_filters=args.filters, patch_size=args.patch_size, filters=args.filter_kind,
                         bias=args.randconv_bias, pool_grid=args.randconv_pool_grid,
                         zca_eps=args.randconv_zca_eps, seed=args.seed)
    g, fmap, cache_info = randconv_gram(
        rds, cfg, panels=True, cache_dir=args.cache_dir, use_cache=not args.no_gram_cache,
        filter_block=args.filter_block, device=args.device, checkpoint_minutes=args.gram_checkpoint_minutes,
        timings=timings, label=rds.name)
    rule = bandwidth_rule(args.bandwidth, "--bandwidth")
    res, info, sigma, median = feature_gram_rows(g, rule, label_sets, y_test, k, args.seed, device=args.device,
                                                 max_refine=args.max_refine, kernel=args.randconv_kernel)
    results = {name: {"train_error": r["interp"]["train_error"], "test_error": r["interp"]["test_error"],
                      "rkhs_norm": r["interp"]["norm"], "residual_relative": r["interp"]["residual_relative"]}
               for name, r in res.items()}
    linear = args.randconv_kernel == "linear"
    return {"kind": "kernelfit.solve", "n_train": len(rds.y_train), "n_test": len(y_test),
            "num_classes": int(k), "results": results,
            "features": {**cfg.to_dict(), "n_features": fmap.n_features, "standardized": True,
                         "kernel_on_features": args.randconv_kernel},
            "gram_cache": cache_info,
            "stats": {"kernel": "linear (phi.phi' + 1) / n_features" if linear else "gaussian",
                      "bandwidth": None if linear else float(sigma),
                      "bandwidth_rule": None if linear else rule.describe(),
                      "median_distance": float(median), "mode": "mixed", "solver": info}}
