"""Command line interface: ``kernelfit solve | plan | data | table``.

``kernelfit solve``   exact kernel interpolation on a dataset (optionally randomized), one JSON record
``kernelfit plan``    memory plan of a solve, without allocating anything
``kernelfit data``    where data is looked for (``path``), what is found (``info``), ``download``
``kernelfit table``   the kernel table of Zhang et al. (Section 5), see ``kernelfit table --help``
``kernelfit predict`` predictions of a model saved by ``solve --save-model``, streamed in blocks

Every input is validated before any data is loaded or memory allocated; errors name what was
expected and how to fix it. Human-readable summaries go to stderr, the JSON record to stdout or
``--out`` (written atomically, never overwriting an existing file without ``--overwrite``).
Run as ``kernelfit ...`` (console script) or ``python -m kernelfit.cli ...``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from .errors import KernelfitError

__all__ = ["main", "build_parser"]

DATASET_NAMES = ("mnist-subset", "mnist", "fashion-mnist", "kmnist", "cifar10")
MODES = ("mixed", "float32", "float64")
TASKS = ("classification", "regression")
PREDICTION_SUFFIXES = (".npy", ".csv", ".json")
KERNELS = ("gaussian", "laplacian")
# Randomization variants (kernelfit.randomize.VARIANTS); repeated here so that `--help` and
# argument parsing never import numpy-heavy modules. A test checks they agree.
VARIANTS = ("true", "corrupt", "random-labels", "shuffled-pixels", "random-pixels", "gaussian")
LABEL_VARIANTS = ("corrupt", "random-labels")
# kernelfit.features.pipeline.FEATURE_KINDS (a test checks they agree)
FEATURE_KINDS = ("pixels", "gabor", "randconv")

# Feature dimension, classes and full split sizes, for planning without loading any data.
DATASET_SHAPES = {
    "mnist-subset": {"d": 784, "num_classes": 10, "n_train": 5000, "n_test": 1000},
    "mnist": {"d": 784, "num_classes": 10, "n_train": 60000, "n_test": 10000},
    "fashion-mnist": {"d": 784, "num_classes": 10, "n_train": 60000, "n_test": 10000},
    "kmnist": {"d": 784, "num_classes": 10, "n_train": 60000, "n_test": 10000},
    "cifar10": {"d": 3072, "num_classes": 10, "n_train": 50000, "n_test": 10000},
}

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_DOES_NOT_FIT, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


# --------------------------------------------------------------------------------------------
# argument types: each says what it expected and what it got
# --------------------------------------------------------------------------------------------

def _bandwidth(text: str):
    if text.strip().lower() == "median":
        return "median"
    from .errors import InputError
    from .kernels import check_bandwidth

    try:
        float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a positive number (sigma, e.g. 5.0 for MNIST pixels / 255) or 'median', "
            f"got {text!r}") from None
    try:
        return check_bandwidth(text)   # the one check: finite, > 0, 1 / (2 sigma^2) finite and nonzero
    except InputError as e:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0 or 'median', got {text!r}: {e}") from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _nonneg_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1], got {text!r}")
    return value


def _subset_seed(text: str):
    if text.strip().lower() == "first":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an integer >= 0 (seeded stratified sample) or 'first' (the first n "
            f"examples), got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0 or 'first', got {value}")
    return value


def _device(text: str) -> str:
    """cpu, cuda or cuda:N; checked here so that a typo fails before any data is read."""
    import re

    if re.fullmatch(r"cpu|cuda(:\d+)?", text.strip()):
        return text.strip()
    raise argparse.ArgumentTypeError(f"expected 'cpu', 'cuda' or 'cuda:N' (e.g. cuda:0), got {text!r}")


def _dataset(text: str) -> str:
    name = text.strip().lower().replace("_", "-")
    name = {"cifar-10": "cifar10", "fashionmnist": "fashion-mnist"}.get(name, name)
    if name not in DATASET_NAMES:
        raise argparse.ArgumentTypeError(
            f"unknown dataset {text!r}; expected one of {', '.join(DATASET_NAMES)}")
    return name


# --------------------------------------------------------------------------------------------
# parser
# --------------------------------------------------------------------------------------------

def _add_data_args(p: argparse.ArgumentParser, with_download: bool = True) -> None:
    g = p.add_argument_group("data: a named dataset, or your own arrays")
    g.add_argument("--dataset", type=_dataset, default=None, metavar="NAME",
                   help=f"one of {', '.join(DATASET_NAMES)} (default: mnist-subset, shipped "
                        f"with kernelfit: 5,000 train / 1,000 test MNIST images)")
    g.add_argument("--data-dir", default=None, metavar="DIR",
                   help="directory (or file) holding the named --dataset; default $KERNELFIT_DATA, else "
                        "~/.cache/kernelfit")
    if with_download:
        g.add_argument("--download", action="store_true",
                       help="fetch missing files of --dataset from the canonical source (checksum-verified)")
    g.add_argument("--data", default=None, metavar="FILE.npz",
                   help="your arrays in one .npz: x_train, y_train and optionally x_test, y_test (any "
                        "shape, any real dtype; used as stored, no scaling)")
    for split in ("train", "test"):
        g.add_argument(f"--x-{split}", default=None, metavar="FILE",
                       help=f"{split} inputs: X.npy (memory-mapped), F.npz:NAME, F.h5:/DATASET (h5py) or "
                            f"S.zarr:/ARRAY (zarr)" if split == "train" else "test inputs (same formats)")
        g.add_argument(f"--y-{split}", default=None, metavar="FILE",
                       help=f"{split} targets, same formats: integer labels >= 0, or float targets (n,) / (n, k) "
                            f"with --task regression (also the targets of --gram / --gram-test)")


def _user_arrays(args) -> dict | None:
    """The user-array options given, or None when a named dataset is meant."""
    given = {k: getattr(args, k, None) for k in ("data", "x_train", "y_train", "x_test", "y_test")}
    return given if any(v is not None for v in given.values()) else None


def _check_data_source(parser, args) -> dict | None:
    """Refuse conflicting data options before anything is read. Returns the user-array options
    (or None, and then ``args.dataset`` is set to the named dataset to load)."""
    user = _user_arrays(args)
    if user is not None:
        flags = [f"--{k.replace('_', '-')}" for k, v in user.items() if v is not None]
        if args.dataset is not None:
            parser.error(f"--dataset {args.dataset} conflicts with {' '.join(flags)}: name a dataset or "
                         f"give your own arrays, not both")
        if getattr(args, "data_dir", None) is not None:
            parser.error(f"--data-dir applies to a named --dataset, not to {' '.join(flags)} (which name "
                         f"their files themselves); drop --data-dir")
        if getattr(args, "download", False):
            parser.error(f"--download fetches a named --dataset; it does not apply to {' '.join(flags)}")
        if user["data"] is not None and len(flags) > 1:
            parser.error(f"--data FILE.npz conflicts with {' '.join(f for f in flags if f != '--data')}: "
                         f"give one .npz holding x_train, y_train (x_test, y_test), or the separate files")
        if user["data"] is None:
            if (user["x_train"] is None) != (user["y_train"] is None):
                parser.error("your own arrays need both --x-train FILE and --y-train FILE")
            if (user["x_test"] is None) != (user["y_test"] is None):
                parser.error("a test split needs both --x-test FILE and --y-test FILE")
            if user["x_train"] is None:
                parser.error(f"{' '.join(flags)} given without --x-train FILE and --y-train FILE")
        return user
    if getattr(args, "data_dir", None) is not None and args.dataset in (None, "mnist-subset"):
        parser.error(f"--data-dir {args.data_dir} needs a dataset it can serve: add --dataset NAME (one of "
                     f"{', '.join(n for n in DATASET_NAMES if n != 'mnist-subset')}); mnist-subset ships "
                     f"with kernelfit. For your own arrays use --data FILE.npz or --x-train/--y-train")
    if args.dataset is None:
        args.dataset = "mnist-subset"
    return None


def _user_shape(user: dict, task: str = "classification") -> dict:
    """d, classes (regression: target columns) and split sizes of a user's arrays, for planning: from their
    headers, and for classification the distinct labels (read and checked, as the loader will count them)."""
    import numpy as np

    from .data import peek_arrays, peek_outputs

    shapes = peek_arrays(**user)
    k = peek_outputs(**user, task=task)
    x = shapes["x_train"][0]
    return {"d": int(np.prod(x[1:], dtype=np.int64)), "image_shape": x[1:], "num_classes": max(k, 1), "n_train": x[0],
            "n_test": shapes["x_test"][0][0] if "x_test" in shapes else 0}


def _load_data(args, user: dict | None):
    from .data import load_arrays, load_dataset

    if user is not None:
        return load_arrays(**user, task=getattr(args, "task", "classification"))
    return load_dataset(args.dataset, data_dir=args.data_dir, download=getattr(args, "download", False))


def _add_size_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n-train", type=_positive_int, default=None, metavar="N",
                   help="training points (default: the whole training split)")
    p.add_argument("--n-test", type=_nonneg_int, default=None, metavar="N",
                   help="test points; 0 skips the test evaluation (default: the whole test split)")


def add_feature_map_args(f) -> None:
    """The Gabor and random-conv options, shared by ``kernelfit solve --features`` and ``kernelfit table``."""
    f.add_argument("--gabor-frequencies", type=float, nargs="+", default=[0.15, 0.25, 0.35], metavar="F",
                   help="Gabor frequencies in cycles / pixel (default 0.15 0.25 0.35)")
    f.add_argument("--gabor-orientations", type=_positive_int, default=8, metavar="K",
                   help="Gabor orientations (default 8)")
    f.add_argument("--gabor-pool", type=_positive_int, default=4, metavar="P",
                   help="Gabor mean-pooling window (default 4)")
    f.add_argument("--filters", type=_positive_int, default=1000, metavar="N",
                   help="randconv: random filters (default 1000; Zhang et al.: 32000)")
    f.add_argument("--filter-block", type=_positive_int, default=250, metavar="B",
                   help="randconv: filters per feature block (default 250)")
    f.add_argument("--patch-size", type=_positive_int, default=6, metavar="P", help="randconv: patch side (default 6)")
    f.add_argument("--filter-kind", choices=("gaussian", "patches"), default="patches",
                   help="randconv: filters drawn as Gaussian noise or as whitened training patches (default)")
    f.add_argument("--randconv-bias", type=float, default=0.25, metavar="A",
                   help="randconv: rectifier threshold in max(0, +-w.x - A) (default 0.25)")
    f.add_argument("--randconv-pool-grid", type=_positive_int, default=2, metavar="G",
                   help="randconv: sum-pooling grid per side (default 2)")
    f.add_argument("--randconv-zca-eps", type=float, default=0.1, metavar="EPS",
                   help="randconv: ZCA whitening regularizer (default 0.1)")
    f.add_argument("--randconv-kernel", choices=("gaussian", "linear"), default="gaussian",
                   help="randconv: kernel on the standardized features (default gaussian, bandwidth from "
                        "--bandwidth, in kernelfit table --bandwidth-cifar-randconv; linear: (phi.phi' + 1) / n_features)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="kernelfit",
        description="Exact kernel interpolation at MNIST / CIFAR-10 scale.",
        epilog="Run 'kernelfit <command> --help' for the options of a command.",
    )
    ap.add_argument("--debug", action="store_true",
                    help="show the full traceback of a failure instead of the one-line error (also anywhere "
                         "after the command, or KERNELFIT_DEBUG=1)")
    sub = ap.add_subparsers(dest="command", metavar="{solve,plan,data,table,predict}")
    sub.required = True

    # -- solve --------------------------------------------------------------------------------
    s = sub.add_parser("solve", help="solve K alpha = Y exactly and report errors and norms",
                       description="Solve the exact interpolation problem K alpha = Y (one-hot "
                                   "labels) and write a JSON result record.")
    _add_data_args(s)
    _add_size_args(s)
    s.add_argument("--subset-seed", type=_subset_seed, default=0, metavar="SEED|first",
                   help="seed of the class-stratified random subset (default 0); 'first' takes "
                        "the first n examples")
    s.add_argument("--kernel", choices=KERNELS, default="gaussian",
                   help="gaussian exp(-|x-z|^2/(2 s^2)) or laplacian exp(-|x-z|/s) (default gaussian)")
    s.add_argument("--bandwidth", type=_bandwidth, default="median", metavar="SIGMA|median",
                   help="kernel bandwidth sigma on pixels / 255, or 'median' (median pairwise "
                        "distance; default). Zhang et al.'s MNIST setting is 5.")
    s.add_argument("--mode", choices=MODES, default=None,
                   help="mixed: float32 factor + float64 refinement (default); float32; float64 "
                        "(default with --gram: float64)")
    s.add_argument("--jitter", type=_nonneg_float, default=0.0, metavar="EPS",
                   help="ridge added to the diagonal (default 0: exact interpolation)")
    s.add_argument("--block-size", type=_positive_int, default=None, metavar="B",
                   help="panel width of the tiled factorization (default: automatic)")
    s.add_argument("--max-refine", type=_nonneg_int, default=10, metavar="K",
                   help="most refinement steps in mixed mode (default 10)")
    s.add_argument("--no-fallback", action="store_true",
                   help="mixed mode: do not re-factor in float64 when refinement cannot reach float64 level")
    f = s.add_argument_group("features (the same maps and cache keys as 'kernelfit table')")
    f.add_argument("--features", choices=FEATURE_KINDS, default="pixels",
                   help="pixels: x / 255 for images, values as stored for your arrays (default); gabor: "
                        "Gabor wavelet magnitudes of grayscale images, cached on disk")
    add_feature_map_args(f)
    f.add_argument("--gram-checkpoint-minutes", type=_nonneg_float, default=30.0, metavar="M",
                   help="randconv: save the unfinished feature Gram this often (0: never; default 30)")
    f.add_argument("--no-gram-cache", action="store_true",
                   help="randconv: do not save / reuse the accumulated feature Gram")
    f.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="feature / Gram cache root (default: $KERNELFIT_CACHE or the user cache dir)")
    g = s.add_argument_group("where the factorization runs")
    g.add_argument("--device", type=_device, default=None, metavar="DEV",
                   help="cpu (default) or a CUDA device (cuda, cuda:1) to factor on with torch")
    g.add_argument("--out-of-core", choices=("auto", "yes", "no"), default="auto",
                   help="GPU: stream panels through the device when the Gram does not fit (default auto: "
                        "decided from measured free device memory)")
    g.add_argument("--tf32", action="store_true",
                   help="CUDA, mode mixed: run the float32 factor's GEMMs on TF32 tensor cores (faster on "
                        "Ampere/Hopper; float64 refinement repairs the error). Gram matrices never use TF32")
    g.add_argument("--checkpoint-dir", type=Path, default=None, metavar="DIR",
                   help="save finished factor panels here (a crash loses at most the panels since the last save)")
    g.add_argument("--resume", action="store_true", help="continue the factorization saved in --checkpoint-dir")
    g.add_argument("--keep-checkpoint", action="store_true",
                   help="keep the checkpoint after a successful solve (default: removed once the result is written)")
    r = s.add_argument_group("randomization (Zhang et al.; test labels stay clean unless "
                             "--corrupt-test)")
    r.add_argument("--variant", choices=VARIANTS, default="true",
                   help="data variant (default: true)")
    r.add_argument("--corrupt-p", type=_probability, default=None, metavar="P",
                   help="label corruption probability; required for --variant corrupt")
    r.add_argument("--seed", type=_nonneg_int, default=0,
                   help="seed of the randomization (default 0)")
    r.add_argument("--corrupt-test", action="store_true",
                   help="randomize the test labels too (off by default)")
    r.add_argument("--with-true", action=argparse.BooleanOptionalAction, default=True,
                   help="for label variants, also fit the true labels in the same solve (one "
                        "factorization, extra right-hand sides; default: on)")
    o = s.add_argument_group("output")
    o.add_argument("--out", type=Path, default=None, metavar="PATH.json",
                   help="write the JSON record here (atomically) instead of stdout")
    o.add_argument("--overwrite", action="store_true", help="allow replacing an existing --out file")
    o.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    _add_threads_arg(o)
    o.add_argument("--force-memory", action="store_true",
                   help="run even when the memory plan says the solve does not fit")
    _add_gram_model_cluster_args(s)
    s.set_defaults(subparser=s)

    # -- plan ---------------------------------------------------------------------------------
    p = sub.add_parser("plan", help="memory plan of a solve (dry run, allocates nothing)",
                       description="Print the memory a solve would need, as JSON on stdout and "
                                   "one line on stderr. Exit status 0 if it fits, 3 if not.")
    p.add_argument("--dataset", type=_dataset, default=None, metavar="NAME",
                   help=f"sets d, classes and default sizes: one of {', '.join(DATASET_NAMES)} "
                        f"(default mnist-subset)")
    p.add_argument("--data", default=None, metavar="FILE.npz",
                   help="or take d, classes and sizes from your arrays (only their headers and labels are read)")
    for key in ("x-train", "y-train", "x-test", "y-test"):
        p.add_argument(f"--{key}", default=None, metavar="FILE", help=f"your {key.replace('-', '_')} file")
    _add_size_args(p)
    p.add_argument("--dim", type=_positive_int, default=None, metavar="D",
                   help="feature dimension (default: the dataset's, e.g. 784 for MNIST)")
    p.add_argument("--num-outputs", type=_positive_int, default=None, metavar="K",
                   help="right-hand sides (default: the number of classes)")
    p.add_argument("--mode", choices=MODES, default=None,
                   help="mixed (default on the host), float32, float64; with a device the default lets the device "
                        "strategy choose")
    p.add_argument("--block-size", type=_positive_int, default=None, metavar="B")
    p.add_argument("--available-gib", type=_nonneg_float, default=None, metavar="GIB",
                   help="plan for this much free memory instead of what is free now")
    g = p.add_argument_group("device strategy (docs/gpu.md): which precision and path a GPU solve should take")
    g.add_argument("--device", default=None, metavar="cuda[:N]",
                   help="plan for this CUDA device: its free memory, its rates from the table (or measured)")
    g.add_argument("--device-profile", default=None, metavar="NAME",
                   help="plan for a named GPU without having one: h200, h100, h100-pcie, a100, v100, l4, rtx4090")
    g.add_argument("--device-memory-gib", type=_nonneg_float, default=None, metavar="GIB",
                   help="the device's memory (overrides the profile's; with both rates below: a device of your own)")
    g.add_argument("--float64-tflops", type=_nonneg_float, default=None, metavar="R", help="its float64 GEMM rate")
    g.add_argument("--float32-tflops", type=_nonneg_float, default=None, metavar="R", help="its float32 GEMM rate")
    g.add_argument("--measure", action="store_true", help="with --device: measure the GEMM rates (~2 s)")
    g.add_argument("--tf32", action="store_true",
                   help="plan a TF32 float32 factor (refined in float64; may fall back to float64, reported)")
    p.set_defaults(subparser=p)

    # -- data ---------------------------------------------------------------------------------
    d = sub.add_parser("data", help="where data is looked for, what is found, downloads")
    dsub = d.add_subparsers(dest="data_command", metavar="{info,path,download}")
    dsub.required = True
    di = dsub.add_parser("info", help="the data directory and the datasets found in it")
    di.add_argument("--data-dir", default=None, metavar="DIR")
    di.add_argument("--load", action="store_true",
                    help="also load each dataset found and report its shapes (slow for an "
                         "undecoded CIFAR-10 image folder)")
    dp = dsub.add_parser("path", help="print the resolved data directory")
    dp.add_argument("--data-dir", default=None, metavar="DIR")
    dd = dsub.add_parser("download", help="download a dataset with checksum verification")
    dd.add_argument("dataset", type=_dataset, metavar="NAME", help="mnist, fashion-mnist, kmnist or cifar10")
    dd.add_argument("--data-dir", default=None, metavar="DIR")
    dd.add_argument("--base-url", default=None, metavar="URL", help="mirror with the same file names")
    dd.add_argument("--force", action="store_true", help="download again even if verified files exist")
    for q in (di, dp, dd):
        q.set_defaults(subparser=q)

    _add_predict_parser(sub)

    # -- table (delegated; its own parser handles the options) --------------------------------
    sub.add_parser("table", help="the kernel table of Zhang et al. (see 'kernelfit table --help')",
                   add_help=False)
    return ap


def _add_gram_model_cluster_args(s: argparse.ArgumentParser) -> None:
    """solve: precomputed Gram input, regression targets, model files, dask cluster."""
    g = s.add_argument_group("precomputed Gram (instead of a dataset: G = k(X_train, X_train), n x n)")
    g.add_argument("--gram", default=None, metavar="G.npy|G.h5:/dset|G.zarr:/arr",
                   help="training Gram matrix, full square (read through a memory map / in tiles, never "
                        "copied whole); needs --y-train (the targets of the Gram's rows)")
    g.add_argument("--gram-test", default=None, metavar="KT.npy|...",
                   help="test Gram k(X_test, X_train), m x n; needs --y-test")
    t = s.add_argument_group("targets, model file, cluster")
    t.add_argument("--task", choices=TASKS, default="classification",
                   help="classification: integer labels, one-hot, error rates (default); regression: float "
                        "targets (1-D or multi-output), RMSE and R^2")
    t.add_argument("--save-model", type=Path, default=None, metavar="MODEL.safetensors",
                   help="write the fitted interpolant (safetensors: alpha, training points, kernel, "
                        "preprocessing, provenance, checksum) for 'kernelfit predict'")
    t.add_argument("--scheduler", default=None, metavar="tcp://HOST:PORT|local:N",
                   help="build the Gram and factor it on dask.distributed: a running scheduler, or local:N "
                        "to start a LocalCluster of N worker processes (needs kernelfit[dask])")


def _add_predict_parser(sub) -> None:
    p = sub.add_parser("predict", help="predict with a model saved by 'kernelfit solve --save-model'",
                       description="Predict class labels (classification) or values (regression) for new "
                                   "points with a saved model; the points are read and predicted in blocks.")
    p.add_argument("--model", type=Path, required=True, metavar="MODEL.safetensors")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", default=None, metavar="FILE.npz",
                     help="an .npz with x_test (and optionally y_test: then the metrics are reported)")
    src.add_argument("--x-test", default=None, metavar="X.npy|X.h5:/dset|X.zarr:/arr",
                     help="test points in the model's input layout (e.g. raw images for a dataset model)")
    src.add_argument("--gram-test", default=None, metavar="KT.npy|...",
                     help="precomputed-Gram models: the test Gram k(X_test, X_train), m x n")
    p.add_argument("--y-test", default=None, metavar="YT.npy|...", help="test targets: report error / RMSE")
    p.add_argument("--target", default=None, metavar="NAME",
                   help="target set of the model to predict (default: its first, e.g. 'true')")
    p.add_argument("--scores", action="store_true",
                   help="write the raw scores k(x, X) alpha (n, outputs) instead of labels")
    p.add_argument("--out", type=Path, default=None, metavar="PRED.npy|.csv|.json",
                   help="write predictions here (atomically); default: JSON on stdout")
    p.add_argument("--overwrite", action="store_true", help="allow replacing an existing --out file")
    _add_threads_arg(p)
    p.set_defaults(subparser=p)


def _add_threads_arg(p) -> None:
    p.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                   help="use at most N threads (BLAS, torch, element-wise passes; default: all cores). On a "
                        "shared or busy machine --threads 1 can be several times faster")


# --------------------------------------------------------------------------------------------
# commands
# --------------------------------------------------------------------------------------------

def _eprint(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def _check_out_path(parser: argparse.ArgumentParser, out: Path | None, overwrite: bool, flag: str = "--out",
                    example: str = "result.json") -> None:
    """Refuse a bad output path before any work, so an hour-long solve never ends in a refusal: a
    directory, an existing file without --overwrite, or a place where a probe file cannot be created and
    written (read-only mounts, /proc, a full disk)."""
    if out is None:
        return
    from .results import check_output_file

    try:
        check_output_file(out, flag, overwrite=overwrite, example=example)
    except KernelfitError as e:
        _refuse(parser, str(e))


def _check_dir_path(parser: argparse.ArgumentParser, directory, flag: str) -> None:
    """The same probe for a directory the command will write into (caches)."""
    if directory is None:
        return
    from .results import check_writable_dir

    try:
        check_writable_dir(Path(directory), flag)
    except KernelfitError as e:
        _refuse(parser, str(e))


def _refuse(parser: argparse.ArgumentParser, message: str) -> None:
    """A refusal of well-formed arguments (an existing --out, an unwritable place): one line and exit 2,
    without the usage dump that argparse prints for a malformed command line."""
    parser.exit(EXIT_USAGE, f"{parser.prog}: error: {message}\n")


def _check_checkpoint_dir(parser: argparse.ArgumentParser, directory: Path | None, resume: bool,
                          n: int | None = None, block: int | None = None, dtype: str | None = None):
    """--resume continues a checkpoint that exists; without it a checkpoint is never silently reused
    or overwritten; a directory kernelfit did not write is never written into. Writability and free
    space for the planned panels are checked too; then the directory is claimed (marker, lock held
    by this run, which a second run sees with our PID). Returns the claimed directory: hold it."""
    if directory is None:
        return None
    from .errors import InputError
    from .linalg.checkpoint import MANIFEST, checkpoint_bytes, owned_dir, read_manifest
    from .results import check_free_space, check_writable_dir
    from .storage import MARKER

    own = owned_dir(directory, "--checkpoint-dir")
    try:
        own.check()
    except InputError as e:
        hint = (f" (A checkpoint directory kernelfit wrote carries {MARKER}; for such a directory, pass --resume "
                f"to continue it.)" if (directory / MANIFEST).exists() else "")
        parser.error(f"{e}{hint}")
    manifest = read_manifest(directory, "--checkpoint-dir") if own.marker_path.is_file() else None
    if resume and manifest is None:
        what = "does not exist" if not directory.exists() else f"holds no checkpoint (no {MANIFEST})"
        parser.error(f"--resume: --checkpoint-dir {directory} {what}; nothing to resume. Fix: name the "
                     f"directory the interrupted run saved to, or drop --resume to start afresh.")
    if not resume and manifest is not None:
        parser.error(f"--checkpoint-dir {directory} already holds a checkpoint; pass --resume to continue it, "
                     f"or choose an empty directory (or delete this one) to start afresh.")
    done = 0
    if resume and n is not None:
        stages = manifest["stages"]
        if not any(st["n"] == n and st["block"] == block for st in stages.values()):
            have = "; ".join(f"{k}: n = {st['n']}, block {st['block']}" for k, st in stages.items()) or "no stages"
            parser.error(f"--resume: the checkpoint in {directory} is of another problem ({have}); this run has "
                         f"n = {n}, block {block}. Fix: pass the options of the interrupted run, or drop --resume "
                         f"and use a new directory.")
        done = sum(f["bytes"] for f in stages.get(str(dtype), {"files": {}})["files"].values()
                   if isinstance(f.get("bytes"), int))
    try:
        check_writable_dir(directory, "--checkpoint-dir")
        if n is not None:
            check_free_space(directory, checkpoint_bytes(n, block, dtype) - done, "--checkpoint-dir",
                             f"the checkpoint ({dtype} factor panels, n = {n})")
    except InputError as e:
        parser.error(str(e))
    return own.claim()


def _remove_checkpoint(directory: Path, held=None, keep: bool = False) -> None:
    """After the result is written: delete exactly the files the checkpoint's manifest lists (and our
    marker and lock, and the directory when that leaves it empty and we created it); never a file
    kernelfit did not write. ``keep``: only release the directory."""
    from .linalg.checkpoint import remove_checkpoint

    if keep:
        if held is not None:
            held.release()
        return
    try:
        left = remove_checkpoint(directory, "--checkpoint-dir", owned=held)
    except KernelfitError as e:   # e.g. a manifest damaged meanwhile: keep everything, say why
        _eprint(f"kept the checkpoint in {directory}: {e}")
        return
    extra = f"; the directory stays: it also holds files kernelfit did not write ({', '.join(left[:5])})" if left else ""
    _eprint(f"removed the checkpoint in {directory} (keep it with --keep-checkpoint){extra}")


def _gabor_config(args):
    from .features.gabor import GaborConfig

    return GaborConfig(frequencies=tuple(args.gabor_frequencies), n_orientations=args.gabor_orientations,
                       pool=args.gabor_pool)


def _check_randconv_options(parser, args) -> None:
    """The random-conv solve runs from the accumulated feature Gram: mixed precision, no ridge."""
    bad = [(args.mode != "mixed", f"--mode {args.mode} (it refines a float32 factor in float64: mixed)"),
           (args.kernel != "gaussian", f"--kernel {args.kernel} (use --randconv-kernel gaussian|linear)"),
           (args.jitter != 0, "--jitter"), (args.checkpoint_dir is not None, "--checkpoint-dir"),
           (args.n_test == 0, "--n-test 0 (it needs a test split)")]
    refused = [what for cond, what in bad if cond]
    if refused:
        parser.error(f"--features randconv solves from the feature Gram and does not take {'; '.join(refused)}")


def _require_randconv_fits(args, n: int, m: int) -> None:
    """Feature Gram panels (float64) + test block (float64) + feature blocks + the float32 factor copy."""
    from .errors import MemoryPlanError
    from .features.randconv import RandConvConfig, RandConvFeatures
    from .planning import available_bytes

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


def _solve_randconv(args, rds, label_sets: dict, y_test, k: int, timings: dict) -> dict:
    """Random-conv features (never materialized): the standardized Gram is accumulated block by block
    (cached like the table's), turned into the kernel in place and solved by the table's panel solver."""
    from .features.pipeline import randconv_gram
    from .features.randconv import RandConvConfig
    from .table import _cholesky_rows_panels

    cfg = RandConvConfig(n_filters=args.filters, patch_size=args.patch_size, filters=args.filter_kind,
                         bias=args.randconv_bias, pool_grid=args.randconv_pool_grid,
                         zca_eps=args.randconv_zca_eps, seed=args.seed)
    g, fmap, cache_info = randconv_gram(
        rds, cfg, panels=True, cache_dir=args.cache_dir, use_cache=not args.no_gram_cache,
        filter_block=args.filter_block, device=args.device, checkpoint_minutes=args.gram_checkpoint_minutes,
        timings=timings, label=rds.name)
    spec = ("median", 1.0) if args.bandwidth == "median" else ("abs", float(args.bandwidth))
    res, info, sigma, median = _cholesky_rows_panels(g, spec, label_sets, y_test, k, args.seed, device=args.device,
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
                      "bandwidth_rule": None if linear else ("median heuristic" if spec[0] == "median" else "given"),
                      "median_distance": float(median), "mode": "mixed", "solver": info}}


def _label_sets_for(variant: str, with_true: bool) -> list[str]:
    if variant in LABEL_VARIANTS and with_true:
        return ["true", variant]
    return [variant]


def _pixel_grid_products(args, user, d: int) -> bool:
    """Whether a solve on this source can store its points' exact dot products: 8-bit pixels of a
    registry dataset (levels within +-128 after the grid shift) with at most 1,023 of them, so every
    dot product is exact in one float32 GEMM. A user's arrays are checked when they are loaded."""
    from .grid import exact_in_one_gemm

    return (user is None and getattr(args, "features", "pixels") == "pixels" and exact_in_one_gemm(d, 128, 128)
            and getattr(args, "device", None) is None)


def _plan_for(args, n_train: int, n_test: int, k: int, d: int, user=None):
    from .planning import plan_solve

    return plan_solve(n_train, d, k, args.mode, n_test=n_test, block=args.block_size,
                      grid_products=_pixel_grid_products(args, user, d))


def cmd_solve(args, parser) -> int:
    # --- everything that can be checked without data, checked first ---
    _check_model_args(args, parser)
    if args.tf32 and (args.gram is not None or (args.mode or "mixed") != "mixed"):
        got = "--gram (no kernel function to refine with)" if args.gram is not None else f"--mode {args.mode}"
        parser.error(f"--tf32 needs --mode mixed (float64 refinement repairs TF32's 10-bit mantissa); got {got}")
    if args.gram is not None:
        _check_gram_source(args, parser)
        return cmd_solve_gram(args, parser)
    _check_gram_only_args(args, parser)
    args.mode = args.mode or "mixed"
    if args.variant == "corrupt" and args.corrupt_p is None:
        parser.error("--variant corrupt needs --corrupt-p P (the probability of replacing a label)")
    if args.resume and args.checkpoint_dir is None:
        parser.error("--resume needs --checkpoint-dir DIR (the directory the interrupted run saved its panels to)")
    if args.corrupt_p is not None and args.variant != "corrupt":
        parser.error(f"--corrupt-p applies only to --variant corrupt (got --variant {args.variant})")
    if args.corrupt_test and args.variant not in LABEL_VARIANTS:
        parser.error(f"--corrupt-test applies only to label variants {LABEL_VARIANTS} "
                     f"(got --variant {args.variant})")
    _check_out_path(parser, args.out, args.overwrite)
    if args.features != "pixels" and not (args.features == "randconv" and args.no_gram_cache):
        from .features.cache import default_cache_dir

        _check_dir_path(parser, args.cache_dir or default_cache_dir(), "--cache-dir")
    user = _check_data_source(parser, args)
    shape = DATASET_SHAPES[args.dataset] if user is None else _user_shape(user, getattr(args, "task", "classification"))
    what = args.dataset if user is None else "your arrays"
    if args.features == "randconv":
        _check_randconv_options(parser, args)
    if args.features == "gabor":   # the features' dimension, for the memory plan; checks the options too
        from .data import REGISTRY
        from .features.gabor import GaborBank

        image = REGISTRY[args.dataset].image_shape if user is None else shape["image_shape"]
        if len(image) not in (2, 3) or (len(image) == 3 and image[-1] != 1):
            parser.error(f"--features gabor needs grayscale images (H, W) or (H, W, 1); {what} holds "
                         f"{tuple(image)} per example. Use --features pixels")
        shape = {**shape, "d": GaborBank(_gabor_config(args)).n_features(image[0], image[1])}
    for flag, n, full in (("--n-train", args.n_train, shape["n_train"]),
                          ("--n-test", args.n_test, shape["n_test"])):
        if n is not None and n > full:
            parser.error(f"{flag} {n} exceeds the {full} examples of {what}; use at most {full}")
    n_train = args.n_train or shape["n_train"]
    n_test = shape["n_test"] if args.n_test is None else args.n_test
    sets = _label_sets_for(args.variant, args.with_true)
    k = shape["num_classes"] * len(sets)
    plan = _plan_for(args, n_train, n_test, k, shape["d"], user)
    if args.features == "randconv" and not args.force_memory:
        _require_randconv_fits(args, n_train, n_test)
    if not plan.fits and not args.force_memory:
        from .planning import require_fits

        require_fits(plan, cli=True)  # raises MemoryPlanError with the numbers and the flags
    held = _check_checkpoint_dir(parser, args.checkpoint_dir, args.resume, n_train, plan.block, plan.factor_dtype)

    # --- then the work ---
    import numpy as np

    from .data import describe
    from .features.pipeline import dataset_features
    from .randomize import Randomization, apply_randomization
    from .results import PhaseTimer, peak_rss_bytes
    from .solve import SolveOptions, run_interpolation

    timer = PhaseTimer()
    with timer.phase("load"):
        loaded = _load_data(args, user)
        ds = loaded.subset(args.n_train, None if args.n_test == 0 else args.n_test, seed=args.subset_seed)
        rnd = Randomization(variant=args.variant, p=args.corrupt_p or 0.0, seed=args.seed,
                            corrupt_test=args.corrupt_test)
        rds, rinfo = apply_randomization(ds, rnd)
        # pixels / 255 in float64 lie exactly on the 1/255 grid, so every float64 pass (residuals,
        # predictions) gets exact distances from float32 GEMMs (``kernelfit.grid``); the solver keeps
        # a float64 copy of the features anyway
        fdtype = np.float64 if args.mode == "float64" or args.features == "pixels" else np.float32
        has_test = args.n_test != 0 and len(rds.x_test) > 0
        yt = rds.y_test if has_test else None
        if args.features != "randconv":
            X, Xt, features = dataset_features(rds, args.features, gabor=_gabor_config(args),
                                               cache_dir=args.cache_dir, dtype=fdtype, with_test=has_test)
    label_sets = {name: (ds.y_train if name == "true" else rds.y_train) for name in sets}
    if args.task == "regression":   # the label values themselves are the float targets
        label_sets = {name: y.astype(np.float64) for name, y in label_sets.items()}
        yt = None if yt is None else yt.astype(np.float64)
    options = SolveOptions(kernel=args.kernel, bandwidth=args.bandwidth, mode=args.mode,
                           jitter=args.jitter, block_size=args.block_size,
                           max_refine=args.max_refine, progress=not args.no_progress,
                           force_memory=args.force_memory, fallback_float64=not args.no_fallback,
                           device=args.device, tf32=args.tf32,
                           out_of_core={"auto": "auto", "yes": True, "no": False}[args.out_of_core],
                           checkpoint_dir=None if args.checkpoint_dir is None else str(args.checkpoint_dir),
                           resume=args.resume)
    n_tr, n_te = len(rds.y_train), (len(yt) if yt is not None else 0)
    extra = {
        "dataset": {**describe(loaded), "n_train": int(n_tr), "n_test": int(n_te),
                    "subset_seed": args.subset_seed,
                    "note": "CIFAR-10 (JPEG q75 copy)" if "jpeg" in ds.source.lower() else None},
        "randomization": rinfo,
    }
    with timer.phase("solve"):
        if args.features == "randconv":
            from .results import provenance

            prov = provenance()   # before the solve: the code that runs
            record = {**_solve_randconv(args, rds, label_sets, yt, ds.num_classes, {}), **extra,
                      "provenance": prov}
        else:
            extra["features"] = features
            (record, model), cluster = _with_cluster(args, lambda client: run_interpolation(
                X, label_sets, Xt, yt, ds.num_classes, options, extra, task=args.task, client=client,
                return_model=True))
            _save_model_if_asked(args, record, model, cluster,
                                 preprocessing={"kind": "pixels", "dtype": np.dtype(fdtype).name,
                                                "scale": float(ds.scale)},
                                 class_names=ds.classes,
                                 # a user's labels are indices into their distinct values: predict those values
                                 classes=None if user is None or args.task != "classification"
                                 else [int(c) for c in ds.classes])
    record["cli_timings_s"] = timer.as_dict()
    record["cli_peak_rss_bytes"] = peak_rss_bytes()

    _print_summary(record)
    _emit_record(args, record)
    if args.checkpoint_dir is not None:   # the result is written: the panels are no longer needed
        _remove_checkpoint(args.checkpoint_dir, held, keep=args.keep_checkpoint)
    return EXIT_OK


def _emit_record(args, record: dict) -> None:
    """The record to --out (atomically) or stdout. If --out cannot be written after the work (disk
    full, directory gone), the record is not lost: it goes to stdout and the command fails."""
    from .errors import OutputError
    from .results import dumps, write_json_atomic

    if args.out is not None:
        try:
            _eprint(f"wrote {write_json_atomic(args.out, record, overwrite=args.overwrite)}")
        except OSError as e:
            sys.stdout.write(dumps(record) + "\n")
            sys.stdout.flush()
            raise OutputError(f"could not write --out {args.out} ({e.strerror or e}); nothing was written "
                              f"there, and the full record was printed on stdout instead. Fix: free space "
                              f"or choose another path, and save stdout next time (> result.json).") from None
    else:
        sys.stdout.write(dumps(record) + "\n")
        sys.stdout.flush()
    failed = (record.get("model") or {}).get("error")
    if failed:
        raise OutputError(f"{failed}; the record was written without it. Fix: free space or choose another "
                          f"path, and rerun.")


def _print_summary(record: dict) -> None:
    ds = record.get("dataset", {})
    st = record.get("stats", {})
    sigma = st.get("bandwidth")
    sigma_s = "" if sigma is None else f" sigma={sigma:.4g} ({st.get('bandwidth_rule')})"
    _eprint(f"[kernelfit] {ds.get('name')} n_train={record.get('n_train')} n_test={record.get('n_test')} "
            f"kernel={st.get('kernel')}{sigma_s} mode={st.get('mode')} task={record.get('task', 'classification')}")
    for name, res in record.get("results", {}).items():
        if "train_error" in res:
            te = res.get("test_error")
            te_s = "n/a" if te is None else f"{100 * te:.2f}%"
            fit = f"train error {100 * res['train_error']:.2f}%  test error {te_s}"
        else:
            te, r2 = res.get("test_rmse"), res.get("test_r2")
            fit = (f"train RMSE {res['train_rmse']:.3g}  test RMSE {'n/a' if te is None else f'{te:.4g}'}  "
                   f"test R^2 {'n/a' if r2 is None else f'{r2:.4f}'}")
        resid = (f"max |residual| {res['residual_max_abs']:.2e}" if "residual_max_abs" in res
                 else f"relative residual {res['residual_relative']:.2e}")
        _eprint(f"  {name:>16}: {fit}  RKHS norm {res['rkhs_norm']:.4g}  {resid}")
    fact = (st.get("refinement") or {}).get("factorization") or st.get("factorization") or {}
    if isinstance(fact, dict) and fact.get("resumed_from_panel"):
        _eprint(f"  resumed the factorization from panel {fact['resumed_from_panel']} (block "
                f"{fact.get('block')}) of the checkpoint in {(fact.get('checkpoint') or {}).get('dir', '?')}")
    t = st.get("timings_s", {})
    if t:
        _eprint("  time: " + ", ".join(f"{k} {v:.2f}s" for k, v in t.items())
                + f"; peak RSS {st.get('peak_rss_bytes', 0) / 2**30:.2f} GiB")


def _check_model_args(args, parser) -> None:
    """--save-model and --scheduler refused before any work (the --out check is its own)."""
    _check_out_path(parser, args.save_model, args.overwrite, "--save-model", "model.safetensors")
    if args.save_model is not None and args.out is not None and args.save_model.resolve() == args.out.resolve():
        parser.error(f"--save-model and --out are the same path {args.out}; give the model its own file")
    if args.save_model is not None and getattr(args, "features", "pixels") != "pixels":
        parser.error(f"--save-model with --features {args.features}: model files hold pixel-space models only "
                     f"(predict cannot rebuild the {args.features} feature map yet); save the features as "
                     f"arrays and solve on them with --x-train / --data, or drop --save-model")
    if args.scheduler is not None and getattr(args, "features", "pixels") == "randconv":
        parser.error("--scheduler with --features randconv: the random-conv Gram is accumulated in this process; "
                     "drop --scheduler")
    if args.save_model is not None and args.variant not in ("true", *LABEL_VARIANTS):
        parser.error(f"--save-model with --variant {args.variant}: the model would need the randomized inputs "
                     f"to predict; save models of true or label-randomized data only")
    if args.task == "regression" and args.variant in LABEL_VARIANTS:
        parser.error(f"--variant {args.variant} randomizes class labels; it does not apply to --task regression")
    if args.scheduler is not None:
        sched = args.scheduler
        if not (sched.startswith("local:") or "://" in sched):
            parser.error(f"--scheduler {sched!r}: expected tcp://HOST:PORT (a running dask scheduler) or "
                         f"local:N (start N local worker processes)")
        if args.device is not None or args.checkpoint_dir is not None:
            parser.error("--scheduler runs the factorization on the dask workers; --device and "
                         "--checkpoint-dir apply to single-process solves only")


def _check_gram_only_args(args, parser) -> None:
    if args.gram_test is not None:
        parser.error("--gram-test goes with --gram G.npy (a precomputed training Gram); without --gram the "
                     "test data come from --dataset, --data or --x-test")


def _check_gram_source(args, parser) -> None:
    """--gram names the whole training input: no dataset, data file or x arrays beside it."""
    other = [flag for flag, v in (("--dataset", args.dataset), ("--data", args.data), ("--data-dir", args.data_dir),
                                  ("--x-train", args.x_train), ("--x-test", args.x_test),
                                  ("--features", None if args.features == "pixels" else args.features))
             if v is not None]
    if other:
        parser.error(f"--gram {args.gram} is the whole training input; it conflicts with {' '.join(other)}. "
                     f"Give the targets with --y-train (and --gram-test with --y-test), nothing else")


def _with_cluster(args, run):
    """run(client) on the --scheduler cluster (client None without one); returns (result, cluster info)."""
    if args.scheduler is None:
        return run(None), None
    from .linalg.distributed import Cluster

    with Cluster(args.scheduler) as cluster:
        info = cluster.info()
        _eprint(f"[kernelfit] dask cluster {info['address']} with {info['workers']} worker(s)")
        return run(cluster.client), info


def _save_model_if_asked(args, record, model, cluster, preprocessing=None, class_names=None, classes=None) -> None:
    """Write --save-model (before the record, which then names the model file and its sha256)."""
    if cluster is not None:
        record["cluster"] = cluster
    if args.save_model is None:
        return
    from .data.arrays import sha256_file
    from .model import save_model

    data = record.get("dataset") or {k: record.get("stats", {}).get(k) for k in ("gram",)}
    try:
        path = save_model(args.save_model, model, task=record["task"], targets=record["target_columns"],
                          num_classes=record.get("num_classes"), classes=classes, class_names=class_names,
                          preprocessing=preprocessing,
                          data=data, provenance=record.get("provenance"), overwrite=args.overwrite)
    except OSError as e:  # the solve is done: keep the record, say the model was not written, fail at the end
        record["model"] = {"path": None, "error": f"could not write --save-model {args.save_model} "
                                                  f"({e.strerror or e}); nothing was written there"}
        return
    record["model"] = {"path": str(path), "sha256": sha256_file(path)}
    _eprint(f"wrote model {path}")


def _read_targets(spec: str, what: str):
    import numpy as np

    from .data.arrays import open_array
    from .solve import check_finite_targets

    y = np.asarray(open_array(spec, what=what))
    check_finite_targets(y, what)   # before the Gram is read: names the first NaN / inf row
    return y


def cmd_solve_gram(args, parser) -> int:
    """solve --gram: a precomputed training Gram (and optional test Gram) with targets from files."""
    for flag, bad in (("--data-dir", args.data_dir is not None), ("--n-train", args.n_train is not None),
                      ("--n-test", args.n_test is not None), ("--variant", args.variant != "true"),
                      ("--download", args.download)):
        if bad:
            parser.error(f"{flag} does not apply to --gram: the Gram fixes the training points and targets come "
                         f"from --y-train; drop {flag}")
    if args.y_train is None:
        parser.error("--gram needs --y-train Y.npy (the targets of the Gram's training points)")
    if (args.gram_test is None) != (args.y_test is None):
        parser.error("--gram-test and --y-test go together (the test Gram and the test targets)")
    args.mode = args.mode or "float64"
    from .solve import GRAM_MODES

    if args.mode not in GRAM_MODES:
        parser.error(f"--mode {args.mode} needs the kernel function: mixed precision refines with float64 kernel "
                     f"products rebuilt from the data, and a precomputed Gram has no data. Use --mode float64 "
                     f"(default) or float32 (half the memory)")
    _check_out_path(parser, args.out, args.overwrite)

    from .results import PhaseTimer, peak_rss_bytes
    from .solve import SolveOptions, run_gram_interpolation

    timer = PhaseTimer()
    with timer.phase("load"):
        y = _read_targets(args.y_train, "--y-train")
        yt = None if args.y_test is None else _read_targets(args.y_test, "--y-test")
        num_classes = None
        if args.task == "classification":
            from .solve import check_labels, infer_num_classes

            num_classes = infer_num_classes((y, "--y-train"), (yt, "--y-test"))
            check_labels(y, num_classes, "--y-train")
    options = SolveOptions(mode=args.mode, jitter=args.jitter, block_size=args.block_size,
                           progress=not args.no_progress, force_memory=args.force_memory, device=args.device,
                           out_of_core={"auto": "auto", "yes": True, "no": False}[args.out_of_core],
                           checkpoint_dir=None if args.checkpoint_dir is None else str(args.checkpoint_dir),
                           resume=args.resume)
    extra = {"dataset": {"name": "precomputed-gram", "gram": args.gram, "gram_test": args.gram_test,
                         "y_train": args.y_train, "y_test": args.y_test}}
    with timer.phase("solve"):
        (record, model), cluster = _with_cluster(args, lambda client: run_gram_interpolation(
            args.gram, {"true": y}, args.gram_test, yt, num_classes, options, extra, task=args.task, client=client,
            return_model=True))
    _save_model_if_asked(args, record, model, cluster)
    record["cli_timings_s"] = timer.as_dict()
    record["cli_peak_rss_bytes"] = peak_rss_bytes()
    _print_summary(record)
    _emit_record(args, record)
    return EXIT_OK


def _write_predictions(out: Path, values, payload: dict, overwrite: bool, labels=None) -> None:
    """Predictions to .json (the payload), .npy (the array) or .csv (a header, the row index, the
    prediction or one column per score, and the true label when it was given)."""
    import numpy as np

    from .results import atomic_file, write_json_atomic

    if out.suffix.lower() == ".json":
        write_json_atomic(out, payload, overwrite=overwrite)
        return
    if out.exists() and not overwrite:
        raise FileExistsError(f"refusing to overwrite {out}; pass --overwrite or choose a new path")
    with atomic_file(out, "wb") as fh:
        if out.suffix.lower() == ".npy":
            np.save(fh, values, allow_pickle=False)
            return
        table = values.reshape(len(values), -1)
        names = ["prediction"] if table.shape[1] == 1 else [f"{'score' if 'scores' in payload else 'prediction'}_{j}"
                                                           for j in range(table.shape[1])]
        columns = [np.arange(len(table))[:, None], table]
        if labels is not None:
            names.append("label")
            columns.append(np.asarray(labels).reshape(len(table), -1))
        header = ",".join(["index", *names])
        integer = all(np.issubdtype(c.dtype, np.integer) for c in columns)
        fmt = "%d" if integer else ["%d", *(["%d" if np.issubdtype(table.dtype, np.integer) else "%.17g"] * table.shape[1]),
                                    *(["%.17g"] if labels is not None else [])]
        np.savetxt(fh, np.hstack([c.astype(np.float64) if not integer else c for c in columns]), fmt=fmt,
                   delimiter=",", header=header, comments="")


def cmd_predict(args, parser) -> int:
    if args.out is not None and args.out.suffix.lower() not in PREDICTION_SUFFIXES:
        parser.error(f"--out {args.out}: expected a file ending in {', '.join(PREDICTION_SUFFIXES)}")
    _check_out_path(parser, args.out, args.overwrite, "--out", "pred.npy")
    import numpy as np

    from .data.arrays import open_array
    from .model import load_model

    model = load_model(args.model)
    if model.precomputed and args.gram_test is None:
        parser.error(f"{args.model} was fitted on a precomputed Gram: predict with --gram-test KT.npy "
                     f"(k(X_test, X_train), m x {model.metadata['n_train']})")
    if not model.precomputed and args.gram_test is not None:
        parser.error(f"{args.model} has a {model.metadata['kernel']} kernel and its training points: give the "
                     f"test points with --x-test or --data, not a test Gram")
    y_test = None
    if args.data is not None:
        X = open_array(f"{args.data}:x_test", what="--data")
        if args.y_test is None:
            with np.load(args.data, allow_pickle=False) as z:
                has_labels = "y_test" in z.files
            y_test = np.asarray(open_array(f"{args.data}:y_test", what="--data")) if has_labels else None
    else:
        X = open_array(args.x_test or args.gram_test, what="--x-test" if args.x_test else "--gram-test")
    if args.y_test is not None:
        y_test = np.asarray(open_array(args.y_test, what="--y-test"))
    if y_test is not None and model.task == "classification" and y_test.ndim != 1 and \
            not (y_test.ndim == 2 and y_test.shape[1] == 1):
        from .errors import InputError

        raise InputError(f"--y-test: expected one class label per test point (shape (m,) or (m, 1)), got shape "
                         f"{tuple(y_test.shape)}. Fix: pass the label column, not one-hot scores "
                         f"(np.argmax(Y, axis=1)).")
    cols = model._target(args.target)
    scores = model.scores(X)[:, cols]
    if model.task == "classification":
        idx = np.argmax(scores, axis=1)
        predictions = idx if model.classes is None else model.classes[idx]
    else:
        predictions = scores[:, 0] if scores.shape[1] == 1 else scores
    payload = {"model": str(args.model), "task": model.task, "n": len(predictions),
               "target": args.target or next(iter(model.targets))}
    if y_test is not None:
        if len(y_test) != len(predictions):
            from .errors import InputError

            raise InputError(f"--y-test has {len(y_test)} rows but there are {len(predictions)} test points.")
        if model.task == "classification":
            payload["test_error"] = float(np.mean(predictions != y_test.reshape(-1)))
            _eprint(f"[kernelfit] test error {100 * payload['test_error']:.2f}% on {len(predictions)} points")
        else:
            from .results import regression_metrics

            m = regression_metrics(y_test, predictions)
            payload.update(test_rmse=m["rmse"], test_r2=m["r2"])
            _eprint(f"[kernelfit] test RMSE {m['rmse']:.4g}, R^2 {m['r2']} on {len(predictions)} points")
    values = scores if args.scores else predictions
    payload["scores" if args.scores else "predictions"] = values
    if args.out is None:
        from .results import dumps

        sys.stdout.write(dumps(payload) + "\n")
    else:
        _write_predictions(args.out, np.asarray(values), payload, args.overwrite, labels=y_test)
        _eprint(f"wrote {args.out}")
    return EXIT_OK


def cmd_plan(args, parser) -> int:
    from .planning import plan_solve

    user = _check_data_source(parser, args)
    shape = DATASET_SHAPES[args.dataset] if user is None else _user_shape(user, getattr(args, "task", "classification"))
    n = args.n_train or shape["n_train"]
    n_test = shape["n_test"] if args.n_test is None else args.n_test
    d = args.dim or shape["d"]
    k = args.num_outputs or shape["num_classes"]
    available = None if args.available_gib is None else int(args.available_gib * 2**30)
    device = _plan_device_profile(args, parser)   # checked before any planning
    plan = plan_solve(n, d, k, args.mode or "mixed", n_test=n_test, block=args.block_size, available=available,
                      grid_products=_pixel_grid_products(args, user, d) and not args.dim)
    out = plan.to_dict()
    fits = plan.fits
    if device is not None:
        from .planning import choose_device_strategy

        ds = choose_device_strategy(n, d, k, device, mode=args.mode, tf32=args.tf32, block=args.block_size)
        out["device_strategy"] = ds
        # resident: the host holds only the data and n x k blocks; out of core it holds the Gram panels
        fits = ds["resident"] or plan.fits
        _eprint(f"device {device.name} ({device.source}): {ds['strategy']}"
                f"{' with TF32 factor GEMMs' if ds['tf32'] else ''}, {ds['factor_dtype']} factor; {ds['reason']}")
    else:
        _eprint(plan.summary())
    from .results import dumps

    sys.stdout.write(dumps(out) + "\n")
    return EXIT_OK if fits else EXIT_DOES_NOT_FIT


def _plan_device_profile(args, parser):
    """The DeviceProfile that ``plan`` plans for (None: no device strategy asked for)."""
    from .planning import DeviceProfile, live_profile, named_profile

    given = (args.device_memory_gib, args.float64_tflops, args.float32_tflops)
    if args.tf32 and args.mode in ("float32", "float64"):
        parser.error(f"--tf32 plans a TF32 float32 factor refined in float64; --mode {args.mode} has none. "
                     "Use --mode mixed or leave --mode out.")
    if args.device is None and args.device_profile is None and all(v is None for v in given):
        if args.tf32 or args.measure:
            parser.error("--tf32 / --measure belong to a device strategy: add --device cuda or --device-profile NAME.")
        return None
    if args.device is not None and args.device_profile is not None:
        parser.error("give --device (a GPU here) or --device-profile (a named GPU), not both.")
    if args.mode == "float32":
        parser.error("--mode float32 has float32 accuracy only and is no device strategy; use mixed, float64 or leave "
                     "--mode out so that the device's rates choose.")
    if args.device is not None:
        prof = live_profile(args.device, measure=args.measure)
    elif args.device_profile is not None:
        prof = named_profile(args.device_profile)
    else:
        missing = [f for f, v in zip(("--device-memory-gib", "--float64-tflops", "--float32-tflops"), given) if v is None]
        if missing:
            parser.error(f"a device of your own needs its memory and both rates; missing {', '.join(missing)} "
                         "(or name one: --device-profile h200).")
        return DeviceProfile("given", int(args.device_memory_gib * 2**30), args.float64_tflops, args.float32_tflops)
    over = {"memory_bytes": None if args.device_memory_gib is None else int(args.device_memory_gib * 2**30),
            "float64_tflops": args.float64_tflops, "float32_tflops": args.float32_tflops}
    over = {key: v for key, v in over.items() if v is not None}
    if over:
        from dataclasses import replace

        prof = replace(prof, **over, source=prof.source + " with given overrides")
    return prof


def _found_files(name: str, root: Path) -> list[str]:
    """Candidate files for a dataset under the data directory, found without reading them."""
    from . import data

    try:  # the loader's own search order, so that info and load agree
        dirs = data._search_dirs(name, root)
    except AttributeError:
        dirs = [root]
    found: list[str] = []
    for d in dirs:
        if not d.is_dir():
            continue
        if name in data.IDX_DATASETS:
            for base in data.IDX_FILES.values():
                for cand in (base, base + ".gz"):
                    if (d / cand).is_file():
                        found.append(str(d / cand))
            if name == "mnist" and (d / data.MNIST_NPZ).is_file():
                found.append(str(d / data.MNIST_NPZ))
        else:
            for cand in (d / data.CIFAR10_BATCH_DIR, d / data.CIFAR10_ARCHIVE):
                if cand.exists():
                    found.append(str(cand))
            try:
                found.extend(str(p) for p in data._image_folder_candidates(d))
            except (AttributeError, OSError):
                pass
    return found


def cmd_data(args, parser) -> int:
    from . import data

    if args.data_command == "path":
        root, origin = data._resolve_with_origin(args.data_dir) \
            if hasattr(data, "_resolve_with_origin") else (data.resolve_data_dir(args.data_dir), "")
        print(root)
        if origin:
            _eprint(f"({origin}; exists: {root.exists()})")
        return EXIT_OK
    if args.data_command == "download":
        if args.dataset in (None, "mnist-subset"):
            parser.error("mnist-subset ships with kernelfit; nothing to download (use 'mnist')")
        path = data.download(args.dataset, args.data_dir, base_url=args.base_url, force=args.force,
                             progress=True)
        _eprint(f"{args.dataset}: files verified in {path}")
        print(path)
        return EXIT_OK
    # info
    root = data.resolve_data_dir(args.data_dir)
    origin = data._resolve_with_origin(args.data_dir)[1] if hasattr(data, "_resolve_with_origin") else ""
    info = {"data_dir": str(root), "origin": origin, "exists": root.exists(), "datasets": {}}
    for name in DATASET_NAMES:
        entry: dict = {}
        if name == "mnist-subset":
            entry["found"] = ["shipped with kernelfit"]
        else:
            entry["found"] = [] if root.is_file() else _found_files(name, root)
        if args.load and (entry["found"] or name == "mnist-subset" or root.is_file()):
            try:
                ds = data.load_dataset(name, data_dir=args.data_dir)
                entry.update({"source": ds.source, "x_train": list(ds.x_train.shape),
                              "x_test": list(ds.x_test.shape), "classes": list(ds.classes)})
            except KernelfitError as e:
                entry["error"] = str(e)
        info["datasets"][name] = entry
    from .results import dumps

    print(dumps(info))
    for name, entry in info["datasets"].items():
        state = ", ".join(entry["found"]) if entry["found"] else "not found"
        _eprint(f"{name:>13}: {state}")
    _eprint(f"data directory: {root} ({origin})")
    return EXIT_OK


def cmd_table(argv: list[str]) -> int:
    from . import table  # imported lazily: it pulls in the feature maps

    rc = table.main(argv)
    return EXIT_OK if rc is None else int(rc)


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 error, 2 usage, 3 plan does not fit, 130 interrupted).

    Every command ends in one line ``kernelfit CMD: error: ...`` for anything that goes wrong at run
    time (bad data, a file that cannot be written, memory, Ctrl-C), never a traceback; ``--debug``
    (anywhere on the line) or ``KERNELFIT_DEBUG=1`` shows the traceback instead.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("KERNELFIT_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    command, args = (argv[0] if argv else "?"), None
    try:
        if argv and argv[0] == "table":  # the table has its own parser; hand it everything after
            return cmd_table(argv[1:])
        parser = build_parser()
        args = parser.parse_args(argv)
        command, sub = args.command, args.subparser  # errors name the subcommand's usage line
        run = {"solve": cmd_solve, "plan": cmd_plan, "data": cmd_data, "predict": cmd_predict}.get(args.command)
        if run is None:
            parser.error(f"unknown command {args.command!r}")
        from .parallel import limit_threads

        with limit_threads(getattr(args, "threads", None)):
            return run(args, sub)
    except SystemExit:
        raise
    except BaseException as e:
        if debug:
            raise
        return _report_failure(command, args, e)


def _report_failure(command: str, args, e: BaseException) -> int:
    """One line on stderr for a failure at run time, and its exit status."""
    prefix = f"kernelfit {command}: "
    if isinstance(e, KeyboardInterrupt):
        where = getattr(args, "checkpoint_dir", None) if args is not None else None
        hint = (f"; the panels finished so far are saved in {where}: rerun the same command with --resume to "
                f"continue" if where is not None else "; nothing was written")
        _eprint(f"{prefix}interrupted{hint}")
        return EXIT_INTERRUPTED
    if isinstance(e, KernelfitError):
        _eprint(f"{prefix}error ({type(e).__name__}): {e}")
    elif isinstance(e, OSError):
        what = f"{e.strerror} ({e.filename})" if e.strerror and e.filename else (e.strerror or str(e))
        _eprint(f"{prefix}error: {what}. Fix: check the path, its permissions and the free disk space, then rerun"
                f" (files written so far are complete: every result is written atomically)")
    elif isinstance(e, MemoryError):
        _eprint(f"{prefix}error: ran out of memory. Fix: check what fits with 'kernelfit plan' (same sizes), and "
                f"use a smaller --n-train or --mode float32")
    else:
        _eprint(f"{prefix}internal error ({type(e).__name__}): {e}. This is a bug: rerun with --debug for the "
                f"traceback and report it")
    return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
