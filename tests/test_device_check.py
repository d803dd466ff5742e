"""The prepared device check and the GPU benchmark it runs, exercised on the CPU at small sizes:
every configuration ends in a record (an error does not stop the run), out-of-core runs really
stream (>= 3 slabs), the data is found in the tree's git-ignored folder, and the check's output is
at most 8 files with the summary table printed last."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
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
@pytest.mark.slow   # ~30 s: three configurations, each in its own process, after the CPU test cases
def test_device_check_dry_run_on_cpu(shared_data_dir, tmp_path):
    out_dir = tmp_path / "out"
    out = _run("device_check.py", "--device", "cpu", "--n", 400, "--n-test", 100, "--ooc-n", 500, "--block", 64,
               "--data", shared_data_dir, "--out", out_dir, timeout=180)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    files = sorted(p.relative_to(out_dir) for p in out_dir.rglob("*"))
    assert len(files) <= 8 and all(len(f.parts) == 1 for f in files)
    assert {"summary.md", "gpu_cholesky.jsonl", "pytest_gpu.log", "environment.json"} <= {str(f) for f in files}
    recs = [json.loads(line) for line in (out_dir / "gpu_cholesky.jsonl").read_text().splitlines()]
    assert [(r["mode"], r["path"]) for r in recs] == [("float64", "in-core"), ("mixed-tf32", "in-core"),
                                                       ("float64", "out-of-core")]
    assert all(r["status"] == "ok" and r["isolated"] for r in recs)            # each in its own process
    refs = [r["reference"]["torch.linalg.cholesky"] for r in recs[:2]]
    assert all("tflops" in ref for ref in refs)                                # same matrix, same process
    assert refs[0]["tflops"] != refs[1]["tflops"]                             # float64 and float32: one each
    assert recs[2]["slabs"] >= 3 and recs[0]["residual_relative"] < 1e-12
    table = (out_dir / "summary.md").read_text()
    assert out.stdout.rstrip().endswith(table.rstrip())      # the summary table is the last thing printed
    assert table.count("\n| ") == len(recs) + 1 and "passed" in table
    assert "| fallback |" in table and "float32+tf32" not in table            # on a CPU the flag is ignored


def test_device_check_without_data_still_records_environment_and_tests(tmp_path):
    # no data anywhere: environment.json and the GPU tests' log are still written, then it says why it stopped
    out_dir = tmp_path / "out"
    env_root = tmp_path / "copy"
    for sub in ("benchmarks", "kernelfit", "tests"):
        shutil.copytree(ROOT / sub, env_root / sub, ignore=shutil.ignore_patterns("__pycache__", "results"))
    for name in ("pyproject.toml",):
        shutil.copy(ROOT / name, env_root / name)
    stub = env_root / "tests" / "test_gpu.py"            # a stand-in for the GPU tests: fast, one pass
    stub.write_text("def test_stand_in():\n    pass\n")
    env = {k: v for k, v in os.environ.items() if k != "KERNELFIT_DATA"}
    env["PYTHONPATH"] = str(env_root)
    out = subprocess.run([sys.executable, str(env_root / "benchmarks" / "device_check.py"), "--device", "cpu",
                          "--out", str(out_dir)], capture_output=True, text=True, timeout=120, cwd=env_root, env=env)
    assert out.returncode == 1
    info = json.loads((out_dir / "environment.json").read_text())
    assert info["data_dir"] is None and "mnist.npz not found" in info["data_error"]
    assert "1 passed" in (out_dir / "pytest_gpu.log").read_text()
    table = (out_dir / "summary.md").read_text()
    assert "not run: mnist.npz not found" in table and out.stdout.rstrip().endswith(table.rstrip())


# -- device-check fixes: records before cleanup, sticky errors, TF32 labelling -----------------

def _sticky_cuda_error(device=None):
    raise RuntimeError("CUDA error: an illegal memory access was encountered (sticky: every later call fails)")


@pytest.mark.data
def test_sticky_error_in_synchronize_still_writes_every_record(shared_data_dir, tmp_path, monkeypatch):
    # A fake synchronize that raises (as after a sticky CUDA error): the failing configuration's record
    # is written before the cleanup (which raises too), and the next configuration runs in a fresh
    # process whose record is written as well. Before the fix the cleanup's raise lost every record.
    import gpu_cholesky

    monkeypatch.setattr(gpu_cholesky, "sync", _sticky_cuda_error)
    monkeypatch.setattr(gpu_cholesky, "REFERENCES", {})
    out = tmp_path / "records.jsonl"
    rc = gpu_cholesky.main(["--device", "cpu", "--n", "200", "--n-test", "50", "--modes", "float64", "float32",
                            "--ooc-n", "--block", "64", "--data", str(shared_data_dir), "--out", str(out)])
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert rc == 1
    assert [(r["mode"], r["status"]) for r in recs] == [("float64", "error"), ("float32", "ok")]
    assert "illegal memory access" in recs[0]["error"]
    assert recs[1]["isolated"] is True and recs[1]["residual_relative"] < 1e-4   # ran in a fresh process


def _emulated_tf32_factor(monkeypatch, mantissa_bits):
    """factor() whose float32 factor is rounded to ``mantissa_bits`` (TF32 keeps 10) and flagged TF32,
    with a recognizable time (123 s), as a TF32 factor on a GPU would be; float64 factors are untouched."""
    import torch

    import kernelfit.linalg.factor as kf

    real = kf.factor
    drop = 23 - mantissa_bits

    def fake(G, placement=kf.DEFAULT_PLACEMENT, **kw):
        info = real(G, placement, **kw)
        if placement.tf32 and str(G.dtype).endswith("float32"):
            for P in G.panels:
                P.view(torch.int32).add_(1 << (drop - 1)).bitwise_and_(~((1 << drop) - 1))
            info.tf32 = True
            info.timings_s = dict(info.timings_s, factor=123.0)
        return info

    monkeypatch.setattr(kf, "factor", fake)


@pytest.mark.data
@pytest.mark.parametrize("bits,falls_back", [(10, False), (3, True)])
def test_tf32_row_reports_the_tf32_attempt_not_the_float64_fallback(shared_data_dir, monkeypatch, bits, falls_back):
    import gpu_cholesky

    from kernelfit.linalg.panels import cholesky_flops

    _emulated_tf32_factor(monkeypatch, bits)
    n = 300
    args = gpu_cholesky.build_parser().parse_args(["--device", "cpu", "--n", str(n), "--n-test", "50", "--block", "64",
                                                   "--no-reference", "--data", str(shared_data_dir)])
    device, base = gpu_cholesky.setup(args)
    rec = gpu_cholesky.run_config("mixed-tf32", n, False, args, device, base)
    # the row's factor is the TF32 attempt: its flag, its dtype, its (emulated) 123 s
    assert rec["factor"]["tf32"] is True and rec["attempt_dtype"] == "float32+tf32"
    assert rec["phases_s"]["factor_compute"] == 123.0
    assert rec["tflops"] == pytest.approx(cholesky_flops(n) / 123.0 / 1e12)
    if falls_back:   # 3 bits: refinement cannot reach float64 level; the float64 factor is reported apart
        assert rec["fallback"] and "re-factored in float64" in rec["fallback"]
        assert rec["factor_dtype"] == "float64"
        fb = rec["fallback_factor"]
        assert fb["dtype"] == "float64" and fb["compute_s"] < 100 and fb["tflops"] != rec["tflops"]
    else:            # TF32 rounding at n = 300 refines to float64 level
        assert rec["fallback"] is None and rec["factor_dtype"] == "float32" and "fallback_factor" not in rec
    assert rec["residual_relative"] < 1e-12      # float64 level either way, from an independent float64 residual



def _emulated_tf32_breakdown(monkeypatch, minor, seconds):
    """factor() whose float32 TF32 factor spends ``seconds`` and then breaks down at ``minor``, and a
    resident solve that knows the attempt ran on TF32, as on a GPU; float64 factors are untouched."""
    import time

    import kernelfit.gram_device as gd
    import kernelfit.linalg.factor as kf
    from kernelfit.errors import NotPositiveDefiniteError

    real_factor, real_solve = kf.factor, gd.solve_refined

    def fake_factor(G, placement=kf.DEFAULT_PLACEMENT, **kw):
        if placement.tf32 and str(G.dtype).endswith("float32"):
            time.sleep(seconds)
            raise NotPositiveDefiniteError(minor=minor, n=G.n, dtype="float32")
        return real_factor(G, placement, **kw)

    def on_tf32(*args, attempt_info=None, **kw):
        return real_solve(*args, attempt_info={**(attempt_info or {}), "tf32": True}, **kw)

    monkeypatch.setattr(kf, "factor", fake_factor)
    monkeypatch.setattr(gd, "solve_refined", on_tf32)


@pytest.mark.data
def test_a_tf32_attempt_that_breaks_down_is_the_rows_attempt_and_the_float64_factor_its_fallback(shared_data_dir,
                                                                                                 monkeypatch):
    import gpu_cholesky

    from kernelfit.linalg.panels import cholesky_flops

    _emulated_tf32_breakdown(monkeypatch, minor=97, seconds=0.3)
    n = 300
    args = gpu_cholesky.build_parser().parse_args(["--device", "cpu", "--n", str(n), "--n-test", "50", "--block", "64",
                                                   "--no-reference", "--data", str(shared_data_dir)])
    device, base = gpu_cholesky.setup(args)
    rec = gpu_cholesky.run_config("mixed-tf32", n, False, args, device, base)
    # the attempt: TF32, broke down, its own seconds, no rate
    assert rec["attempt_dtype"] == "float32+tf32" and rec["factor"]["status"] == "broke down"
    assert rec["factor"]["minor"] == 97 and rec["factor"]["tf32"] is True
    seconds = rec["phases_s"]["factor_compute"]
    assert seconds >= 0.3 and rec["attempt_status"] == f"broke down at minor 97 after {seconds:.2f} s"
    assert rec["tflops"] is None and "broke down" in rec["tflops_note"]
    assert rec["fraction_of_measured_gemm_peak"] is None and rec["fraction_of_nominal_peak"] is None
    # the float64 re-factorization: reported apart, with its own time and rate
    fb = rec["fallback_factor"]
    assert fb["dtype"] == "float64" and fb["compute_s"] < 0.3
    assert fb["tflops"] == pytest.approx(cholesky_flops(n) / fb["compute_s"] / 1e12)
    assert rec["factor_dtype"] == "float64" and "leading minor of order 97" in rec["fallback"]
    assert rec["phases_s"]["factor_total"] >= seconds + fb["compute_s"]      # both factorizations cost time
    assert rec["residual_relative"] < 1e-12
    # the summary row says so, with every number under its own label
    cell = _summary_cells(rec)
    assert cell["factor (attempt)"] == f"float32+tf32: broke down at minor 97 after {seconds:.2f} s"
    assert cell["attempt s"] == f"{seconds:.2f}" and cell["attempt TFLOP/s"] == "-"
    assert cell["fallback"] == f"yes: float64 factor {fb['compute_s']:.2f} s, {fb['tflops']:.3g} TFLOP/s"
    assert cell["final factor"] == f"float64, {fb['compute_s']:.2f} s"
    assert cell["float64 level (rel <= threshold)"] == f"True ({rec['float64_level_threshold']:.1e}, backward stable)"


def _summary_cells(rec):
    import device_check

    run = {"rc": 0, "seconds": 1, "timed_out": False}
    lines = device_check.summary_table([rec], "1 passed", run, run, "cpu").strip().splitlines()
    header, row = ([c.strip() for c in ln.strip("|").split("|")] for ln in (lines[-3], lines[-1]))
    return dict(zip(header, row))


def test_summary_of_a_record_that_lost_its_broken_down_attempt_labels_its_factor_as_the_fallback():
    # the shape of a mixed-tf32 record written before attempts that broke down were kept: the factor
    # fields (1.59 s, 45.4 TFLOP/s, float64) are the float64 re-factorization's, and no fallback_factor
    rec = {"mode": "mixed-tf32", "n": 60000, "path": "in-core", "slabs": 1, "status": "ok", "attempt_dtype": "float64",
           "factor_dtype": "float64", "tflops": 45.37, "phases_s": {"gram": 0.39, "factor_total": 1.59,
                                                                  "factor_compute": 1.587, "refine": 0.56},
           "fallback": "float32 factor broke down (leading minor of order 12553); re-factored in float64",
           "reference": {"torch.linalg.cholesky": {"tflops": 44.18, "ours_over_reference_speed": 1.03}}}
    cell = _summary_cells(rec)
    assert cell["factor (attempt)"] == "not recorded: float32 factor broke down (leading minor of order 12553)"
    assert (cell["attempt s"], cell["attempt TFLOP/s"], cell["ours / torch"]) == ("-", "-", "-")
    assert cell["fallback"] == "yes: float64 factor 1.59 s, 45.4 TFLOP/s" and cell["final factor"] == "float64, 1.59 s"


# -- device check 2 (deepfit): the packed CIFAR-10 copy and the dry run ---------------------------

def _tiny_image_folder_archive(path, per_class=(3, 2)):
    """train/<class>/k.jpg and test/<class>/k.jpg, 32x32 RGB, one colour per class and image."""
    import io
    import tarfile

    from PIL import Image

    from kernelfit.data.registry import CIFAR10_CLASSES

    with tarfile.open(path, "w:gz") as tf:
        for split, count in zip(("train", "test"), per_class):
            for c, name in enumerate(CIFAR10_CLASSES):
                for k in range(count):
                    buf = io.BytesIO()
                    Image.new("RGB", (32, 32), (20 * c, 40 * k, 200 - 15 * c)).save(buf, "JPEG", quality=75)
                    info = tarfile.TarInfo(f"cifar10/{split}/{name}/{k:04d}.jpg")
                    info.size = buf.tell()
                    buf.seek(0)
                    tf.addfile(info, buf)


def test_packed_cifar10_decodes_to_what_the_image_folder_reader_reads(tmp_path):
    from prep_cifar10_npz import load_packed, main

    from kernelfit.data.image_folder import read_image_folder
    from kernelfit.data.registry import CIFAR10_CLASSES

    archive = tmp_path / "c.tar.gz"
    _tiny_image_folder_archive(archive)
    out = tmp_path / "runs" / "c.npz"
    assert main(["--src", str(archive), "--out", str(out)]) == 0
    xtr, ytr, xte, yte, classes = load_packed(out)
    ref = read_image_folder(archive, classes=CIFAR10_CLASSES, cache=False)
    np.testing.assert_array_equal(xtr, ref[0])
    np.testing.assert_array_equal(ytr, ref[1])
    np.testing.assert_array_equal(xte, ref[2])
    np.testing.assert_array_equal(yte, ref[3])
    assert classes == CIFAR10_CLASSES
    with np.load(out, allow_pickle=False) as z:        # plain arrays only
        assert set(z.files) >= {"train_jpeg", "train_offsets", "y_train", "classes"}
    with pytest.raises(SystemExit, match="already exists; pass --overwrite"):   # never overwrites silently
        main(["--src", str(archive), "--out", str(out)])


@pytest.mark.slow   # ~15 s on 2 busy cores: six trainings of one epoch
def test_deepfit_device_check_dry_run_on_cpu(tmp_path):
    from prep_cifar10_npz import main as prep

    archive, packed, out_dir = tmp_path / "c.tar.gz", tmp_path / "c.npz", tmp_path / "out"
    _tiny_image_folder_archive(archive, per_class=(4, 2))
    assert prep(["--src", str(archive), "--out", str(packed)]) == 0
    out = _run("device_check_deepfit.py", "--device", "cpu", "--max-epochs", 1, "--data", packed, "--out", out_dir,
               "--timeout", 120, timeout=180)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    files = sorted(p.name for p in out_dir.iterdir())
    assert files == ["deepfit.log", "deepfit_runs.jsonl", "environment.json", "summary.md"]
    recs = [json.loads(line) for line in (out_dir / "deepfit_runs.jsonl").read_text().splitlines()]
    assert [(r["model"], r["labels"]) for r in recs] == [(m, lab) for m in ("mlp-1x512", "alexnet-small", "inception-small")
                                                         for lab in ("true", "random")]
    from deepfit.experiments import PAPER_TABLE1

    paper = {(m, lab): (tr, te) for m, a, w, lab, tr, te in PAPER_TABLE1 if not a and not w}
    for r in recs:
        assert r["status"] == "ok" and r["epochs"] == 1 and r["n_train"] == 40
        assert (r["paper_train_acc"], r["paper_test_acc"]) == paper[(r["model"], r["labels"])]
        assert r["samples_per_s"] == pytest.approx(40 / r["train_time_s"])
        assert r["config"]["variant"] == ("random-labels" if r["labels"] == "random" else "true")
    table = (out_dir / "summary.md").read_text()
    assert out.stdout.rstrip().endswith(table.rstrip()) and table.count("\n| ") == len(recs) + 1


# -- the device strategy of the plan -------------------------------------------------------------

@pytest.mark.parametrize("profile,n,tf32,expected", [
    ("h200", 60000, False, "float64-resident"),     # FP64 ~ FP32 on Hopper, 60k float64 (~14 GiB) fits
    ("h200", 200000, False, "mixed-resident"),      # float64 Gram 149 GB > 0.9 x 141 GB; float32 75 GB fits
    ("h200", 300000, False, "float64-out-of-core"),  # neither fits: float64 slabs, one host solve
    ("rtx4090", 60000, False, "mixed-resident"),    # FP64 at 1/64 of FP32: float32 factor + refinement
    ("rtx4090", 100000, False, "mixed-out-of-core"),
    ("h200", 60000, True, "mixed-resident"),        # TF32 only when asked: a float32 factor
])
def test_device_strategy_follows_rates_and_memory(profile, n, tf32, expected):
    from kernelfit.planning import choose_device_strategy, named_profile

    ds = choose_device_strategy(n, 784, 10, named_profile(profile), tf32=tf32)
    assert ds["strategy"] == expected and ds["tf32"] is tf32
    assert ds["factor_dtype"] == ("float64" if expected.startswith("float64") else "float32")
    # the memory judgement against the closed form: lower-triangle Gram n^2/2 x 8 bytes plus working tiles
    gram64 = n * n / 2 * 8
    assert gram64 <= ds["float64_resident_bytes"] <= gram64 * 1.15 + 3 * 2**30   # + a 2048-row product tile, points


def test_plan_reports_the_device_strategy_for_a_named_gpu_and_refuses_a_missing_one(capsys):
    from kernelfit import cli

    assert cli.main(["plan", "--dataset", "mnist", "--device-profile", "h200"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["device_strategy"]["strategy"] == "float64-resident"
    assert cli.main(["plan", "--dataset", "mnist", "--device-profile", "h200", "--tf32"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["device_strategy"]["tf32"] is True and "TF32" in captured.err
    assert cli.main(["plan", "--dataset", "mnist", "--device-memory-gib", "24", "--float64-tflops", "1",
                     "--float32-tflops", "80"]) == 0
    assert json.loads(capsys.readouterr().out)["device_strategy"]["strategy"] == "mixed-resident"
    import torch

    if not torch.cuda.is_available():
        assert cli.main(["plan", "--dataset", "mnist", "--device", "cuda"]) == 1
        assert "--device-profile" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["plan", "--dataset", "mnist", "--device-memory-gib", "24"])      # rates missing
    assert "missing --float64-tflops, --float32-tflops" in capsys.readouterr().err


def test_deepfit_device_check_dry_run_one_model_fast(tmp_path):
    """The default-run counterpart of the slow dry run: one model, both label sets, records + summary."""
    from prep_cifar10_npz import main as prep

    archive, packed, out_dir = tmp_path / "c.tar.gz", tmp_path / "c.npz", tmp_path / "out"
    _tiny_image_folder_archive(archive, per_class=(4, 2))
    assert prep(["--src", str(archive), "--out", str(packed)]) == 0
    out = _run("device_check_deepfit.py", "--device", "cpu", "--max-epochs", 1, "--models", "mlp-1x512",
               "--data", packed, "--out", out_dir, "--timeout", 120, timeout=180)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    recs = [json.loads(line) for line in (out_dir / "deepfit_runs.jsonl").read_text().splitlines()]
    assert [(r["model"], r["labels"], r["status"]) for r in recs] == [("mlp-1x512", "true", "ok"),
                                                                      ("mlp-1x512", "random", "ok")]
    assert (out_dir / "summary.md").read_text().rstrip() in out.stdout
