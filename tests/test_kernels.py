import numpy as np
import pytest
from scipy.spatial.distance import cdist

from kernelfit.errors import InputError
from kernelfit.gram import KernelOperator, build_gram_panels
from kernelfit.kernels import gaussian_kernel, laplacian_kernel, median_bandwidth, squared_distances


@pytest.fixture
def points():
    rng = np.random.default_rng(0)
    return rng.standard_normal((53, 7)), rng.standard_normal((31, 7))


def test_squared_distances_match_cdist_and_are_clamped(points):
    X, Z = points
    np.testing.assert_allclose(squared_distances(X, Z), cdist(X, Z, "sqeuclidean"), rtol=1e-12, atol=1e-12)
    D = squared_distances(X, X)  # duplicates: expansion can go below 0 without the clamp
    assert D.min() >= 0.0
    big = np.full((3, 5), 1e4)
    assert squared_distances(big, big).min() == 0.0


@pytest.mark.parametrize("sigma", [0.5, 2.0, 7.0])
def test_gaussian_and_laplacian_match_closed_form(points, sigma):
    X, Z = points
    d2 = cdist(X, Z, "sqeuclidean")
    np.testing.assert_allclose(gaussian_kernel(X, Z, sigma), np.exp(-d2 / (2 * sigma**2)), rtol=1e-12)
    np.testing.assert_allclose(laplacian_kernel(X, Z, sigma), np.exp(-np.sqrt(d2) / sigma), rtol=1e-10)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), "wide", None])
def test_bad_bandwidth_rejected(points, bad):
    X, Z = points
    with pytest.raises(InputError, match="bandwidth"):
        gaussian_kernel(X, Z, bad)


def test_median_bandwidth_is_median_pairwise_distance(points):
    X, _ = points
    d = cdist(X, X)[np.triu_indices(len(X), 1)]
    assert median_bandwidth(X) == pytest.approx(np.median(d), rel=1e-12)
    with pytest.raises(InputError):
        median_bandwidth(X[:1])


@pytest.mark.parametrize("n,block", [(50, 16), (64, 64), (7, 3)])
@pytest.mark.parametrize("kernel", ["gaussian", "laplacian"])
def test_gram_panels_equal_dense_kernel(n, block, kernel):
    rng = np.random.default_rng(1)
    X = rng.standard_normal((n, 5))
    G = build_gram_panels(X, kernel, 1.7, block=block, dtype=np.float64)
    d = cdist(X, X)
    ref = np.exp(-d**2 / (2 * 1.7**2)) if kernel == "gaussian" else np.exp(-d / 1.7)
    np.testing.assert_allclose(G.to_dense(), ref, rtol=1e-12, atol=1e-14)
    assert np.all(G.diagonal() == 1.0)


def test_gram_float32_within_float32_tolerance():
    rng = np.random.default_rng(2)
    X = rng.random((300, 784))  # MNIST-like scale: pixels in [0, 1]
    G = build_gram_panels(X, "gaussian", 5.0, block=64, dtype=np.float32)
    ref = np.exp(-cdist(X, X, "sqeuclidean") / 50.0)
    assert G.dtype == np.float32
    np.testing.assert_allclose(G.to_dense(), ref, rtol=0, atol=2e-5)


def test_kernel_operator_products_match_dense():
    rng = np.random.default_rng(3)
    X, T = rng.standard_normal((97, 4)), rng.standard_normal((23, 4))
    V = rng.standard_normal((97, 3))
    op = KernelOperator(X, "gaussian", 1.3, rows=10)
    K = np.exp(-cdist(X, X, "sqeuclidean") / (2 * 1.3**2))
    np.testing.assert_allclose(op.symmetric_matmul(V), K @ V, rtol=1e-12, atol=1e-12)
    Kt = np.exp(-cdist(T, X, "sqeuclidean") / (2 * 1.3**2))
    np.testing.assert_allclose(op.matmul(T, V), Kt @ V, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("on_grid", [False, True])
@pytest.mark.parametrize("workers", [1, 2, 3])
def test_kernel_operator_tasks_match_dense_for_any_worker_count(monkeypatch, on_grid, workers):
    """Tiles side by side (``parallel_tasks``) with 1, 2 or 3 column-tile groups: float64 products of
    the dense kernel, off and on an integer grid (7 column tiles, a short last row tile)."""
    monkeypatch.setattr("kernelfit.gram.blas_threads", lambda: workers)
    rng = np.random.default_rng(11)
    X, T = rng.integers(0, 256, (130, 20)) / 255.0, rng.integers(0, 256, (45, 20)) / 255.0
    if not on_grid:
        X, T = X + rng.random(X.shape) * 1e-3, T + rng.random(T.shape) * 1e-3
    V = rng.standard_normal((130, 3))
    op = KernelOperator(X, "gaussian", 0.8, rows=16, cols=19)
    assert (op.grid is not None) == on_grid
    Kt = np.exp(-cdist(T, X, "sqeuclidean") / (2 * 0.8**2))
    np.testing.assert_allclose(op.matmul(T, V), Kt @ V, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("on_grid", [False, True])
def test_kernel_operator_rows_get_the_same_bits_whole_or_in_blocks(on_grid):
    """A row's product does not depend on how many other rows are in the call (block-wise
    predictions of a saved model equal whole ones)."""
    rng = np.random.default_rng(12)
    X, T = rng.integers(0, 256, (300, 30)) / 255.0, rng.integers(0, 256, (70, 30)) / 255.0
    if not on_grid:
        X, T = X + 1e-4, T + 1e-4 * rng.random(T.shape)
    V = rng.standard_normal((300, 10))
    op = KernelOperator(X, "gaussian", 1.1, rows=16, cols=64)
    whole = op.matmul(T, V)
    blocks = np.vstack([op.matmul(T[a : a + 32], V) for a in range(0, 70, 32)])
    np.testing.assert_array_equal(blocks, whole)
