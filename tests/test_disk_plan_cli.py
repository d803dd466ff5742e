"""The disk out-of-core strategy wired into the plan, the solver and the CLI: the plan's
choice against mocked RAM and disk, CLI solves on disk against in-RAM solves and scipy, the float64
fallback of a float32 disk factor, and the one-line refusals of bad flags."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import scipy.linalg

from kernelfit import places
from kernelfit.cli import main
from kernelfit.disk_solve import solve_on_disk
from kernelfit.errors import InputError, MemoryPlanError
from kernelfit.linalg.options import FactorOptions
from kernelfit.planning import choose_disk, plan_solve, require_fits

GIB = 2**30


# ------------------------------------------------------------------------------ the plan's choice
def _free(monkeypatch, nbytes):
    monkeypatch.setattr(places, "free_bytes", lambda d: int(nbytes))


def test_plan_keeps_the_solve_in_ram_when_it_fits(tmp_path, monkeypatch):
    _free(monkeypatch, 100 * GIB)
    plan = plan_solve(20_000, 784, 10, "mixed", available=64 * GIB)
    assert plan.fits
    assert choose_disk(plan, FactorOptions(scratch_dir=str(tmp_path))) is None


def test_plan_takes_the_disk_when_ram_is_short_and_the_scratch_dir_has_room(tmp_path, monkeypatch):
    _free(monkeypatch, 100 * GIB)
    plan = plan_solve(150_000, 784, 10, "mixed", available=24 * GIB)
    assert not plan.fits
    assert choose_disk(plan, FactorOptions()) is None          # no scratch directory: no disk
    disk = choose_disk(plan, FactorOptions(scratch_dir=str(tmp_path)))
    assert disk is not None and disk.fits and disk.dtype == "float32"
    # the float32 lower triangle at least, within one slab of it
    assert 150_000**2 / 2 * 4 <= disk.disk_bytes <= 100 * GIB
    # the default budget leaves room for what the solve keeps besides the Gram
    assert 0 < disk.budget_bytes <= 0.92 * 24 * GIB - (plan.total_bytes - plan.gram_bytes)
    assert disk.slabs >= 2


def test_plan_refuses_with_both_sizes_when_neither_fits(tmp_path, monkeypatch):
    _free(monkeypatch, 10 * GIB)
    plan = plan_solve(150_000, 784, 10, "mixed", available=24 * GIB)
    with pytest.raises(MemoryPlanError) as e:
        choose_disk(plan, FactorOptions(scratch_dir=str(tmp_path)))
    msg = str(e.value)
    assert "10.00 GiB free" in msg and "24.00 GiB available" in msg
    assert re.search(r"needs \d+\.\d\d GiB on the scratch directory", msg)


def test_disk_asked_for_without_a_scratch_dir_and_the_in_ram_refusal_names_the_disk(tmp_path):
    plan = plan_solve(150_000, 784, 10, "mixed", available=24 * GIB)
    with pytest.raises(InputError, match="scratch"):
        choose_disk(plan, FactorOptions(out_of_core="disk"))
    with pytest.raises(MemoryPlanError, match="--out-of-core disk --scratch-dir DIR"):
        require_fits(plan, cli=True)


# ------------------------------------------------------------------------------ float64 fallback
def test_float32_breakdown_on_disk_falls_back_to_a_float64_stage(tmp_path):
    rng = np.random.default_rng(1)
    X = rng.random((600, 2))
    Y = np.eye(3)[rng.integers(0, 3, 600)]
    K = np.exp(-((X[:, None] - X[None]) ** 2).sum(-1) / 2) + 1e-6 * np.eye(600)   # cond ~ 5e8
    ref = scipy.linalg.cho_solve(scipy.linalg.cho_factor(K, lower=True), Y)
    kw = dict(kernel="gaussian", bandwidth=1.0, memory_budget=2_000_000, jitter=1e-6)
    alpha, stats = solve_on_disk(X, Y, scratch_dir=tmp_path / "a", fallback_float64=True, **kw)
    assert stats["factor_dtype"] == "float64" and "re-factored in float64" in stats["refinement"]["fallback"]
    assert np.linalg.norm(alpha - ref) <= 1e-6 * np.linalg.norm(ref)
    assert not (tmp_path / "a").exists()                 # both stages removed
    # too small a budget for the float64 stage: refused, never a float32 answer
    with pytest.raises(InputError, match="float64 re-factorization on disk cannot run"):
        solve_on_disk(X, Y, scratch_dir=tmp_path / "b", fallback_float64=True, **{**kw, "memory_budget": 600_000})


# ------------------------------------------------------------------------------ CLI
N, M, SIGMA = 1500, 300, 1.0


@pytest.fixture(scope="module")
def arrays(tmp_path_factory):
    d = tmp_path_factory.mktemp("arrays")
    rng = np.random.default_rng(0)
    X, Xt = rng.random((N, 20)), rng.random((M, 20))
    y, yt = rng.integers(0, 3, N), rng.integers(0, 3, M)
    for name, a in (("X", X), ("Xt", Xt), ("y", y), ("yt", yt)):
        np.save(d / f"{name}.npy", a)

    def gram(A, B):
        return np.exp(-((A[:, None] - B[None]) ** 2).sum(-1) / (2 * SIGMA**2))

    np.save(d / "G.npy", gram(X, X))
    np.save(d / "Gt.npy", gram(Xt, X))
    return d


def _record(path):
    return json.loads(path.read_text())["results"]["true"]


def _same(a, b):
    assert a["test_error"] == b["test_error"] and a["train_error"] == b["train_error"] == 0.0
    assert abs(a["rkhs_norm"] - b["rkhs_norm"]) <= 1e-8 * abs(b["rkhs_norm"])


def test_cli_solve_on_disk_equals_the_in_ram_solve(arrays, tmp_path, capsys):
    base = ["solve", "--x-train", str(arrays / "X.npy"), "--y-train", str(arrays / "y.npy"), "--x-test",
            str(arrays / "Xt.npy"), "--y-test", str(arrays / "yt.npy"), "--bandwidth", str(SIGMA), "--no-progress"]
    assert main(base + ["--out", str(tmp_path / "ram.json")]) == 0
    assert main(base + ["--out-of-core", "disk", "--scratch-dir", str(tmp_path / "s"), "--memory-budget", "0.002",
                        "--out", str(tmp_path / "disk.json")]) == 0
    err = capsys.readouterr().err
    assert "strategy disk" in err and "I/O wait" in err
    disk = json.loads((tmp_path / "disk.json").read_text())
    st = disk["stats"]
    assert st["strategy"] == "disk" and st["slabs"] >= 4 and st["bytes_read"] > 0 and st["bytes_written"] > 0
    assert st["memory_budget_bytes"] == int(0.002 * GIB) and st["disk_bytes"] > 0
    assert st["io"] == "direct" or st["io"].startswith("buffered (O_DIRECT refused")    # which I/O ran, said
    _same(_record(tmp_path / "disk.json"), _record(tmp_path / "ram.json"))
    # against scipy: the RKHS norm sqrt(y^T K^-1 y) of the one-hot targets
    G = np.load(arrays / "G.npy")
    Y = np.eye(3)[np.load(arrays / "y.npy")]
    a = scipy.linalg.cho_solve(scipy.linalg.cho_factor(G, lower=True), Y)
    norm = np.sqrt(np.sum(Y * a))
    assert abs(_record(tmp_path / "disk.json")["rkhs_norm"] - norm) <= 1e-8 * norm
    assert not (tmp_path / "s").exists()


def test_cli_gram_file_on_disk_equals_the_in_ram_solve(arrays, tmp_path, capsys):
    base = ["solve", "--gram", str(arrays / "G.npy"), "--y-train", str(arrays / "y.npy"), "--gram-test",
            str(arrays / "Gt.npy"), "--y-test", str(arrays / "yt.npy"), "--no-progress"]
    assert main(base + ["--out", str(tmp_path / "ram.json")]) == 0
    # float64 (the default mode of a precomputed Gram): 8-byte panels, twice the budget
    assert main(base + ["--out-of-core", "disk", "--scratch-dir", str(tmp_path / "s"), "--memory-budget", "0.004",
                        "--out", str(tmp_path / "disk.json")]) == 0
    st = json.loads((tmp_path / "disk.json").read_text())["stats"]
    assert st["strategy"] == "disk" and st["slabs"] >= 4 and st["factor_dtype"] == "float64"
    assert st["factorization"]["device"] == "cpu" and st["factorization"]["compute"] == "numpy"
    _same(_record(tmp_path / "disk.json"), _record(tmp_path / "ram.json"))
    # --device: the Gram file's slabs factor on that torch device (here the CPU as a separate device)
    assert main(base + ["--out-of-core", "disk", "--scratch-dir", str(tmp_path / "s2"), "--memory-budget", "0.004",
                        "--device", "cpu", "--out", str(tmp_path / "dev.json")]) == 0
    st = json.loads((tmp_path / "dev.json").read_text())["stats"]
    assert st["factorization"]["compute"] == "torch" and st["factorization"]["bytes_uploaded"] > 0
    _same(_record(tmp_path / "dev.json"), _record(tmp_path / "ram.json"))


@pytest.mark.parametrize("kind", ["hdf5", "zarr"])
def test_hdf5_and_zarr_gram_files_on_disk_equal_the_in_ram_solve(kind, arrays, tmp_path, capsys):
    G = np.load(arrays / "G.npy")
    if kind == "hdf5":
        h5py = pytest.importorskip("h5py")
        with h5py.File(tmp_path / "G.h5", "w") as f:
            f.create_dataset("G", data=G, chunks=(256, 256))
        spec = f"{tmp_path / 'G.h5'}:/G"
    else:
        zarr = pytest.importorskip("zarr")
        z = zarr.open(str(tmp_path / "G.zarr"), mode="w", shape=G.shape, chunks=(256, 256), dtype=G.dtype)
        z[:] = G
        spec = str(tmp_path / "G.zarr")
    tail = ["--y-train", str(arrays / "y.npy"), "--gram-test", str(arrays / "Gt.npy"), "--y-test", str(arrays / "yt.npy"),
            "--no-progress"]
    assert main(["solve", "--gram", str(arrays / "G.npy"), *tail, "--out", str(tmp_path / "ram.json")]) == 0
    assert main(["solve", "--gram", spec, *tail, "--out-of-core", "disk", "--scratch-dir", str(tmp_path / "s"),
                 "--memory-budget", "0.004", "--out", str(tmp_path / "disk.json")]) == 0
    st = json.loads((tmp_path / "disk.json").read_text())["stats"]
    assert st["strategy"] == "disk" and st["slabs"] >= 4
    _same(_record(tmp_path / "disk.json"), _record(tmp_path / "ram.json"))


def test_cli_plan_reports_ram_disk_and_the_strategy(arrays, tmp_path, capsys, monkeypatch):
    base = ["plan", "--x-train", str(arrays / "X.npy"), "--y-train", str(arrays / "y.npy")]
    assert main(base + ["--out-of-core", "disk", "--scratch-dir", str(tmp_path / "s"), "--memory-budget", "0.002"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["strategy_chosen"] == "disk" and out["disk_bytes"] >= N * N / 2 * 4 and out["ram_bytes"] > 0
    # 60k MNIST points in 4 GiB of RAM: no in-RAM strategy; 1 GiB of disk: no disk either -> exit 3
    _free(monkeypatch, GIB)
    assert main(["plan", "--dataset", "mnist", "--n-train", "60000", "--available-gib", "4",
                 "--scratch-dir", str(tmp_path / "s")]) == 3
    err = capsys.readouterr().err
    assert "does NOT fit" in err and "1.00 GiB free" in err


@pytest.mark.parametrize("extra, message", [
    (["--out-of-core", "disk", "--scratch-dir", "S", "--memory-budget", "0"], "expected a size in GiB > 0"),
    (["--out-of-core", "disk", "--scratch-dir", "FILE"], "is a file"),
    (["--out-of-core", "disk"], "--out-of-core disk keeps the Gram and its factor in a directory: add --scratch-dir"),
    (["--memory-budget", "1"], "--memory-budget is the RAM of a disk solve"),
    (["--out-of-core", "disk", "--scratch-dir", "S", "--checkpoint-dir", "S"], "does not combine with --checkpoint-dir"),
])
def test_bad_disk_flags_are_one_line_refusals(arrays, tmp_path, capsys, extra, message):
    (tmp_path / "FILE").write_text("x")
    extra = [str(tmp_path / e) if e in ("S", "FILE") else e for e in extra]
    with pytest.raises(SystemExit) as e:
        main(["solve", "--x-train", str(arrays / "X.npy"), "--y-train", str(arrays / "y.npy"), *extra])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err
    if "GiB > 0" not in message:           # argparse's type errors keep their usage line
        assert err.count("\n") == 1 and "usage:" not in err


# ------------------------------------------------------------------------------ one default bandwidth per feature map
def test_table_and_solve_features_take_the_same_default_bandwidth_per_feature_kind():
    from kernelfit.catalog import DEFAULT_BANDWIDTH, FEATURE_KINDS
    from kernelfit.cli import build_parser
    from kernelfit.cli.table import options_from_args
    from kernelfit.validate import bandwidth_rule

    table = options_from_args(build_parser().parse_args(["table"]))
    table_rule = {"gabor": table.bandwidth_mnist_gabor, "pixels": table.bandwidth_cifar_pixels,
                  "randconv": table.bandwidth_cifar_randconv}
    for kind in FEATURE_KINDS:
        args = build_parser().parse_args(["solve", "--dataset", "mnist", "--features", kind])
        assert args.bandwidth is None          # resolved in run() from the one table below
        assert bandwidth_rule(table_rule[kind]) == bandwidth_rule(DEFAULT_BANDWIDTH[kind])
        assert bandwidth_rule(DEFAULT_BANDWIDTH[kind]) == bandwidth_rule("0.5*median")
    assert bandwidth_rule(table.bandwidth_mnist_pixels).value == 5.0   # the paper's sigma, kept on purpose
    args = build_parser().parse_args(["solve", "--bandwidth", "0.25*median"])
    assert bandwidth_rule(args.bandwidth) == bandwidth_rule("0.25*median")


def test_solve_features_without_bandwidth_records_the_feature_rule(arrays, tmp_path):
    base = ["solve", "--x-train", str(arrays / "X.npy"), "--y-train", str(arrays / "y.npy"), "--n-test", "0",
            "--no-progress"]
    assert main(base + ["--out", str(tmp_path / "d.json")]) == 0
    assert main(base + ["--bandwidth", "0.5*median", "--out", str(tmp_path / "h.json")]) == 0
    d, h = (json.loads((tmp_path / f).read_text())["stats"] for f in ("d.json", "h.json"))
    assert d["bandwidth_rule"] == h["bandwidth_rule"] and d["bandwidth"] == h["bandwidth"]
    X = np.load(arrays / "X.npy")
    from scipy.spatial.distance import pdist
    assert d["bandwidth"] == pytest.approx(0.5 * np.median(pdist(X)), rel=0.05)   # 0.5 x a sampled median


def test_factor_with_disk_placement_says_where_the_disk_path_runs():
    from kernelfit.linalg.factor import factor
    from kernelfit.linalg.panels import SymmetricPanels

    G = SymmetricPanels.from_dense(np.eye(8), 4)
    with pytest.raises(InputError, match="fit_interpolant"):
        factor(G, FactorOptions(out_of_core="disk"))


def test_npz_gram_on_disk_is_a_one_line_refusal(arrays, tmp_path, capsys):
    np.savez(tmp_path / "G.npz", G=np.load(arrays / "G.npy"))
    with pytest.raises(SystemExit) as e:
        main(["solve", "--gram", f"{tmp_path / 'G.npz'}:G", "--y-train", str(arrays / "y.npy"),
              "--out-of-core", "disk", "--scratch-dir", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "inflating it whole" in err and "usage:" not in err


def test_cli_disk_solve_interrupted_then_resumed_equals_an_uninterrupted_one(arrays, tmp_path, capsys, monkeypatch):
    """Ctrl-C in the middle of the factorization keeps the store; `--resume` finishes it, and the answer is the
    uninterrupted run's to the last bit (the same slabs, the same GEMMs)."""
    from kernelfit.linalg import slabs

    base = ["solve", "--x-train", str(arrays / "X.npy"), "--y-train", str(arrays / "y.npy"), "--x-test",
            str(arrays / "Xt.npy"), "--y-test", str(arrays / "yt.npy"), "--bandwidth", str(SIGMA), "--no-progress",
            "--out-of-core", "disk", "--memory-budget", "0.002"]
    assert main(base + ["--scratch-dir", str(tmp_path / "s1"), "--out", str(tmp_path / "whole.json")]) == 0
    real, calls = slabs.cholesky_inplace, []

    def interrupted(*a, **k):   # the third slab's factorization is cut short, as by Ctrl-C
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(slabs, "cholesky_inplace", interrupted)
    assert main(base + ["--scratch-dir", str(tmp_path / "s2"), "--out", str(tmp_path / "resumed.json")]) == 130
    assert (tmp_path / "s2" / "manifest.json").is_file() and not (tmp_path / "resumed.json").exists()
    assert "--resume" in capsys.readouterr().err
    monkeypatch.setattr(slabs, "cholesky_inplace", real)
    assert main(base + ["--scratch-dir", str(tmp_path / "s2"), "--resume", "--out", str(tmp_path / "resumed.json")]) == 0
    whole, resumed = (json.loads((tmp_path / n).read_text()) for n in ("whole.json", "resumed.json"))
    assert resumed["stats"]["resumed"] is not None
    for name in whole["results"]:
        assert resumed["results"][name] == whole["results"][name]
