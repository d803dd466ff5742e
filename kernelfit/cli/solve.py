"""``kernelfit solve``: exact kernel interpolation on a dataset (optionally randomized), one JSON record.

Everything that can be checked without data is checked first (``_check_*``), then the memory plan,
then the work. ``solve --gram`` (a precomputed Gram) is in :mod:`.solve_gram`, the random-conv
feature Gram in :mod:`.randconv`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..catalog import DEFAULT_BANDWIDTH, FEATURE_KINDS, KERNELS, LABEL_VARIANTS, MAX_REFINE, MODES, VARIANTS
from . import randconv, solve_gram
from .args import (
    EXIT_OK,
    add_common,
    add_disk_args,
    add_feature_map_args,
    add_size_args,
    bandwidth,
    check_dir_path,
    check_disk_args,
    check_out_path,
    device,
    nonneg_float,
    nonneg_int,
    placement,
    positive_int,
    probability,
    refuse,
    subset_seed,
)
from .checkpoint import claim_checkpoint_dir, remove_checkpoint
from .output import emit_record, print_summary
from .sources import add_data_args, check_data_source, data_shape, load_data


def register(sub) -> None:
    s = sub.add_parser("solve", help="solve K alpha = Y exactly and report errors and norms",
                       description="Solve the exact interpolation problem K alpha = Y (one-hot "
                                   "labels) and write a JSON result record.")
    add_data_args(s)
    add_size_args(s)
    s.add_argument("--subset-seed", type=subset_seed, default=0, metavar="SEED|first",
                   help="seed of the class-stratified random subset (default 0); 'first' takes the first n examples")
    s.add_argument("--kernel", choices=KERNELS, default="gaussian",
                   help="gaussian exp(-|x-z|^2/(2 s^2)) or laplacian exp(-|x-z|/s) (default gaussian)")
    s.add_argument("--bandwidth", type=bandwidth, default=None, metavar="SIGMA|median|F*median",
                   help="kernel bandwidth sigma (on pixels / 255 for images), 'median' (the median pairwise distance "
                        "of a sample) or 'F*median'. Default: the feature map's measured rule, the same as 'kernelfit "
                        "table' uses: " + ", ".join(f"{k} {v}" for k, v in DEFAULT_BANDWIDTH.items())
                        + " (benchmarks/results/bandwidth_rule.jsonl; --features pixels is the default map). "
                        "Zhang et al.'s MNIST setting is 5.")
    s.add_argument("--mode", choices=MODES, default=None,
                   help="mixed: float32 factor + float64 refinement (default); float32; float64 "
                        "(default with --gram: float64)")
    s.add_argument("--jitter", type=nonneg_float, default=0.0, metavar="EPS",
                   help="ridge added to the diagonal (default 0: exact interpolation)")
    s.add_argument("--block-size", type=positive_int, default=None, metavar="B",
                   help="panel width of the tiled factorization (default: automatic)")
    s.add_argument("--max-refine", type=nonneg_int, default=MAX_REFINE, metavar="K",
                   help=f"most refinement steps in mixed mode (default {MAX_REFINE})")
    s.add_argument("--no-fallback", action="store_true",
                   help="mixed mode: do not re-factor in float64 when refinement cannot reach float64 level")
    _add_feature_args(s)
    _add_placement_args(s)
    _add_randomization_args(s)
    o = s.add_argument_group("output")
    o.add_argument("--out", type=Path, default=None, metavar="PATH.json",
                   help="write the JSON record here (atomically) instead of stdout")
    o.add_argument("--overwrite", action="store_true", help="allow replacing an existing --out file")
    o.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    o.add_argument("--force-memory", action="store_true",
                   help="run even when the memory plan says the solve does not fit")
    solve_gram.add_arguments(s)
    add_common(s)
    s.set_defaults(run=run)


def _add_feature_args(s) -> None:
    f = s.add_argument_group("features (the same maps and cache keys as 'kernelfit table')")
    f.add_argument("--features", choices=FEATURE_KINDS, default="pixels",
                   help="pixels: x / 255 for images, values as stored for your arrays (default); gabor: "
                        "Gabor wavelet magnitudes of grayscale images, cached on disk")
    add_feature_map_args(f)
    f.add_argument("--gram-checkpoint-minutes", type=nonneg_float, default=30.0, metavar="M",
                   help="randconv: save the unfinished feature Gram this often (0: never; default 30)")
    f.add_argument("--no-gram-cache", action="store_true",
                   help="randconv: do not save / reuse the accumulated feature Gram")
    f.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="feature / Gram cache root (default: $KERNELFIT_CACHE or the user cache dir)")


def _add_placement_args(s) -> None:
    g = s.add_argument_group("where the factorization runs")
    g.add_argument("--device", type=device, default=None, metavar="DEV",
                   help="cpu (default) or a CUDA device (cuda, cuda:1) to factor on with torch")
    add_disk_args(g)
    g.add_argument("--tf32", action="store_true",
                   help="CUDA, mode mixed: run the float32 factor's GEMMs on TF32 tensor cores (faster on "
                        "Ampere/Hopper; float64 refinement repairs the error). Gram matrices never use TF32")
    g.add_argument("--checkpoint-dir", type=Path, default=None, metavar="DIR",
                   help="save finished factor panels here (a crash loses at most the panels since the last save)")
    g.add_argument("--resume", action="store_true",
                   help="continue the factorization saved in --checkpoint-dir, or the disk store in --scratch-dir")
    g.add_argument("--keep-checkpoint", action="store_true",
                   help="keep the checkpoint after a successful solve (default: removed once the result is written)")


def _add_randomization_args(s) -> None:
    r = s.add_argument_group("randomization (Zhang et al.; test labels stay clean unless --corrupt-test)")
    r.add_argument("--variant", choices=VARIANTS, default="true", help="data variant (default: true)")
    r.add_argument("--corrupt-p", type=probability, default=None, metavar="P",
                   help="label corruption probability; required for --variant corrupt")
    r.add_argument("--seed", type=nonneg_int, default=0, help="seed of the randomization (default 0)")
    r.add_argument("--corrupt-test", action="store_true", help="randomize the test labels too (off by default)")
    r.add_argument("--with-true", action=argparse.BooleanOptionalAction, default=True,
                   help="for label variants, also fit the true labels in the same solve (one "
                        "factorization, extra right-hand sides; default: on)")


# ------------------------------------------------------------------------------ checks
def check_model_args(args) -> None:
    """--save-model and --scheduler refused before any work (the --out check is its own)."""
    check_out_path(args, args.save_model, args.overwrite, "--save-model", "model.safetensors")
    features = getattr(args, "features", "pixels")
    if args.save_model is not None and args.out is not None and args.save_model.resolve() == args.out.resolve():
        refuse(args, f"--save-model and --out are the same path {args.out}; give the model its own file")
    if args.save_model is not None and features != "pixels":
        refuse(args, f"--save-model with --features {features}: model files hold pixel-space models only "
                     f"(predict cannot rebuild the {features} feature map yet); save the features as "
                     f"arrays and solve on them with --x-train / --data, or drop --save-model")
    if args.scheduler is not None and features == "randconv":
        refuse(args, "--scheduler with --features randconv: the random-conv Gram is accumulated in this process; "
                     "drop --scheduler")
    if args.save_model is not None and args.variant not in ("true", *LABEL_VARIANTS):
        refuse(args, f"--save-model with --variant {args.variant}: the model would need the randomized inputs "
                     f"to predict; save models of true or label-randomized data only")
    if args.task == "regression" and args.variant in LABEL_VARIANTS:
        refuse(args, f"--variant {args.variant} randomizes class labels; it does not apply to --task regression")
    if args.scheduler is not None:
        if not (args.scheduler.startswith("local:") or "://" in args.scheduler):
            refuse(args, f"--scheduler {args.scheduler!r}: expected tcp://HOST:PORT (a running dask scheduler) or "
                         f"local:N (start N local worker processes)")
        if args.device is not None or args.checkpoint_dir is not None:
            refuse(args, "--scheduler runs the factorization on the dask workers; --device and "
                         "--checkpoint-dir apply to single-process solves only")


def _check_options(args) -> None:
    """The options of a solve on data (not --gram) that need no data to judge."""
    if args.gram_test is not None:
        refuse(args, "--gram-test goes with --gram G.npy (a precomputed training Gram); without --gram the "
                     "test data come from --dataset, --data or --x-test")
    if args.variant == "corrupt" and args.corrupt_p is None:
        refuse(args, "--variant corrupt needs --corrupt-p P (the probability of replacing a label)")
    if args.resume and args.checkpoint_dir is None and args.scratch_dir is None:
        refuse(args, "--resume needs --checkpoint-dir DIR (the directory the interrupted run saved its panels to), "
                     "or --scratch-dir DIR for a disk solve")
    check_disk_args(args)
    if args.corrupt_p is not None and args.variant != "corrupt":
        refuse(args, f"--corrupt-p applies only to --variant corrupt (got --variant {args.variant})")
    if args.corrupt_test and args.variant not in LABEL_VARIANTS:
        refuse(args, f"--corrupt-test applies only to label variants {LABEL_VARIANTS} (got --variant {args.variant})")
    check_out_path(args, args.out, args.overwrite)
    if args.features != "pixels" and not (args.features == "randconv" and args.no_gram_cache):
        from ..catalog import cache_root

        check_dir_path(args, args.cache_dir or cache_root(), "--cache-dir")


def _gabor_config(args):
    from ..features.gabor import GaborConfig

    return GaborConfig(frequencies=tuple(args.gabor_frequencies), n_orientations=args.gabor_orientations,
                       pool=args.gabor_pool)


def _feature_shape(args, user, shape: dict) -> dict:
    """The shape the memory plan sees: Gabor features have their own dimension (checks the options too)."""
    if args.features == "randconv":
        randconv.check_options(args)
    if args.features != "gabor":
        return shape
    from ..data import REGISTRY
    from ..features.gabor import GaborBank

    image = REGISTRY[args.dataset].image_shape if user is None else shape["image_shape"]
    if len(image) not in (2, 3) or (len(image) == 3 and image[-1] != 1):
        what = args.dataset if user is None else "your arrays"
        refuse(args, f"--features gabor needs grayscale images (H, W) or (H, W, 1); {what} holds "
                     f"{tuple(image)} per example. Use --features pixels")
    return {**shape, "d": GaborBank(_gabor_config(args)).n_features(image[0], image[1])}


def pixel_grid_products(args, user, d: int) -> bool:
    """Whether a solve on this source can store its points' exact dot products: 8-bit pixels of a
    registry dataset (levels within +-128 after the grid shift) with at most 1,023 of them, so every
    dot product is exact in one float32 GEMM. A user's arrays are checked when they are loaded."""
    from ..grid import exact_in_one_gemm

    return (user is None and getattr(args, "features", "pixels") == "pixels" and exact_in_one_gemm(d, 128, 128)
            and getattr(args, "device", None) is None)


