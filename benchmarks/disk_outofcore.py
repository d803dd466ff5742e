"""In-core vs on-disk Cholesky of the same MNIST Gram.

Each part runs in its own subprocess (its peak RSS is its own): ``incore`` builds the Gram panels in
RAM, factors them (``tiled.cholesky_inplace``) and solves; ``disk`` fills a store under
--scratch-dir tile by tile, factors it left-looking with a RAM budget of --budget-fraction of the
Gram, and solves streaming the factor. Both measure float32 sgemm peak in the same process. Prints
JSON lines (one per part, then a summary with the factorization-rate ratio disk / in-core, the
end-to-end ratio, I/O wait and bytes through the disk), also appended to --out. ``--repeats R`` runs
the two parts R times interleaved (in-core, disk, in-core, disk, ...: the VMs are shared, so a slow
spell hits both) and the summary compares the best factorization of each part, with every pair's
ratio beside it.

    python benchmarks/disk_outofcore.py --n 30000 --scratch-dir /mnt/scratch/kf     # the issue's run
    python benchmarks/disk_outofcore.py --n 4000 --scratch-dir /tmp/kf-disk          # a dry run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from cpu_peers import gemm_peak, peak_rss_bytes  # benchmarks/ is on sys.path when a script runs


def _features(n, data_dir):
    from kernelfit.data import load_dataset, to_features

    ds = load_dataset("mnist", data_dir=data_dir)
    ds = ds.subset(n_train=n if n < len(ds.y_train) else None, n_test=10, seed=0 if n < len(ds.y_train) else None)
    X = to_features(ds.x_train).astype(np.float64)
    X -= X.mean(axis=0)          # as kernelfit.solve does: the kernels are translation-invariant
    Y = np.eye(ds.num_classes)[ds.y_train]
    return np.ascontiguousarray(X, dtype=np.float32), Y
def part_incore(args) -> dict:
    from kernelfit.gram import build_gram_panels
    from kernelfit.linalg.tiled import cho_solve, cholesky_inplace

    X, Y = _features(args.n, args.data_dir)
    t0 = time.perf_counter()
    G = build_gram_panels(X, "gaussian", args.sigma, dtype=np.float32)
    t1 = time.perf_counter()
    cholesky_inplace(G)
    t2 = time.perf_counter()
    alpha = cho_solve(G, Y.astype(np.float32))
    t3 = time.perf_counter()
    np.save(args.alpha_out, alpha)
    return {"part": "incore", "n": args.n, "block": G.block, "gram_s": t1 - t0, "factor_s": t2 - t1,
            "solve_s": t3 - t2, "end_to_end_s": t3 - t0, "factor_gflops": args.n**3 / 3 / (t2 - t1) / 1e9,
            "gram_bytes": G.nbytes, "peak_rss_bytes": peak_rss_bytes(), "sgemm_peak_gflops": gemm_peak(np.float32)}


def part_disk(args) -> dict:
    from kernelfit.kernels import kernel_tile
    from kernelfit.linalg.diskstore import DiskPanels, disk_cho_solve
    from kernelfit.linalg.panels import SymmetricPanels, choose_block

    X, Y = _features(args.n, args.data_dir)
    n = args.n
    budget = int(SymmetricPanels.nbytes_for(n, choose_block(n), np.float32) * args.budget_fraction)

    def tile(rows: slice, cols: slice) -> np.ndarray:
        T = kernel_tile(X[rows], X[cols], "gaussian", args.sigma, dtype=np.float32)
        d = np.arange(max(rows.start, cols.start), min(rows.stop, cols.stop))
        T[d - rows.start, d - cols.start] = 1.0     # k(x, x) = 1 exactly, as build_gram_panels
        return T

    t0 = time.perf_counter()
    st = DiskPanels.open(args.scratch_dir, n, source={"kind": "benchmark-mnist", "n": n, "sigma": args.sigma},
                         budget_bytes=budget, dtype=np.float32)     # block: diskstore.disk_block
    try:
        st.fill(tile)
        t1 = time.perf_counter()
        stats = st.factor(budget)
        t2 = time.perf_counter()
        alpha = disk_cho_solve(st, Y.astype(np.float32))
        t3 = time.perf_counter()
        stats = stats.to_dict()
    finally:
        st.remove()
    ref = np.load(args.alpha_out)
    return {"part": "disk", "n": n, "block": st.block, "budget_bytes": budget, "slabs": stats["slabs"],
            "gram_s": t1 - t0, "factor_s": t2 - t1, "solve_s": t3 - t2, "end_to_end_s": t3 - t0,
            "factor_gflops": n**3 / 3 / (t2 - t1) / 1e9, "io_wait_s": stats["io_wait_s"],
            "bytes_read": stats["bytes_read"], "bytes_written": stats["bytes_written"], "timings_s": stats["timings_s"],
            "alpha_rel_diff_vs_incore": float(np.linalg.norm(alpha - ref) / np.linalg.norm(ref)),
            "peak_rss_bytes": peak_rss_bytes(), "sgemm_peak_gflops": gemm_peak(np.float32)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=30000)
    p.add_argument("--sigma", type=float, default=5.0)
    p.add_argument("--budget-fraction", type=float, default=0.25, help="RAM budget of the disk run, as a fraction of the Gram")
    p.add_argument("--scratch-dir", required=True, help="an empty or new directory on the disk to measure")
    p.add_argument("--data-dir", default=os.environ.get("KERNELFIT_DATA"))
    p.add_argument("--out", help="append the JSON lines to this file")
    p.add_argument("--repeats", type=int, default=1, help="interleaved in-core / disk pairs (default 1)")
    p.add_argument("--part", choices=["incore", "disk"], help=argparse.SUPPRESS)
    p.add_argument("--alpha-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.part:
        rec = (part_incore if args.part == "incore" else part_disk)(args)
        print(json.dumps(rec))
        return 0
    from kernelfit.places import check_writable_dir
    from kernelfit.provenance import provenance
    from kernelfit.results import append_jsonl

    check_writable_dir(args.scratch_dir, "--scratch-dir")
    tmp = tempfile.mkdtemp(prefix="kf-disk-bench-")     # ours: the in-core alpha the disk part compares with
    alpha = os.path.join(tmp, "alpha.npy")
    recs = []
    try:
        for _ in range(max(1, args.repeats)):
            for part in ("incore", "disk"):
                cmd = [sys.executable, os.path.abspath(__file__), "--part", part, "--alpha-out", alpha, "--n",
                       str(args.n), "--sigma", str(args.sigma), "--budget-fraction", str(args.budget_fraction),
                       "--scratch-dir", args.scratch_dir] + (["--data-dir", args.data_dir] if args.data_dir else [])
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode != 0:
                    sys.stderr.write(out.stderr)
                    return out.returncode
                recs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    finally:
        if os.path.exists(alpha):
            os.unlink(alpha)
        os.rmdir(tmp)
    incs = [r for r in recs if r["part"] == "incore"]
    dsks = [r for r in recs if r["part"] == "disk"]
    inc = max(incs, key=lambda r: r["factor_gflops"])
    dsk = max(dsks, key=lambda r: r["factor_gflops"])
    recs.append({"part": "summary", "n": args.n, "sigma": args.sigma, "budget_fraction": args.budget_fraction,
                 "repeats": len(incs), "factor_rate_ratio": dsk["factor_gflops"] / inc["factor_gflops"],
                 "factor_rate_ratio_per_pair": [d["factor_gflops"] / i["factor_gflops"] for i, d in zip(incs, dsks)],
                 "end_to_end_ratio": min(r["end_to_end_s"] for r in incs) / min(r["end_to_end_s"] for r in dsks),
                 "io_wait_s": dsk["io_wait_s"], "bytes_read": dsk["bytes_read"], "bytes_written": dsk["bytes_written"],
                 "sgemm_peak_gflops": max(r["sgemm_peak_gflops"] for r in recs),
                 "provenance": provenance(sys.argv)})
    for r in recs:
        print(json.dumps(r))
        if args.out:
            append_jsonl(args.out, r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
