"""The kernel table command: tiny end-to-end run vs an independent scipy solve, outputs, bad input."""

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
from scipy.spatial.distance import cdist

from kernelfit.cli import main as cli_main
from kernelfit.cli.table import options_from_args
from kernelfit.errors import InputError
from kernelfit.table import PAPER, run_table, write_table
from kernelfit.validate import BandwidthRule
from kernelfit.validate import bandwidth_rule as _parse_bandwidth


def _options(argv):
    """TableOptions of a `kernelfit table` command line, parsed by the kernelfit CLI."""
    from kernelfit.cli import build_parser

    return options_from_args(build_parser().parse_args(["table", *argv]))


def main(argv):
    """`kernelfit table ARGV` through the CLI, failures raised as they are (--debug)."""
    return cli_main(["--debug", "table", *argv])


def test_parse_bandwidth():
    # the table's --bandwidth-* values are parsed by the one bandwidth rule (validate.bandwidth_rule)
    assert _parse_bandwidth("5") == BandwidthRule("given", 5.0)
    assert _parse_bandwidth("0.5*median") == BandwidthRule("median", 0.5)
    assert _parse_bandwidth("median") == BandwidthRule("median", 1.0)
    with pytest.raises(InputError, match="median"):
        _parse_bandwidth("wide")
    with pytest.raises(InputError, match="> 0"):
        _parse_bandwidth("-1")


def test_bad_rows_and_lambdas():
    with pytest.raises(InputError, match="unknown rows"):
        run_table(_options(["--rows", "mnist-hog"]))
    with pytest.raises(InputError, match="include 0"):
        run_table(_options(["--lambdas", "0.1", "1"]))
    with pytest.raises(SystemExit) as e:   # the parser's validated types (cli.args.nonneg_float)
        _options(["--gram-checkpoint-minutes", "-1"])
    assert e.value.code == 2


def test_paper_numbers_are_cited():
    for p in PAPER.values():
        assert "Zhang et al. 2017" in p["source"]
    assert PAPER["mnist-pixels"]["test_error"] == 0.012 and PAPER["mnist-gabor"]["test_error"] == 0.006


@pytest.mark.data
def test_tiny_table_matches_direct_solve(shared_data_dir, tmp_path):
    argv = ["--rows", "mnist-pixels,mnist-gabor", "--n-train-mnist", "300", "--n-test", "200",
            "--data-dir", str(shared_data_dir), "--out-dir", str(tmp_path), "--tag", "t",
            "--cache-dir", str(tmp_path / "cache"), "--lambdas", "0", "0.01", "1"]
    assert main(argv) == 0
    rec = json.loads((tmp_path / "table_t.json").read_text())
    md = (tmp_path / "table_t.md").read_text()
    assert "| mnist-gabor | random |" in md and "1.20%" in md
    # Independent reference: rebuild the same subset and solve K alpha = Y with scipy.
    from kernelfit.data import load_dataset

    ds = load_dataset("mnist", data_dir=shared_data_dir).subset(300, 200, seed=0)
    Xtr = ds.x_train.reshape(300, -1) / 255.0
    Xte = ds.x_test.reshape(200, -1) / 255.0
    row = rec["rows"][0]
    assert row["row"] == "mnist-pixels" and row["bandwidth"] == 5.0
    K = np.exp(-cdist(Xtr, Xtr, "sqeuclidean") / 50.0)
    Y = np.eye(10)[ds.y_train]
    alpha = scipy.linalg.solve(K, Y, assume_a="pos")
    err = np.mean(np.argmax(np.exp(-cdist(Xte, Xtr, "sqeuclidean") / 50.0) @ alpha, 1) != ds.y_test)
    res = row["results"]["true"]
    assert res["interp"]["test_error"] == pytest.approx(err)
    assert res["interp"]["train_error"] == 0.0
    assert res["interp"]["norm"] == pytest.approx(np.sqrt(np.sum(alpha * Y)), rel=1e-6)
    # the ridge row is one of the path's lambdas, chosen by LOO
    assert res["ridge"]["lambda"] in (0.0, 0.01, 1.0)
    # random labels: still interpolated, test error near chance
    assert row["results"]["random"]["interp"]["train_error"] == 0.0
    assert row["results"]["random"]["interp"]["test_error"] > 0.7
    # Gabor row beats pixels even at n = 300
    g = rec["rows"][1]
    assert g["results"]["true"]["interp"]["test_error"] < res["interp"]["test_error"]


