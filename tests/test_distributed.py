"""Distributed Cholesky + solves on a local dask cluster of 2 worker processes (small n), compared with
the single-process tiled factor, LAPACK, and dask.array's own Cholesky as independent references."""

import numpy as np
import pytest
import scipy.linalg
from scipy.spatial.distance import cdist

distributed = pytest.importorskip("distributed")
da = pytest.importorskip("dask.array")

from kernelfit.errors import InputError, NotPositiveDefiniteError  # noqa: E402
from kernelfit.gram import gram_tiles  # noqa: E402
from kernelfit.linalg import distributed as kd  # noqa: E402
from kernelfit.linalg.panels import SymmetricPanels  # noqa: E402
from kernelfit.linalg.tiled import cho_solve, cholesky_inplace  # noqa: E402


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                                       silence_logs=40)
    c = distributed.Client(cluster)
    yield c
    c.close()
    cluster.close()


def gaussian_problem(n=600, d=6, seed=0, bandwidth=0.6):
    rng = np.random.default_rng(seed)
    X = rng.random((n, d))
    K = np.exp(-cdist(X, X, "sqeuclidean") / (2 * bandwidth**2)) + 1e-6 * np.eye(n)
    return X, K, rng.standard_normal((n, 3))


def test_factor_and_solve_match_single_process(client):
    X, K, B = gaussian_problem()
    G = SymmetricPanels.from_dense(K, 128)               # 5 tiles per side, last one 88 wide
    single = SymmetricPanels.from_dense(K, 128)
    cholesky_inplace(single)
    L = kd.cholesky(kd.scatter_panels(G, client=client))
    Ld = L.to_panels()
    # same tile kernels, same order of updates per tile -> agreement to rounding
    np.testing.assert_allclose(Ld.to_dense(False), single.to_dense(False), atol=1e-10)
    np.testing.assert_allclose(Ld.to_dense(False), scipy.linalg.cholesky(K, lower=True), atol=1e-8)
    Xs = kd.cho_solve(L, B)
    np.testing.assert_allclose(Xs, cho_solve(single, B), rtol=1e-7, atol=1e-7)
    assert np.abs(K @ Xs - B).max() < 1e-8
    # workers did the work: both processes hold tiles
    assert len({w for ws in client.who_has().values() for w in ws}) == 2


def test_gram_built_on_workers_and_dask_array_roundtrip(client):
    X, K, B = gaussian_problem(n=300, seed=1)
    A = gram_tiles(X, "gaussian", 0.6, block=64, client=client)
    Gd = A.to_panels()
    np.testing.assert_allclose(Gd.to_dense(), K - 1e-6 * np.eye(300), atol=1e-12)
    # dask-array input with square chunks; independent reference: dask.array.linalg.cholesky
    # (which needs n divisible by the chunk, hence n = 320 here)
    X, K, B = gaussian_problem(n=320, seed=1)
    Kd = da.from_array(K, chunks=(64, 64))
    L = kd.cholesky(kd.from_dask_array(Kd, client=client))
    ref = da.linalg.cholesky(Kd, lower=True).compute(scheduler="sync")
    np.testing.assert_allclose(L.to_dask_array().compute(), ref, atol=1e-10)
    x = kd.cho_solve(L, B[:, 0])
    assert x.shape == (320,) and np.abs(K @ x - B[:, 0]).max() < 1e-8


def test_errors(client):
    with pytest.raises(InputError, match="square chunks"):
        kd.from_dask_array(da.zeros((10, 10), chunks=(5, 4)), client=client)
    K = np.eye(50)
    K[33, 33] = -1.0
    L = kd.cholesky(kd.scatter_panels(SymmetricPanels.from_dense(K, 16), client=client))
    with pytest.raises(NotPositiveDefiniteError) as exc:
        L.to_panels()
    assert exc.value.minor == 34          # global 1-based minor, as LAPACK reports it
    with pytest.raises(InputError, match="right-hand side has 7 rows"):
        kd.cho_solve(kd.cholesky(kd.scatter_panels(SymmetricPanels.from_dense(np.eye(20), 8), client=client)),
                     np.ones(7))


@pytest.mark.slow   # importing torch in two worker processes takes ~10 s on the 2-core CI machine
def test_torch_tile_backend_on_workers(client):
    pytest.importorskip("torch")
    X, K, B = gaussian_problem(n=200, seed=2)
    L = kd.cholesky(kd.scatter_panels(SymmetricPanels.from_dense(K, 64), client=client), backend="torch",
                    device="cpu")
    np.testing.assert_allclose(L.to_panels().to_dense(False), scipy.linalg.cholesky(K, lower=True), atol=1e-8)


def test_scheduler_address_option(client):
    c2 = kd.get_client(scheduler_address=client.scheduler.address)
    try:
        L = kd.cholesky(kd.scatter_panels(SymmetricPanels.from_dense(4 * np.eye(30), 8), client=c2))
        np.testing.assert_allclose(L.to_panels().to_dense(False), 2 * np.eye(30))
    finally:
        c2.close()


# --- the solve pipeline and the CLI on the cluster ----------------------------------------------

