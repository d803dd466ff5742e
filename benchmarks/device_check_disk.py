"""Device check (disk -> host -> GPU): the disk factorization with a GPU as the fast memory, tests then
one benchmark, everything under one --timeout (default 150 s), on a machine that has only this
working tree (plus the folders carried with it).

    python3 benchmarks/device_check_disk.py --out "$OUT"

Steps (all output under --out):

1. ``environment.json``: Python / torch / CUDA versions, GPU name and memory (then where the data
   was found, or why not). Written before anything can fail.
2. ``pytest -m gpu tests/test_disk_device.py`` under ``--pytest-timeout`` (60 s) -> ``pytest_disk_gpu.log``.
3. The benchmark, each part in its own process (a crash or a timeout costs only its own part; every
   part appends its JSON line to ``disk_gpu.jsonl`` as soon as it is done): MNIST, --n training points
   (default 40,000), 10,000 test images, Gaussian kernel sigma 5, float64.
   ``incore``: the host Gram panels factored on the device in one piece (``linalg.factor`` with
   FactorOptions(device=...)). ``disk``: the same Gram filled into a disk store under --scratch-dir
   (default a new folder under /tmp), factored disk -> host -> device with a host budget of
   --budget-fraction (1/4) of the Gram (``disk_solve.solve_on_disk``), solved on the host streaming
   the factor, its float64 residual and test error. Then a ``benchmark`` line: both factor seconds,
   the rate ratio disk / in-core, slabs, bytes read, I/O wait, the residual and test error.
4. ``summary.md``, printed last.

Data: mnist.npz from --data, $KERNELFIT_DATA, <repo>/runs/data (git-ignored; carry it), or
<repo>/../shared/data. Imports only numpy / scipy / torch and kernelfit (no dask, pywavelets, zarr).
The exit status is 0 only when the tests passed and the benchmark succeeded.

CPU dry run of the machinery (a slow test in tests/test_disk_device.py):
    python benchmarks/device_check_disk.py --device cpu --n 2000 --out /tmp/check
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from device_check import child_env, environment, fresh_out_dir, gpu_label, pytest_counts, run_logged  # noqa: E402
from gpu_cholesky import find_data_dir  # noqa: E402

FILES = ("environment.json", "pytest_disk_gpu.log", "disk_gpu.jsonl", "disk_gpu.log", "summary.md")


# ------------------------------------------------------------------------------ the parts (child processes)
def _data(args):
    """MNIST features in float64 (pixels / 255, uncentered: the solvers center them), one-hot targets."""
    import numpy as np

    from kernelfit.data import load_dataset, to_features

    ds = load_dataset("mnist", data_dir=args.data)
    full = args.n >= len(ds.y_train)
    ds = ds.subset(n_train=None if full else args.n, n_test=args.n_test, seed=None if full else 0)
    X = np.ascontiguousarray(to_features(ds.x_train), dtype=np.float64)
    Xt = np.ascontiguousarray(to_features(ds.x_test), dtype=np.float64)
    return X, np.eye(ds.num_classes)[ds.y_train], Xt, np.asarray(ds.y_test)


def _sync(device):
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _warm(device):
    """torch imported, the device's context, cuBLAS and cuSOLVER loaded before any timing (in both parts)."""
    import torch

    A = torch.eye(256, dtype=torch.float64, device=device)
    torch.linalg.cholesky_ex(A @ A)
    _sync(device)


def part_incore(args) -> dict:
    import numpy as np

    from kernelfit.gram import build_gram_panels
    from kernelfit.linalg.factor import factor
    from kernelfit.linalg.options import FactorOptions

    X, _, _, _ = _data(args)
    X -= X.mean(axis=0)
    _warm(args.device)
    t0 = time.perf_counter()
    G = build_gram_panels(X, "gaussian", args.sigma, dtype=np.float64)
    t1 = time.perf_counter()
    info = factor(G, FactorOptions(device=args.device))
    _sync(args.device)
    t2 = time.perf_counter()
    return {"part": "incore", "ok": True, "n": args.n, "device": info.device, "path": info.path, "block": G.block,
            "gram_s": t1 - t0, "factor_s": t2 - t1, "factor_timings_s": info.timings_s,
            "factor_gflops": args.n**3 / 3 / (t2 - t1) / 1e9, "gram_bytes": G.nbytes}


