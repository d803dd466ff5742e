"""GPU (and CPU) benchmark of the tiled Cholesky on MNIST Gaussian-kernel Grams: in-core float64 /
float32 / mixed / mixed with a TF32 factor, out-of-core float64 / float32 / mixed, with the library's
own dense Cholesky (torch / cupy) on the same matrix in the same run as the reference. Prints one
JSON line per configuration, success or error, emitted before any cleanup (a failing configuration
is recorded and the next one runs; the exit status is 1 when any failed). A cleanup that fails (a
sticky CUDA error: every later call on that context fails) sends the remaining configurations to
fresh processes; ``--isolate`` runs every configuration in its own process from the start.
Out-of-core runs use a device budget that cuts the Gram into at least ``--ooc-slabs`` slabs (else
90% of free memory often holds it all and nothing streams); each record says how many slabs ran.
Each out-of-core mode builds its own Gram (20-40 GB of host panels at n = 100,000): ask for one.

The reference (``torch.linalg.cholesky``; cupy's too when installed and n^2 < 2^31, the limit of
cuSOLVER's 32-bit API that cupy calls) runs once per (n, dtype) after warm-up calls that create the
handles and compile the kernels, so first-call costs are not timed; later configurations of the
same (n, dtype) carry its numbers. A mixed-TF32 row reports the TF32 attempt's own factor (time,
TFLOP/s), or, when it broke down, where and after how long (``attempt_status``; no TFLOP/s then,
``tflops_note`` says why); when the float64 re-factorization ran (after a breakdown, or refinement
that could not reach float64 level), that factor is reported separately with its own time and rate
(``fallback_factor``), and ``fallback`` / ``factor_dtype`` say so.

GPU (the prepared run is benchmarks/device_check.py, which calls this script; see docs/gpu.md):
    python benchmarks/gpu_cholesky.py --device cuda --n 60000 --modes float64 mixed-tf32 --ooc-n 100000 --isolate
CPU (small, CI-like; exercises every code path on torch-CPU):
    python benchmarks/gpu_cholesky.py --device cpu --n 2000 --n-test 1000 --ooc-n 3000 --ooc-budget-mib 8

Data: mnist.npz from --data, else $KERNELFIT_DATA, else <repo>/runs/data (git-ignored: copy
mnist.npz there on a machine that has only the working tree), else <repo>/../shared/data.

Per phase (seconds): gram (built on the device; in core it stays there, out of core it is written to
host panels), factor (compute; transfers separate), solve / refine (float64 residuals on the device),
predict; in-core records also carry ``device_phases_s`` (wall clock, device synchronized per phase). TFLOP/s =
(n^3/3) / factor compute time. "fraction of peak" divides by a float32/float64 GEMM rate measured in
the same run (and by the vendor's nominal dense peak when the GPU name is in NOMINAL_PEAK_TFLOPS).
For n > 60,000 the training set is MNIST train plus 1-pixel-shifted copies (test error on MNIST test).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kernelfit.gram_device import (  # noqa: E402
    ResidentOptions,
    build_gram_panels_device,
    gram_tile_into,
    kernel_matmul_torch,
    solve_resident,
)
from kernelfit.linalg import backend_torch as bt  # noqa: E402
from kernelfit.linalg.backend import free_device_bytes  # noqa: E402
from kernelfit.linalg.factor import factor  # noqa: E402
from kernelfit.linalg.mixed import broke_down, solve_refined  # noqa: E402
from kernelfit.linalg.options import FactorOptions  # noqa: E402
from kernelfit.linalg.outofcore import TorchDevice, budget_for_slabs  # noqa: E402
from kernelfit.linalg.panels import cholesky_flops, choose_block  # noqa: E402
from kernelfit.linalg.refine import float64_level_threshold  # noqa: E402
from kernelfit.linalg.tiled import cho_solve  # noqa: E402
from kernelfit.planning import measure_gemm_tflops, profile_for_name  # noqa: E402

SIGMA = 5.0   # GUIDE: Gaussian kernel, sigma = 5 on pixels / 255
MODES = ("float64", "float32", "mixed", "mixed-tf32")   # mixed-tf32: float32 factor on TF32 tensor cores
DATA_FOLDER_IN_TREE = ROOT / "runs" / "data"             # git-ignored (/runs/): travels with a copied tree
CUSOLVER_32BIT_LIMIT = 2**31    # cupy.linalg.cholesky calls cuSOLVER's 32-bit potrf: n^2 elements must stay below


def find_data_dir(explicit=None) -> Path:
    """The folder holding mnist.npz: --data, $KERNELFIT_DATA, <repo>/runs/data, <repo>/../shared/data."""
    env = os.environ.get("KERNELFIT_DATA")
    candidates = [("--data", explicit), ("$KERNELFIT_DATA", env), ("<repo>/runs/data", DATA_FOLDER_IN_TREE),
                  ("<repo>/../shared/data", ROOT.parent / "shared" / "data")]
    tried = []
    for label, path in candidates:
        if not path:
            continue
        if (Path(path) / "mnist.npz").is_file():
            return Path(path).resolve()
        tried.append(f"{label} = {path}")
    raise SystemExit("mnist.npz not found; looked in " + "; ".join(tried) + f". Copy mnist.npz (Keras layout) into "
                     f"{DATA_FOLDER_IN_TREE} (git-ignored) or pass --data DIR / set KERNELFIT_DATA.")


def release_device_memory(device):
    """Hand cached blocks back to the driver between configurations (torch's cache, cupy's pool), so
    each one starts from the same free memory and the reference checks see what is really free."""
    gc.collect()
    sync(device)            # raises after a sticky CUDA error: the caller records that, see main()
    if device.type == "cuda":
        import torch

        torch.cuda.empty_cache()
    cupy = sys.modules.get("cupy")
    if cupy is not None:
        cupy.get_default_memory_pool().free_all_blocks()
        cupy.get_default_pinned_memory_pool().free_all_blocks()


def emit(record, out_path):
    line = json.dumps(record, default=lambda o: o.item() if hasattr(o, "item") else str(o))
    print(line, flush=True)
    if out_path:
        with open(out_path, "a") as f:
            f.write(line + "\n")


def machine(device):
    """kernelfit.results provenance (CPU model, cores, RAM, versions, git) plus the benchmarked GPU."""
    import torch

    from kernelfit.provenance import provenance

    prov = provenance()
    info = {**prov["machine"], "versions": prov["versions"], "git": prov["git"], "gpu": None}
    try:
        import cupy

        info["versions"]["cupy"] = cupy.__version__
    except ImportError:
        info["versions"]["cupy"] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    return info


def sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gemm_tflops(device, dtype, m):
    """Measured GEMM rate on this device (the practical peak the factorization is compared with)."""
    return measure_gemm_tflops(device, dtype, m, seconds=1.0)


def nominal_peak(device_name, dtype_name):
    """The datasheet's dense rate (kernelfit.planning.DEVICE_PROFILES) for this GPU, or None."""
    prof = profile_for_name(device_name) if device_name else None
    return None if prof is None else getattr(prof, f"{dtype_name}_tflops", None)


