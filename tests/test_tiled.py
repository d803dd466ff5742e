import numpy as np
import pytest
import scipy.linalg

from kernelfit.errors import InputError, NotPositiveDefiniteError
from kernelfit.linalg.panels import SymmetricPanels
from kernelfit.linalg.tiled import cho_solve, cholesky_inplace, logdet


def spd(n, dtype, seed=0, cond=1e3):
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    A = (Q * np.geomspace(1.0, 1.0 / cond, n)) @ Q.T
    return ((A + A.T) / 2).astype(dtype)


TOL = {np.float64: 1e-12, np.float32: 2e-5}


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("n,block", [(1, 4), (5, 16), (64, 16), (100, 32), (101, 32), (257, 64), (300, 7)])
def test_tiled_cholesky_matches_lapack(dtype, n, block):
    A = spd(n, dtype, seed=n)
    ref = scipy.linalg.cholesky(A.astype(np.float64), lower=True)
    P = SymmetricPanels.from_dense(A, block)
    cholesky_inplace(P)
    L = P.to_dense(symmetric=False)
    assert np.allclose(np.triu(L, 1), 0)
    np.testing.assert_allclose(L, ref, rtol=0, atol=TOL[dtype] * np.abs(ref).max() * 10)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_cho_solve_matches_scipy(dtype):
    A = spd(150, dtype, seed=3)
    B = np.random.default_rng(4).standard_normal((150, 4)).astype(dtype)
    P = SymmetricPanels.from_dense(A, 40)
    cholesky_inplace(P)
    X = cho_solve(P, B)
    ref = scipy.linalg.cho_solve(scipy.linalg.cho_factor(A.astype(np.float64), lower=True), B.astype(np.float64))
    np.testing.assert_allclose(X, ref, rtol=0, atol=TOL[dtype] * 1e3 * np.abs(ref).max())
    assert logdet(P) == pytest.approx(np.linalg.slogdet(A.astype(np.float64))[1], rel=1e-4 if dtype == np.float32 else 1e-10)


def test_factorization_is_in_place():
    P = SymmetricPanels.from_dense(spd(130, np.float64), 32)
    before = [p for p in P.panels]
    ptrs = [p.ctypes.data for p in P.panels]
    cholesky_inplace(P)
    assert [p.ctypes.data for p in P.panels] == ptrs
    assert all(np.shares_memory(a, b) for a, b in zip(before, P.panels))


def test_panel_storage_is_half_the_matrix():
    n, b = 1000, 100
    P = SymmetricPanels.empty(n, b, np.float32)
    assert P.nbytes == SymmetricPanels.nbytes_for(n, b, np.float32)
    assert P.nbytes < 0.56 * n * n * 4
    A = spd(n, np.float64)
    np.testing.assert_array_equal(SymmetricPanels.from_dense(A, b).to_dense(), A)


@pytest.mark.parametrize("block", [1, 7, 40, 64])
def test_submatrix_reads_any_index_set_from_the_lower_triangle(block):
    rng = np.random.default_rng(4)
    B = rng.standard_normal((40, 40))
    A = B + B.T
    P = SymmetricPanels.from_dense(A, block)
    for Q in P.panels:   # only the lower triangle is stored: poison the rest of each diagonal tile
        w = Q.shape[1]
        Q[:w][np.triu_indices(w, 1)] = np.nan
    for idx in (rng.choice(40, 15, replace=False), np.array([39, 0, 5, 5, 22]), np.arange(40)):
        np.testing.assert_array_equal(P.submatrix(idx), A[np.ix_(idx, idx)])
    with pytest.raises(InputError, match=r"integer indices in \[0, 40\)"):
        P.submatrix(np.array([3, 40]))


def test_astype_copies_every_panel_in_the_new_dtype():
    """Panels big enough for the threaded row-block copy (>= 2^20 elements) and a small last one."""
    A = np.random.default_rng(1).standard_normal((2100, 2100))
    P = SymmetricPanels.from_dense(A + A.T, 700)
    Q = P.astype(np.float32)
    assert Q.block == P.block and all(q.dtype == np.float32 for q in Q.panels)
    for p, q in zip(P.panels, Q.panels):
        np.testing.assert_array_equal(q, p.astype(np.float32))


@pytest.mark.parametrize("block, rows", [(20, 512), (20, 7), (16, 4), (77, 5), (9, 20)])
def test_symmetric_matmul(block, rows):
    """Row blocks that split the diagonal squares (rows < block), that do not divide them, and that
    span whole panels: the same product as the dense matrix; the upper part of the diagonal
    squares is never read (filled with garbage here)."""
    A = spd(77, np.float64)
    V = np.random.default_rng(0).standard_normal((77, 3))
    P = SymmetricPanels.from_dense(A, block)
    for Pj in P.panels:
        w = Pj.shape[1]
        Pj[:w][np.triu_indices(w, 1)] = 1e6
    np.testing.assert_allclose(P.symmetric_matmul(V, rows=rows), A @ V, atol=1e-12)


def test_not_positive_definite_names_the_failing_minor():
    A = spd(60, np.float64)
    A[45, 45] = -1.0  # leading minors of order <= 45 stay positive definite
    P = SymmetricPanels.from_dense(A, 16)
    with pytest.raises(NotPositiveDefiniteError) as err:
        cholesky_inplace(P)
    assert err.value.minor == scipy.linalg.lapack.dpotrf(A, lower=1)[1] == 46
    assert "jitter" in str(err.value) and "46" in str(err.value)


def test_single_blas_thread_limits_every_blas_library_and_restores_it(blas_thread_counts):
    """Skinny triangular solves run on one BLAS thread (numpy's and scipy's OpenBLAS both); wider
    right-hand sides and the code after the block keep the threads they had."""
    from kernelfit.linalg.tiled import SKINNY_COLUMNS, single_blas_thread

    blas_threads = blas_thread_counts
    before = blas_threads()
    assert before
    with single_blas_thread(10):
        assert blas_threads() == [1] * len(before)
    assert blas_threads() == before
    with single_blas_thread(SKINNY_COLUMNS + 1):
        assert blas_threads() == before
    with single_blas_thread(3):     # the cached controller works a second time
        assert blas_threads() == [1] * len(before)
    assert blas_threads() == before
