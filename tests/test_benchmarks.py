"""The benchmark scripts run on the CPU at small sizes (so CI exercises them) and their JSON says what
the README relies on: independent residuals, references run in the same process, matching outputs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script, *args, timeout=600):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *map(str, args)],
                         capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def test_randconv_features_benchmark_matches_reference_pipeline():
    (rec,) = _run("randconv_features.py", "--n-images", 40, "--filters", 24, "--filter-block", 10)
    assert rec["n_features"] == 24 * 8
    assert rec["max_rel_diff"] < 1e-5          # folded conv == patch matrix + whitening + matmul
    assert rec["ours_gflops"] > 0 and rec["speedup_vs_reference"] > 0
    assert rec["machine"]["cpu_model"] and rec["machine"]["usable_cores"] >= 1   # which machine produced it


@pytest.mark.data
def test_gpu_cholesky_benchmark_runs_on_cpu(shared_data_dir):
    recs = _run("gpu_cholesky.py", "--device", "cpu", "--n", 600, "--n-test", 200, "--modes", "float64", "mixed",
                "--ooc-n", 700, "--ooc-modes", "mixed", "--ooc-budget-mib", 2, "--block", 128,
                "--data", shared_data_dir)
    rows = [r for r in recs if r.get("kind") == "gpu_cholesky"]
    assert [(r["mode"], r["path"]) for r in rows] == [("float64", "in-core"), ("mixed", "in-core"),
                                                       ("mixed", "out-of-core")]
    for r in rows:
        assert r["residual_relative"] < 1e-12 and r["train_error"] == 0.0
        assert "torch.linalg.cholesky" in r["reference"]          # the reference ran in the same process
    assert rows[2]["factor"]["device_memory"]["peak_bytes"] <= 2 * 2**20
    assert rows[0]["machine"]["cpu_model"] and rows[0]["machine"]["versions"]["numpy"]
