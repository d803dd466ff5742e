"""Exact kernel interpolation on the CPU against its peers, in one run: MNIST, sigma = 5, pixels / 255.

Methods, each fit + predict of the test set in its own subprocess (so its peak RSS, read by the child
from its own VmHWM after the timed part, is its own):

  kernelfit         fit_interpolant default (mode "mixed": the strategy the memory plan picks) and
                    class predictions (``predict(argmax_groups=10)``)
  kernelfit-float64 the same with mode "float64"
  scipy             K = sklearn.metrics.pairwise.rbf_kernel(X) (float64, the way a user builds it),
                    scipy.linalg.cho_factor / cho_solve, predictions rbf_kernel(X_test, X) @ alpha
  sklearn           sklearn.kernel_ridge.KernelRidge(alpha=1e-10, kernel="rbf").fit / .predict

Sizes and methods are interleaved (for each repeat, each n, every method, in an order rotated per
repeat) so a slow patch of a shared machine does not land on one method. After its timed part every
child computes, untimed and the same way for all methods, an independent float64 residual
||K alpha - Y|| / ||Y|| and the RKHS norm sqrt(sum alpha * K alpha) with K from sklearn's rbf_kernel
in row blocks, the test error, and the number of test points whose predicted class differs from the
argmax of the float64 scores rbf_kernel(X_test, X) @ alpha. The parent measures the machine's sgemm / dgemm peak (best of a
few 4096^3 products, before and after the runs) and prints JSON lines: a "machine" line, one line
per run, and one "ratios" line per n (peer end-to-end time / kernelfit time; > 1: kernelfit faster),
with kernelfit's factorization and prediction rates as shares of the sgemm peak.

    python benchmarks/cpu_peers.py --sizes 5000 10000 20000 --repeats 1 --out benchmarks/results/cpu_peers.jsonl
    python benchmarks/cpu_peers.py --sizes 2000 --n-test 2000        # quick check
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

METHODS = ("kernelfit", "kernelfit-float64", "scipy", "sklearn")
PEERS = ("scipy", "sklearn", "kernelfit-float64")


def load_mnist(data_dir, n, n_test, seed):
    with np.load(os.path.join(data_dir, "mnist.npz")) as f:
        x, y, xt, yt = f["x_train"], f["y_train"], f["x_test"], f["y_test"]
    idx = np.sort(np.random.default_rng(seed).choice(len(y), size=n, replace=False)) if n < len(y) else np.arange(len(y))
    X = x[idx].reshape(len(idx), -1).astype(np.float64) / 255.0
    Xt = xt[:n_test].reshape(min(n_test, len(yt)), -1).astype(np.float64) / 255.0
    return X, y[idx].astype(np.int64), Xt, yt[:n_test].astype(np.int64)


def one_hot(y, k=10):
    Y = np.zeros((len(y), k))
    Y[np.arange(len(y)), y] = 1.0
    return Y


# --------------------------------------------------------------------------------------------
# child: one method, timed, then the same untimed checks for every method
# --------------------------------------------------------------------------------------------

def _fit_predict(method, X, Y, Xt, sigma):
    gamma = 1.0 / (2.0 * sigma * sigma)
    t = {}
    extra = {}
    if method in ("kernelfit", "kernelfit-float64"):
        from kernelfit.solve import SolveOptions, fit_interpolant

        t0 = time.perf_counter()
        model = fit_interpolant(X, Y, SolveOptions(bandwidth=sigma, mode="mixed" if method == "kernelfit" else "float64"),
                                n_test=len(Xt))
        t["fit"] = time.perf_counter() - t0
        t.update({f"fit.{k}": v for k, v in model.stats["timings_s"].items()})
        t0 = time.perf_counter()
        scores = model.predict(Xt, argmax_groups=Y.shape[1])
        t["predict"] = time.perf_counter() - t0
        st = model.stats
        extra = {"strategy": st["strategy"], "strategy_reason": st["strategy_reason"],
                 "residual_source": st["residual_source"], "factor_dtype": st["factor_dtype"],
                 "factor_gflops": st["factor_gflops"], "reported_residual_relative": st["residual_relative"],
                 "refinement": {k: st["refinement"].get(k) for k in
                                ("iterations", "relative_residuals", "stop_reason", "float64_level", "fallback")},
                 "distances": st.get("distances"), "predict_scores": st.get("predict_scores"),
                 "predict_rows_recomputed_float64": st.get("predict_rows_recomputed_float64")}
        alpha = model.alpha
    elif method == "scipy":
        import scipy.linalg
        from sklearn.metrics.pairwise import rbf_kernel

        t0 = time.perf_counter()
        K = rbf_kernel(X, gamma=gamma)
        t["fit.gram"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        c = scipy.linalg.cho_factor(K, lower=True, overwrite_a=True, check_finite=False)
        t["fit.factor"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        alpha = scipy.linalg.cho_solve(c, Y, check_finite=False)
        t["fit.solve"] = time.perf_counter() - t1
        t["fit"] = time.perf_counter() - t0
        del K, c
        t0 = time.perf_counter()
        scores = rbf_kernel(Xt, X, gamma=gamma) @ alpha
        t["predict"] = time.perf_counter() - t0
        extra = {"factor_gflops": X.shape[0] ** 3 / 3.0 / t["fit.factor"] / 1e9}
    elif method == "sklearn":
        from sklearn.kernel_ridge import KernelRidge

        t0 = time.perf_counter()
        kr = KernelRidge(alpha=1e-10, kernel="rbf", gamma=gamma).fit(X, Y)
        t["fit"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        scores = kr.predict(Xt)
        t["predict"] = time.perf_counter() - t0
        alpha = np.asarray(kr.dual_coef_, dtype=np.float64)
        del kr
    else:
        raise SystemExit(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    t["total"] = t["fit"] + t["predict"]
    return alpha, scores, t, extra


def independent_checks(X, Y, alpha, sigma, Xt, scores, rows=2000):
    """||K alpha - Y|| / ||Y||, sqrt(sum alpha * K alpha) and the number of test points whose class
    differs from that of the float64 scores k(Xt, X) alpha, all with K from sklearn's rbf_kernel
    (float64, row blocks)."""
    from sklearn.metrics.pairwise import rbf_kernel

    gamma = 1.0 / (2.0 * sigma * sigma)
    KA = np.empty_like(Y)
    for a in range(0, len(X), rows):
        KA[a : a + rows] = rbf_kernel(X[a : a + rows], X, gamma=gamma) @ alpha
    R = KA - Y
    differ = 0
    for a in range(0, len(Xt), rows):
        ref = rbf_kernel(Xt[a : a + rows], X, gamma=gamma) @ alpha
        differ += int(np.sum(np.argmax(ref, 1) != np.argmax(scores[a : a + rows], 1)))
    return (float(np.linalg.norm(R) / np.linalg.norm(Y)), float(np.sqrt(max(float(np.sum(alpha * KA)), 0.0))),
            differ)


def peak_rss_bytes():
    """This process's own peak RSS: VmHWM of its address space. (ru_maxrss of a child is no good
    here: Linux carries the parent's high-water mark into a forked child.)"""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child(args):
    X, y, Xt, yt = load_mnist(args.data_dir, args.n, args.n_test, args.seed)
    Y = one_hot(y)
    alpha, scores, t, extra = _fit_predict(args.child, X, Y, Xt, args.sigma)
    peak = peak_rss_bytes()   # before the untimed checks below allocate their own blocks
    residual, rkhs, differ = independent_checks(X, Y, alpha, args.sigma, Xt, scores)
    if os.environ.get("OPENBLAS_CORETYPE"):
        extra["blas_workaround"] = (f"OPENBLAS_CORETYPE={os.environ['OPENBLAS_CORETYPE']}: rerun after the run "
                                    "with the default kernels died with SIGSEGV")
    rec = {"kind": "run", "method": args.child, "n": args.n, "n_test": len(yt), "d": X.shape[1],
           "sigma": args.sigma, "timings_s": t, "test_error": float(np.mean(np.argmax(scores, 1) != yt)),
           "test_classes_differ_from_float64": differ,
           "rkhs_norm": rkhs, "residual_relative_independent": residual,
           "predict_gflops": 2.0 * len(Xt) * X.shape[0] * X.shape[1] / t["predict"] / 1e9,
           "peak_rss_gib": peak / 2**30, **extra}
    sys.stdout.write(json.dumps(rec) + "\n")


