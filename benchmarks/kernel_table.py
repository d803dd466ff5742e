"""Benchmark driver for the Zhang et al. (2017, Sec. 5) kernel table.

Subcommands (JSON lines on stdout, machine recorded):

  table        the table itself: same options as ``kernelfit table`` (kernelfit.table.main)
  tune-gabor   pick the Gabor feature config / bandwidth on a subset: for each config and each
               bandwidth factor (x median pairwise feature distance), exact Gaussian-kernel
               interpolation (dense float64 Cholesky, scipy) and its test error; the pixel row runs
               in the same process as the reference.
  sgd          the SGD-to-minimum-norm demonstration (kernelfit.linear)

Examples
  python benchmarks/kernel_table.py tune-gabor --n-train 10000 --n-test 10000
  python benchmarks/kernel_table.py table --n-train-mnist 5000 --n-train-cifar 5000 --filters 1000
  nice -n 10 python benchmarks/kernel_table.py table --rows mnist-gabor --n-train-mnist 60000 \\
      --n-test 10000 --tag mnist_gabor_60k
"""

from __future__ import annotations

import argparse
import json
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
    from kernelfit.results import machine_info

    ds = load_dataset("mnist", data_dir=args.data_dir).subset(args.n_train, args.n_test, seed=args.seed)
    Y = np.eye(10)[ds.y_train]
    print(json.dumps({"machine": machine_info(), "n_train": args.n_train, "n_test": args.n_test}), flush=True)
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
            K = np.exp(-Dtr / (2 * s * s))
            c = scipy.linalg.cho_factor(K, overwrite_a=True, check_finite=False)
            alpha = scipy.linalg.cho_solve(c, Y, check_finite=False)
            del K, c
            err = float(np.mean(np.argmax(np.exp(-Dte / (2 * s * s)) @ alpha, 1) != ds.y_test))
            print(json.dumps({"config": name, "dim": int(dim), "factor": fac, "sigma": s, "median": med,
                              "test_error": err, "norm": float(np.sqrt(np.sum(alpha * Y))),
                              "features_s": round(t_feat, 2), "solve_s": round(time.perf_counter() - t, 2)}),
                  flush=True)
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd, rest = (argv[0], argv[1:]) if argv else ("table", [])
    if cmd == "table":
        from kernelfit.table import main as table_main

        return table_main(rest)
    if cmd == "tune-gabor":
        return tune_gabor(rest)
    if cmd == "sgd":
        from kernelfit.linear import main as linear_main

        return linear_main(rest)
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
