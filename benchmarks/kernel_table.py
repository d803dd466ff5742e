"""Benchmark driver for the Zhang et al. (2017, Sec. 5) kernel table.

Subcommands (JSON lines on stdout, machine recorded):

  table        the table itself: same options as ``kernelfit table`` (kernelfit.cli)
  tune-gabor   pick the Gabor feature config / bandwidth on a subset: for each config and each
               bandwidth factor (x median pairwise feature distance), exact Gaussian-kernel
               interpolation (dense float64 Cholesky, scipy) and its test error; the pixel row runs
               in the same process as the reference.
  tune-randconv  compare random-conv feature recipes on a CIFAR-10 subset: for each feature config
               (rectifier bias, pooling grid, filter kind) the standardized-feature Gram is accumulated
               once, then exact interpolation (dense float64 Cholesky, scipy) runs for the linear
               kernel on the features and for Gaussian kernels at each bandwidth factor
  sgd          the SGD-to-minimum-norm demonstration (kernelfit.linear)

Examples
  python benchmarks/kernel_table.py tune-gabor --n-train 10000 --n-test 10000
  python benchmarks/kernel_table.py tune-randconv --n-train 10000 --n-test 5000 --filters 4000
  python benchmarks/kernel_table.py table --n-train-mnist 5000 --n-train-cifar 5000 --filters 1000
  nice -n 10 python benchmarks/kernel_table.py table --rows mnist-gabor --n-train-mnist 60000 \\
      --n-test 10000 --tag mnist_gabor_60k
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time

import numpy as np
import scipy.linalg

GABOR_CONFIGS = {
    # name: GaborConfig overrides
    "g3x8_p4": {},
    "g3x8_p4_pix": {"include_pixels": True},
    "g3x8_p4_l2": {"normalize": "l2"},
    "g4x8_p4_pix": {"frequencies": (0.12, 0.18, 0.25, 0.35), "n_stds": 2.5, "include_pixels": True},
    "g3x8_p7_cplx": {"output": "complex", "pool": 7},
}


def _sqd(A, B):
    from kernelfit.kernels import squared_distances

    D = squared_distances(np.asarray(A, np.float64), np.asarray(B, np.float64))
    return np.maximum(D, 0.0, out=D)


def tune_gabor(argv) -> int:
    ap = argparse.ArgumentParser(prog="kernel_table.py tune-gabor")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--n-train", type=int, default=10000)
    ap.add_argument("--n-test", type=int, default=10000)
    ap.add_argument("--configs", default="pixels," + ",".join(GABOR_CONFIGS))
    ap.add_argument("--factors", type=float, nargs="+", default=[0.35, 0.5, 0.7, 1.0])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from kernelfit.data import load_dataset, to_features
    from kernelfit.features.gabor import GaborBank, GaborConfig
    from kernelfit.kernels import median_bandwidth
    from kernelfit.provenance import machine_info

    ds = load_dataset("mnist", data_dir=args.data_dir).subset(args.n_train, args.n_test, seed=args.seed)
    Y = np.eye(10)[ds.y_train]
    print(json.dumps({"machine": machine_info(), "command": _command_line("tune-gabor", argv),
                      "n_train": args.n_train, "n_test": args.n_test}), flush=True)
    for name in args.configs.split(","):
        t = time.perf_counter()
        if name == "pixels":
            Ftr, Fte, dim = to_features(ds.x_train), to_features(ds.x_test), 784
        else:
            bank = GaborBank(GaborConfig(**GABOR_CONFIGS[name]))
            Ftr, Fte = bank.transform(ds.x_train), bank.transform(ds.x_test)
            dim = Ftr.shape[1]
        t_feat = time.perf_counter() - t
        med = median_bandwidth(Ftr, seed=args.seed)
        Dtr, Dte = _sqd(Ftr, Ftr), _sqd(Fte, Ftr)
        for fac in args.factors:
            s = fac * med
            t = time.perf_counter()
            err, norm = _interpolate(np.exp(-Dtr / (2 * s * s)), Y, np.exp(-Dte / (2 * s * s)), ds.y_test)
            print(json.dumps({"config": name, "dim": int(dim), "factor": fac, "sigma": s, "median": med,
                              "test_error": err, "norm": norm,
                              "features_s": round(t_feat, 2), "solve_s": round(time.perf_counter() - t, 2)}),
                  flush=True)
    return 0


def _interpolate(K, Y, K_test, y_test):
    """Exact interpolation with LAPACK (scipy cho_factor, float64): test error and RKHS norm."""
    c = scipy.linalg.cho_factor(K, overwrite_a=True, check_finite=False)
    alpha = scipy.linalg.cho_solve(c, Y, check_finite=False)
    err = float(np.mean(np.argmax(K_test @ alpha, 1) != y_test))
    return err, float(np.sqrt(np.sum(alpha * Y)))


def _command_line(sub: str, argv) -> str:
    """The command as typed, kept in each record so a result file says how to reproduce it."""
    return " ".join(["python benchmarks/kernel_table.py", sub, *map(shlex.quote, argv)])


def tune_randconv(argv) -> int:
    ap = argparse.ArgumentParser(prog="kernel_table.py tune-randconv")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--n-train", type=int, default=10000)
    ap.add_argument("--n-test", type=int, default=5000)
    ap.add_argument("--filters", type=int, default=4000)
    ap.add_argument("--filter-block", type=int, default=500)
    ap.add_argument("--configs", nargs="+", default=["bias=0.25", "bias=0", "bias=0.5", "bias=1",
                                                     "bias=0.25,pool_grid=3"],
                    help="RandConvConfig overrides, comma-separated key=value (filters=patches|gaussian, "
                         "bias, pool_grid, patch_size, zca_eps)")
    ap.add_argument("--factors", type=float, nargs="+", default=[0.25, 0.35, 0.5, 0.7, 1.0])
    ap.add_argument("--validation", action="store_true",
                    help="evaluate on n-test held-out *training* images (for choosing a recipe without "
                         "touching the test set)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from kernelfit.data import load_dataset
    from kernelfit.features.randconv import GramOptions, RandConvConfig, RandConvFeatures
    from kernelfit.gram import linear_from_gram_inplace
    from kernelfit.provenance import machine_info
    from kernelfit.table import _median_distance_from_sqd

    ds = load_dataset("cifar10", data_dir=args.data_dir)
    if args.validation:   # a stratified sample of the training set, in random order, split in two
        ds = ds.subset(args.n_train + args.n_test, 1, seed=args.seed)
        ds.x_test, ds.y_test = ds.x_train[args.n_train:], ds.y_train[args.n_train:]
        ds.x_train, ds.y_train = ds.x_train[: args.n_train], ds.y_train[: args.n_train]
    else:
        ds = ds.subset(args.n_train, args.n_test, seed=args.seed)
    Y = np.eye(10)[ds.y_train]
    print(json.dumps({"machine": machine_info(), "command": _command_line("tune-randconv", argv),
                      "seed": args.seed, "n_train": args.n_train, "n_test": args.n_test,
                      "evaluated_on": "held-out training images" if args.validation else "test images",
                      "filters": args.filters, "source": "CIFAR-10 (JPEG q75 copy)"}), flush=True)
    casts = {"bias": float, "pool_grid": int, "patch_size": int, "zca_eps": float, "filters": str}
    for text in args.configs:
        over = {}
        for item in filter(None, text.split(",")):
            key, _, value = item.partition("=")
            if key not in casts:
                raise SystemExit(f"tune-randconv: unknown config key {key!r} in {text!r}; "
                                 f"expected some of {sorted(casts)}.")
            over[key] = casts[key](value)
        cfg = RandConvConfig(**{"filters": "patches", "seed": args.seed, **over, "n_filters": args.filters})
        t = time.perf_counter()
        g = RandConvFeatures(cfg).fit(ds.x_train).accumulate_gram(ds.x_train, ds.x_test,
                                                                  GramOptions(filter_block=args.filter_block))
        t_feat = time.perf_counter() - t
        base = {"config": text, "n_features": int(g.n_features), "features_s": round(t_feat, 1)}
        t = time.perf_counter()
        # the table's linear kernel, (phi.phi' + 1) / n_features (the intercept makes the centred Gram invertible)
        err, norm = _interpolate(linear_from_gram_inplace(g.train.copy(), g.n_features), Y,
                                 linear_from_gram_inplace(g.cross.copy(), g.n_features), ds.y_test)
        print(json.dumps({**base, "kernel": "linear", "test_error": err, "norm": norm,
                          "solve_s": round(time.perf_counter() - t, 2)}), flush=True)
        Dtr, Dte = g.squared_distances()
        del g
        med = _median_distance_from_sqd(Dtr, seed=args.seed)
        for fac in args.factors:
            s = fac * med
            t = time.perf_counter()
            err, norm = _interpolate(np.exp(-Dtr / (2 * s * s)), Y, np.exp(-Dte / (2 * s * s)), ds.y_test)
            print(json.dumps({**base, "kernel": "gaussian", "factor": fac, "sigma": s, "median": med,
                              "test_error": err, "norm": norm, "solve_s": round(time.perf_counter() - t, 2)}),
                  flush=True)
        del Dtr, Dte
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd, rest = (argv[0], argv[1:]) if argv else ("table", [])
    if cmd == "table":
        from kernelfit.cli import main as cli_main

        return cli_main(["table", *rest])
    if cmd == "tune-gabor":
        return tune_gabor(rest)
    if cmd == "tune-randconv":
        return tune_randconv(rest)
    if cmd == "sgd":
        from kernelfit.linear import main as linear_main

        return linear_main(rest)
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