def part_disk(args) -> dict:
    import numpy as np

    from kernelfit.disk_solve import solve_on_disk
    from kernelfit.kernels import kernel_tile
    from kernelfit.linalg.panels import SymmetricPanels, choose_block

    X, Y, Xt, yt = _data(args)
    n = X.shape[0]
    budget = int(SymmetricPanels.nbytes_for(n, choose_block(n), np.float64) * args.budget_fraction)
    _warm(args.device)
    parent = Path(tempfile.mkdtemp(prefix="kf-disk-gpu-", dir=args.scratch_dir))   # ours: removed when empty
    t0 = time.perf_counter()
    alpha, R, st = solve_on_disk(X, Y, kernel="gaussian", bandwidth=args.sigma, scratch_dir=parent / "store",
                                 memory_budget=budget, dtype=np.float64, max_refine=0, with_residual=True,
                                 device=args.device)
    t1 = time.perf_counter()
    parent.rmdir()            # the store removed itself after the solve; the folder is empty
    mean = X.mean(axis=0)
    wrong = 0
    for r0 in range(0, len(yt), 2000):     # test scores K(X_test, X) alpha in row blocks, float64
        K = kernel_tile(Xt[r0 : r0 + 2000] - mean, X - mean, "gaussian", args.sigma, dtype=np.float64)
        wrong += int(((K @ alpha).argmax(1) != yt[r0 : r0 + 2000]).sum())
    return {"part": "disk", "ok": True, "n": n, "budget_bytes": budget, "block": st["block_size"],
            "factor_s": st["timings_s"]["factor"], "end_to_end_s": t1 - t0, "timings_s": st["timings_s"],
            "factor_device": st["factor_device"], "slabs": st["slabs"], "bytes_read": st["bytes_read"],
            "bytes_written": st["bytes_written"], "io_wait_s": st["io_wait_s"], "disk_timings_s": st["disk_timings_s"],
            "residual_rel": float(np.linalg.norm(R) / np.linalg.norm(Y)),
            "test_error": wrong / max(len(yt), 1), "n_test": int(len(yt))}


def run_part(args) -> int:
    """One part in this process: its JSON line appended to --jsonl, an error as a line too."""
    try:
        rec = {"incore": part_incore, "disk": part_disk}[args.part](args)
    except BaseException as exc:      # recorded, then the process fails
        rec = {"part": args.part, "ok": False, "error": f"{type(exc).__name__}: {exc}"}
        with open(args.jsonl, "a") as f:
            f.write(json.dumps(rec) + "\n")
        raise
    with open(args.jsonl, "a") as f:
        f.write(json.dumps(rec, default=str) + "\n")
    print(json.dumps(rec, default=str), flush=True)
    return 0


# ------------------------------------------------------------------------------ the check
def benchmark_line(parts: dict, args) -> dict:
    inc, dsk = parts.get("incore", {}), parts.get("disk", {})
    ok = bool(inc.get("ok") and dsk.get("ok"))
    rec = {"part": "benchmark", "ok": ok, "device": args.device, "n": args.n, "dtype": "float64", "sigma": args.sigma,
           "budget_fraction": args.budget_fraction}
    if ok:
        rec.update(factor_s_in_core=inc["factor_s"], factor_s_disk=dsk["factor_s"],
                   rate_ratio=inc["factor_s"] / dsk["factor_s"],        # (n^3/3 / disk s) / (n^3/3 / in-core s)
                   slabs=dsk["slabs"], bytes_read=dsk["bytes_read"], io_wait_s=dsk["io_wait_s"],
                   residual_rel=dsk["residual_rel"], test_error=dsk["test_error"],
                   bytes_uploaded=dsk["factor_device"].get("bytes_uploaded"),
                   factored_on=dsk["factor_device"].get("device"))
    else:
        rec["errors"] = {k: v.get("error", "no record (killed or timed out)") for k, v in
                         (("incore", inc), ("disk", dsk)) if not v.get("ok")}
    return rec