@pytest.mark.data
def test_randconv_row_panels_path_matches_eigh_path(shared_data_dir, tmp_path, monkeypatch):
    """Large-n path (Gram accumulated in panels, tiled Cholesky) == dense eigh path at small n."""
    common = ["--rows", "cifar-randconv", "--n-train-cifar", "300", "--n-test", "100", "--filters", "12",
              "--filter-block", "5", "--data-dir", str(shared_data_dir), "--out-dir", str(tmp_path),
              "--no-random-labels", "--cache-dir", str(tmp_path / "cache")]
    main(common + ["--tag", "eigh", "--lambdas", "0"])
    main(common + ["--tag", "panels", "--eigh-max-n", "100"])
    main(common + ["--tag", "panels2", "--eigh-max-n", "100"])   # second run: Gram from the cache
    a = json.loads((tmp_path / "table_eigh.json").read_text())["rows"][0]
    b = json.loads((tmp_path / "table_panels.json").read_text())["rows"][0]
    c = json.loads((tmp_path / "table_panels2.json").read_text())["rows"][0]
    assert not b["gram_cache"]["hit"] and c["gram_cache"]["hit"] and c["gram_cache"]["key"] == b["gram_cache"]["key"]
    assert c["results"] == b["results"]
    # a run killed after its first Gram checkpoint (5 of 12 filters) continues from it when rerun
    from kernelfit.features.cache import GramCache

    save = GramCache.save

    def save_then_die(self, key, g, meta_extra=None):
        save(self, key, g, meta_extra)
        if not g.complete:
            raise KeyboardInterrupt

    fresh = common[:-1] + [str(tmp_path / "cache2"), "--eigh-max-n", "100", "--gram-checkpoint-minutes", "1e-9"]
    with monkeypatch.context() as m:
        m.setattr(GramCache, "save", save_then_die)
        with pytest.raises(KeyboardInterrupt):
            main(fresh + ["--tag", "killed"])
    main(fresh + ["--tag", "resumed"])
    d = json.loads((tmp_path / "table_resumed.json").read_text())["rows"][0]
    assert d["gram_cache"]["resumed_from_filters"] == 5 and not d["gram_cache"]["hit"]
    assert d["results"] == b["results"]
    assert a["bandwidth"] == pytest.approx(b["bandwidth"], rel=1e-6)
    ia, ib = a["results"]["true"]["interp"], b["results"]["true"]["interp"]
    assert ia["test_error"] == ib["test_error"] and ib["train_error"] == 0.0
    assert ia["norm"] == pytest.approx(ib["norm"], rel=1e-5)


def test_provenance_is_taken_before_the_rows_run(monkeypatch):
    """An hours-long table run records the code it started with, not the HEAD at its end."""
    import kernelfit.provenance as results
    import kernelfit.table as table

    state = {"rows_started": False}
    monkeypatch.setattr(results, "git_info", lambda: {"sha": "after" if state["rows_started"] else "before"})

    def fake_row(row, args):
        state["rows_started"] = True
        return {"row": row, "results": {}}

    monkeypatch.setattr(table, "run_row", fake_row)
    record = run_table(_options(["--rows", "mnist-pixels"]))
    assert state["rows_started"] and record["provenance"]["git"]["sha"] == "before"


