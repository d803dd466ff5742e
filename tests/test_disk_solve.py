"""kernelfit.disk_solve: the kernel solve with the Gram on disk, against scipy's dense float64 solve."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from kernelfit.disk_solve import solve_gram_file_on_disk, solve_on_disk
from kernelfit.errors import StorageError
from kernelfit.linalg.panels import SymmetricPanels

N, SIGMA, JITTER = 2500, 2.0, 1e-2    # cond(K + jitter I) ~ 1e5: float32 refinement converges in a few steps


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(3)
    X = rng.standard_normal((N, 4)) + 10.0          # off the origin: the solve centers the points
    y = rng.integers(0, 3, N)
    Y = np.eye(3)[y]
    d = ((X[:, None, :] - X[None, :, :]) ** 2).sum(-1)
    K = np.exp(-d / (2 * SIGMA**2))
    alpha = scipy.linalg.cho_solve(scipy.linalg.cho_factor(K + JITTER * np.eye(N), lower=True), Y)
    return X, Y, K, alpha


def budget():
    return SymmetricPanels.nbytes_for(N, 512, np.float32) // 4


def test_solve_on_disk_matches_scipy_and_removes_its_store(tmp_path, problem):
    X, Y, K, ref = problem
    alpha, stats = solve_on_disk(X, Y, kernel="gaussian", bandwidth=SIGMA, scratch_dir=tmp_path / "s",
                                 memory_budget=budget(), jitter=JITTER)
    assert np.linalg.norm(alpha - ref) <= 1e-8 * np.linalg.norm(ref)
    assert np.array_equal(np.argmax(K @ alpha + JITTER * alpha, 1), np.argmax(Y, 1))   # interpolates the classes
    assert stats["strategy"] == "disk" and stats["slabs"] >= 4 and stats["factor_dtype"] == "float32"
    assert stats["bytes_read"] > 0 and stats["bytes_written"] > 0 and stats["io_wait_s"] >= 0
    # as good as float64 gets here: backward stable, a residual no larger than scipy's float64 solve's
    assert stats["refinement"]["backward_stable"]
    Kj = K + JITTER * np.eye(N)
    assert np.linalg.norm(Y - Kj @ alpha) <= 2 * np.linalg.norm(Y - Kj @ ref)
    assert not (tmp_path / "s").exists()


def test_gram_file_on_disk_matches_scipy(tmp_path, problem):
    X, Y, K, ref = problem
    np.save(tmp_path / "K.npy", K)
    alpha, stats = solve_gram_file_on_disk(tmp_path / "K.npy", Y, scratch_dir=tmp_path / "s",
                                           memory_budget=budget(), jitter=JITTER, rows=300)
    assert np.linalg.norm(alpha - ref) <= 1e-8 * np.linalg.norm(ref)
    assert "K.npy" in stats["residual_source"]


def test_full_disk_then_resume_finishes_the_same_solve(tmp_path, problem, full_disk_at):
    X, Y, K, ref = problem
    free_space = full_disk_at(6)
    kw = dict(kernel="gaussian", bandwidth=SIGMA, scratch_dir=tmp_path / "s", memory_budget=budget(), jitter=JITTER)
    with pytest.raises(StorageError, match="resume=True"):
        solve_on_disk(X, Y, **kw)
    assert (tmp_path / "s" / "manifest.json").is_file()
    free_space()
    alpha, stats = solve_on_disk(X, Y, resume=True, **kw)
    assert stats["resumed"]["finished_panels"] > 0
    assert np.linalg.norm(alpha - ref) <= 1e-8 * np.linalg.norm(ref)
