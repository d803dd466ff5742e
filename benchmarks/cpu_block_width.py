"""Panel width of the tiled float32 Cholesky on a CPU: the same MNIST Gaussian-kernel Gram factored
with several widths, interleaved over repeats, next to the machine's sgemm peak measured in the same
run. Prints one JSON line per factorization and a summary line (best time per width, and the width
``kernelfit.linalg.panels.choose_block`` picks for this n).

A wider panel makes each trailing-update GEMM larger (closer to the GEMM peak) but also computes
more of the upper halves of the diagonal squares, ~1.5 width / n extra flops; this measures where
that balances.

    python benchmarks/cpu_block_width.py --n 20000 --widths 1024 1536 2048 --repeats 2 --data-dir DIR
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cpu_peers import gemm_peak, load_mnist  # noqa: E402

from kernelfit.gram import build_gram_panels  # noqa: E402
from kernelfit.linalg.panels import cholesky_flops, choose_block  # noqa: E402
from kernelfit.linalg.tiled import cholesky_inplace, logdet  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--widths", type=int, nargs="+", default=[1024, 1536, 2048])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--sigma", type=float, default=5.0)
    ap.add_argument("--data-dir", default=os.environ.get("KERNELFIT_DATA", "/work/shared/data"))
    ap.add_argument("--out", default=None, help="also append the JSON lines to this file")
    args = ap.parse_args(argv)
    if not os.path.exists(os.path.join(args.data_dir, "mnist.npz")):
        raise SystemExit(f"no mnist.npz in {args.data_dir}; pass --data-dir DIR (the folder that holds it).")

    from kernelfit.provenance import machine_info, provenance
    from kernelfit.results import append_jsonl, dumps

    def emit(rec):
        print(dumps(rec, indent=None), flush=True)
        if args.out:
            append_jsonl(args.out, rec)

    X, _, _, _ = load_mnist(args.data_dir, args.n, 1, 0)
    Xc = (X - X.mean(axis=0)).astype(np.float32)
    peak = gemm_peak(np.float32)
    emit({"kind": "machine", "n": args.n, "sgemm_gflops_before": peak, "machine": machine_info(),
          "provenance": provenance()})
    best = {}
    for rep in range(args.repeats):
        widths = args.widths[rep % len(args.widths):] + args.widths[: rep % len(args.widths)]   # rotate the order
        for w in widths:
            G = build_gram_panels(Xc, "gaussian", args.sigma, w, np.float32)
            t = time.perf_counter()
            cholesky_inplace(G)
            dt = time.perf_counter() - t
            best[w] = min(best.get(w, np.inf), dt)
            # log det K from the factor: the same matrix whatever the width (a check, not timed)
            emit({"kind": "factor", "n": args.n, "width": w, "repeat": rep, "seconds": dt,
                  "gflops": cholesky_flops(args.n) / dt / 1e9, "share_of_sgemm": cholesky_flops(args.n) / dt / 1e9 / peak,
                  "logdet": logdet(G)})
            del G
    after = gemm_peak(np.float32)
    emit({"kind": "summary", "n": args.n, "best_seconds": {str(w): best[w] for w in args.widths},
          "fastest_width": min(best, key=best.get), "choose_block": choose_block(args.n),
          "sgemm_gflops_before_after": [peak, after]})


if __name__ == "__main__":
    main()