@pytest.mark.data
def test_randconv_linear_kernel_row_matches_scipy_on_explicit_features(shared_data_dir, tmp_path):
    """--randconv-kernel linear (+ bias / pool options) == scipy on the standardized feature matrix."""
    from kernelfit.data import load_dataset
    from kernelfit.features.randconv import RandConvConfig, RandConvFeatures

    common = ["--rows", "cifar-randconv", "--n-train-cifar", "120", "--n-test", "60", "--filters", "30",
              "--filter-block", "7", "--randconv-bias", "0.5", "--randconv-pool-grid", "2",
              "--randconv-zca-eps", "0.3", "--randconv-kernel", "linear", "--data-dir", str(shared_data_dir),
              "--out-dir", str(tmp_path),
              "--no-random-labels", "--cache-dir", str(tmp_path / "cache"), "--lambdas", "0", "0.01"]
    main(common + ["--tag", "lin"])
    main(common + ["--tag", "lin_panels", "--eigh-max-n", "50"])
    rows = [json.loads((tmp_path / f"table_{t}.json").read_text())["rows"][0] for t in ("lin", "lin_panels")]
    ds = load_dataset("cifar10", data_dir=shared_data_dir).subset(120, 60, seed=0)
    fmap = RandConvFeatures(RandConvConfig(n_filters=30, filters="patches", bias=0.5, pool_grid=2, zca_eps=0.3,
                                          seed=0))
    fmap.fit(ds.x_train)
    Ftr = fmap.transform(ds.x_train).astype(np.float64)
    Fte = fmap.transform(ds.x_test).astype(np.float64)
    mu, sd = Ftr.mean(0), Ftr.std(0)
    keep = sd > 1e-8 * sd.max()
    Ztr = np.where(keep, (Ftr - mu) / np.where(keep, sd, 1.0), 0.0)
    Zte = np.where(keep, (Fte - mu) / np.where(keep, sd, 1.0), 0.0)
    D = Ftr.shape[1]
    K, Kt = (Ztr @ Ztr.T + 1.0) / D, (Zte @ Ztr.T + 1.0) / D
    Y = np.eye(10)[ds.y_train]
    alpha = scipy.linalg.solve(K, Y, assume_a="pos")
    err = np.mean(np.argmax(Kt @ alpha, 1) != ds.y_test)
    for row in rows:
        assert row["kernel"].startswith("linear") and row["bandwidth"] is None
        assert row["features"]["bias"] == 0.5 and row["features"]["pool_grid"] == 2
        assert row["features"]["zca_eps"] == 0.3
        assert row["features"]["kernel_on_features"] == "linear" and row["features"]["n_features"] == D == 240
        it = row["results"]["true"]["interp"]
        assert it["test_error"] == pytest.approx(err) and it["train_error"] == 0.0
        assert it["norm"] == pytest.approx(np.sqrt(np.sum(alpha * Y)), rel=1e-4)
    assert "| linear |" in (tmp_path / "table_lin.md").read_text()
    # another bias is another feature map: its Gram is not taken from the cache
    i = common.index("--randconv-bias") + 1
    main(common[:i] + ["0.25"] + common[i + 1:] + ["--tag", "lin_b025"])
    other = json.loads((tmp_path / "table_lin_b025.json").read_text())["rows"][0]
    assert not other["gram_cache"]["hit"] and other["gram_cache"]["key"] != rows[0]["gram_cache"]["key"]