def load_mnist(data_dir, n, n_test, seed):
    with np.load(Path(data_dir) / "mnist.npz", allow_pickle=False) as z:
        xtr = z["x_train"].reshape(60000, -1).astype(np.float64) / 255.0
        ytr = z["y_train"].astype(np.int64)
        xte = z["x_test"].reshape(10000, -1)[:n_test].astype(np.float64) / 255.0
        yte = z["y_test"][:n_test].astype(np.int64)
    if n <= 60000:
        idx = np.random.default_rng(seed).permutation(60000)[:n]
        return xtr[idx], ytr[idx], xte, yte
    # more points than MNIST train: append copies shifted by one pixel (right, down, left, ...)
    parts, labels, shift = [xtr], [ytr], 0
    while sum(len(p) for p in parts) < n:
        dy, dx = [(0, 1), (1, 0), (0, -1), (-1, 0)][shift % 4]
        img = np.roll(xtr.reshape(-1, 28, 28), (dy, dx), axis=(1, 2)).reshape(60000, -1)
        parts.append(img)
        labels.append(ytr)
        shift += 1
    return np.vstack(parts)[:n], np.concatenate(labels)[:n], xte, yte


def one_hot(y):
    Y = np.zeros((len(y), 10))
    Y[np.arange(len(y)), y] = 1.0
    return Y


def warm_up_references(dtype, device):
    """First calls create the cuSOLVER / cuBLAS handles and (cupy) compile kernels with NVRTC: make
    them on a small matrix so the timed reference calls do not pay them."""
    import torch

    A = torch.eye(256, dtype=dtype, device=device) * 2.0
    torch.linalg.cholesky_ex(A)
    sync(device)
    cupy = _cupy()
    if cupy is not None and device.type == "cuda":
        with cupy.cuda.Device(device.index or 0):
            cupy.linalg.cholesky(cupy.from_dlpack(A))
            cupy.cuda.Device().synchronize()