def test_fit_distributed_matches_single_process(client):
    from kernelfit.linalg.options import FactorOptions
    from kernelfit.solve import SolveOptions, fit_distributed, fit_interpolant

    rng = np.random.default_rng(7)
    X, Y = rng.random((500, 6)), rng.standard_normal((500, 2))
    for mode in ("mixed", "float64"):
        opts = SolveOptions(bandwidth=0.7, mode=mode, placement=FactorOptions(block_size=128))
        single = fit_interpolant(X, Y, opts)
        dist = fit_distributed(X, Y, opts, client)
        np.testing.assert_allclose(dist.alpha, single.alpha, rtol=1e-8, atol=1e-8 * np.abs(single.alpha).max())
        K = np.exp(-cdist(X, X, "sqeuclidean") / (2 * 0.7**2))
        assert np.abs(K @ dist.alpha - Y).max() < 1e-8          # independent residual (dense scipy K)
        assert dist.stats["factorization"]["workers"] == 2


def test_gram_file_tiles_read_on_workers(client, tmp_path):
    from kernelfit.linalg.options import FactorOptions
    from kernelfit.solve import SolveOptions, fit_precomputed

    _, K, B = gaussian_problem(n=400, seed=3)
    np.save(tmp_path / "G.npy", K)
    single = fit_precomputed(str(tmp_path / "G.npy"), B, SolveOptions(mode="float64", placement=FactorOptions(block_size=96)))
    dist = fit_precomputed(str(tmp_path / "G.npy"), B, SolveOptions(mode="float64",
                                                                    placement=FactorOptions(block_size=96)), client=client)
    np.testing.assert_allclose(dist.alpha, scipy.linalg.cho_solve(scipy.linalg.cho_factor(K), B), rtol=1e-7, atol=1e-7)
    np.testing.assert_allclose(dist.alpha, single.alpha, rtol=1e-9, atol=1e-9)
    with pytest.raises(InputError, match="pass it as a path"):
        fit_precomputed(K, B, SolveOptions(mode="float64"), client=client)


def test_cli_local_cluster_equals_single_process(tmp_path):
    import json

    from kernelfit.cli import main
    from kernelfit.model import load_model

    common = ["solve", "--n-train", "300", "--n-test", "100", "--bandwidth", "5", "--block-size", "64",
              "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "one.json"), "--save-model", str(tmp_path / "one.st")]) == 0
    assert main([*common, "--scheduler", "local:2", "--out", str(tmp_path / "two.json"),
                 "--save-model", str(tmp_path / "two.st")]) == 0
    one, two = (json.loads((tmp_path / f"{k}.json").read_text()) for k in ("one", "two"))
    assert two["cluster"]["workers"] == 2 and two["cluster"]["local"]
    assert two["stats"]["factorization"]["backend"] == "dask.distributed"
    for key in ("train_error", "test_error"):
        assert two["results"]["true"][key] == one["results"]["true"][key]
    assert two["results"]["true"]["rkhs_norm"] == pytest.approx(one["results"]["true"]["rkhs_norm"], rel=1e-9)
    a1, a2 = load_model(tmp_path / "one.st").interpolant.alpha, load_model(tmp_path / "two.st").interpolant.alpha
    np.testing.assert_allclose(a2, a1, rtol=1e-8, atol=1e-8 * np.abs(a1).max())


def test_cli_gram_on_a_running_scheduler(client, tmp_path, capsys):
    import json

    from kernelfit.cli import main

    _, K, B = gaussian_problem(n=300, seed=4)
    np.save(tmp_path / "G.npy", K)
    np.save(tmp_path / "y.npy", B[:, 0])
    argv = ["solve", "--gram", str(tmp_path / "G.npy"), "--y-train", str(tmp_path / "y.npy"), "--task", "regression",
            "--block-size", "64", "--no-progress"]
    assert main([*argv, "--scheduler", client.scheduler.address]) == 0
    rec = json.loads(capsys.readouterr().out)
    alpha = scipy.linalg.cho_solve(scipy.linalg.cho_factor(K), B[:, 0])
    assert rec["results"]["true"]["rkhs_norm"] == pytest.approx(np.sqrt(alpha @ B[:, 0]), rel=1e-8)
    assert rec["cluster"]["workers"] == 2 and not rec["cluster"]["local"]
    assert main([*argv, "--scheduler", "local:0"]) == 1
    assert "local:N with N >= 1" in capsys.readouterr().err


def test_lower_tiles_factors_whatever_tiles_it_is_handed(client):
    # linalg knows no kernels: the caller hands in the tile function (here a copy of a dense matrix's block)
    _, K, B = gaussian_problem(n=150, seed=5)
    A = kd.lower_tiles(np.array, lambda i, j, r0, r1, c0, c1: (K[r0:r1, c0:c1],), 150, 32, np.float64, client,
                       name="given")
    assert sorted(A.tiles) == [(i, j) for i in range(5) for j in range(i + 1)]
    L = kd.cholesky(A)
    np.testing.assert_allclose(L.to_panels().to_dense(False), scipy.linalg.cholesky(K, lower=True), atol=1e-10)
