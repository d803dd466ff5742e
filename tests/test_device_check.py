"""The prepared device check and the GPU benchmark it runs, exercised on the CPU at small sizes:
every configuration ends in a record (an error does not stop the run), out-of-core runs really
stream (>= 3 slabs), the data is found in the tree's git-ignored folder, and the check's output is
at most 8 files with the summary table printed last."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def _run(script, *args, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def _records(stdout):
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


@pytest.mark.data
def test_benchmark_records_every_configuration_even_after_an_error(shared_data_dir):
    # float64 out-of-core cannot run in 1 MiB at this block: that configuration fails, the next one runs
    out = _run("gpu_cholesky.py", "--device", "cpu", "--n", 300, "--n-test", 100, "--modes", "float32",
               "--ooc-n", 400, "--ooc-modes", "float64", "float32", "--ooc-budget-mib", 1, "--block", 128,
               "--data", shared_data_dir)
    recs = _records(out.stdout)
    assert out.returncode == 1, out.stderr[-2000:]                 # a failed configuration fails the run ...
    assert [(r["mode"], r["path"], r["status"]) for r in recs] == [   # ... but only after all of them ran
        ("float32", "in-core", "ok"), ("float64", "out-of-core", "error"), ("float32", "out-of-core", "ok")]
    assert "MemoryPlanError" in recs[1]["error"] and "even the out-of-core path needs" in recs[1]["error"]
    assert recs[2]["residual_relative"] < 1e-5 and recs[2]["factor"]["path"] == "out-of-core"


@pytest.mark.data
def test_out_of_core_runs_stream_at_least_three_slabs_by_default(shared_data_dir):
    out = _run("gpu_cholesky.py", "--device", "cpu", "--n", 300, "--n-test", 100, "--modes", "float32",
               "--ooc-n", 500, "--ooc-modes", "float32", "--block", 64, "--no-reference",
               "--data", shared_data_dir)
    assert out.returncode == 0, out.stderr[-2000:]
    ooc = [r for r in _records(out.stdout) if r["path"] == "out-of-core"]
    assert len(ooc) == 1 and ooc[0]["slabs"] >= 3
    mem = ooc[0]["factor"]["device_memory"]
    assert mem["slabs"] == ooc[0]["slabs"] and mem["peak_bytes"] <= mem["budget_bytes"]


def test_data_is_found_in_the_trees_ignored_folder(tmp_path, monkeypatch):
    import gpu_cholesky

    monkeypatch.delenv("KERNELFIT_DATA", raising=False)
    monkeypatch.setattr(gpu_cholesky, "DATA_FOLDER_IN_TREE", tmp_path)
    monkeypatch.setattr(gpu_cholesky, "ROOT", tmp_path / "nowhere")
    with pytest.raises(SystemExit, match=r"mnist.npz not found.*Copy mnist.npz .* into .*\(git-ignored\)"):
        gpu_cholesky.find_data_dir()
    (tmp_path / "mnist.npz").write_bytes(b"")
    assert gpu_cholesky.find_data_dir() == tmp_path.resolve()
    # the documented folder is ignored by git, so a copy there is never committed
    rel = Path("runs") / "data" / "mnist.npz"
    check = subprocess.run(["git", "check-ignore", "-q", str(rel)], cwd=ROOT)
    if check.returncode != 128:          # 128: not a git checkout (e.g. a copied tree)
        assert check.returncode == 0


@pytest.mark.data
def test_device_check_dry_run_on_cpu(shared_data_dir, tmp_path):
    out_dir = tmp_path / "out"
    out = _run("device_check.py", "--device", "cpu", "--n", 400, "--n-test", 100, "--ooc-n", 500, "--block", 64,
               "--data", shared_data_dir, "--out", out_dir, timeout=180)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    files = sorted(p.relative_to(out_dir) for p in out_dir.rglob("*"))
    assert len(files) <= 8 and all(len(f.parts) == 1 for f in files)
    assert {"summary.md", "gpu_cholesky.jsonl", "pytest_gpu.log", "environment.json"} <= {str(f) for f in files}
    recs = [json.loads(line) for line in (out_dir / "gpu_cholesky.jsonl").read_text().splitlines()]
    assert [(r["mode"], r["path"]) for r in recs] == [("float32", "in-core"), ("mixed", "in-core"),
                                                       ("mixed-tf32", "in-core"), ("float32", "out-of-core"),
                                                       ("mixed", "out-of-core")]
    assert all(r["status"] == "ok" for r in recs)
    assert all("tflops" in r["reference"]["torch.linalg.cholesky"] for r in recs[:3])   # same matrix, same process
    assert all(r["slabs"] >= 3 for r in recs[3:])
    table = (out_dir / "summary.md").read_text()
    assert out.stdout.rstrip().endswith(table.rstrip())      # the summary table is the last thing printed
    assert table.count("\n| ") == len(recs) + 1 and "passed" in table
