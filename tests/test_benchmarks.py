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


@pytest.mark.data
def test_tune_randconv_validation_split_and_errors_match_scipy(shared_data_dir):
    """tune-randconv --validation: held-out *training* images, errors == scipy on the explicit features."""
    import numpy as np
    import scipy.linalg
    from scipy.spatial.distance import cdist

    from kernelfit.data import load_dataset
    from kernelfit.features.randconv import RandConvConfig, RandConvFeatures

    recs = _run("kernel_table.py", "tune-randconv", "--data-dir", shared_data_dir, "--n-train", 150,
                "--n-test", 60, "--filters", 30, "--filter-block", 8, "--validation",
                "--configs", "bias=1,zca_eps=1", "--factors", 0.7)
    head, lin, gau = recs
    assert head["evaluated_on"] == "held-out training images" and head["machine"]["cpu_model"]
    assert head["seed"] == 0 and "tune-randconv" in head["command"] and "bias=1,zca_eps=1" in head["command"]
    assert lin["kernel"] == "linear" and gau["kernel"] == "gaussian" and gau["factor"] == 0.7
    ds = load_dataset("cifar10", data_dir=shared_data_dir).subset(210, 1, seed=0)
    xtr, ytr, xva, yva = ds.x_train[:150], ds.y_train[:150], ds.x_train[150:], ds.y_train[150:]
    fmap = RandConvFeatures(RandConvConfig(n_filters=30, filters="patches", bias=1.0, zca_eps=1.0, seed=0))
    fmap.fit(xtr)
    F, Fv = fmap.transform(xtr).astype(np.float64), fmap.transform(xva).astype(np.float64)
    mu, sd = F.mean(0), F.std(0)
    keep = sd > 1e-8 * sd.max()
    Z = np.where(keep, (F - mu) / np.where(keep, sd, 1.0), 0.0)
    Zv = np.where(keep, (Fv - mu) / np.where(keep, sd, 1.0), 0.0)
    Y = np.eye(10)[ytr]
    s = gau["sigma"]
    alpha = scipy.linalg.solve(np.exp(-cdist(Z, Z, "sqeuclidean") / (2 * s * s)), Y, assume_a="pos")
    err = np.mean(np.argmax(np.exp(-cdist(Zv, Z, "sqeuclidean") / (2 * s * s)) @ alpha, 1) != yva)
    assert gau["test_error"] == pytest.approx(err)
    alpha = scipy.linalg.solve(Z @ Z.T + 1.0, Y, assume_a="pos")
    assert lin["test_error"] == pytest.approx(np.mean(np.argmax((Zv @ Z.T + 1.0) @ alpha, 1) != yva))
