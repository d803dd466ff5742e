"""Which default bandwidth rule per feature map? Test error of the exact interpolant for
sigma = F x median pairwise distance, F in {0.25, 0.5, 1, 2}, on real data.

    KERNELFIT_DATA=/path/to/data python benchmarks/bandwidth_rule.py --threads 1 \
        > benchmarks/results/bandwidth_rule.jsonl

One JSON line per (feature map, F): test error per F, the median, n, time, and the machine. The
same solver paths as ``kernelfit solve --features`` / ``kernelfit table`` (pixels and Gabor: the
mixed-precision interpolant on the feature matrix; randconv: the feature-Gram panel solve). MNIST at
5,000 / 1,000, CIFAR-10 at 2,000 / 1,000 by default (stratified seeded subsets). Skips a dataset
whose files are absent (one line saying so).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1, help="BLAS / kernel-pool threads (default 1)")
    p.add_argument("--factors", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.0])
    p.add_argument("--mnist-n", type=int, nargs=2, default=[5000, 1000], metavar=("TRAIN", "TEST"))
    p.add_argument("--cifar-n", type=int, nargs=2, default=[2000, 1000], metavar=("TRAIN", "TEST"))
    p.add_argument("--maps", nargs="+", default=["mnist-pixels", "mnist-gabor", "cifar-pixels", "cifar-randconv"])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "KERNELFIT_THREADS"):
        os.environ[var] = str(args.threads)   # before numpy loads its BLAS

    import numpy as np
    from threadpoolctl import threadpool_limits

    from kernelfit.data import load_dataset
    from kernelfit.errors import DataError, InputError
    from kernelfit.features.pipeline import dataset_features, randconv_gram
    from kernelfit.features.randconv import RandConvConfig
    from kernelfit.kernels import median_bandwidth
    from kernelfit.solve import SolveOptions, fit_interpolant

    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "cpus": os.cpu_count(), "threads": args.threads, "python": platform.python_version(),
               "numpy": np.__version__}
    datasets = {}

    def dataset(name, n_train, n_test):
        if name not in datasets:
            ds = load_dataset(name)
            datasets[name] = ds.subset(n_train, n_test, seed=args.seed)
        return datasets[name]

    def emit(rec):
        print(json.dumps({**rec, "machine": machine}), flush=True)

    with threadpool_limits(args.threads):
        for fmap in args.maps:
            source, kind = fmap.split("-")
            name = "mnist" if source == "mnist" else "cifar10"
            n_train, n_test = args.mnist_n if source == "mnist" else args.cifar_n
            try:
                ds = dataset(name, n_train, n_test)
            except (DataError, InputError, FileNotFoundError) as e:
                emit({"feature_map": fmap, "skipped": f"{name} not available: {e}"})
                continue
            t0 = time.perf_counter()
            if kind == "randconv":
                from kernelfit.solve import fit_feature_gram

                cfg = RandConvConfig(seed=args.seed)
                g, _, _ = randconv_gram(ds, cfg, panels=True, use_cache=False)
                features_s = time.perf_counter() - t0
                for F in args.factors:
                    t = time.perf_counter()
                    model, scores = fit_feature_gram(copy.deepcopy(g), np.eye(ds.num_classes)[ds.y_train],
                                                     SolveOptions(bandwidth=f"{F}*median"), seed=args.seed)
                    emit({"feature_map": fmap, "n_train": len(ds.y_train), "n_test": len(ds.y_test), "factor": F,
                          "median": model.stats["median_distance"], "sigma": model.bandwidth,
                          "test_error": float(np.mean(np.argmax(scores, 1) != ds.y_test)),
                          "train_error": float(np.mean(np.argmax(model.train_scores, 1) != ds.y_train)),
                          "features_s": features_s,
                          "solve_s": time.perf_counter() - t, "features": cfg.to_dict()})
                continue
            Ftr, Fte, info = dataset_features(ds, kind)
            median = median_bandwidth(Ftr, seed=args.seed)
            features_s = time.perf_counter() - t0
            Y = np.eye(ds.num_classes)[ds.y_train]
            for F in args.factors:
                t = time.perf_counter()
                model = fit_interpolant(Ftr, Y, SolveOptions(bandwidth=F * median, mode="mixed"))
                pred = np.argmax(model.predict(Fte, argmax_groups=ds.num_classes), axis=1)
                emit({"feature_map": fmap, "n_train": len(ds.y_train), "n_test": len(ds.y_test), "factor": F,
                      "median": median, "sigma": F * median, "test_error": float(np.mean(pred != ds.y_test)),
                      "train_error": float(np.mean(np.argmax(model.train_scores, 1) != ds.y_train)),
                      "residual_relative": model.stats["residual_relative"], "features_s": features_s,
                      "solve_s": time.perf_counter() - t, "features": {k: v for k, v in info.items() if k != "cache_dir"}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
