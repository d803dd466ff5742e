"""One error path for every kernelfit command: a run-time failure ends in one line on stderr and a
non-zero exit, never a traceback (unless --debug); output places are probed before any work; a result
that was computed is never lost because its file could not be written."""

from __future__ import annotations

import errno
import json
import subprocess
import sys

import pytest

from kernelfit import cli
from kernelfit.cli import main
from kernelfit.errors import InputError

SMALL = ["solve", "--n-train", "60", "--n-test", "20", "--bandwidth", "5", "--no-progress"]


def _usage_error(argv, capsys):
    with pytest.raises(SystemExit) as ei:
        main(argv)
    assert ei.value.code == 2
    return capsys.readouterr().err


def _fail_if_loaded(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("data were loaded before the arguments were checked")
    monkeypatch.setattr("kernelfit.data.load_dataset", boom)


@pytest.mark.parametrize("device", ["banana", "gpu", "cuda:x", "cuda1"])
def test_bad_device_is_a_usage_error(device, capsys):
    err = _usage_error(["solve", "--device", device], capsys)
    assert "expected 'cpu', 'cuda' or 'cuda:N'" in err and repr(device) in err


def test_unwritable_out_refused_before_loading(monkeypatch, capsys):
    _fail_if_loaded(monkeypatch)
    err = _usage_error([*SMALL, "--out", "/proc/kernelfit-x.json"], capsys)
    assert "--out /proc/kernelfit-x.json: cannot create files in /proc" in err


def test_unwritable_cache_dir_refused_before_loading(monkeypatch, capsys):
    _fail_if_loaded(monkeypatch)
    err = _usage_error([*SMALL, "--features", "gabor", "--cache-dir", "/proc/kernelfit-cache"], capsys)
    assert "--cache-dir /proc/kernelfit-cache: cannot create files in /proc" in err


def test_unwritable_save_model_and_predictions_refused(tmp_path, monkeypatch, capsys):
    _fail_if_loaded(monkeypatch)
    err = _usage_error([*SMALL, "--save-model", "/proc/m.safetensors"], capsys)
    assert "--save-model /proc/m.safetensors" in err
    err = _usage_error(["predict", "--model", str(tmp_path / "m.safetensors"), "--x-test", "x.npy",
                        "--out", "/proc/pred.npy"], capsys)
    assert "--out /proc/pred.npy: cannot create files" in err


def test_record_is_kept_on_stdout_when_out_cannot_be_written(tmp_path, monkeypatch, capsys):
    out = tmp_path / "r.json"

    def disk_full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("kernelfit.results.write_json_atomic", disk_full)
    rc = main([*SMALL, "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 1
    record = json.loads(captured.out)  # the computed record, not lost
    assert record["n_train"] == 60 and record["results"]["true"]["train_error"] == 0.0
    assert "could not write --out" in captured.err and "No space left" in captured.err
    assert "printed on stdout" in captured.err and "Traceback" not in captured.err
    assert not out.exists()


def test_record_written_and_failure_reported_when_model_cannot_be_saved(tmp_path, monkeypatch, capsys):
    out, model = tmp_path / "r.json", tmp_path / "m.safetensors"

    def disk_full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("kernelfit.model.save_model", disk_full)
    rc = main([*SMALL, "--out", str(out), "--save-model", str(model)])
    err = capsys.readouterr().err
    assert rc == 1 and "could not write --save-model" in err and "record was written without it" in err
    assert json.loads(out.read_text())["model"]["path"] is None
    assert not model.exists()


def test_kernelfit_error_oserror_and_interrupt_are_one_line(monkeypatch, capsys, tmp_path):
    def raiser(exc):
        def run(args):
            raise exc
        return run

    cases = [(InputError("bad thing; expected X"), 1, "kernelfit solve: error (InputError): bad thing"),
             (PermissionError(errno.EACCES, "Permission denied", "/x/y"), 1,
              "kernelfit solve: error: Permission denied (/x/y)"),
             (MemoryError(), 1, "ran out of memory"),
             (ZeroDivisionError("oops"), 1, "internal error (ZeroDivisionError): oops"),
             (KeyboardInterrupt(), 130, "interrupted; the panels finished so far are saved in")]
    for exc, code, needle in cases:
        monkeypatch.setattr(cli.solve, "run", raiser(exc))
        rc = main(["solve", "--checkpoint-dir", str(tmp_path / "ck")])
        err = capsys.readouterr().err
        assert rc == code, (exc, err)
        assert needle in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1
    # --debug (anywhere) shows the traceback: the exception propagates
    monkeypatch.setattr(cli.solve, "run", raiser(ZeroDivisionError("oops")))
    with pytest.raises(ZeroDivisionError):
        main(["solve", "--debug"])


def test_table_errors_go_through_the_same_path(monkeypatch, capsys):
    from kernelfit import table

    def boom(options, argv=None):
        raise InputError("--n-train-mnist 90000 exceeds the 60000 training images")

    monkeypatch.setattr(table, "run_table", boom)
    rc = main(["table", "--n-train-mnist", "90000"])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("kernelfit table: error (InputError): --n-train-mnist 90000")


def test_predict_refuses_two_column_labels(tmp_path, capsys):
    import numpy as np

    model = tmp_path / "m.safetensors"
    assert main([*SMALL, "--save-model", str(model), "--out", str(tmp_path / "r.json")]) == 0
    x = tmp_path / "x.npy"
    y2 = tmp_path / "y2.npy"
    np.save(x, np.zeros((5, 28, 28), dtype=np.uint8))
    np.save(y2, np.zeros((5, 2), dtype=np.int64))
    capsys.readouterr()
    rc = main(["predict", "--model", str(model), "--x-test", str(x), "--y-test", str(y2)])
    err = capsys.readouterr().err
    assert rc == 1 and "expected one class label per test point" in err and "(5, 2)" in err


def test_subprocess_interrupt_prints_one_line():
    # a real SIGINT-like KeyboardInterrupt raised inside the command, seen from outside the process
    code = ("import sys, kernelfit.cli as c\n"
            "def run(a): raise KeyboardInterrupt\n"
            "c.plan.run = run\n"
            "sys.exit(c.main(['plan']))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130
    assert proc.stderr.strip() == "kernelfit plan: interrupted; nothing was written"


def test_threads_limits_blas_torch_and_the_pool_then_restores(monkeypatch, capsys, blas_thread_counts):
    import torch

    from kernelfit import parallel

    seen = {}

    def spy(args):
        seen["blas"] = blas_thread_counts()
        seen["torch"] = torch.get_num_threads()
        seen["pool"] = parallel._POOL_WORKERS
        return 0

    before = (blas_thread_counts(), torch.get_num_threads(), parallel._POOL_WORKERS)
    monkeypatch.setattr(cli.solve, "run", spy)
    assert main(["solve", "--threads", "1"]) == 0
    assert set(seen["blas"]) == {1} and seen["torch"] == 1 and seen["pool"] == 1
    assert (blas_thread_counts(), torch.get_num_threads(), parallel._POOL_WORKERS) == before
    assert "positive integer" in _usage_error(["solve", "--threads", "0"], capsys)
    assert "positive integer" in _usage_error(["predict", "--model", "m", "--x-test", "x", "--threads", "-2"], capsys)


def test_sparse_user_labels_plan_solve_and_predict_their_own_values(tmp_path, capsys):
    """Labels {3, 7, 5_000_000}: three classes (not five million), and a saved model predicts the user's
    label values, not the indices 0..2 the solve uses internally."""
    import numpy as np

    rng = np.random.default_rng(0)
    centers = {3: 0.0, 7: 3.0, 5_000_000: 6.0}
    y = np.repeat(list(centers), 20)
    x = np.array([centers[v] for v in y])[:, None] + rng.normal(scale=0.3, size=(len(y), 2))
    data = tmp_path / "d.npz"
    np.savez(data, x_train=x, y_train=y, x_test=x[::3], y_test=y[::3])
    model, out = tmp_path / "m.safetensors", tmp_path / "r.json"
    assert main(["solve", "--data", str(data), "--bandwidth", "1", "--no-progress", "--out", str(out),
                 "--save-model", str(model)]) == 0
    rec = json.loads(out.read_text())
    assert rec["num_classes"] == 3 and rec["results"]["true"]["test_error"] == 0.0
    capsys.readouterr()
    assert main(["predict", "--model", str(model), "--data", str(data)]) == 0
    pred = json.loads(capsys.readouterr().out)
    assert pred["predictions"] == [int(v) for v in y[::3]] and pred["test_error"] == 0.0


def test_prediction_csv_has_a_header_index_and_labels(tmp_path, capsys):
    import numpy as np

    rng = np.random.default_rng(1)
    x = rng.normal(size=(30, 3))
    y = (x[:, 0] > 0).astype(np.int64)
    data = tmp_path / "d.npz"
    np.savez(data, x_train=x, y_train=y, x_test=x[:7], y_test=y[:7])
    model = tmp_path / "m.safetensors"
    assert main(["solve", "--data", str(data), "--bandwidth", "1", "--no-progress", "--out", str(tmp_path / "r.json"),
                 "--save-model", str(model)]) == 0
    out = tmp_path / "pred.csv"
    assert main(["predict", "--model", str(model), "--data", str(data), "--out", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert lines[0] == "index,prediction,label" and lines[1:] == [f"{i},{v},{v}" for i, v in enumerate(y[:7])]
    scores = tmp_path / "scores.csv"
    assert main(["predict", "--model", str(model), "--data", str(data), "--scores", "--out", str(scores)]) == 0
    head, *rows = scores.read_text().splitlines()
    assert head == "index,score_0,score_1,label" and len(rows) == 7
    table = np.loadtxt(scores, delimiter=",", skiprows=1)
    assert np.array_equal(np.argmax(table[:, 1:3], axis=1), y[:7]) and np.array_equal(table[:, 0], np.arange(7))


def test_existing_out_is_one_line_without_the_usage_dump(tmp_path, capsys):
    out = tmp_path / "same.json"
    out.write_text("{}")
    err = _usage_error([*SMALL, "--out", str(out)], capsys)
    assert err.strip().splitlines() == [f"kernelfit solve: error: --out {out} already exists; pass --overwrite to "
                                        f"replace it, or choose a new path"]
