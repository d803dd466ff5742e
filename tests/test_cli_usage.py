"""The command line as a user meets it: the usage dump only for malformed command lines, one line for a
refusal of well-formed ones; --threads and -v/-q on the commands; `data info` attributes the MNIST
family's same-named files to the dataset they hold."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import struct

import numpy as np
import pytest

from kernelfit import cli
from kernelfit.cli import main


def _exit_2(argv, capsys) -> str:
    with pytest.raises(SystemExit) as ei:
        main(argv)
    assert ei.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("argv,reason", [
    (["solve", "--variant", "corrupt"], "kernelfit solve: error: --variant corrupt needs --corrupt-p"),
    (["solve", "--n-train", "5001"], "kernelfit solve: error: --n-train 5001 exceeds the 5000 examples of mnist-subset"),
    (["solve", "--resume"], "kernelfit solve: error: --resume needs --checkpoint-dir"),
    (["solve", "--data-dir", "/tmp"], "kernelfit solve: error: --data-dir /tmp needs a dataset"),
    (["plan", "--tf32"], "kernelfit plan: error: --tf32 / --measure belong to a device strategy"),
    (["data", "download", "mnist-subset"], "kernelfit data download: error: mnist-subset ships with kernelfit"),
])
def test_refusals_are_one_line_without_usage(argv, reason, capsys):
    err = _exit_2(argv, capsys)
    assert "usage:" not in err and err.strip().splitlines() == [err.strip()] and err.startswith(reason)


def test_table_existing_output_is_a_one_line_refusal(tmp_path, capsys):
    (tmp_path / "table_t.json").write_text("{}")
    err = _exit_2(["table", "--rows", "mnist-pixels", "--out-dir", str(tmp_path), "--tag", "t"], capsys)
    assert err.startswith("kernelfit table: error: ") and "--overwrite" in err and "usage:" not in err
    assert (tmp_path / "table_t.json").read_text() == "{}"


@pytest.mark.parametrize("argv", [["solve", "--bogus"], ["solve", "--n-train", "0"], ["table", "--filters", "x"],
                                  ["plan", "--mode", "float16"]])
def test_malformed_command_lines_keep_the_usage(argv, capsys):
    assert "usage:" in _exit_2(argv, capsys)


@pytest.mark.parametrize("argv,flag", [(["table", "--gabor-frequencies", "0"], "--gabor-frequencies"),
                                       (["table", "--randconv-bias", "nan"], "--randconv-bias"),
                                       (["table", "--device", "gpu"], "--device"),
                                       (["solve", "--randconv-zca-eps", "-1"], "--randconv-zca-eps")])
def test_table_and_feature_options_are_validated(argv, flag, capsys):
    """Options that took any float / string before (table --device, the feature-map floats)."""
    err = _exit_2(argv, capsys)
    assert flag in err and "expected" in err


# ------------------------------------------------------------------ --threads, -v / -q
def _spy(seen, blas_thread_counts):
    def run(args):
        import torch

        seen["blas"], seen["torch"] = blas_thread_counts(), torch.get_num_threads()
        return 0
    return run


@pytest.mark.parametrize("module,argv", [
    ("plan", ["plan"]), ("table", ["table"]), ("predict", ["predict", "--model", "m", "--x-test", "x"]),
    ("data", ["data", "info"])])
def test_threads_on_every_computing_command(module, argv, monkeypatch, blas_thread_counts):
    import torch

    seen = {}
    before = (blas_thread_counts(), torch.get_num_threads())
    if module == "data":   # its subcommands bind their own run functions
        monkeypatch.setattr(cli.data, "_info", _spy(seen, blas_thread_counts))
    else:
        monkeypatch.setattr(getattr(cli, module), "run", _spy(seen, blas_thread_counts))
    assert main([*argv, "--threads", "1"]) == 0
    assert set(seen["blas"]) == {1} and seen["torch"] == 1
    assert (blas_thread_counts(), torch.get_num_threads()) == before


@pytest.mark.parametrize("argv", [["solve"], ["plan"], ["table"], ["data", "path"], ["data", "info"],
                                  ["data", "download", "mnist"], ["predict", "--model", "m", "--x-test", "x"]])
@pytest.mark.parametrize("flags,level", [([], 0), (["-v"], 1), (["-vv"], 2), (["-q"], -1), (["-v", "-qq"], -1)])
def test_verbosity_flags_on_every_command(argv, flags, level, monkeypatch):
    from kernelfit import progress

    calls = []
    monkeypatch.setattr(progress, "set_verbosity", calls.append, raising=False)
    for name in ("solve", "plan", "table", "predict"):
        monkeypatch.setattr(getattr(cli, name), "run", lambda args: 0)
    for name in ("_path", "_info", "_download"):
        monkeypatch.setattr(cli.data, name, lambda args: 0)
    assert main([*argv, *flags]) == 0
    assert calls == [level]


# ------------------------------------------------------------------ data info, MNIST family
def _write_idx(d, seed: int) -> str:
    """Four gzipped IDX files of random 4x4 images; returns the md5 of the uncompressed train images."""
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    digest = None
    for name, shape in (("train-images-idx3-ubyte", (6, 4, 4)), ("train-labels-idx1-ubyte", (6,)),
                        ("t10k-images-idx3-ubyte", (3, 4, 4)), ("t10k-labels-idx1-ubyte", (3,))):
        a = rng.integers(0, 10 if len(shape) == 1 else 256, shape).astype(np.uint8)
        raw = struct.pack(">BBBB", 0, 0, 8, a.ndim) + struct.pack(f">{a.ndim}I", *a.shape) + a.tobytes()
        (d / f"{name}.gz").write_bytes(gzip.compress(raw))
        if name.startswith("train-images"):
            digest = hashlib.md5(raw).hexdigest()
    return digest


def test_data_info_lists_each_family_members_files_only_under_it(tmp_path, monkeypatch, capsys):
    from kernelfit.data import REGISTRY

    fashion = _write_idx(tmp_path, 1)              # Fashion-MNIST in the data directory itself
    mnist = _write_idx(tmp_path / "mnist", 2)      # MNIST in its subdirectory, side by side
    for name, digest in (("fashion-mnist", fashion), ("mnist", mnist)):
        monkeypatch.setitem(REGISTRY, name, dataclasses.replace(REGISTRY[name], content_md5={"x_train": digest}))
    assert main(["data", "info", "--data-dir", str(tmp_path)]) == 0
    found = {k: v["found"] for k, v in json.loads(capsys.readouterr().out)["datasets"].items()}
    assert sorted(found["fashion-mnist"]) == sorted(str(p) for p in tmp_path.glob("*.gz"))
    assert sorted(found["mnist"]) == sorted(str(p) for p in (tmp_path / "mnist").glob("*.gz"))
    assert found["kmnist"] == []
