"""benchmarks/cpu_peers.py runs at a CI size and its JSON carries what its ratios rest on."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.data
def test_cpu_peers_benchmark_small(shared_data_dir):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cpu_peers.py"), "--sizes", "300",
                          "--n-test", "200", "--data-dir", str(shared_data_dir)],
                         capture_output=True, text=True, timeout=600, cwd=ROOT, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    recs = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    runs = [r for r in recs if r["kind"] == "run"]
    assert sorted(r["method"] for r in runs) == ["kernelfit", "kernelfit-float64", "scipy", "sklearn"]
    for r in runs:
        assert not r.get("failed") and r["peak_rss_gib"] > 0 and r["timings_s"]["total"] > 0
        assert r["residual_relative_independent"] < 1e-8
    kf = {r["method"]: r for r in runs}
    assert kf["kernelfit"]["residual_relative_independent"] < 1e-12
    assert kf["kernelfit"]["strategy"] and kf["kernelfit"]["residual_source"]
    assert "integer grid" in kf["kernelfit"]["distances"] and "integer grid" in kf["kernelfit"]["predict_scores"]
    assert all(r["test_classes_differ_from_float64"] == 0 for r in runs)
    (machine,) = [r for r in recs if r["kind"] == "machine"]
    assert machine["sgemm_gflops_before"] > 0 and machine["dgemm_gflops_before"] > 0
    (ratios,) = [r for r in recs if r["kind"] == "ratios"]
    assert set(ratios["end_to_end_ratio"]) == {"scipy", "sklearn", "kernelfit-float64"}
    assert len(set(ratios["test_error"].values())) == 1     # every method, the same classifier
    rk = list(ratios["rkhs_norm"].values())
    assert max(rk) - min(rk) <= 1e-4 * max(rk)



@pytest.mark.data
def test_peer_rerun_with_other_openblas_kernels_is_recorded(shared_data_dir):
    """The rerun after a SYRK crash: the same peer under OPENBLAS_CORETYPE, recorded as such."""
    import os

    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cpu_peers.py"), "--child", "scipy", "--n", "300",
                          "--n-test", "100", "--data-dir", str(shared_data_dir)],
                         capture_output=True, text=True, timeout=600, cwd=ROOT, check=False,
                         env=dict(os.environ, OPENBLAS_CORETYPE="Haswell"))
    assert out.returncode == 0, out.stderr[-3000:]
    (rec,) = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert "OPENBLAS_CORETYPE=Haswell" in rec["blas_workaround"] and rec["residual_relative_independent"] < 1e-8


def test_cpu_block_width_benchmark_small(tmp_path):
    """The panel-width benchmark on the packaged MNIST subset: every width factors the same Gram
    (log det equal to numpy's slogdet of the float64 Gram, to float32 accuracy)."""
    import numpy as np
    from sklearn.metrics.pairwise import rbf_kernel

    with np.load(ROOT / "kernelfit" / "datasets" / "mnist_subset.npz") as f:
        np.savez(tmp_path / "mnist.npz", **{k: f[k] for k in f.files})
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cpu_block_width.py"), "--n", "600",
                          "--widths", "64", "128", "600", "--repeats", "2", "--sigma", "5",
                          "--data-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    recs = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    factors = [r for r in recs if r["kind"] == "factor"]
    assert sorted(r["width"] for r in factors) == [64, 64, 128, 128, 600, 600]
    with np.load(tmp_path / "mnist.npz") as f:
        n = len(f["y_train"])
        idx = np.sort(np.random.default_rng(0).choice(n, size=600, replace=False))
        X = f["x_train"][idx].reshape(600, -1).astype(np.float64) / 255.0
    ref = np.linalg.slogdet(rbf_kernel(X, gamma=1.0 / 50.0))[1]
    for r in factors:
        assert abs(r["logdet"] - ref) <= 1e-5 * abs(ref) + 1e-3, (r["width"], r["logdet"], ref)
    (summary,) = [r for r in recs if r["kind"] == "summary"]
    assert summary["fastest_width"] in (64, 128, 600) and summary["choose_block"] == 512