def test_median_distance_from_gram_equals_the_distance_matrix_route():
    """The linear row reads the median off the Gram without building n x n distances: same sample, same value."""
    from scipy.spatial.distance import pdist

    from kernelfit.gram import sampled_sqd_from_gram
    from kernelfit.kernels import median_of_pairs
    from kernelfit.linalg.panels import SymmetricPanels
    from kernelfit.table import _median_distance_from_sqd

    def _median_distance_from_gram(G, diag, max_points, seed=0):
        return median_of_pairs(sampled_sqd_from_gram(G, diag, max_points, seed))

    X = np.random.default_rng(3).standard_normal((300, 7))
    G = X @ X.T
    D = np.maximum(np.diag(G)[:, None] + np.diag(G)[None, :] - 2 * G, 0.0)
    assert _median_distance_from_gram(G, np.diag(G).copy(), max_points=120, seed=5) == pytest.approx(
        _median_distance_from_sqd(D, max_points=120, seed=5), rel=1e-12)
    assert _median_distance_from_gram(G, np.diag(G).copy(), max_points=1000) == pytest.approx(
        np.median(pdist(X)), rel=1e-9)
    # the panels path (large n) reads the same sample out of panel storage
    panels = SymmetricPanels.from_dense(G, 64)
    assert _median_distance_from_gram(panels, np.diag(G).copy(), max_points=120, seed=5) == pytest.approx(
        _median_distance_from_sqd(D, max_points=120, seed=5), rel=1e-12)


def test_table_output_named_after_rows_and_refused_before_work_when_it_exists(tmp_path, monkeypatch):
    from kernelfit.table import default_tag, output_paths

    args = _options(["--rows", "mnist-pixels,cifar-randconv", "--n-train-mnist", "300",
                                      "--n-train-cifar", "200", "--filters", "16", "--out-dir", str(tmp_path)])
    assert default_tag(args) == "mnist-pixels-cifar-randconv_mnist300_cifar200_f16"
    monkeypatch.chdir(tmp_path)
    here = _options(["--rows", "mnist-pixels"])
    assert output_paths(here)[0] == Path("table_mnist-pixels_mnist" + str(here.n_train_mnist) + ".json")
    json_path, _ = output_paths(args)
    json_path.write_text("{}")
    # main refuses before any row runs (no data dir is given: running a row would fail differently)
    with pytest.raises(InputError, match="--overwrite"):
        write_table(_options(["--rows", "mnist-pixels,cifar-randconv", "--n-train-mnist", "300", "--n-test", "10",
                              "--n-train-cifar", "200", "--filters", "16", "--out-dir", str(tmp_path),
                              "--data-dir", str(tmp_path / "missing")]))
    assert json_path.read_text() == "{}"
    assert output_paths(_options(
        ["--rows", "mnist-pixels,cifar-randconv", "--n-train-mnist", "300", "--n-train-cifar", "200",
         "--filters", "16", "--out-dir", str(tmp_path), "--overwrite"]))[0] == json_path


def test_table_rows_on_a_users_npz_match_scipy(tmp_path):
    """--mnist-data FILE.npz: the mnist-* rows run on the user's 8x8 images, values as stored."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (80, 8, 8)).astype(np.uint8)
    xt = rng.integers(0, 256, (30, 8, 8)).astype(np.uint8)
    y, yt = rng.integers(0, 4, 80), rng.integers(0, 4, 30)
    np.savez(tmp_path / "mine.npz", x_train=x, y_train=y, x_test=xt, y_test=yt)
    argv = ["--rows", "mnist-pixels", "--mnist-data", str(tmp_path / "mine.npz"), "--n-train-mnist", "80",
            "--n-test", "30", "--bandwidth-mnist-pixels", "300", "--no-random-labels", "--lambdas", "0",
            "--out-dir", str(tmp_path), "--tag", "u", "--cache-dir", str(tmp_path / "cache")]
    assert main(argv) == 0
    row = json.loads((tmp_path / "table_u.json").read_text())["rows"][0]
    assert row["dataset"] == str(tmp_path / "mine.npz") and row["data"]["x_train"]["shape"] == [80, 8, 8]
    X, Xt = x.reshape(80, -1).astype(float), xt.reshape(30, -1).astype(float)
    K = np.exp(-cdist(X, X, "sqeuclidean") / (2 * 300.0**2))
    alpha = scipy.linalg.solve(K, np.eye(4)[y], assume_a="pos")
    err = np.mean(np.argmax(np.exp(-cdist(Xt, X, "sqeuclidean") / (2 * 300.0**2)) @ alpha, 1) != yt)
    assert row["results"]["true"]["interp"]["test_error"] == pytest.approx(err)