def _cupy():
    try:
        import cupy

        return cupy
    except ImportError:
        return None


def reference_cholesky(Xd, dtype, device, n, args):
    """The library's own dense Cholesky (torch.linalg.cholesky; cupy's too when installed and n^2 <
    2^31) on the same Gram, timed in the same run after warm-up calls. Returns (record, dense L on
    host or None)."""
    import torch

    need = n * n * torch.empty((), dtype=dtype).element_size()
    free = free_device_bytes(device) if device.type == "cuda" else None
    if free is not None and 2.2 * need > free:
        return {"skipped": f"dense {need / 2**30:.1f} GiB x2 (matrix + factor) > free {free / 2**30:.1f} GiB"}, None
    K = torch.empty((n, n), dtype=dtype, device=device)
    sq = (Xd * Xd).sum(1)
    rows = 4096
    for a in range(0, n, rows):
        gram_tile_into(K[a : a + rows], Xd[a : a + rows], Xd, sq[a : a + rows], sq, "gaussian", SIGMA)
    K.fill_diagonal_(1.0)
    warm_up_references(dtype, device)
    sync(device)
    rec = {"dtype": str(dtype).replace("torch.", "")}
    t = time.perf_counter()
    L, info = torch.linalg.cholesky_ex(K)
    sync(device)
    dt = time.perf_counter() - t
    rec["torch.linalg.cholesky"] = {"seconds": dt, "tflops": cholesky_flops(n) / dt / 1e12, "info": int(info)}
    Lh = L.cpu().numpy() if n <= args.compare_max_n else None
    del L, info
    release_device_memory(device)         # torch's factor leaves the cache; cupy needs the memory
    cupy = _cupy()
    try:
        if cupy is None:
            raise ImportError
        if device.type != "cuda":
            raise ValueError("cupy runs on CUDA devices only")
        if n * n >= CUSOLVER_32BIT_LIMIT:
            raise OverflowError(f"n^2 = {n * n:,} >= 2^31: cupy calls cuSOLVER's 32-bit potrf, which cannot index it")
        with cupy.cuda.Device(device.index or 0):
            Kc = cupy.from_dlpack(K)
            cupy.cuda.Device().synchronize()
            t = time.perf_counter()
            Lc = cupy.linalg.cholesky(Kc)
            cupy.cuda.Device().synchronize()
            dt = time.perf_counter() - t
            rec["cupy.linalg.cholesky"] = {"seconds": dt, "tflops": cholesky_flops(n) / dt / 1e12}
            del Lc, Kc
    except ImportError:
        rec["cupy.linalg.cholesky"] = "cupy not installed"
    except (ValueError, OverflowError) as exc:
        rec["cupy.linalg.cholesky"] = f"skipped: {exc}"
    except Exception as exc:   # a cupy failure must not cost the configuration
        rec["cupy.linalg.cholesky"] = f"error: {type(exc).__name__}: {exc}"
    del K
    release_device_memory(device)
    return rec, Lh


def ooc_budget(n, block, fdt, device, args):
    """The out-of-core device budget: --ooc-budget-mib, else the largest that gives >= --ooc-slabs slabs."""
    if args.ooc_budget_mib:
        return args.ooc_budget_mib * 2**20
    itemsize = np.dtype(fdt).itemsize
    workspace = TorchDevice(device).workspace_bytes(block, n, itemsize)
    return budget_for_slabs(n, block, itemsize, args.ooc_slabs, workspace)