def _plan(args, user) -> tuple[int, object]:
    """Sizes checked against the data, then the memory plan (refused when it does not fit)."""
    from ..planning import choose_disk, plan_solve, require_fits

    shape = _feature_shape(args, user, data_shape(args, user))
    what = args.dataset if user is None else "your arrays"
    for flag, n, full in (("--n-train", args.n_train, shape["n_train"]), ("--n-test", args.n_test, shape["n_test"])):
        if n is not None and n > full:
            refuse(args, f"{flag} {n} exceeds the {full} examples of {what}; use at most {full}")
    n_train = args.n_train or shape["n_train"]
    n_test = shape["n_test"] if args.n_test is None else args.n_test
    k = shape["num_classes"] * len(_label_sets_for(args.variant, args.with_true))
    plan = plan_solve(n_train, shape["d"], k, args.mode, n_test=n_test, block=args.block_size,
                      grid_products=pixel_grid_products(args, user, shape["d"]))
    if args.features == "randconv" and not args.force_memory:
        randconv.require_fits(args, n_train, n_test)
    disk = None if args.features == "randconv" else choose_disk(plan, placement(args))   # both sizes if refused
    if disk is None and not plan.fits and not args.force_memory:
        require_fits(plan, cli=True)  # raises MemoryPlanError with the numbers and the flags
    return n_train, plan


