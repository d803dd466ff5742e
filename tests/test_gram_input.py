"""Precomputed Gram matrices: reading (npy memory map, HDF5, zarr), the checks before the solve, and
the solve against scipy's dense Cholesky on a kernel kernelfit does not have (arc-cosine)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg

from kernelfit.cli import main
from kernelfit.data.gram import (
    check_gram,
    check_test_gram,
    gram_matmul,
    read_gram_panels,
)
from kernelfit.data.rows import find_duplicate_rows
from kernelfit.errors import InputError, NotPositiveDefiniteError
from kernelfit.experiment import run_gram_interpolation
from kernelfit.linalg.options import FactorOptions
from kernelfit.solve import SolveOptions, fit_precomputed

REPO_ROOT = Path(__file__).resolve().parent.parent


def arccos1(A, B):
    """Arc-cosine kernel of order 1 (Cho & Saul 2009): |a||b|/pi (sin t + (pi - t) cos t)."""
    na = np.linalg.norm(A, axis=1)[:, None]
    nb = np.linalg.norm(B, axis=1)[None, :]
    c = np.clip(A @ B.T / (na * nb), -1.0, 1.0)
    t = np.arccos(c)
    return na * nb / np.pi * (np.sin(t) + (np.pi - t) * c)


@pytest.fixture(scope="module")
def problem(tmp_path_factory):
    rng = np.random.default_rng(0)
    n, m, d = 1500, 200, 12
    X, Xt = rng.standard_normal((n, d)), rng.standard_normal((m, d))
    G = arccos1(X, X)
    G = (G + G.T) / 2            # the formula is symmetric only up to rounding
    Kt = arccos1(Xt, X)
    Y = np.stack([np.sin(X[:, 0]), X[:, 1] * X[:, 2]], axis=1)
    Yt = np.stack([np.sin(Xt[:, 0]), Xt[:, 1] * Xt[:, 2]], axis=1)
    d = tmp_path_factory.mktemp("gram")
    np.save(d / "G.npy", G)
    np.save(d / "Kt.npy", Kt)
    np.save(d / "Y.npy", Y)
    np.save(d / "Yt.npy", Yt)
    return {"G": G, "Kt": Kt, "Y": Y, "Yt": Yt, "dir": d}


def test_gram_solve_matches_scipy_cho_solve_on_arccos_kernel(problem):
    G, Y = problem["G"], problem["Y"]
    ref = scipy.linalg.cho_solve(scipy.linalg.cho_factor(G, lower=True), Y)
    cond = np.linalg.cond(G)
    model = fit_precomputed(str(problem["dir"] / "G.npy"), Y, SolveOptions(mode="float64",
                                                                           placement=FactorOptions(block_size=256)))
    # forward error of a backward-stable solve: ~ cond(G) eps relative to |alpha|
    tol = 100 * cond * np.finfo(np.float64).eps * np.abs(ref).max()
    np.testing.assert_allclose(model.alpha, ref, rtol=0, atol=tol)
    # the residual is recomputed from the file in float64: compare with the dense product
    np.testing.assert_allclose(model.train_scores, G @ model.alpha, rtol=0, atol=1e-9 * np.abs(Y).max())
    np.testing.assert_allclose(model.predict(problem["Kt"]), problem["Kt"] @ ref, rtol=0,
                               atol=tol * np.abs(problem["Kt"]).sum(axis=1).max())
    assert model.stats["gram"]["checks"]["duplicate_rows_checked"]
    assert model.rkhs_norm == pytest.approx(np.sqrt(np.sum(ref * Y)), rel=1e-6)


def test_gram_float32_mode_has_float32_accuracy(problem):
    G, Y = problem["G"], problem["Y"]
    ref = scipy.linalg.cho_solve(scipy.linalg.cho_factor(G, lower=True), Y)
    model = fit_precomputed(G.astype(np.float32), Y, SolveOptions(mode="float32"))
    err = np.abs(model.alpha - ref).max() / np.abs(ref).max()
    assert err < 100 * np.linalg.cond(G) * np.finfo(np.float32).eps
    assert model.stats["factor_dtype"] == "float32"


def test_gram_readers_hdf5_and_zarr_of_odd_chunking_give_the_same_panels(problem, tmp_path):
    h5py = pytest.importorskip("h5py")
    zarr = pytest.importorskip("zarr")
    G = problem["G"][:300, :300]
    with h5py.File(tmp_path / "g.h5", "w") as f:
        f.create_dataset("grams/train", data=G, chunks=(7, 300))
    z = zarr.open(str(tmp_path / "g.zarr"), mode="w", shape=G.shape, chunks=(97, 13), dtype="f8")
    z[...] = G
    from kernelfit.data.gram import open_gram

    ref = read_gram_panels(G, np.float64, 64).to_dense()
    for spec in (tmp_path / "g.h5", f"{tmp_path / 'g.h5'}:/grams/train", f"{tmp_path / 'g.zarr'}",
                 str(tmp_path / "g.npy")):
        if str(spec).endswith("g.npy"):
            np.save(spec, G)
        P = read_gram_panels(open_gram(str(spec)), np.float64, 64)
        np.testing.assert_array_equal(P.to_dense(), ref)
    np.testing.assert_array_equal(ref, G)   # lower triangle mirrored: the symmetric input comes back


def test_memory_mapped_read_never_copies_the_matrix(problem, tmp_path):
    # panels are filled from the map tile by tile: the source stays a memmap, never an ndarray copy
    from kernelfit.data.gram import open_gram

    Gm = open_gram(str(problem["dir"] / "G.npy"))
    assert isinstance(Gm, np.memmap)
    P = read_gram_panels(Gm, np.float64, 256)
    assert not any(np.shares_memory(p, Gm) for p in P.panels)
    np.testing.assert_allclose(gram_matmul(Gm, problem["Y"]), problem["G"] @ problem["Y"], rtol=1e-12, atol=1e-10)


def _good(n=40, seed=1):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, 3))
    return np.exp(-((X[:, None] - X[None]) ** 2).sum(-1) / 2)


def test_not_square():
    with pytest.raises(InputError, match=r"square n x n.*got shape \(40, 39\).*--gram-test"):
        check_gram(_good()[:, :39])


def test_not_symmetric_message_states_tolerance():
    G = _good()
    G[35, 2] += 1e-3           # lower triangle edited, the upper not: the sampled corner tile sees it
    with pytest.raises(InputError, match=r"not symmetric: G\[(35, 2|2, 35)\].*tolerance 1e-06 x max\|diagonal\|"):
        check_gram(G)
    G = _good()
    G[35, 2] += 1e-9           # rounding-level asymmetry is accepted
    check_gram(G)


@pytest.mark.parametrize("where,value,match", [
    ((5, 5), np.nan, r"diagonal holds NaN or inf \(first at G\[5, 5\]"),
    ((7, 7), 0.0, r"non-positive diagonal entry G\[7, 7\] = 0"),
    ((9, 9), -2.0, r"non-positive diagonal entry G\[9, 9\] = -2"),
])
def test_bad_diagonal(where, value, match):
    G = _good()
    G[where] = value
    with pytest.raises(InputError, match=match):
        check_gram(G)


def test_nan_off_diagonal_is_found_before_the_factorization():
    G = _good(n=300)
    G[250, 100] = np.inf      # the lower triangle, which the panels read
    with pytest.raises(InputError, match=r"G\[250, 100\] = inf is not finite"):
        fit_precomputed(G, np.ones(300), SolveOptions(mode="float64", placement=FactorOptions(block_size=64)))


def test_not_positive_definite_names_the_leading_minor():
    G = _good(n=50)
    G[30, 30] = 1e-3          # positive diagonal, symmetric, but the 31st leading minor is negative
    with pytest.raises(NotPositiveDefiniteError) as exc:
        fit_precomputed(G, np.ones(50), SolveOptions(mode="float64", placement=FactorOptions(block_size=16)))
    # independent reference: the first leading minor with a negative determinant
    minors = [np.linalg.slogdet(G[:k, :k]) for k in range(1, 51)]
    first = next(k for k, (sign, _) in enumerate(minors, start=1) if sign <= 0)
    assert exc.value.minor == first


def test_test_gram_with_wrong_column_count():
    check_test_gram(np.zeros((5, 40)), 40)
    with pytest.raises(InputError, match=r"--gram-test: the test Gram has 5 columns but the training Gram has n = 40.*transpose"):
        check_test_gram(np.zeros((40, 5)), 40)
    with pytest.raises(InputError, match="0 rows"):
        check_test_gram(np.zeros((0, 40)), 40)


def test_duplicate_training_rows_found_before_factorization(monkeypatch):
    rng = np.random.default_rng(3)
    X = rng.standard_normal((200, 4))
    X[150] = X[17]
    G = np.exp(-((X[:, None] - X[None]) ** 2).sum(-1) / 2)

    def no_factorization(*a, **k):
        raise AssertionError("the factorization ran before the duplicate check")

    monkeypatch.setattr("kernelfit.solve.factor_panels", no_factorization)
    y = np.where(np.arange(200) == 150, 1.0, 0.0)   # labels differ too: no factorization may run
    with pytest.raises(InputError, match=r"rows 17 and 150 of the Gram matrix are equal.*--jitter"):
        fit_precomputed(G, y, SolveOptions(mode="float64"))
    monkeypatch.undo()
    model = fit_precomputed(G, y, SolveOptions(mode="float64", jitter=1e-6))   # a ridge makes it solvable
    ref = np.linalg.solve(G + 1e-6 * np.eye(200), y)
    np.testing.assert_allclose(model.alpha[:, 0], ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())


def test_find_duplicate_rows_hashing():
    rng = np.random.default_rng(4)
    A = rng.standard_normal((500, 30))
    assert find_duplicate_rows(A) is None
    B = A.copy()
    B[400] = B[12]
    B[400, 3] = -0.0 if B[12, 3] == 0 else B[400, 3]
    B[12, 5] = 0.0
    B[400, 5] = -0.0           # equal as numbers: still a duplicate
    B[499] = B[12]
    B[499, 5] = 0.0
    dup = find_duplicate_rows(B)
    assert (dup.first, dup.second, dup.count) == (12, 400, 2)
    # hashes from the caller's own pass give the same answer without a second read
    from kernelfit.data.rows import row_hashes

    dup2 = find_duplicate_rows(B, hashes=row_hashes(B))
    assert (dup2.first, dup2.second, dup2.count) == (12, 400, 2)
    # equal hashes but unequal rows (a collision) are not reported
    assert find_duplicate_rows(A, hashes=np.zeros(500, dtype=np.uint64)) is None


def test_nan_in_the_upper_triangle_is_found_too():
    # the panels read only the lower triangle, but the float64 residual G @ alpha reads whole rows
    G = _good(n=300)
    G[100, 250] = np.nan
    with pytest.raises(InputError, match=r"G\[100, 250\] = nan is not finite"):
        check_gram(G)


def test_run_gram_interpolation_record(problem):
    d = problem["dir"]
    rec = run_gram_interpolation(str(d / "G.npy"), {"true": problem["Y"]}, str(d / "Kt.npy"), problem["Yt"], None,
                                 SolveOptions(mode="float64"), task="regression")
    assert rec["options"]["kernel"] == "precomputed" and rec["task"] == "regression"
    g = rec["stats"]["gram"]
    assert g["shape"] == [1500, 1500] and g["dtype"] == "float64" and len(g["sha256"]) == 64
    ref = scipy.linalg.cho_solve(scipy.linalg.cho_factor(problem["G"], lower=True), problem["Y"])
    pred = problem["Kt"] @ ref
    rmse = float(np.sqrt(np.mean((pred - problem["Yt"]) ** 2)))
    assert rec["results"]["true"]["test_rmse"] == pytest.approx(rmse, rel=1e-6)
    assert rec["results"]["true"]["train_rmse"] < 1e-8
    with pytest.raises(InputError, match="mixed.*no kernel function"):
        run_gram_interpolation(problem["G"], {"true": problem["Y"]}, None, None, None, SolveOptions(mode="mixed"))


def test_cli_gram_classification_and_bad_usage(problem, tmp_path, capsys):
    d = problem["dir"]
    y = (problem["Y"][:, 0] > 0).astype(np.int64)
    yt = (problem["Yt"][:, 0] > 0).astype(np.int64)
    np.save(tmp_path / "y.npy", y)
    np.save(tmp_path / "yt.npy", yt)
    out = tmp_path / "r.json"
    rc = main(["solve", "--gram", str(d / "G.npy"), "--y-train", str(tmp_path / "y.npy"), "--gram-test",
               str(d / "Kt.npy"), "--y-test", str(tmp_path / "yt.npy"), "--out", str(out), "--no-progress"])
    assert rc == 0
    rec = json.loads(out.read_text())
    ref = scipy.linalg.cho_solve(scipy.linalg.cho_factor(problem["G"], lower=True), np.eye(2)[y])
    err = float(np.mean(np.argmax(problem["Kt"] @ ref, axis=1) != yt))
    assert rec["results"]["true"]["test_error"] == pytest.approx(err)
    assert rec["stats"]["mode"] == "float64" and rec["num_classes"] == 2
    for argv, needle in [
        (["--mode", "mixed"], "needs the kernel function"),
        (["--n-train", "10"], "--n-train does not apply to --gram"),
        (["--variant", "random-labels"], "--variant does not apply"),
    ]:
        with pytest.raises(SystemExit) as exc:
            main(["solve", "--gram", str(d / "G.npy"), "--y-train", str(tmp_path / "y.npy"), *argv])
        assert exc.value.code == 2 and needle in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["solve", "--gram", str(d / "G.npy")])
    assert "--gram needs --y-train" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["solve", "--gram-test", str(d / "Kt.npy")])
    assert "--gram-test goes with --gram" in capsys.readouterr().err
    # a test Gram given the wrong way round: a clear error, exit 1, before the solve
    np.save(tmp_path / "KtT.npy", problem["Kt"].T)
    rc = main(["solve", "--gram", str(d / "G.npy"), "--y-train", str(tmp_path / "y.npy"), "--gram-test",
               str(tmp_path / "KtT.npy"), "--y-test", str(tmp_path / "yt.npy"), "--no-progress"])
    assert rc == 1 and "the test Gram has 200 columns but the training Gram has n = 1500" in capsys.readouterr().err


_RSS_SCRIPT = r"""
import json, sys
import numpy as np
from kernelfit.linalg.panels import SymmetricPanels, choose_block
from kernelfit.linalg.options import FactorOptions
from kernelfit.solve import SolveOptions, fit_precomputed