# --------------------------------------------------------------------------------------------
# parent
# --------------------------------------------------------------------------------------------

def gemm_peak(dtype, size=4096, repeats=3):
    a = np.random.default_rng(0).random((size, size)).astype(dtype)
    b = a.T.copy()
    a @ b   # warm-up (threads, pages)
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2.0 * size**3 / best / 1e9


def _timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# numpy's and scipy's bundled OpenBLAS (0.3.29 and 0.3.31 tried) die with SIGSEGV in their threaded
# SYRK on these 2-core VMs with AVX-512 kernels (SkylakeX / Cooperlake): X @ X.T with 16,000 x 784
# float64 rows, and dpotrf at n = 20,000 (numpy issue 19685 reports the same X @ X.T crash). The
# Haswell (AVX2) kernels do not crash. A peer killed that way is rerun once with them, and the parent
# measures the GEMM peak of those kernels too, so the record shows how much slower the peer's BLAS was.
FALLBACK_CORETYPE = "Haswell"


def run_child(args, method, n, coretype=None):
    """One method in its own process (stderr inherited: progress and errors show)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", method, "--n", str(n), "--n-test", str(args.n_test),
           "--sigma", str(args.sigma), "--seed", str(args.seed), "--data-dir", args.data_dir]
    env = dict(os.environ, OPENBLAS_CORETYPE=coretype) if coretype else None
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False, env=env)   # a failed run is recorded
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode == -11 and method in ("scipy", "sklearn") and coretype is None:
        rec = run_child(args, method, n, coretype=FALLBACK_CORETYPE)
        rec["first_attempt"] = {"returncode": -11, "signal": "SIGSEGV", "openblas_kernels": "default"}
        return rec
    if proc.returncode != 0 or not lines:
        return {"kind": "run", "method": method, "n": n, "failed": True, "returncode": proc.returncode,
                **({"openblas_coretype": coretype} if coretype else {})}
    return json.loads(lines[-1])


def gemm_peaks_with(coretype):
    """sgemm / dgemm peaks of OpenBLAS's ``coretype`` kernels, measured in a child process."""
    code = ("import json, sys; sys.path.insert(0, %r); import cpu_peers as c, numpy as np; "
            "print(json.dumps({'sgemm': c.gemm_peak(np.float32), 'dgemm': c.gemm_peak(np.float64)}))"
            % os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, check=False,
                          env=dict(os.environ, OPENBLAS_CORETYPE=coretype))
    return json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[5000, 10000, 20000])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--n-test", type=int, default=10000)
    ap.add_argument("--sigma", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--data-dir", default=os.environ.get("KERNELFIT_DATA", "/work/shared/data"))
    ap.add_argument("--out", default=None, help="also append the JSON lines to this file")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args)

    from kernelfit.provenance import machine_info, provenance
    from kernelfit.results import append_jsonl, dumps

    def emit(rec):
        print(dumps(rec, indent=None), flush=True)
        if args.out:
            append_jsonl(args.out, rec)

    peaks = {"sgemm_gflops_before": gemm_peak(np.float32), "dgemm_gflops_before": gemm_peak(np.float64)}
    runs = []
    for rep in range(args.repeats):
        for n in args.sizes:
            k = (rep + args.sizes.index(n)) % len(args.methods)
            for method in args.methods[k:] + args.methods[:k]:
                rec = run_child(args, method, n)
                rec["repeat"] = rep
                runs.append(rec)
                emit(rec)
    peaks.update(sgemm_gflops_after=gemm_peak(np.float32), dgemm_gflops_after=gemm_peak(np.float64))
    if any(r.get("blas_workaround") for r in runs):
        fallback = gemm_peaks_with(FALLBACK_CORETYPE)
        if fallback:
            peaks.update({f"sgemm_gflops_{FALLBACK_CORETYPE.lower()}_kernels": fallback["sgemm"],
                          f"dgemm_gflops_{FALLBACK_CORETYPE.lower()}_kernels": fallback["dgemm"]})
    sgemm = max(peaks["sgemm_gflops_before"], peaks["sgemm_gflops_after"])
    emit({"kind": "machine", **peaks, "machine": machine_info(), "provenance": provenance()})
    for n in args.sizes:
        ok = [r for r in runs if r["n"] == n and not r.get("failed")]
        best = {m: min((r for r in ok if r["method"] == m), key=lambda r: r["timings_s"]["total"], default=None)
                for m in args.methods}
        kf = best.get("kernelfit")
        if kf is None:
            continue
        emit({"kind": "ratios", "n": n, "reference": "kernelfit (default mode), best of repeats",
              "end_to_end_ratio": {m: best[m]["timings_s"]["total"] / kf["timings_s"]["total"]
                                   for m in PEERS if best.get(m)},
              "fit_ratio": {m: best[m]["timings_s"]["fit"] / kf["timings_s"]["fit"] for m in PEERS if best.get(m)},
              "kernelfit_strategy": kf.get("strategy"),
              "kernelfit_factor_share_of_sgemm": kf["factor_gflops"] / sgemm,
              "kernelfit_predict_share_of_sgemm": kf["predict_gflops"] / sgemm,
              "kernelfit_end_to_end_over_factor": kf["timings_s"]["total"] / kf["timings_s"]["fit.factor"],
              "test_error": {m: best[m]["test_error"] for m in args.methods if best.get(m)},
              "test_classes_differ_from_float64": {m: best[m]["test_classes_differ_from_float64"]
                                                   for m in args.methods if best.get(m)},
              "peer_blas_workaround": {m: best[m]["blas_workaround"] for m in PEERS
                                       if best.get(m) and best[m].get("blas_workaround")},
              "rkhs_norm": {m: best[m]["rkhs_norm"] for m in args.methods if best.get(m)},
              "residual_relative_independent": {m: best[m]["residual_relative_independent"]
                                                for m in args.methods if best.get(m)},
              "peak_rss_gib": {m: best[m]["peak_rss_gib"] for m in args.methods if best.get(m)},
              "sgemm_gflops": sgemm})


if __name__ == "__main__":
    main()
