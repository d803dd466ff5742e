"""MNIST exact Gaussian-kernel interpolation benchmark.

For each n: kernelfit solves K alpha = Y (sigma = 5, pixels / 255) for the true labels and for random
labels with ONE Gram and ONE factorization, and reports time per phase, peak RSS, test error, RKHS
norm and residuals. Where it can run, the reference is measured in the same run on the same Gram in
the factor's dtype: plain scipy `cho_factor` / `cho_solve` on a dense matrix. Each measurement runs
in its own subprocess so peak RSS belongs to that measurement alone.

    python benchmarks/mnist_interpolation.py --sizes 10000 20000 60000 --out benchmarks/results/mnist_cpu.jsonl
    python benchmarks/mnist_interpolation.py --sizes 2000 --n-test 1000      # quick, CI-sized

Prints JSON lines; the last line is a summary with the flop-rate ratio of kernelfit's factorization
at the largest n against scipy's float32 potrf at --reference-n (rates scaled by n^3 / 3).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

SCIPY_DENSE_LIMIT = 30000  # dense scipy potrf beyond this crashed / does not fit on a 24 GiB machine (GUIDE)


def _load(n, n_test, data_dir, seed):
    from kernelfit.data import load_dataset, to_features
    from kernelfit.randomize import random_labels

    ds = load_dataset("mnist", data_dir=data_dir)
    ds = ds.subset(n_train=n if n < len(ds.y_train) else None, n_test=n_test if n_test < len(ds.y_test) else None,
                   seed=seed if n < len(ds.y_train) else None)
    y_rand = random_labels(ds.y_train, ds.num_classes, np.random.default_rng(seed + 1))
    return ds, to_features(ds.x_train), to_features(ds.x_test), y_rand


def run_kernelfit(args) -> dict:
    from kernelfit.experiment import run_interpolation
    from kernelfit.linalg.options import FactorOptions
    from kernelfit.solve import SolveOptions

    ds, Xtr, Xte, y_rand = _load(args.n, args.n_test, args.data_dir, args.seed)
    opts = SolveOptions(kernel="gaussian", bandwidth=args.sigma, mode=args.mode,
                        placement=FactorOptions(block_size=args.block, progress=args.progress))
    t = time.perf_counter()
    rec = run_interpolation(Xtr, {"true": ds.y_train, "random-labels": y_rand}, Xte, ds.y_test, ds.num_classes, opts)
    total = time.perf_counter() - t
    s = rec["stats"]
    return {
        "what": "kernelfit", "n": args.n, "n_test": len(ds.y_test), "mode": args.mode, "sigma": args.sigma,
        "block": s["block_size"], "timings_s": s["timings_s"], "total_s": total,
        "factor_gflops": s["factor_gflops"], "peak_rss_gib": s["peak_rss_bytes"] / 2**30,
        "refinement": s["refinement"],
        "results": rec["results"],
        "provenance": rec.get("provenance"),
    }


def run_scipy(args) -> dict:
    """Plain scipy on the same Gram (same kernel code, dense, float32), same targets."""
    import scipy.linalg

    from kernelfit.kernels import kernel_tile
    from kernelfit.solve import one_hot

    ds, Xtr, Xte, y_rand = _load(args.n, args.n_test, args.data_dir, args.seed)
    dtype = np.float32 if args.mode in ("float32", "mixed") else np.float64
    X = Xtr.astype(dtype)
    t = time.perf_counter()
    K = kernel_tile(X, X, "gaussian", args.sigma)
    np.fill_diagonal(K, 1.0)
    t_gram = time.perf_counter() - t
    Y = np.hstack([one_hot(ds.y_train, 10), one_hot(y_rand, 10)]).astype(dtype)
    t = time.perf_counter()
    c = scipy.linalg.cho_factor(K, lower=True, overwrite_a=True, check_finite=False)
    t_factor = time.perf_counter() - t
    t = time.perf_counter()
    alpha = scipy.linalg.cho_solve(c, Y, check_finite=False)
    t_solve = time.perf_counter() - t
    scores = kernel_tile(Xte.astype(np.float64), Xtr.astype(np.float64), "gaussian", args.sigma) @ alpha
    n = args.n
    return {
        "what": "scipy", "n": n, "dtype": np.dtype(dtype).name,
        "timings_s": {"gram": t_gram, "factor": t_factor, "solve": t_solve},
        "factor_gflops": n**3 / 3 / t_factor / 1e9,
        "test_error_true": float(np.mean(scores[:, :10].argmax(1) != ds.y_test)),
        "peak_rss_gib": __import__("resource").getrusage(__import__("resource").RUSAGE_SELF).ru_maxrss / 2**20,
    }


def _child(kind, args) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--n", str(args_n := args.n), "--n-test", str(args.n_test),
           "--mode", args.mode, "--sigma", str(args.sigma), "--seed", str(args.seed)]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    if args.block:
        cmd += ["--block", str(args.block)]
    if args.progress:
        cmd += ["--progress"]
    p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if p.returncode != 0:
        return {"what": kind, "n": args_n, "error": f"subprocess exited with {p.returncode}"}
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10000, 20000, 60000])
    ap.add_argument("--n-test", type=int, default=10000)
    ap.add_argument("--mode", default="mixed", choices=["float64", "float32", "mixed"])
    ap.add_argument("--sigma", type=float, default=5.0)
    ap.add_argument("--block", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reference-n", type=int, default=20000, help="n of the scipy potrf flop-rate reference")
    ap.add_argument("--data-dir", default=os.environ.get("KERNELFIT_DATA"))
    ap.add_argument("--out", default=None, help="append the JSON lines to this file too")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--child", choices=["kernelfit", "scipy"], help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        print(json.dumps(run_kernelfit(args) if args.child == "kernelfit" else run_scipy(args), default=float))
        return 0

    def emit(rec):
        line = json.dumps(rec, default=float)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")

    from kernelfit.provenance import provenance

    emit({"what": "machine", **provenance()})
    records = {}
    sizes = sorted(set(args.sizes) | ({args.reference_n} if args.reference_n <= max(args.sizes) else set()))
    for n in sizes:
        args.n = n
        if n <= SCIPY_DENSE_LIMIT:
            records[("scipy", n)] = r = _child("scipy", args)
            emit(r)
        else:
            emit({"what": "scipy", "n": n, "skipped": f"dense scipy potrf at n > {SCIPY_DENSE_LIMIT} crashed or does "
                  "not fit on this machine class (see shared/GUIDE.md); reference taken at --reference-n"})
        if n in args.sizes:
            records[("kernelfit", n)] = r = _child("kernelfit", args)
            if ("scipy", n) in records and "factor_gflops" in records[("scipy", n)] and "factor_gflops" in r:
                r["factor_speed_vs_scipy_same_n"] = r["factor_gflops"] / records[("scipy", n)]["factor_gflops"]
            emit(r)
    ref = records.get(("scipy", args.reference_n), {})
    top = records.get(("kernelfit", max(args.sizes)), {})
    if "factor_gflops" in ref and "factor_gflops" in top:
        emit({"what": "summary", "n": top["n"], "reference_n": args.reference_n,
              "kernelfit_factor_gflops": top["factor_gflops"], "scipy_potrf_gflops_at_reference_n": ref["factor_gflops"],
              "flop_rate_ratio": top["factor_gflops"] / ref["factor_gflops"],
              "test_error_true": top["results"]["true"]["test_error"],
              "test_error_random_labels": top["results"]["random-labels"]["test_error"],
              "residual_relative_true": top["results"]["true"]["residual_relative"],
              "peak_rss_gib": top["peak_rss_gib"]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
