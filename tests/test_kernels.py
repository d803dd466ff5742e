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


# --- one Kernel object per kind -------------------------------------------------------------

CLOSED_FORM = {"gaussian": lambda d2, s: np.exp(-d2 / (2 * s * s)), "laplacian": lambda d2, s: np.exp(-np.sqrt(d2) / s)}


def test_kernels_registry_is_keyed_by_the_catalog_and_check_kernel_returns_the_kernel():
    from kernelfit import catalog
    from kernelfit.kernels import KERNELS, Kernel, check_kernel

    assert tuple(KERNELS) == catalog.KERNELS and set(CLOSED_FORM) == set(catalog.KERNELS)
    for name in catalog.KERNELS:
        k = check_kernel(name)
        assert isinstance(k, Kernel) and k.name == name and k is KERNELS[name]
    for bad in ("rbf", None, ["gaussian"]):
        with pytest.raises(InputError, match="unknown kernel .* expected one of gaussian, laplacian"):
            check_kernel(bad)


def test_a_catalog_kernel_without_a_kernel_object_fails_at_import(monkeypatch):
    from kernelfit import catalog, kernels

    monkeypatch.setattr(catalog, "KERNELS", (*catalog.KERNELS, "cauchy"))
    with pytest.raises(ImportError, match=r"names \['cauchy'\] but kernelfit.kernels defines no Kernel"):
        kernels._registry()


@pytest.mark.parametrize("name", ["gaussian", "laplacian"])
def test_each_kernel_method_matches_the_closed_form(points, name):
    from kernelfit.grid import find_integer_grid
    from kernelfit.kernels import KERNELS

    k, s = KERNELS[name], 1.7
    X, Z = points
    d2 = cdist(X, Z, "sqeuclidean")
    ref = CLOSED_FORM[name](d2, s)
    block = d2.copy()
    k.apply_inplace(block, s)
    np.testing.assert_allclose(block, ref, rtol=1e-12)
    out = np.empty_like(d2)
    k.tile_into(out, X, Z, (X * X).sum(1), (Z * Z).sum(1), s)
    np.testing.assert_allclose(out, ref, rtol=1e-10)
    np.testing.assert_allclose(np.exp(-k.exponent(d2, s)), ref, rtol=1e-12)
    # grid finish: from 2 s' q.p - s' |q|^2 - s' |p|^2 of integer levels q, p (points = step * q)
    rng = np.random.default_rng(3)
    P = rng.integers(0, 256, (9, 5)) / 255.0
    P[0, 0] = 1 / 255.0   # level 1 present: the grid's step is 1 / 255
    g = find_integer_grid(P)
    q = g.Q.astype(np.float64)
    sc = k.grid_scale(g.step, s)
    o = 2 * sc * (q @ q.T) - sc * g.sq[:, None] - sc * g.sq[None, :]
    k.grid_finish(o, g.step, s)
    np.testing.assert_allclose(o, CLOSED_FORM[name](cdist(P, P, "sqeuclidean"), s), rtol=1e-12, atol=1e-15)
    torch = pytest.importorskip("torch")
    t = torch.from_numpy(d2.copy())
    k.torch_apply_(t, s)
    np.testing.assert_allclose(t.numpy(), ref, rtol=1e-12)


def test_no_kernel_branches_outside_kernels_py():
    # a comparison of a kernel name with "gaussian" / "laplacian" is a kernel branch (in an if, or kept in
    # a flag for later): it belongs to a Kernel method (kernelfit.kernels), not to the code using the kernel
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    # not a branch: random-conv solves take their kernel from --randconv-kernel and refuse a changed --kernel
    allowed = {("kernelfit/cli/randconv.py", "args.kernel != 'gaussian'")}
    found = []
    for path in sorted((root / "kernelfit").rglob("*.py")):
        if path.relative_to(root).parts[1] == "kernels.py":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare):
                names = {p.value for p in [node.left, *node.comparators] if isinstance(p, ast.Constant)}
                if names & {"gaussian", "laplacian"} and "kernel" in ast.unparse(node) \
                        and (path.relative_to(root).as_posix(), ast.unparse(node)) not in allowed:
                    found.append(f"{path.relative_to(root)}:{node.lineno}: {ast.unparse(node)}")
    assert not found, "\n".join(found)
