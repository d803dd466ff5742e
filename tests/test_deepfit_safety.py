"""deepfit's trust and fault paths: no file is ever unpickled, corrupt checkpoints, a diverging loss,
output places checked before any work, and one error line (never a traceback) for every failure."""

from __future__ import annotations

import builtins
import json
import os
import pickle

import numpy as np
import pytest
import torch

from deepfit import cli
from deepfit.cli import build_parser, main
from deepfit.train import TrainConfig, TrainingDivergedError, checkpoint_path, train
from kernelfit.errors import InputError

TINY = ["--model", "mlp2", "--width", "16", "--dataset", "mnist-subset", "--n-train", "128", "--n-test", "64",
        "--threads", "1", "--quiet", "--device", "cpu"]


class _Canary:
    """Unpickling this object creates a file: the proof that loading ran the file's own code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (builtins.open, (self.path, "w"))


def _write_evil(path, canary, fmt):
    payload = {"config": TrainConfig(dataset="mnist-subset").to_dict(), "model": _Canary(canary),
               "config_hash": "x", "optimizer": {}, "epoch": 0}
    if fmt == "torch":
        torch.save(payload, path)
    else:  # a plain pickle, which torch.load reads through its legacy path
        with open(path, "wb") as fh:
            pickle.dump(payload, fh)


def _one_error_line(err, command):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err
    errors = [ln for ln in lines if ln.startswith(f"deepfit {command}: error: ")]
    assert len(errors) == 1, err
    return errors[0]


def _run_id(argv):
    return checkpoint_path(".", cli._config_from_args(build_parser().parse_args(argv))).stem


# ------------------------------------------------------------------ never unpickle

@pytest.mark.parametrize("fmt", ["torch", "pickle"])
def test_measure_refuses_a_malicious_pickle_and_never_runs_it(tmp_path, capsys, fmt):
    evil, canary = tmp_path / "evil.pt", tmp_path / "canary"
    _write_evil(evil, canary, fmt)
    with open(evil, "rb") as fh:  # the file really is malicious: unpickling it creates the canary
        pickle.load(fh) if fmt == "pickle" else torch.load(fh, weights_only=False)
    assert canary.exists()
    canary.unlink()
    rc = main(["measure", "--checkpoint", str(evil)])
    assert rc == 1 and not canary.exists()
    line = _one_error_line(capsys.readouterr().err, "measure")
    assert "refusing to load" in line and "torch.save(model.state_dict(), path)" in line
    if fmt == "torch":
        assert "pickled Python object (io.open)" in line


@pytest.mark.parametrize("command", ["train", "sweep"])
def test_resuming_from_a_malicious_checkpoint_dir_is_refused(tmp_path, capsys, command):
    ck, canary, out = tmp_path / "ck", tmp_path / "canary", tmp_path / "r.jsonl"
    ck.mkdir()
    argv = [command, *TINY, "--max-epochs", "1", "--out", str(out), "--checkpoint-dir", str(ck)]
    if command == "sweep":
        argv += ["--ps", "0"]
        from deepfit.experiments import corruption_sweep_configs, unique_configs
        base = cli._config_from_args(build_parser().parse_args(argv))
        (cfg,) = unique_configs(corruption_sweep_configs(base, [0.0], [0]))   # p=0 is the true run
        evil = checkpoint_path(ck, cfg)
    else:
        evil = ck / f"{_run_id(argv)}.pt"
    _write_evil(evil, canary, "torch")
    rc = main(argv)
    assert rc == 1 and not canary.exists()
    line = _one_error_line(capsys.readouterr().err, command)
    assert "refusing to load checkpoint" in line and str(evil) in line
    assert evil.exists() and not out.exists()   # nothing deleted, nothing recorded


@pytest.mark.parametrize("content", ["random", "truncated", "empty"])
def test_corrupt_checkpoint_is_one_line_not_a_traceback(tmp_path, capsys, content):
    good = tmp_path / "good.pt"
    torch.save({"model": {"w": torch.ones(64)}, "config": {}}, good)
    data = good.read_bytes()
    bad = tmp_path / "bad.pt"
    bad.write_bytes({"random": os.urandom(2000), "truncated": data[: len(data) // 2], "empty": b""}[content])
    assert main(["measure", "--checkpoint", str(bad)]) == 1
    line = _one_error_line(capsys.readouterr().err, "measure")
    assert str(bad) in line and ("corrupt" in line or "refusing to load" in line)


def test_train_checkpoints_load_weights_only_and_resume(tmp_path):
    from deepfit.data import prepare_arrays
    rng = np.random.default_rng(0)
    data = prepare_arrays(rng.integers(0, 256, (32, 8, 8, 1), dtype=np.uint8), rng.integers(0, 10, 32),
                          rng.integers(0, 256, (8, 8, 8, 1), dtype=np.uint8), rng.integers(0, 10, 8), 10, crop=None,
                          info={"dataset": "synthetic"})
    cfg = TrainConfig(model="mlp2", width=8, dataset="synthetic", crop=None, max_epochs=2)
    train(cfg.replace(max_epochs=1), data, device="cpu", checkpoint_dir=tmp_path)
    # torch's own restricted loader, independent of deepfit's, accepts what deepfit writes
    ckpt = torch.load(checkpoint_path(tmp_path, cfg.replace(max_epochs=1)), weights_only=True)
    assert set(ckpt["model"]) and json.dumps(ckpt["config"]) and json.dumps(ckpt["history"])


# ------------------------------------------------------------------ a diverging loss

def test_nan_loss_stops_the_run_and_records_nothing(tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    rc = main(["train", *TINY, "--max-epochs", "3", "--lr", "1e30", "--out", str(out)])
    assert rc == 1 and not out.exists()
    line = _one_error_line(capsys.readouterr().err, "train")
    assert "not finite" in line and "epoch 2" in line and "step 2" in line and "lower learning rate" in line


def test_nan_in_a_batch_names_epoch_and_step_and_saves_no_checkpoint(tmp_path):
    from deepfit.data import prepare_arrays
    x = np.random.default_rng(0).normal(size=(64, 6, 6, 1)).astype(np.float32)
    data = prepare_arrays(x, np.arange(64) % 10, x[:8], np.arange(8) % 10, 10, crop=None, preprocess="normalize",
                          info={"dataset": "synthetic"})
    cfg = TrainConfig(model="mlp2", width=8, dataset="synthetic", crop=None, preprocess="normalize", batch_size=16,
                      max_epochs=3)
    data.x_train[40] = float("inf")   # in one of the 4 batches of epoch 1
    with pytest.raises(TrainingDivergedError, match=r"epoch 1, SGD step [1-4] ") as e:
        train(cfg, data, device="cpu", checkpoint_dir=tmp_path)
    assert "--lr" in str(e.value) and not checkpoint_path(tmp_path, cfg).exists()


# ------------------------------------------------------------------ outputs checked before any work

@pytest.fixture
def no_data(monkeypatch):
    """Fail the test if a command reads its data set (the checks must come before)."""
    import deepfit.data

    def boom(*a, **k):
        raise AssertionError("data was prepared before the output paths were checked")
    monkeypatch.setattr(deepfit.data, "prepare_data", boom)


@pytest.mark.parametrize("flag, value, needle", [
    ("--out", "{tmp}", "is a directory"),
    ("--out", "/proc/deepfit-x.jsonl", "cannot create files"),
    ("--checkpoint-dir", "{tmp}/afile", "is a file, not a directory"),
    ("--checkpoint-dir", "/proc/deepfit-ck", "cannot create files"),
    ("--plot-dir", "/proc/deepfit-png", "cannot create files"),
])
def test_bad_output_places_are_refused_before_any_work(tmp_path, capsys, no_data, flag, value, needle):
    (tmp_path / "afile").write_text("mine")
    value = value.format(tmp=tmp_path)
    argv = {"--out": str(tmp_path / "r.jsonl"), flag: value}
    command = "sweep" if flag == "--plot-dir" else "train"
    extra = ["--ps", "0"] if command == "sweep" else []
    rc = main([command, *TINY, *extra, *[t for kv in argv.items() for t in kv]])
    assert rc == 2
    line = _one_error_line(capsys.readouterr().err, command)
    assert flag in line and needle in line
    assert (tmp_path / "afile").read_text() == "mine"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_out_directory_is_refused_before_any_work(tmp_path, capsys, no_data):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert main(["train", *TINY, "--out", str(ro / "r.jsonl")]) == 2
    finally:
        ro.chmod(0o700)
    assert "cannot create files" in _one_error_line(capsys.readouterr().err, "train")


def test_existing_results_file_is_appended_as_before(tmp_path):
    out = tmp_path / "r.jsonl"
    out.write_text('{"run_id": "someone-else"}\n')
    assert main(["train", *TINY, "--max-epochs", "1", "--out", str(out)]) == 0
    recs = [json.loads(s) for s in out.read_text().splitlines()]
    assert recs[0] == {"run_id": "someone-else"} and len(recs) == 2


def test_results_write_failure_says_what_was_kept_and_rerun_appends_without_training(tmp_path, capsys, monkeypatch):
    import kernelfit.results as R
    out, ck = tmp_path / "r.jsonl", tmp_path / "ck"
    argv = ["train", *TINY, "--max-epochs", "2", "--out", str(out), "--checkpoint-dir", str(ck)]
    real = R.append_jsonl

    def full(path, rec):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(R, "append_jsonl", full)
    assert main(argv) == 1
    line = _one_error_line(capsys.readouterr().err, "train")
    ckpt = ck / f"{_run_id(argv)}.pt"
    assert "could not be appended" in line and str(ckpt) in line and "rerun" in line
    monkeypatch.setattr(R, "append_jsonl", real)
    assert main(argv) == 0
    (rec,) = [json.loads(s) for s in out.read_text().splitlines()]
    assert rec["resumed_from_epoch"] == 2 and rec["epochs"] == 2


def test_measure_out_directory_refused_and_write_failure_keeps_the_json(tmp_path, capsys, monkeypatch):
    ck = tmp_path / "ck"
    assert main(["train", *TINY, "--max-epochs", "1", "--out", str(tmp_path / "r.jsonl"), "--checkpoint-dir",
                 str(ck)]) == 0
    (path,) = ck.glob("*.pt")
    capsys.readouterr()
    assert main(["measure", "--checkpoint", str(path), "--out", str(tmp_path)]) == 2
    assert "is a directory" in _one_error_line(capsys.readouterr().err, "measure")
    import kernelfit.results as R

    def full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(R, "write_json_atomic", full)
    rc = main(["measure", "--checkpoint", str(path), "--groups", "norms", "--out", str(tmp_path / "m.json")])
    cap = capsys.readouterr()
    assert rc == 1 and json.loads(cap.out)["measures"]
    assert "printed to standard output" in _one_error_line(cap.err, "measure")


# ------------------------------------------------------------------ one error path

def test_interrupt_names_the_checkpoint_and_rerun_resumes(tmp_path, capsys, monkeypatch):
    import deepfit.experiments as E
    out, ck = tmp_path / "r.jsonl", tmp_path / "ck"
    argv = ["train", *TINY, "--max-epochs", "3", "--out", str(out), "--checkpoint-dir", str(ck)]
    real = E.train

    def interrupted(*a, **k):
        def stop(rec):
            if rec["epoch"] == 1:
                raise KeyboardInterrupt
        return real(*a, **k, on_epoch_end=stop)
    monkeypatch.setattr(E, "train", interrupted)
    assert main(argv) == 1
    line = _one_error_line(capsys.readouterr().err, "train")
    assert "interrupted" in line and str(ck / f"{_run_id(argv)}.pt") in line and "resumes" in line
    monkeypatch.setattr(E, "train", real)
    assert main(argv) == 0
    (rec,) = [json.loads(s) for s in out.read_text().splitlines()]
    assert rec["resumed_from_epoch"] == 1 and rec["epochs"] == 3


@pytest.mark.parametrize("argv, needle", [
    (["train", "--device", "banana"], "unknown device 'banana'"),
    (["train", "--threads", "0"], "--threads expects a positive integer"),
    (["train", "--device", "cpu,cpu"], "one device"),
    (["sweep", "--workers", "0", "--ps", "0"], "--workers expects a positive integer"),
    (["measure", "--checkpoint", "x.pt", "--threads", "0"], "--threads expects a positive integer"),
])
def test_argument_errors_exit_2_with_a_clear_message(tmp_path, capsys, argv, needle):
    with pytest.raises(SystemExit) as e:
        main([*argv, *([] if argv[0] == "measure" else ["--out", str(tmp_path / "r.jsonl")])])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(InputError, match="Valid models"):
        main(["train", "--model", "resnet", "--out", str(tmp_path / "r.jsonl"), "--debug"])


def test_report_out_that_cannot_be_written_is_refused_before_training(tmp_path, capsys, monkeypatch):
    import deepfit.report as R

    def boom(*a, **k):
        raise AssertionError("the report ran before its --out was checked")
    monkeypatch.setattr(R, "run_report", boom)
    assert main(["report", "--preset", "quick", "--out", "/proc/deepfit-report"]) == 2
    assert "cannot create files" in capsys.readouterr().err