def run_config(mode, n, ooc, args, device, base):
    import torch

    fdt = np.float64 if mode == "float64" else np.float32
    tf32 = mode == "mixed-tf32"
    tdt = bt.torch_dtype(fdt)
    block = args.block or choose_block(n)
    rec = dict(base, kind="gpu_cholesky", mode=mode, n=n, kernel="gaussian", bandwidth=SIGMA,
               path="out-of-core" if ooc else "in-core", block=block, phases_s={})
    Xtr, ytr, Xte, yte = load_mnist(args.data, n, args.n_test, args.seed)
    rec.update(d=Xtr.shape[1], n_test=len(yte))
    Y = one_hot(ytr)
    X64 = torch.from_numpy(Xtr).to(device)
    Xte64 = torch.from_numpy(Xte).to(device)
    Xd = X64.to(tdt)

    key = reference_key(n, fdt)
    if args.no_reference:
        ref, Lref = {"skipped": "--no-reference"}, None
    elif n > args.reference_max_n:
        ref, Lref = {"skipped": f"n > --reference-max-n {args.reference_max_n}"}, None
    elif key in REFERENCES:          # computed once per (n, dtype), by an earlier configuration
        ref, Lref = json.loads(json.dumps(REFERENCES[key][0])), REFERENCES[key][1]
        ref["computed_in"] = "an earlier configuration of this run"
    else:
        ref, Lref = reference_cholesky(Xd, tdt, device, n, args)
        REFERENCES[key] = (ref, Lref)
    del Xd
    rec["reference"] = ref

    budget = ooc_budget(n, block, fdt, device, args) if ooc else None
    fkw = dict(backend=args.backend, device=str(device) if args.backend != "numpy" else None,
               out_of_core=bool(ooc), device_memory_budget=budget, tf32=tf32)
    t_gram = []

    def build(dt):
        t = time.perf_counter()
        G = build_gram_panels_device(Xtr.astype(dt), "gaussian", SIGMA, block, dt, device)
        sync(device)
        t_gram.append(time.perf_counter() - t)
        return G

    def apply_high(V):
        return kernel_matmul_torch(X64, X64, torch.from_numpy(V).to(device), "gaussian", SIGMA,
                                      rows=args.product_rows, exact_diagonal=True).cpu().numpy()

    if not ooc and args.pipeline == "resident":
        # the Gram fits on the device: Gram, factor, refinement (and below, prediction) stay there
        sol = solve_resident(Xtr, Y, ResidentOptions(kernel="gaussian", bandwidth=SIGMA, dtype=fdt,
                                                     max_refine=10 if mode.startswith("mixed") else 0,
                                                     fallback_float64=mode.startswith("mixed"), rows=args.product_rows),
                             FactorOptions(device=device, block_size=block, tf32=tf32))
        alpha, factors, report = sol.alpha, sol.factors, sol.report
        rec["pipeline"] = "resident"
        rec["refinement"] = report
        rec["fallback"] = report["fallback"]
        rec["factor_dtype"] = report["factor_dtype"]
        rec["phases_s"].update(gram=sol.timings_s["gram"], factor_total=sol.timings_s["factor"],
                               refine=sol.timings_s["solve"])
        rec["device_phases_s"] = sol.device_timings_s      # the device synchronized at the end of each phase
        rec["resident_memory"] = sol.memory
        Lh_first = None
        del sol
    elif mode.startswith("mixed"):
        rec["pipeline"] = "host panels"
        timings = {}
        # the float64 fallback re-factors in core; out of core it would not fit, so it is not offered
        # what a float32 factor that breaks down cannot report itself (linalg.factor's TF32 rule for host panels)
        attempt_info = {"backend": args.backend, "device": fkw["device"] or "cpu", "path": rec["path"],
                        "tf32": bool(tf32 and device.type == "cuda" and args.backend != "numpy")}
        alpha, _, report, factors = solve_refined(build, lambda G: factor(G, FactorOptions(**fkw)).to_dict(), apply_high, Y,
                                                  dtype=np.float32, max_refine=10, scale_diagonal=True,
                                                  fallback=None if ooc else (lambda: None), timings=timings,
                                                  attempt_info=attempt_info)
        rec["refinement"] = report
        rec["fallback"] = report["fallback"]
        rec["factor_dtype"] = report["factor_dtype"]
        rec["phases_s"]["gram"] = sum(t_gram)
        rec["phases_s"]["factor_total"] = timings["factor"]       # every attempt, one that broke down included
        rec["phases_s"]["refine"] = timings["solve"]
        Lh_first = None
    else:
        rec["pipeline"] = "host panels"
        G = build(fdt)
        rec["phases_s"]["gram"] = t_gram[0]
        factors = [factor(G, FactorOptions(**fkw)).to_dict()]
        rec["phases_s"]["factor_total"] = factors[0]["timings_s"]["factor"]
        t = time.perf_counter()
        alpha = cho_solve(G, Y.astype(fdt)).astype(np.float64)
        rec["phases_s"]["solve_host"] = time.perf_counter() - t
        rec["factor_dtype"] = np.dtype(fdt).name
        Lh_first = G if Lref is not None else None
    # The row's factor is the first attempt (the TF32 one for mixed-tf32), with its own time and rate, also
    # when it broke down; a float64 re-factorization after it is reported apart, never under its label.
    describe_attempt(rec, factors, n, ooc, base)
    attach_reference_ratios(rec)
    if Lh_first is not None:
        rec["reference"]["max_abs_diff_L_vs_torch"] = float(np.max(np.abs(Lh_first.to_dense(False) - Lref)))

    # float64 residual and test error, computed on the device from the data (independent of the solve)
    t = time.perf_counter()
    scores = apply_high(alpha)
    R = Y - scores
    rec["residual_relative"] = float(np.linalg.norm(R) / np.linalg.norm(Y))
    rec["residual_max_abs"] = float(np.max(np.abs(R)))
    rec["phases_s"]["residual_float64"] = time.perf_counter() - t
    t = time.perf_counter()
    test_scores = kernel_matmul_torch(Xte64, X64, torch.from_numpy(alpha).to(device), "gaussian", SIGMA,
                                         rows=args.product_rows).cpu().numpy()
    rec["phases_s"]["predict"] = time.perf_counter() - t
    rec["train_error"] = float(np.mean(np.argmax(scores, 1) != ytr))
    rec["test_error"] = float(np.mean(np.argmax(test_scores, 1) != yte))
    rec["float64_level_threshold"] = float64_level_threshold(n)
    if device.type == "cuda":
        rec["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
    rec["status"] = "ok"
    return rec


REFERENCES = {}   # (n, dtype) -> (reference record, dense host L or None): each computed once per run


def reference_key(n, fdt):
    return f"{n}:{np.dtype(fdt).name}"


def describe_attempt(rec, factors, n, ooc, base):
    """The record's factor fields: the first attempt's (``factor``, ``attempt_dtype``, ``attempt_status``,
    ``phases_s.factor_compute``, ``tflops``, ``fraction_of_*_peak``) and, after a float64
    re-factorization, that factor's own (``fallback_factor``). An attempt that broke down has no rate:
    ``tflops`` and the fractions are null and ``tflops_note`` says why."""
    attempt = factors[0]
    label = attempt["dtype"] + ("+tf32" if attempt.get("tf32") else "")
    rec["attempt_dtype"] = label
    if broke_down(attempt):
        seconds = attempt["timings_s"]["factor"]
        rec["attempt_status"] = f"broke down at minor {attempt['minor']} after {seconds:.2f} s"
        rec["factor"] = attempt
        rec["phases_s"]["factor_compute"] = seconds     # the attempt's seconds until the breakdown
        rec["slabs"] = 1 if not ooc else None
        rec["tflops"] = None
        rec["tflops_note"] = (f"not computed: the {label} attempt {rec['attempt_status']}, so no factor to rate "
                              f"(fraction_of_*_peak null as well); the float64 re-factorization's rate is in "
                              f"fallback_factor")
    else:
        rec["attempt_status"] = "finished"
        rec.update(describe_factor(attempt, n, ooc))
        rec["phases_s"]["factor_compute"] = rec.pop("compute_s")
    rec.setdefault("fallback", None)
    if len(factors) > 1:
        fb = describe_factor(factors[-1], n, ooc)
        rec["fallback_factor"] = {"dtype": factors[-1]["dtype"], "compute_s": fb["compute_s"], "tflops": fb["tflops"],
                                  "timings_s": factors[-1]["timings_s"],
                                  **peak_fractions(fb["tflops"], factors[-1]["dtype"], base)}
    rec.update(peak_fractions(rec["tflops"], "tf32" if attempt.get("tf32") else attempt["dtype"], base))


def peak_fractions(tflops, peak_name, base):
    """TFLOP/s over the GEMM rate measured in this run and over the datasheet's (None where unknown or
    where there is no rate)."""
    measured = base["gemm_tflops"].get(peak_name)
    nom = nominal_peak(base["machine"].get("gpu"), peak_name)
    return {"fraction_of_measured_gemm_peak": tflops / measured if measured and tflops is not None else None,
            "fraction_of_nominal_peak": tflops / nom if nom and tflops is not None else None}


def describe_factor(info, n, ooc):
    """The factor columns of a record: compute seconds (transfers excluded), TFLOP/s, slabs."""
    ts = info["timings_s"]
    compute = ts["factor"] - ts.get("to_device", 0.0) - ts.get("to_host", 0.0)
    out = {"factor": {k: info[k] for k in ("backend", "device", "path", "dtype", "bytes_moved", "device_memory",
                                           "tf32", "notes")}, "compute_s": compute,
           "tflops": cholesky_flops(n) / max(compute, 1e-12) / 1e12,
           "slabs": info["device_memory"].get("slabs", 1 if not ooc else None)}   # how many really ran
    out["factor"]["timings_s"] = ts
    return out


def attach_reference_ratios(rec):
    for r in (rec.get("reference") or {}).values():
        if isinstance(r, dict) and "tflops" in r and rec.get("tflops"):
            r["ours_over_reference_speed"] = rec["tflops"] / r["tflops"]


def guarded(mode, n, ooc, args, device, base):
    """run_config, or an error record: every configuration ends in a record. The device memory is
    handed back by the caller only after the record is out (cleanup can raise, see main())."""
    t = time.perf_counter()
    try:
        rec = run_config(mode, n, ooc, args, device, base)
    except Exception as exc:
        rec = error_record(base, mode, n, ooc, f"{type(exc).__name__}: {exc}", traceback.format_exc(limit=6)[-3000:])
    rec["wall_s"] = time.perf_counter() - t
    return rec


def error_record(base, mode, n, ooc, error, tb=None):
    rec = dict(base, kind="gpu_cholesky", mode=mode, n=n, path="out-of-core" if ooc else "in-core", status="error",
               error=error)
    if tb:
        rec["traceback"] = tb
    return rec


def child_command(args, mode, n, ooc):
    """This script for one configuration in a fresh process (a fresh CUDA context), with the
    references already computed in this run passed along so none is computed twice."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one-config", f"{mode}:{n}:{'ooc' if ooc else 'in'}",
           "--device", args.device, "--backend", args.backend, "--n-test", args.n_test, "--ooc-slabs", args.ooc_slabs,
           "--reference-max-n", args.reference_max_n, "--pipeline", args.pipeline, "--product-rows", args.product_rows,
           "--compare-max-n", args.compare_max_n, "--seed", args.seed, "--data", args.data]
    cmd += ["--ooc-budget-mib", args.ooc_budget_mib] if args.ooc_budget_mib else []
    cmd += ["--block", args.block] if args.block else []
    cmd += ["--no-reference"] if args.no_reference else []
    for key, (ref, _) in REFERENCES.items():
        cmd += ["--reference-json", key + "=" + json.dumps(ref)]
    return [str(c) for c in cmd]


def run_child(args, mode, n, ooc, seconds, base):
    """One configuration in a child process: its record, or an error record saying how it ended."""
    t = time.perf_counter()
    proc = subprocess.Popen(child_command(args, mode, n, ooc), stdout=subprocess.PIPE, text=True,
                            start_new_session=True)   # its own process group: a timeout ends all of it
    try:
        out, _ = proc.communicate(timeout=None if seconds is None else max(1.0, seconds))
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, _ = proc.communicate()
        timed_out = True
    recs = [json.loads(ln) for ln in out.splitlines() if ln.startswith('{"')]
    if recs:
        rec = recs[-1]
    else:
        why = "killed at --timeout" if timed_out else f"exited with status {proc.returncode}"
        rec = error_record(base, mode, n, ooc, f"child process {why} before writing its record (stderr is in the log)")
        rec["wall_s"] = time.perf_counter() - t
    rec["isolated"] = True
    ref = rec.get("reference") or {}
    if "torch.linalg.cholesky" in ref and "computed_in" not in ref:
        REFERENCES[reference_key(n, np.float64 if mode == "float64" else np.float32)] = (strip_ratios(ref), None)
    return rec


def strip_ratios(ref):
    ref = json.loads(json.dumps(ref))
    for r in ref.values():
        if isinstance(r, dict):
            r.pop("ours_over_reference_speed", None)
    return ref


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="torch device: cuda, cuda:1, cpu")
    p.add_argument("--backend", default="torch", choices=["torch", "numpy", "cupy"])
    p.add_argument("--n", type=int, default=60000, help="in-core training points")
    p.add_argument("--n-test", type=int, default=10000)
    p.add_argument("--modes", nargs="*", default=["float64", "mixed-tf32"], choices=MODES, help="in-core modes")
    p.add_argument("--ooc-n", type=int, nargs="*", default=[100000], help="out-of-core sizes ([] = skip)")
    p.add_argument("--ooc-modes", nargs="+", default=["float64"], choices=MODES,
                   help="out-of-core modes (each builds its own Gram; default float64: one host solve, no refinement)")
    p.add_argument("--ooc-budget-mib", type=int, default=None,
                   help="device budget for out-of-core (default: the largest that gives --ooc-slabs slabs)")
    p.add_argument("--ooc-slabs", type=int, default=3, help="out-of-core runs stream at least this many slabs")
    p.add_argument("--reference-max-n", type=int, default=60000,
                   help="run the dense torch/cupy reference Cholesky up to this n")
    p.add_argument("--block", type=int, default=None, help="panel width (default: automatic for each n)")
    p.add_argument("--pipeline", choices=["resident", "host"], default="resident",
                   help="in-core runs: 'resident' keeps Gram, factor, refinement and prediction on the device "
                        "(default); 'host' builds host panels and copies them to the device for the factor")
    p.add_argument("--product-rows", type=int, default=2048)
    p.add_argument("--compare-max-n", type=int, default=20000, help="compare our L with torch's up to this n")
    p.add_argument("--no-reference", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=None, help="folder with mnist.npz (default: $KERNELFIT_DATA, <repo>/runs/data, "
                                                "<repo>/../shared/data)")
    p.add_argument("--out", default=None, help="also append the JSON lines to this file")
    p.add_argument("--isolate", action="store_true",
                   help="run each configuration in its own process (a fresh CUDA context each; a few seconds more each)")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds for all configurations; those not started by then get a record saying so")
    p.add_argument("--one-config", default=None, help=argparse.SUPPRESS)            # MODE:N:in|ooc, for --isolate
    p.add_argument("--reference-json", action="append", default=[], help=argparse.SUPPRESS)   # KEY=JSON
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.data = find_data_dir(args.data)
    t0 = time.perf_counter()
    deadline = t0 + args.timeout if args.timeout else None
    for item in args.reference_json:
        key, _, text = item.partition("=")
        REFERENCES[key] = (json.loads(text), None)
    if args.one_config:
        mode, n, where = args.one_config.split(":")
        configs = [(mode, int(n), where == "ooc")]
    else:
        configs = [(mode, args.n, False) for mode in args.modes]
        configs += [(mode, n, True) for n in args.ooc_n for mode in args.ooc_modes]
    failed = 0
    isolate = args.isolate and not args.one_config
    base = device = None
    light = {"device": args.device, "argv": sys.argv[1:]}
    for mode, n, ooc in configs:
        left = None if deadline is None else deadline - time.perf_counter()
        if left is not None and left <= 0:
            rec = error_record(light, mode, n, ooc, f"not run: --timeout {args.timeout:.0f} s reached")
        elif isolate:
            rec = run_child(args, mode, n, ooc, left, base or light)
        else:
            if base is None:
                try:
                    device, base = setup(args)
                except Exception as exc:   # no usable device in this process: say so for this configuration
                    rec = error_record(light, mode, n, ooc, f"setup failed: {type(exc).__name__}: {exc}",
                                       traceback.format_exc(limit=6)[-3000:])
                    failed += 1
                    emit(rec, args.out)
                    isolate = not args.one_config
                    continue
            rec = guarded(mode, n, ooc, args, device, base)
        failed += rec["status"] != "ok"
        emit(rec, args.out)          # the record is out before any cleanup that could raise
        if not isolate and device is not None:
            try:
                release_device_memory(device)
            except Exception as exc:   # a sticky CUDA error: this process's context is unusable from now on
                isolate = not args.one_config
                print(f"[gpu_cholesky] cleanup after {mode} n={n} failed ({type(exc).__name__}: {exc}); "
                      f"{'the remaining configurations run in fresh processes' if isolate else 'stopping'}",
                      file=sys.stderr, flush=True)
                if not isolate:
                    break
    return 1 if failed else 0


def setup(args):
    """The torch device and the fields every record of this process shares (machine, GEMM rates)."""
    torch = bt.require_torch()
    device = bt.resolve_device(args.device)
    m = 8192 if device.type == "cuda" else 1024
    base = {"machine": machine(device), "device": str(device), "argv": sys.argv[1:],
            "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    base["gemm_tflops"] = {"float64": gemm_tflops(device, torch.float64, m),
                           "float32": gemm_tflops(device, torch.float32, m)}
    return device, base


if __name__ == "__main__":
    sys.exit(main())