def _label_sets_for(variant: str, with_true: bool) -> list[str]:
    return ["true", variant] if variant in LABEL_VARIANTS and with_true else [variant]


# ------------------------------------------------------------------------------ run
def run(args) -> int:
    check_model_args(args)
    if args.tf32 and (args.gram is not None or (args.mode or "mixed") != "mixed"):
        got = "--gram (no kernel function to refine with)" if args.gram is not None else f"--mode {args.mode}"
        refuse(args, f"--tf32 needs --mode mixed (float64 refinement repairs TF32's 10-bit mantissa); got {got}")
    if args.gram is not None:
        solve_gram.check_source(args)
        return solve_gram.run(args)
    if args.bandwidth is None:   # one default rule per feature map, shared with `kernelfit table`
        args.bandwidth = DEFAULT_BANDWIDTH[args.features]
    args.mode = args.mode or "mixed"
    _check_options(args)
    user = check_data_source(args)
    n_train, plan = _plan(args, user)
    held = claim_checkpoint_dir(args, args.checkpoint_dir, args.resume, n_train, plan.block, plan.factor_dtype)
    record = _solve(args, user)   # the work
    print_summary(record)
    emit_record(args, record)
    if args.checkpoint_dir is not None:   # the result is written: the panels are no longer needed
        remove_checkpoint(args.checkpoint_dir, held, keep=args.keep_checkpoint)
    return EXIT_OK


