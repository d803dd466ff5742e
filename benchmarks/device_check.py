"""Device check 1 of 2 (kernelfit): the GPU tests, then the GPU benchmark, each under a timeout, on
a machine that has only this working tree (plus the folders carried with it). See docs/gpu.md;
device check 2 (deepfit, Table 1 networks) is benchmarks/device_check_deepfit.py.

    python3 benchmarks/device_check.py --out "$OUT"          # <= 330 s by default

Steps (all output under --out, at most 8 files, one folder level; the summary table prints last):

1. ``environment.json``: Python / torch / CUDA versions, GPU name and memory (then where the data
   was found, or why not). Written before anything can fail.
2. ``pytest -m gpu tests/test_gpu.py`` under ``--pytest-timeout`` -> ``pytest_gpu.log``, ``pytest_gpu.xml``.
   Runs before the data lookup: a missing data folder still leaves these records.
3. ``benchmarks/gpu_cholesky.py --isolate`` under what is left of ``--timeout``, each configuration
   in its own process (a sticky CUDA error costs only its own): all of MNIST (n = 60,000, 10,000
   test images) in-core float64 resident (targets: end to end <= 10 s, test error 1.22%, relative
   residual <= 1e-12), then with a TF32 float32 factor (reported as the TF32 attempt, any float64
   fallback apart), each with ``torch.linalg.cholesky`` on the same matrix (computed once per
   dtype); out-of-core n = 100,000 float64 in >= 3 slabs -> ``gpu_cholesky.jsonl`` (one record
   per configuration, success or error), ``gpu_cholesky.log``.
4. ``summary.md``: one row per configuration, printed last.

Data: mnist.npz from --data, $KERNELFIT_DATA, <repo>/runs/data (git-ignored; copy it there so it
travels with the tree), or <repo>/../shared/data. The exit status is 0 only when the tests passed
and every benchmark configuration succeeded.

CPU dry run of the machinery (part of the test suite):
    python benchmarks/device_check.py --device cpu --n 400 --n-test 100 --ooc-n 500 --block 64 --out /tmp/check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu_cholesky import find_data_dir  # noqa: E402

FILES = ("environment.json", "pytest_gpu.log", "pytest_gpu.xml", "gpu_cholesky.jsonl", "gpu_cholesky.log",
         "summary.md")


def fresh_out_dir(out, files) -> Path:
    """The output folder, created, with this check's own files of an earlier run in it removed (a fresh
    record; nothing else there is touched)."""
    if not out:
        raise SystemExit("no output folder: pass --out DIR or set $OUT.")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name in files:
        (out / name).unlink(missing_ok=True)
    return out


def child_env(data_dir: Path | None) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", MPLBACKEND="Agg")
    if data_dir is not None:
        env["KERNELFIT_DATA"] = str(data_dir)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


def run_logged(cmd, log: Path, env, timeout: float) -> dict:
    """Run cmd with stdout+stderr into log, killed after timeout seconds; returns rc / seconds / timed_out."""
    t = time.perf_counter()
    with open(log, "w") as f:
        f.write("$ " + " ".join(map(str, cmd)) + "\n")
        f.flush()
        # its own process group, so a timeout also ends the benchmark's per-configuration children
        proc = subprocess.Popen(list(map(str, cmd)), stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                start_new_session=True)
        try:
            rc, timed_out = proc.wait(timeout=max(1.0, timeout)), False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc, timed_out = proc.wait(), True
            f.write(f"\n[device_check] killed after {timeout:.0f} s (timeout)\n")
    return {"rc": rc, "seconds": round(time.perf_counter() - t, 1), "timed_out": timed_out}


def gpu_label(info: dict, device: str) -> str:
    """The GPUs ``environment`` found, by name, or what ran instead."""
    return ", ".join(g["name"] for g in info.get("gpus", [])) or f"{device} (no CUDA GPU)"


def environment(device: str) -> dict:
    info = {"python": platform.python_version(), "platform": platform.platform(), "data_dir": None,
            "requested_device": device, "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_cuda"] = torch.version.cuda
        info["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            info["gpus"] = [{"name": torch.cuda.get_device_name(i),
                             "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1)}
                            for i in range(torch.cuda.device_count())]
    except Exception as exc:   # the check must still run its steps and say what broke
        info["torch_error"] = f"{type(exc).__name__}: {exc}"
    try:
        import cupy

        info["cupy"] = cupy.__version__
    except Exception:
        info["cupy"] = None
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,memory.used,driver_version",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
            info["nvidia_smi"] = out.stdout.strip() or out.stderr.strip()
        except Exception as exc:
            info["nvidia_smi"] = f"{type(exc).__name__}: {exc}"
    return info


def pytest_counts(log: Path) -> str:
    """The last pytest summary line ('8 passed, 1 skipped in 4.20s'), or what the log ended with."""
    lines = [ln.strip(" =") for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    for ln in reversed(lines):
        if re.search(r"\b(passed|failed|error|skipped|deselected|no tests ran)\b", ln):
            return ln
    return lines[-1] if lines else "(no output)"


def end_to_end_seconds(r: dict):
    ph = r.get("phases_s", {})
    if "gram" not in ph:
        return None
    return ph["gram"] + ph.get("factor_total", 0.0) + ph.get("refine", ph.get("solve_host", 0.0)) + ph.get("predict", 0.0)


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


# the float64 resident run on all of MNIST: what the check expects of it
TARGETS = {"end_to_end_s": 10.0, "test_error": 0.0122, "residual_relative": 1e-12}


def target_line(records: list[dict]) -> str:
    r = next((r for r in records if r.get("mode") == "float64" and r.get("path") == "in-core"
              and r.get("n") == 60000 and r.get("status") == "ok"), None)
    if r is None:
        return "targets (float64 resident, n = 60,000): no such record"
    e2e = end_to_end_seconds(r)
    checks = [f"end to end {_fmt(e2e, '.2f')} s (<= {TARGETS['end_to_end_s']:g}: "
              f"{'met' if e2e is not None and e2e <= TARGETS['end_to_end_s'] else 'NOT met'})",
              f"test error {100 * r['test_error']:.2f}% (1.22%: "
              f"{'met' if abs(r['test_error'] - TARGETS['test_error']) < 5e-5 else 'NOT met'})",
              f"residual {r['residual_relative']:.1e} (<= 1e-12: "
              f"{'met' if r['residual_relative'] <= TARGETS['residual_relative'] else 'NOT met'})"]
    return "targets (float64 resident, n = 60,000): " + "; ".join(checks)


def _factor_cells(r: dict, ratio) -> list[str]:
    """The cells factor (attempt), attempt s, attempt TFLOP/s, ours / torch, fallback, final factor: the
    first factorization (where it broke down if it did), then the float64 re-factorization with its
    own seconds and rate. A record without ``fallback_factor`` after a fallback predates the recording
    of attempts that break down: its factor fields are the float64 re-factorization's, so they are
    shown as that, and the attempt as not recorded."""
    ph = r.get("phases_s", {})
    attempt_s, attempt_tf = ph.get("factor_compute"), r.get("tflops")
    status = r.get("attempt_status")
    attempt = r.get("attempt_dtype", "-") + ("" if status in (None, "finished") else f": {status}")
    fb = r.get("fallback_factor") if r.get("fallback") else None
    if r.get("fallback") and fb is None and r.get("status") == "ok":
        fb = {"dtype": r.get("factor_dtype"), "compute_s": attempt_s, "tflops": attempt_tf}
        attempt, attempt_s, attempt_tf, ratio = f"not recorded: {r['fallback'].split(';')[0]}", None, None, None
    if "fallback" not in r:
        fallback = "-"
    elif fb is None:
        fallback = "no"
    else:
        fallback = f"yes: {fb['dtype']} factor {_fmt(fb.get('compute_s'), '.2f')} s, {_fmt(fb.get('tflops'), '.3g')} TFLOP/s"
    final = f"{fb['dtype']}, {_fmt(fb.get('compute_s'), '.2f')} s" if fb else r.get("factor_dtype", "-")
    return [attempt, _fmt(attempt_s, ".2f"), _fmt(attempt_tf, ".3g"), _fmt(ratio, ".2f"), fallback, final]


def _level_text(refinement: dict | None, threshold) -> str:
    """float64_level with the threshold it was judged against, and whether the solve is backward stable
    (then float64 itself could not do better: the relative residual is as small as K allows)."""
    if not refinement or refinement.get("float64_level") is None:
        return "-"
    notes = ([] if threshold is None else [f"{threshold:.1e}"]) + (["backward stable"] if refinement.get("backward_stable")
                                                                  else [])
    return f"{refinement['float64_level']}" + (f" ({', '.join(notes)})" if notes else "")


def summary_table(records: list[dict], pytest_line: str, pytest_run: dict, bench_run: dict, gpu: str,
                  marker: str = "gpu", note: str = "") -> str:
    head = [f"# Device check on {gpu}", "",
            f"pytest -m '{marker}' tests/test_gpu.py: {pytest_line} (rc {pytest_run['rc']}, {pytest_run['seconds']} s"
            f"{', TIMED OUT' if pytest_run['timed_out'] else ''})",
            f"benchmark: rc {bench_run['rc']}, {bench_run['seconds']} s{', TIMED OUT' if bench_run['timed_out'] else ''}"
            + (f"; {note}" if note else ""),
            target_line(records), "",
            "| config | n | path | slabs | status | factor (attempt) | attempt s | attempt TFLOP/s "
            "| torch.linalg.cholesky TFLOP/s | ours / torch | fallback | final factor | gram s | end-to-end s "
            "| residual (rel) | float64 level (rel <= threshold) | test error |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = []
    for r in records:
        ref = (r.get("reference") or {}).get("torch.linalg.cholesky")
        ref_tf = ref.get("tflops") if isinstance(ref, dict) else None
        ratio = ref.get("ours_over_reference_speed") if isinstance(ref, dict) else None
        ph = r.get("phases_s", {})
        refinement = r.get("refinement") if "residual_relative" in r else None
        status = r.get("status", "?") if r.get("status") == "ok" else f"error: {r.get('error', '')[:60]}"
        attempt, attempt_s, attempt_tf, ratio, fallback, final = _factor_cells(r, ratio)
        rows.append(f"| {r.get('mode')} | {r.get('n')} | {r.get('path')} | {_fmt(r.get('slabs'), 'd')} | {status} "
                    f"| {attempt} | {attempt_s} | {attempt_tf} | {_fmt(ref_tf, '.3g')} | {ratio} | {fallback} | {final} "
                    f"| {_fmt(ph.get('gram'), '.2f')} | {_fmt(end_to_end_seconds(r), '.2f')} "
                    f"| {_fmt(r.get('residual_relative'), '.1e')} | {_level_text(refinement, r.get('float64_level_threshold'))} "
                    f"| {_fmt(r.get('test_error'), '.4f')} |")
    if not rows:
        rows.append("| (no benchmark records) |" + " |" * 16)
    return "\n".join(head + rows) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu for a dry run of the machinery")
    p.add_argument("--out", default=os.environ.get("OUT"), help="output folder (default $OUT)")
    p.add_argument("--data", default=None, help="folder with mnist.npz (see the module docstring for the search)")
    p.add_argument("--timeout", type=float, default=330.0, help="seconds for the whole check (default 330)")
    p.add_argument("--pytest-timeout", type=float, default=90.0, help="seconds for the GPU tests (default 90)")
    p.add_argument("--n", type=int, default=60000, help="in-core training points (default 60000, all of MNIST)")
    p.add_argument("--n-test", type=int, default=10000)
    p.add_argument("--modes", nargs="+", default=["float64", "mixed-tf32"])
    p.add_argument("--ooc-n", type=int, nargs="*", default=[100000])
    p.add_argument("--ooc-modes", nargs="+", default=["float64"])
    p.add_argument("--ooc-slabs", type=int, default=3)
    p.add_argument("--block", type=int, default=None, help="panel width (default: automatic for each n)")
    args = p.parse_args(argv)
    out = fresh_out_dir(args.out, FILES)
    os.environ["PYTHONUNBUFFERED"] = "1"
    t0 = time.perf_counter()

    info = environment(args.device)
    (out / "environment.json").write_text(json.dumps(info, indent=2) + "\n")
    gpu = gpu_label(info, args.device)
    print(f"[device_check] {gpu}", flush=True)

    marker = "gpu" if args.device.startswith("cuda") else "not gpu"   # the dry run takes the cpu cases
    pytest_run = run_logged([sys.executable, "-m", "pytest", "-m", marker, "tests/test_gpu.py", "-rfEs",
                             "-p", "no:cacheprovider", f"--junitxml={out / 'pytest_gpu.xml'}"],
                            out / "pytest_gpu.log", child_env(None), min(args.pytest_timeout, args.timeout))
    pytest_line = pytest_counts(out / "pytest_gpu.log")
    print(f"[device_check] pytest: {pytest_line} ({pytest_run['seconds']} s)", flush=True)

    # the data is looked up only now: without it, the environment and the tests are still on record
    try:
        data_dir = find_data_dir(args.data)
        info["data_dir"] = str(data_dir)
    except SystemExit as exc:
        data_dir, info["data_error"] = None, str(exc)
    (out / "environment.json").write_text(json.dumps(info, indent=2) + "\n")
    records, note = [], ""
    bench_run = {"rc": None, "seconds": 0.0, "timed_out": False}
    if data_dir is None:
        note = f"not run: {info['data_error']}"
        (out / "gpu_cholesky.log").write_text(note + "\n")
    else:
        print(f"[device_check] data from {data_dir}", flush=True)
        left = args.timeout - (time.perf_counter() - t0)
        bench = [sys.executable, str(ROOT / "benchmarks" / "gpu_cholesky.py"), "--device", args.device, "--n", args.n,
                 "--n-test", args.n_test, "--modes", *args.modes, "--ooc-n", *args.ooc_n,
                 "--ooc-modes", *args.ooc_modes, "--ooc-slabs", args.ooc_slabs, "--data", data_dir,
                 "--out", out / "gpu_cholesky.jsonl", "--isolate", "--timeout", max(1, int(left) - 10),
                 *(["--block", args.block] if args.block else [])]
        bench_run = run_logged(bench, out / "gpu_cholesky.log", child_env(data_dir), left)
        jsonl = out / "gpu_cholesky.jsonl"
        records = [json.loads(ln) for ln in jsonl.read_text().splitlines() if ln.strip()] if jsonl.exists() else []

    table = summary_table(records, pytest_line, pytest_run, bench_run, gpu, marker, note)
    (out / "summary.md").write_text(table)
    print(f"[device_check] finished in {time.perf_counter() - t0:.0f} s; files in {out}", flush=True)
    print(table, flush=True)
    ok = (pytest_run["rc"] == 0 and bench_run["rc"] == 0 and records
          and all(r.get("status") == "ok" for r in records))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
