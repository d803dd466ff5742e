"""deepfit CLI end to end on tiny subsets of the shipped MNIST subset (CPU, seconds)."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from deepfit.cli import main

TINY = ["--dataset", "mnist-subset", "--n-train", "128", "--n-test", "64", "--threads", "1", "--quiet",
        "--device", "cpu"]


def _lines(path):
    return [json.loads(s) for s in path.read_text().splitlines() if s.strip()]


def test_models_lists_paper_counts(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for count in ("1,209,866", "1,735,178", "1,387,786", "1,649,402"):
        assert count in out


def test_train_writes_record_with_provenance_and_clean_test_labels(tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    rc = main(["train", "--model", "mlp2", "--width", "32", "--variant", "random-labels", "--max-epochs", "2",
               "--out", str(out), *TINY])
    assert rc == 0
    (rec,) = _lines(out)
    assert rec["config"]["variant"] == "random-labels" and rec["config"]["model"] == "mlp2"
    assert rec["test_labels"] == "clean" and rec["data"]["randomization"]["test_labels_clean"] is True
    assert len(rec["history"]) == 2 and rec["epochs"] == 2
    assert rec["data"]["n_train"] == 128 and rec["data"]["n_test"] == 64
    git = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    assert rec["provenance"]["git"]["sha"] == (git.stdout.strip() if git.returncode == 0 else None)
    assert rec["provenance"]["versions"]["torch"]
    # Random labels change about 1 - 1/10 of the labels (binomial sd for n=128 is ~0.027).
    assert np.isclose(rec["data"]["randomization"]["fraction_changed_train"], 0.9, atol=0.1)
    assert "fitted=" in capsys.readouterr().out


def test_train_corrupt_test_is_recorded(tmp_path):
    out = tmp_path / "r.jsonl"
    assert main(["train", "--model", "mlp2", "--width", "16", "--variant", "corrupt", "--p", "0.5",
                 "--corrupt-test", "--max-epochs", "1", "--out", str(out), *TINY]) == 0
    (rec,) = _lines(out)
    assert rec["test_labels"] == "corrupted" and rec["config"]["corrupt_test"] is True
    assert rec["data"]["randomization"]["fraction_changed_test"] > 0


def test_train_resumes_from_checkpoint(tmp_path):
    out, ck = tmp_path / "r.jsonl", tmp_path / "ck"
    args = ["train", "--model", "mlp2", "--width", "16", "--max-epochs", "2", "--out", str(out),
            "--checkpoint-dir", str(ck), *TINY]
    assert main(args) == 0
    out2 = tmp_path / "r2.jsonl"  # a fresh results file: the run resumes from its finished checkpoint
    assert main([*args[:-len(TINY) - 4], "--out", str(out2), "--checkpoint-dir", str(ck), *TINY]) == 0
    (a,), (b,) = _lines(out), _lines(out2)
    assert a["run_id"] == b["run_id"] and b["resumed_from_epoch"] == 2
    assert a["history"][-1]["train_acc"] == b["history"][-1]["train_acc"]


def test_rerunning_a_finished_train_command_appends_no_duplicate(tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    args = ["train", "--model", "mlp2", "--width", "16", "--max-epochs", "1", "--out", str(out), *TINY]
    assert main(args) == 0 and main(args) == 0
    assert len(_lines(out)) == 1
    assert "already in" in capsys.readouterr().out
    assert main([*args, "--seed", "1"]) == 0  # another configuration is a new run
    assert len(_lines(out)) == 2


def test_sweep_runs_in_parallel_skips_finished_and_plots(tmp_path, capsys):
    out, plots = tmp_path / "s.jsonl", tmp_path / "png"
    args = ["sweep", "--model", "mlp2", "--width", "16", "--ps", "0,0.5,1", "--variants", "gaussian",
            "--max-epochs", "2", "--workers", "2", "--out", str(out), "--plot-dir", str(plots), *TINY]
    assert main(args) == 0
    recs = _lines(out)
    assert sorted((r["config"]["variant"], r["config"]["p"]) for r in recs) == [   # corrupt p=0 is the true run
        ("corrupt", 0.5), ("corrupt", 1.0), ("gaussian", 0.0), ("true", 0.0)]
    assert all(r["experiment"] == "sweep" and r["threads"] == 1 for r in recs)
    for name in ("deepfit_fig1a_loss_curves.png", "deepfit_fig1b_steps_to_fit.png", "deepfit_fig1c_test_error.png"):
        assert (plots / name).stat().st_size > 1000
    capsys.readouterr()
    assert main(args) == 0
    assert "4 already in" in capsys.readouterr().err
    assert len(_lines(out)) == 4


def test_sweep_trains_corrupt_p0_and_true_as_one_run(tmp_path, capsys):
    from deepfit.train import TrainConfig, config_hash
    out = tmp_path / "s.jsonl"
    assert main(["sweep", "--model", "mlp2", "--width", "16", "--ps", "0,1", "--variants", "true", "--max-epochs", "1",
                 "--out", str(out), *TINY]) == 0
    recs = _lines(out)
    assert sorted((r["config"]["variant"], r["config"]["p"]) for r in recs) == [("corrupt", 1.0), ("true", 0.0)]
    true = [r for r in recs if r["config"]["variant"] == "true"][0]
    assert true["run_id"] == config_hash(TrainConfig(**true["config"]))
    # corrupt p=0 and true give the same training data (kernelfit.randomize): one run is the right answer
    from kernelfit.data import load_dataset
    from kernelfit.randomize import Randomization, apply_randomization
    ds = load_dataset("mnist-subset").subset(128, 64, seed=0)
    a, _ = apply_randomization(ds, Randomization("corrupt", p=0.0, seed=0))
    b, _ = apply_randomization(ds, Randomization("true", seed=0))
    assert (a.y_train == b.y_train).all() and (a.x_train == b.x_train).all()


@pytest.mark.slow
def test_sweep_on_local_dask_cluster(tmp_path):
    out = tmp_path / "d.jsonl"
    assert main(["sweep", "--model", "mlp2", "--width", "16", "--ps", "0,1", "--max-epochs", "1",
                 "--workers", "2", "--dask", "local", "--out", str(out), *TINY]) == 0
    assert sorted(r["config"]["p"] for r in _lines(out)) == [0.0, 1.0]


def test_table1_grid_prints_paper_numbers(tmp_path, capsys):
    out = tmp_path / "t.jsonl"
    assert main(["table1", "--models", "mlp-1x512", "--max-epochs", "1", "--crop", "none", "--out", str(out),
                 *TINY]) == 0
    recs = _lines(out)
    # mlp-1x512 has three Table 1 cells: wd yes/no on true labels, and random labels.
    assert len(recs) == 3
    assert {(r["config"]["weight_decay"] > 0, r["config"]["variant"]) for r in recs} == {
        (True, "true"), (False, "true"), (False, "random-labels")}
    text = capsys.readouterr().out
    assert "50.51" in text and "10.61" in text and "99.34" in text
    assert main(["table", "--results", str(out), "--models", "mlp-1x512", "--dataset", "mnist-subset"]) == 0
    assert "mlp-1x512" in capsys.readouterr().out


@pytest.mark.parametrize("argv, needle", [
    (["train", "--model", "resnet"], "Valid models"),
    (["train", "--variant", "noise"], "Valid variants"),
    (["train", "--variant", "corrupt", "--p", "1.5"], "[0, 1]"),
    (["train", "--model", "inception-small", "--crop", "none", "--n-train", "8", "--max-epochs", "1",
      "--dataset", "mnist-subset", "--width", "3"], "does not take"),
])
def test_bad_input_exit_code_and_message(tmp_path, capsys, argv, needle):
    rc = main([*argv, "--out", str(tmp_path / "x.jsonl"), "--quiet"])
    assert rc == 2
    assert needle in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train", "sweep", "table1"])
def test_missing_dataset_says_where_it_looked_and_hints_at_real_options(tmp_path, capsys, command):
    import re

    from deepfit.cli import build_parser
    extra = ["--ps", "0"] if command == "sweep" else []
    rc = main([command, "--dataset", "cifar10", "--data-dir", str(tmp_path / "nowhere"), *extra,
               "--out", str(tmp_path / "x.jsonl"), "--quiet"])
    assert rc == 1   # a DataError: not an argument error (2), but still one line, no traceback
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ": error: " in ln]
    assert len(errors) == 1 and "Traceback" not in err
    assert str(tmp_path / "nowhere") in err
    sub = build_parser()._subparsers._group_actions[0].choices[command]
    known = {o for act in sub._actions for o in act.option_strings}
    hinted = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", err))
    assert hinted and hinted <= known, f"the error names options {command} does not have: {hinted - known}"


@pytest.mark.slow
def test_table1_full_grid_tiny(tmp_path, capsys):
    # Every model of the grid (Inception +/- BN, AlexNet, MLPs, with crops and weight decay) runs end to end.
    out = tmp_path / "t.jsonl"
    assert main(["table1", "--max-epochs", "1", "--out", str(out), "--dataset", "mnist-subset", "--n-train", "32",
                 "--n-test", "16", "--threads", "2", "--quiet", "--device", "cpu"]) == 0
    assert len(_lines(out)) == 19
    from deepfit.experiments import read_results, table1_rows
    rows = table1_rows(read_results(out), dataset="mnist-subset")
    assert len(rows) == 19 and all(r["train_acc"] is not None for r in rows)


def test_table1_at_toy_sizes_warns_once_per_place_and_records_it(tmp_path, capsys):
    from deepfit.experiments import table1_incomparable
    from deepfit.train import TrainConfig

    assert table1_incomparable(TrainConfig(dataset="cifar10")) == []   # the paper's setting: all of CIFAR-10, whiten, crop 28
    out = tmp_path / "t.jsonl"
    assert main(["table1", "--models", "mlp-1x512", "--max-epochs", "1", "--crop", "none", "--out", str(out), *TINY]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "cannot be compared with the paper" in line]
    assert len(err) == 2 and err[0] == err[1] and err[0].startswith("[deepfit] warning: ")
    assert "dataset mnist-subset (paper: cifar10)" in err[0] and "crop None (paper: 28)" in err[0]
    recs = _lines(out)
    assert all(r["paper_comparable"] is False and "dataset mnist-subset (paper: cifar10)" in r["not_comparable_because"]
               for r in recs)