def summary(rec: dict, pytest_line: str, gpu: str, runs: dict) -> str:
    rows = [f"# Disk -> host -> {rec['device']} device check ({gpu})", "",
            f"- tests (`pytest -m gpu tests/test_disk_device.py`): {pytest_line}",
            "- parts: " + ", ".join(f"{k} rc={v['rc']} {v['seconds']} s{' (timed out)' if v['timed_out'] else ''}"
                                    for k, v in runs.items()), ""]
    if not rec["ok"]:
        return "\n".join(rows + [f"benchmark FAILED: {rec['errors']}", ""])
    g = 2**30
    rows += ["| n | in-core factor s | disk factor s | rate disk / in-core | slabs | read GiB | I/O wait s | "
             "residual | test error |", "|---|---|---|---|---|---|---|---|---|",
             f"| {rec['n']} | {rec['factor_s_in_core']:.2f} | {rec['factor_s_disk']:.2f} | {rec['rate_ratio']:.2f} | "
             f"{rec['slabs']} | {rec['bytes_read'] / g:.1f} | {rec['io_wait_s']:.2f} | {rec['residual_rel']:.1e} | "
             f"{rec['test_error']:.2%} |", ""]
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu for a dry run of the machinery")
    p.add_argument("--out", default=os.environ.get("OUT"), help="output folder (default $OUT)")
    p.add_argument("--data", default=None, help="folder with mnist.npz (see the module docstring for the search)")
    p.add_argument("--timeout", type=float, default=150.0, help="seconds for the whole check (default 150)")
    p.add_argument("--pytest-timeout", type=float, default=60.0)
    p.add_argument("--n", type=int, default=40000, help="training points (default 40000)")
    p.add_argument("--n-test", type=int, default=10000)
    p.add_argument("--sigma", type=float, default=5.0)
    p.add_argument("--budget-fraction", type=float, default=0.25, help="host budget of the disk run / the Gram")
    p.add_argument("--scratch-dir", default="/tmp", help="a new folder for the disk store is made under it")
    p.add_argument("--part", choices=["incore", "disk"], help=argparse.SUPPRESS)   # a child process
    p.add_argument("--jsonl", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.part:
        return run_part(args)
    out = fresh_out_dir(args.out, FILES)
    t0 = time.perf_counter()
    info = environment(args.device)
    (out / "environment.json").write_text(json.dumps({**info, "device": args.device}, indent=2) + "\n")
    gpu = gpu_label(info, args.device)
    print(f"[device_check_disk] {gpu}", flush=True)

    pytest_run = run_logged([sys.executable, "-m", "pytest", "-m", "gpu", "tests/test_disk_device.py", "-rfEs",
                             "-p", "no:cacheprovider"], out / "pytest_disk_gpu.log", child_env(None),
                            min(args.pytest_timeout, args.timeout))
    pytest_line = pytest_counts(out / "pytest_disk_gpu.log")
    print(f"[device_check_disk] pytest: {pytest_line} ({pytest_run['seconds']} s)", flush=True)

    jsonl, runs, parts = out / "disk_gpu.jsonl", {}, {}
    try:
        data_dir = find_data_dir(args.data)
        info["data_dir"] = str(data_dir)
    except SystemExit as exc:
        data_dir, info["data_error"] = None, str(exc)
    (out / "environment.json").write_text(json.dumps({**info, "device": args.device}, indent=2) + "\n")
    if data_dir is not None:
        log = out / "disk_gpu.log"
        for name, share in (("incore", 0.4), ("disk", 1.0)):      # the in-core part gets at most 40% of what is left
            left = args.timeout - (time.perf_counter() - t0) - 3
            cmd = [sys.executable, str(Path(__file__).resolve()), "--part", name, "--jsonl", jsonl, "--device",
                   args.device, "--n", args.n, "--n-test", args.n_test, "--sigma", args.sigma, "--data", data_dir,
                   "--budget-fraction", args.budget_fraction, "--scratch-dir", args.scratch_dir]
            runs[name] = run_logged(cmd, out / f"part_{name}.log", child_env(data_dir), max(1.0, left * share))
            with open(log, "a") as f:
                f.write((out / f"part_{name}.log").read_text(errors="replace"))
            (out / f"part_{name}.log").unlink()
        parts = {r["part"]: r for r in (json.loads(x) for x in jsonl.read_text().splitlines() if x.strip())} \
            if jsonl.exists() else {}
    else:
        parts = {"incore": {"error": info["data_error"]}, "disk": {"error": info["data_error"]}}
    rec = benchmark_line(parts, args)
    with open(jsonl, "a") as f:
        f.write(json.dumps(rec) + "\n")
    table = summary(rec, pytest_line, gpu, runs)
    (out / "summary.md").write_text(table)
    print(f"[device_check_disk] finished in {time.perf_counter() - t0:.0f} s; files in {out}", flush=True)
    print(table, flush=True)
    return 0 if pytest_run["rc"] == 0 and rec["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