def vm_hwm():   # this process's own peak RSS (ru_maxrss would include the forking parent's RSS)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


path, n = sys.argv[1], int(sys.argv[2])
Y = np.random.default_rng(0).standard_normal((n, 2))
baseline = vm_hwm()          # interpreter + numpy + scipy + kernelfit, before the Gram is touched
model = fit_precomputed(path, Y, SolveOptions(mode="float64"))
print(json.dumps({"baseline": baseline, "peak": vm_hwm(),
                  "panel_bytes": SymmetricPanels.nbytes_for(n, choose_block(n), np.float64),
                  "residual": model.stats["residual_relative"]}))
"""


@pytest.mark.slow   # writes a 512 MB Gram and factors n = 8,000 (~10-30 s on 2 cores)
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc (Linux)")
def test_peak_rss_of_memory_mapped_gram_solve_stays_near_the_panels(tmp_path):
    """The solve's memory above the imported libraries stays <= 1.3x the panel bytes: one copy of the lower
    triangle, never the file on top (the 512 MB map is read in blocks whose pages are released)."""
    n = 8000
    rng = np.random.default_rng(0)
    X = rng.standard_normal((n, 20))
    sq = (X**2).sum(1)
    G = np.lib.format.open_memmap(tmp_path / "G.npy", mode="w+", dtype=np.float64, shape=(n, n))
    for a in range(0, n, 500):     # written in row blocks: the parent never holds the matrix either
        G[a:a + 500] = np.exp(-np.maximum(sq[a:a + 500, None] + sq[None] - 2 * X[a:a + 500] @ X.T, 0) / 40.0)
        G[a:a + 500, a:a + 500] = (G[a:a + 500, a:a + 500] + G[a:a + 500, a:a + 500].T) / 2
    G.flush()
    del G
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(tmp_path / "G.npy"), str(n)], capture_output=True,
                         text=True, env=env, timeout=600, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["residual"] < 1e-6
    grown = res["peak"] - res["baseline"]
    assert grown <= 1.3 * res["panel_bytes"], res
    assert res["peak"] < 1.5 * res["panel_bytes"] + 128 * 2**20, res   # and no second copy anywhere


def test_memory_refusal_from_the_header_before_any_pass(tmp_path, monkeypatch):
    from kernelfit.errors import MemoryPlanError

    np.lib.format.open_memmap(tmp_path / "big.npy", mode="w+", dtype=np.float64, shape=(4000, 4000)).flush()
    monkeypatch.setattr("kernelfit.planning.available_bytes", lambda: 64 * 2**20)

    def no_pass(*a, **k):
        raise AssertionError("the Gram was read before the memory plan refused it")

    monkeypatch.setattr("kernelfit.data.gram.check_gram", no_pass)
    with pytest.raises(MemoryPlanError, match="would not fit"):
        fit_precomputed(str(tmp_path / "big.npy"), np.ones(4000), SolveOptions(mode="float64"))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_test_gram_is_refused_before_the_solve(problem, tmp_path, monkeypatch, bad):
    Kt = problem["Kt"].copy()
    Kt[137, :] = np.nan      # a whole NaN row was predicted as class 0 (argmax of NaN scores)
    Kt[137, 5] = bad
    np.save(tmp_path / "Kt.npy", Kt)
    import kernelfit.solve as S

    solved = []
    monkeypatch.setattr(S, "fit_precomputed", lambda *a, **k: solved.append(1))
    y = (problem["Y"][:, 0] > 0).astype(np.int64)
    with pytest.raises(InputError, match=r"--gram-test: K_test\[137, 0\] = nan is not finite \(1500 such entries "
                                         r"in rows 0\.\.199\)"):
        run_gram_interpolation(str(problem["dir"] / "G.npy"), {"true": y}, str(tmp_path / "Kt.npy"),
                               (problem["Yt"][:, 0] > 0).astype(np.int64), 2, SolveOptions(mode="float64"))
    assert solved == []
    # a single entry, found by the pass whatever its position
    Kt2 = problem["Kt"].copy()
    Kt2[199, 1499] = bad
    with pytest.raises(InputError, match=rf"K_test\[199, 1499\] = {bad} is not finite \(1 such entries"):
        check_test_gram(Kt2, 1500)


def test_predict_and_matmul_check_every_block_they_read(problem):
    model = fit_precomputed(problem["G"][:300, :300], problem["Y"][:300], SolveOptions(mode="float64"))
    Kt = problem["Kt"][:, :300].copy()
    Kt[42, 7] = np.nan
    with pytest.raises(InputError, match=r"K_test\[42, 7\] = nan is not finite"):
        model.predict(Kt)
    with pytest.raises(InputError, match=r"G\[42, 7\] = nan is not finite"):
        gram_matmul(Kt, np.ones((300, 1)), rows=16)
    np.testing.assert_allclose(gram_matmul(problem["Kt"][:, :300], np.eye(300)[:, :3]), problem["Kt"][:, :3],
                               rtol=0, atol=0)