def _load(args, user):
    """The data, subset and randomized: (loaded, subset, randomized, randomization record)."""
    from ..randomize import Randomization, apply_randomization

    loaded = load_data(args, user)
    ds = loaded.subset(args.n_train, None if args.n_test == 0 else args.n_test, seed=args.subset_seed)
    rnd = Randomization(variant=args.variant, p=args.corrupt_p or 0.0, seed=args.seed, corrupt_test=args.corrupt_test)
    rds, rinfo = apply_randomization(ds, rnd)
    return loaded, ds, rds, rinfo


def _options(args):
    from ..solve import SolveOptions

    return SolveOptions(kernel=args.kernel, bandwidth=args.bandwidth, mode=args.mode, jitter=args.jitter,
                        max_refine=args.max_refine, force_memory=args.force_memory,
                        fallback_float64=not args.no_fallback, placement=placement(args))


def _solve(args, user) -> dict:
    import numpy as np

    from ..data import describe
    from ..features.pipeline import dataset_features
    from ..results import PhaseTimer, peak_rss_bytes

    timer = PhaseTimer()
    with timer.phase("load"):
        loaded, ds, rds, rinfo = _load(args, user)
        # pixels / 255 in float64 lie exactly on the 1/255 grid, so every float64 pass (residuals,
        # predictions) gets exact distances from float32 GEMMs (``kernelfit.grid``); the solver keeps
        # a float64 copy of the features anyway
        fdtype = np.float64 if args.mode == "float64" or args.features == "pixels" else np.float32
        has_test = args.n_test != 0 and len(rds.x_test) > 0
        yt = rds.y_test if has_test else None
        if args.features != "randconv":
            X, Xt, features = dataset_features(rds, args.features, gabor=_gabor_config(args),
                                               cache_dir=args.cache_dir, dtype=fdtype, with_test=has_test)
    label_sets = {name: (ds.y_train if name == "true" else rds.y_train)
                  for name in _label_sets_for(args.variant, args.with_true)}
    if args.task == "regression":   # the label values themselves are the float targets
        label_sets = {name: y.astype(np.float64) for name, y in label_sets.items()}
        yt = None if yt is None else yt.astype(np.float64)
    n_te = len(yt) if yt is not None else 0
    extra = {"dataset": {**describe(loaded), "n_train": int(len(rds.y_train)), "n_test": int(n_te),
                         "subset_seed": args.subset_seed,
                         "note": "CIFAR-10 (JPEG q75 copy)" if "jpeg" in ds.source.lower() else None},
             "randomization": rinfo}
    with timer.phase("solve"):
        if args.features == "randconv":
            from ..provenance import provenance

            prov = provenance()   # before the solve: the code that runs
            record = {**randconv.solve(args, rds, label_sets, yt, ds.num_classes, {}), **extra, "provenance": prov}
        else:
            extra["features"] = features
            record = _interpolate(args, user, ds, (X, Xt, yt, fdtype), label_sets, extra)
    record["cli_timings_s"] = timer.as_dict()
    record["cli_peak_rss_bytes"] = peak_rss_bytes()
    return record


def _interpolate(args, user, ds, arrays, label_sets: dict, extra: dict) -> dict:
    """The kernel solve on features (optionally on a dask cluster), and the model file if asked."""
    import numpy as np

    from ..experiment import run_interpolation

    X, Xt, yt, fdtype = arrays
    (record, model), cluster = solve_gram.with_cluster(args, lambda client: run_interpolation(
        X, label_sets, Xt, yt, ds.num_classes, _options(args), extra, task=args.task, client=client,
        return_model=True))
    solve_gram.save_model_if_asked(
        args, record, model, cluster,
        preprocessing={"kind": "pixels", "dtype": np.dtype(fdtype).name, "scale": float(ds.scale)},
        class_names=ds.classes,
        # a user's labels are indices into their distinct values: predict those values
        classes=None if user is None or args.task != "classification" else [int(c) for c in ds.classes])
    return record

