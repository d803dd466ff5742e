"""End-to-end tests of the `kernelfit` CLI on the shipped MNIST subset, with independent references."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.kernel_ridge import KernelRidge

from kernelfit import cli
from kernelfit.cli import main

REPO_ROOT = Path(__file__).resolve().parent.parent


def _reference(n_train, n_test, sigma, seed=0):
    """Same subset, solved independently with sklearn's KernelRidge (negligible ridge)."""
    from kernelfit.data import load_dataset

    ds = load_dataset("mnist-subset").subset(n_train, n_test, seed=seed)
    X = ds.x_train.reshape(n_train, -1).astype(np.float64) / 255.0
    Xt = ds.x_test.reshape(n_test, -1).astype(np.float64) / 255.0
    Y = np.eye(10)[ds.y_train]
    kr = KernelRidge(alpha=1e-10, kernel="rbf", gamma=1.0 / (2.0 * sigma**2)).fit(X, Y)
    test_error = float(np.mean(np.argmax(kr.predict(Xt), axis=1) != ds.y_test))
    rkhs = float(np.sqrt(np.sum(kr.dual_coef_ * Y)))  # alpha^T K alpha = alpha^T Y at interpolation
    return test_error, rkhs, ds


def test_solve_end_to_end_matches_kernel_ridge(tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = main(["solve", "--n-train", "500", "--n-test", "200", "--bandwidth", "5",
               "--no-progress", "--out", str(out)])
    assert rc == 0
    err = capsys.readouterr().err
    assert "test error" in err and str(out.resolve()) in err
    rec = json.loads(out.read_text())
    ref_err, ref_norm, ds = _reference(500, 200, 5.0)
    res = rec["results"]["true"]
    assert res["train_error"] == 0.0
    assert res["test_error"] == pytest.approx(ref_err, abs=1e-12)
    assert res["rkhs_norm"] == pytest.approx(ref_norm, rel=1e-6)
    assert res["residual_max_abs"] < 1e-8
    assert rec["n_train"] == 500 and rec["n_test"] == 200
    assert rec["dataset"]["name"] == "mnist-subset"
    assert rec["randomization"]["variant"] == "true"
    assert rec["provenance"]["command"]  # provenance recorded
    assert rec["options"]["bandwidth"] == 5.0 and rec["options"]["mode"] == "mixed"


def test_solve_random_labels_keeps_test_labels_clean(capsys):
    rc = main(["solve", "--n-train", "300", "--n-test", "100", "--bandwidth", "5", "--mode",
               "float64", "--variant", "random-labels", "--seed", "3", "--no-progress"])
    assert rc == 0
    rec = json.loads(capsys.readouterr().out)
    assert set(rec["results"]) == {"true", "random-labels"}
    rl, tr = rec["results"]["random-labels"], rec["results"]["true"]
    assert rl["train_error"] == 0.0 and tr["train_error"] == 0.0  # both interpolated
    assert rl["test_error"] > 0.6  # chance is 0.9; cannot generalize from random labels
    assert tr["test_error"] < 0.3
    info = rec["randomization"]
    assert info["test_labels_clean"] is True
    assert 0.8 < info["fraction_changed_train"] < 0.97
    assert rl["rkhs_norm"] > tr["rkhs_norm"]  # random labels need a larger norm (Zhang et al.)
    ref_err, ref_norm, _ = _reference(300, 100, 5.0)
    assert tr["test_error"] == pytest.approx(ref_err, abs=1e-12)
    assert tr["rkhs_norm"] == pytest.approx(ref_norm, rel=1e-6)


def test_python_m_subprocess_stdout_is_json(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "kernelfit.cli", "solve", "--n-train", "200", "--n-test", "50",
         "--bandwidth", "median", "--no-progress"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    rec = json.loads(proc.stdout)
    assert rec["stats"]["bandwidth_rule"] == "median heuristic"
    assert rec["results"]["true"]["train_error"] == 0.0
    assert "[kernelfit] mnist-subset" in proc.stderr
    # pixels / 255 reach the solver in float64, exactly on the 1/255 grid: exact-distance passes
    assert "integer grid of step 0.00392157" in rec["stats"]["distances"]


# ---------------------------------------------------------------------------------------------
# input validation: argparse errors (exit 2) before any work
# ---------------------------------------------------------------------------------------------

def _usage_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as ei:
        main(argv)
    assert ei.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("bw", ["0", "-1", "abc", "nan", "inf"])
def test_bad_bandwidth(bw, capsys):
    err = _usage_error(["solve", "--bandwidth", bw], capsys)
    assert "--bandwidth" in err and "'median'" in err


def test_unknown_dataset(capsys):
    err = _usage_error(["solve", "--dataset", "imagenet"], capsys)
    assert "unknown dataset 'imagenet'" in err and "mnist-subset" in err


@pytest.mark.parametrize("argv,needle", [
    (["solve", "--variant", "corrupt"], "--corrupt-p"),
    (["solve", "--variant", "true", "--corrupt-p", "0.5"], "only to --variant corrupt"),
    (["solve", "--variant", "corrupt", "--corrupt-p", "1.5"], "probability in [0, 1]"),
    (["solve", "--variant", "gaussian", "--corrupt-test"], "label variants"),
    (["solve", "--n-train", "6000"], "exceeds the 5000 examples"),
    (["solve", "--n-train", "0"], "positive integer"),
    (["solve", "--jitter=-1e-3"], "number >= 0"),
    (["solve", "--mode", "float16"], "invalid choice"),
    (["solve", "--subset-seed", "x"], "'first'"),
])
def test_bad_solve_arguments(argv, needle, capsys):
    assert needle in _usage_error(argv, capsys)


def test_existing_out_is_not_overwritten(tmp_path, capsys, monkeypatch):
    out = tmp_path / "r.json"
    out.write_text("keep me")
    called = []
    monkeypatch.setattr("kernelfit.data.load_dataset", lambda *a, **k: called.append(1))
    err = _usage_error(["solve", "--n-train", "50", "--n-test", "10", "--out", str(out)], capsys)
    assert "already exists" in err and "--overwrite" in err
    assert out.read_text() == "keep me"
    assert not called  # refused before loading anything
    monkeypatch.undo()
    rc = main(["solve", "--n-train", "50", "--n-test", "10", "--bandwidth", "5", "--no-progress",
               "--out", str(out), "--overwrite"])
    assert rc == 0
    assert json.loads(out.read_text())["n_train"] == 50


def test_out_under_a_file_is_refused(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("")
    assert "is a file" in _usage_error(["solve", "--out", str(f / "r.json")], capsys)


def test_memory_refusal_before_loading_and_force(monkeypatch, capsys):
    import kernelfit.planning as memory

    monkeypatch.setattr(memory, "available_bytes", lambda: 1 << 20)  # pretend 1 MiB is free
    called = []
    monkeypatch.setattr("kernelfit.data.load_dataset", lambda *a, **k: called.append(1))
    rc = main(["solve", "--n-train", "200", "--n-test", "10", "--no-progress"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "MemoryPlanError" in err and "--force-memory" in err
    assert not called
    monkeypatch.undo()
    monkeypatch.setattr(memory, "available_bytes", lambda: 1 << 20)
    rc = main(["solve", "--n-train", "200", "--n-test", "10", "--bandwidth", "5", "--no-progress",
               "--force-memory"])
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["options"]["force_memory"] is True


# ---------------------------------------------------------------------------------------------
# plan, data, table
# ---------------------------------------------------------------------------------------------

def test_plan_fits_and_does_not_fit(capsys):
    rc = main(["plan", "--dataset", "mnist", "--n-train", "60000", "--available-gib", "4"])
    assert rc == cli.EXIT_DOES_NOT_FIT
    captured = capsys.readouterr()
    plan = json.loads(captured.out)
    assert plan["fits"] is False and "does NOT fit" in captured.err
    n = 60000
    # lower-triangle float32 panels: between n(n+1)/2 and n^2 elements of 4 bytes
    assert n * (n + 1) // 2 * 4 <= plan["gram_bytes"] <= n * n * 4
    assert plan["d"] == 784 and plan["k"] == 10 and plan["n_test"] == 10000
    rc = main(["plan", "--dataset", "cifar10", "--n-train", "1000", "--n-test", "0",
               "--mode", "float64", "--available-gib", "64"])
    assert rc == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["fits"] is True and plan["d"] == 3072
    assert 1000 * 1001 // 2 * 8 <= plan["gram_bytes"] <= 1000 * 1000 * 8


def test_data_path(tmp_path, capsys):
    assert main(["data", "path", "--data-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path)


def test_data_info_empty_dir(tmp_path, capsys):
    assert main(["data", "info", "--data-dir", str(tmp_path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["data_dir"] == str(tmp_path)
    assert info["datasets"]["mnist"]["found"] == [] and info["datasets"]["cifar10"]["found"] == []


@pytest.mark.data
def test_data_info_and_solve_on_shared_data(shared_data_dir, capsys):
    assert main(["data", "info", "--data-dir", str(shared_data_dir)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert str(shared_data_dir / "mnist.npz") in info["datasets"]["mnist"]["found"]
    assert any("cifar10" in f for f in info["datasets"]["cifar10"]["found"])
    rc = main(["solve", "--dataset", "mnist", "--data-dir", str(shared_data_dir), "--n-train",
               "300", "--n-test", "100", "--bandwidth", "5", "--no-progress"])
    assert rc == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["dataset"]["name"] == "mnist" and rec["dataset"]["source"].endswith("mnist.npz")
    assert rec["results"]["true"]["train_error"] == 0.0


def test_data_download_checksum_mismatch_via_file_mirror(tmp_path, capsys):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    from kernelfit.data import REMOTE_FILES

    for rf in REMOTE_FILES["mnist"]:
        (mirror / rf.filename).write_bytes(b"not the real file")
    target = tmp_path / "data"
    rc = main(["data", "download", "mnist", "--data-dir", str(target), "--base-url",
               mirror.as_uri() + "/"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "checksum mismatch" in err
    assert not any(p.name.endswith(".gz") for p in target.iterdir())  # nothing partial kept


def test_data_download_subset_is_usage_error(capsys):
    assert "ships with kernelfit" in _usage_error(["data", "download", "mnist-subset"], capsys)


def test_table_delegates_help(capsys):
    with pytest.raises(SystemExit) as ei:
        main(["table", "--help"])
    assert ei.value.code == 0
    assert "kernelfit table" in capsys.readouterr().out


def test_cli_constants_agree_with_library():
    """The CLI keeps no copies of the vocabularies: they come from kernelfit.catalog, which the library agrees with."""
    from dataclasses import asdict

    from kernelfit import catalog, data, randomize, solve
    from kernelfit.planning import MODES

    for copy in ("VARIANTS", "DATASET_NAMES", "MODES", "DATASET_SHAPES", "FEATURE_KINDS", "KERNELS", "TASKS"):
        assert not hasattr(cli, copy), copy
    assert set(catalog.VARIANTS) == set(randomize.VARIANTS)
    assert set(catalog.DATASET_NAMES) == set(data.DATASETS)
    assert set(catalog.MODES) == set(MODES)
    ds = data.load_dataset("mnist-subset")
    shape = asdict(catalog.DATASETS["mnist-subset"])
    assert (len(ds.x_train), len(ds.x_test), ds.num_classes) == (
        shape["n_train"], shape["n_test"], shape["num_classes"])
    assert int(np.prod(ds.image_shape)) == shape["d"]
    assert solve.SolveOptions().mode in catalog.MODES


def test_table_parser_defaults_are_table_options_defaults():
    """`kernelfit table` with no options runs TableOptions() (the feature-map defaults are solve's)."""
    from kernelfit import table
    from kernelfit.cli.table import ROW_NAMES, options_from_args

    assert options_from_args(cli.build_parser().parse_args(["table"])) == table.TableOptions()
    assert ROW_NAMES == table.ROWS


def test_no_type_bool_in_parser():
    import argparse

    def walk(parser):
        for action in parser._actions:
            assert action.type is not bool, action.dest
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    walk(sub)

    walk(cli.build_parser())


@pytest.mark.slow
@pytest.mark.data
def test_mnist_10k_sigma5_matches_published_scale(shared_data_dir, tmp_path):
    # GUIDE: n = 10,000 random MNIST training points, sigma = 5, float32 -> 2.36% test error.
    # Our seeded stratified sample is a different random draw, so allow sampling variation.
    out = tmp_path / "r.json"
    rc = main(["solve", "--dataset", "mnist", "--data-dir", str(shared_data_dir), "--n-train",
               "10000", "--n-test", "10000", "--bandwidth", "5", "--mode", "float32",
               "--no-progress", "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())["results"]["true"]
    assert res["train_error"] == 0.0
    assert 0.020 <= res["test_error"] <= 0.028


def test_missing_dataset_is_a_clear_error(tmp_path, capsys):
    rc = main(["solve", "--dataset", "cifar10", "--data-dir", str(tmp_path), "--n-train", "10",
               "--n-test", "5", "--no-progress"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "DataError" in err and "not found" in err and "--download" in err


def test_resume_needs_checkpoint_dir(capsys):
    with pytest.raises(SystemExit) as ei:
        main(["solve", "--resume", "--n-train", "50"])
    assert ei.value.code == 2
    assert "--checkpoint-dir" in capsys.readouterr().err


def test_checkpointed_solve_resumes_to_the_same_answer(tmp_path, capsys):
    common = ["solve", "--n-train", "700", "--n-test", "100", "--bandwidth", "5", "--block-size", "128",
              "--no-progress", "--checkpoint-dir", str(tmp_path / "ck")]
    assert main(common + ["--out", str(tmp_path / "a.json"), "--keep-checkpoint"]) == 0
    assert (tmp_path / "ck" / "manifest.json").exists()
    capsys.readouterr()
    assert main(common + ["--resume", "--out", str(tmp_path / "b.json")]) == 0
    err = capsys.readouterr().err
    assert "resumed the factorization from panel" in err and "removed the checkpoint" in err
    assert not (tmp_path / "ck").exists()   # removed after the successful solve
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    assert a["results"]["true"]["rkhs_norm"] == pytest.approx(b["results"]["true"]["rkhs_norm"], rel=1e-12)


def test_resume_of_a_missing_checkpoint_and_reuse_without_resume_are_refused_in_cli_words(tmp_path, capsys):
    base = ["solve", "--n-train", "300", "--n-test", "0", "--bandwidth", "5", "--no-progress"]
    with pytest.raises(SystemExit) as ei:
        main(base + ["--checkpoint-dir", str(tmp_path / "nope"), "--resume"])
    assert ei.value.code == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "nothing to resume" in err
    assert not (tmp_path / "nope").exists()
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "manifest.json").write_text("{}")
    with pytest.raises(SystemExit) as ei:
        main(base + ["--checkpoint-dir", str(ck)])
    err = capsys.readouterr().err
    assert ei.value.code == 2 and "pass --resume" in err and "resume=True" not in err
    assert (ck / "manifest.json").read_text() == "{}"   # nothing saved is touched


# ------------------------------------------------------------------ checkpoint directories we own
_CK_BASE = ["solve", "--n-train", "300", "--n-test", "20", "--bandwidth", "5", "--block-size", "64", "--no-progress"]
_USER_FILES = {"Train_X.npy": b"user train", "L_labels_backup.npy": b"user labels", "T1_2.npy": b"user T",
               "manifest.json": b'{"owner": "someone else"}'}


def test_checkpoint_dir_with_files_we_did_not_write_is_refused_before_work(tmp_path, capsys, monkeypatch):
    import kernelfit.experiment

    ck = tmp_path / "data"
    ck.mkdir()
    for name, content in _USER_FILES.items():
        (ck / name).write_bytes(content)
    monkeypatch.setattr(kernelfit.experiment, "run_interpolation", lambda *a, **k: pytest.fail("work started"))
    for extra in ([], ["--resume"]):
        with pytest.raises(SystemExit) as ei:
            main(_CK_BASE + ["--checkpoint-dir", str(ck), "--out", str(tmp_path / "r.json")] + extra)
        err = capsys.readouterr().err
        assert ei.value.code == 2
        assert "kernelfit did not write it" in err and "Train_X.npy" in err and "choose an empty or new directory" in err
    assert {p.name: p.read_bytes() for p in ck.iterdir()} == _USER_FILES   # nothing written, nothing deleted


def test_cleanup_after_success_removes_exactly_our_files(tmp_path, capsys, monkeypatch):
    """User files placed in the checkpoint directory while the run works (named like ours too) stay;
    the panels, manifest, marker and lock go. Today's glob-based cleanup deleted L_*.npy and T*_*.npy."""
    import kernelfit.experiment

    ck = tmp_path / "ck"
    real = kernelfit.experiment.run_interpolation
    late = {**{k: v for k, v in _USER_FILES.items() if k != "manifest.json"},
            "L_00003.npy": b"user file named like an old panel", "float64.L_00099.npy": b"named like ours, not listed"}

    def user_writes_meanwhile(*a, **k):
        ck.mkdir(exist_ok=True)
        for name, content in late.items():
            (ck / name).write_bytes(content)
        return real(*a, **k)

    monkeypatch.setattr(kernelfit.experiment, "run_interpolation", user_writes_meanwhile)
    assert main(_CK_BASE + ["--checkpoint-dir", str(ck), "--out", str(tmp_path / "r.json")]) == 0
    assert {p.name: p.read_bytes() for p in ck.iterdir()} == late
    err = capsys.readouterr().err
    assert "removed the checkpoint" in err and "holds files kernelfit did not write" in err
    # a fresh directory with nothing else in it is removed with the checkpoint
    monkeypatch.setattr(kernelfit.experiment, "run_interpolation", real)
    assert main(_CK_BASE + ["--checkpoint-dir", str(tmp_path / "ck2"), "--out", str(tmp_path / "r2.json")]) == 0
    assert not (tmp_path / "ck2").exists()


def test_checkpoint_dir_in_use_by_another_process_is_refused_naming_its_pid(tmp_path, capsys, monkeypatch):
    import kernelfit.experiment

    script = ("import sys\nfrom kernelfit.linalg.checkpoint import owned_dir\nheld = owned_dir(sys.argv[1]).claim()\n"
              "print('locked', flush=True)\nsys.stdin.read()\n")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    holder = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "ck")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env)
    monkeypatch.setattr(kernelfit.experiment, "run_interpolation", lambda *a, **k: pytest.fail("work started"))
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(_CK_BASE + ["--checkpoint-dir", str(tmp_path / "ck")]) == 1
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    err = capsys.readouterr().err
    assert f"in use by another kernelfit run (PID {holder.pid})" in err and "Traceback" not in err


def test_corrupt_checkpoint_manifest_on_resume_is_a_one_line_error(tmp_path, capsys):
    ck = tmp_path / "ck"
    assert main(_CK_BASE + ["--checkpoint-dir", str(ck), "--keep-checkpoint", "--out", str(tmp_path / "a.json")]) == 0
    (ck / "manifest.json").write_text('{"format": "kernelfit.cholesky-checkpoint/2", "stages": [')
    capsys.readouterr()
    assert main(_CK_BASE + ["--checkpoint-dir", str(ck), "--resume", "--out", str(tmp_path / "b.json")]) == 1
    err = capsys.readouterr().err
    assert "manifest.json is not a readable kernelfit checkpoint manifest" in err and "Traceback" not in err
    assert not (tmp_path / "b.json").exists()


def test_checkpoint_free_space_is_checked_before_work(tmp_path, capsys, monkeypatch):
    import kernelfit.experiment
    import kernelfit.places

    monkeypatch.setattr(kernelfit.places, "free_bytes", lambda d: 4096)
    monkeypatch.setattr(kernelfit.experiment, "run_interpolation", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(SystemExit) as ei:
        main(_CK_BASE + ["--checkpoint-dir", str(tmp_path / "ck")])
    err = capsys.readouterr().err
    assert ei.value.code == 2 and "--checkpoint-dir" in err and "needs" in err and "are free" in err
    assert not (tmp_path / "ck").exists()
