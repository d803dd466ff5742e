"""Exact grid distances (kernelfit.grid) and the kernel products that use them, against brute force
integer arithmetic and the float64 GEMM path."""

import numpy as np
import pytest

from kernelfit import grid as gr
from kernelfit.gram import KernelOperator, build_gram_panels
from kernelfit.kernels import kernel_tile


def _pixels(n, d, seed=0, levels=256):
    rng = np.random.default_rng(seed)
    q = rng.integers(0, levels, size=(n, d))
    q[:, : d // 3] = 0                      # MNIST-like empty border
    q[0, 0] = 1                             # level 1 occurs: the step is 1 / (levels - 1)
    return q, q / (levels - 1.0)


def _brute_neg_sq(Qa, Qb):
    Qa = np.asarray(Qa, dtype=np.int64)
    Qb = np.asarray(Qb, dtype=np.int64)
    return -((Qa[:, None, :] - Qb[None, :, :]) ** 2).sum(-1)


def test_pixels_are_found_on_their_grid():
    q, X = _pixels(50, 30)
    g = gr.find_integer_grid(X)
    assert g is not None
    assert g.step == pytest.approx(1 / 255, rel=1e-15)
    assert g.max_level <= 128
    np.testing.assert_array_equal(g.Q.astype(np.int64), q - q.min() - int(g.shift - q.min()))


@pytest.mark.parametrize("case", ["random floats", "nudged pixels", "float32 pixels", "huge levels", "all zero"])
def test_data_off_a_usable_grid_is_refused(case):
    q, X = _pixels(40, 20)
    if case == "random floats":
        X = np.random.default_rng(1).random((40, 20))
    elif case == "nudged pixels":
        X = X.copy()
        X[3, 7] += 1e-9
    elif case == "float32 pixels":
        X = X.astype(np.float32)
    elif case == "huge levels":
        X = q * 1000.0 + np.arange(20)[None, :]   # integers, but levels far beyond float32-exact products
        X[0, 0] = 1.0
    else:
        X = np.zeros((40, 20))
    assert gr.find_integer_grid(X) is None


def test_distances_are_exact_in_one_and_several_chunks():
    q, X = _pixels(70, 784)
    g = gr.find_integer_grid(X)
    parts = gr.chunks(784, g.max_level, g.max_level)
    assert len(parts) == 1                  # 784 x 128 x 128 < 2^24
    out = np.empty((70, 70))
    gr.kernel_tile_into(out, np.empty((70, 70), np.float32), g, g, slice(0, 70), slice(0, 70), "laplacian", g.step)
    # laplacian with sigma = step: exp(-sqrt(d^2)) of the exact integer d^2
    np.testing.assert_array_equal(out, np.exp(-np.sqrt(-_brute_neg_sq(g.Q, g.Q).astype(np.float64))))
    # 12-bit levels over 3,000 features: float32 sums of one GEMM would round; the chunks keep it exact
    rng = np.random.default_rng(2)
    Q = rng.integers(-2048, 2049, size=(30, 3000)).astype(np.float64)
    parts = gr.chunks(3000, 2048, 2048)
    assert len(parts) == 1000 and all((c.stop - c.start) * 2048 * 2048 < 2**24 for c in parts)
    Q = Q[:, :40]
    parts = gr.chunks(40, 2048, 2048)
    assert len(parts) == 14
    one_gemm = Q.astype(np.float32) @ Q.astype(np.float32).T
    exact = Q.astype(np.int64) @ Q.astype(np.int64).T
    assert not np.array_equal(one_gemm.astype(np.int64), exact)      # the rounding the chunks avoid
    g = gr.IntegerGrid(1.0, 0.0, Q.astype(np.float32), np.einsum("ij,ij->i", Q, Q), 2048.0)
    out = np.empty((30, 30))
    gr.kernel_tile_into(out, np.empty((30, 30), np.float32), g, g, slice(0, 30), slice(0, 30), "laplacian", 1.0)
    np.testing.assert_array_equal(out, np.exp(-np.sqrt(-_brute_neg_sq(Q, Q).astype(np.float64))))


@pytest.mark.parametrize("kernel,bandwidth", [("gaussian", 5.0), ("gaussian", 1.5), ("laplacian", 7.0)])
def test_grid_products_match_the_float64_kernel(kernel, bandwidth):
    q, X = _pixels(300, 100, seed=3)
    _, Xt = _pixels(70, 100, seed=4)
    V = np.random.default_rng(5).standard_normal((300, 3))
    op = KernelOperator(X, kernel, bandwidth, rows=64, cols=96)
    assert op.grid is not None and "exact" in op.distances
    assert op.on_grid(Xt)
    K = kernel_tile(X, X, kernel, bandwidth)
    np.fill_diagonal(K, 1.0)
    ref = K @ V
    got = op.symmetric_matmul(V)
    assert np.abs(got - ref).max() <= 1e-13 * np.abs(ref).max()
    Kt = kernel_tile(Xt, X, kernel, bandwidth)
    np.testing.assert_allclose(op.matmul(Xt, V), Kt @ V, rtol=0, atol=1e-13 * np.abs(Kt @ V).max())
    # the grid Gram equals the float64 one
    G = build_gram_panels(X, kernel, bandwidth, block=64, dtype=np.float64, grid=op.grid).to_dense()
    assert np.abs(G - K).max() <= 1e-14


def test_predictions_match_the_float64_kernel_with_one_and_many_exact_chunks():
    """Test points on the grid: 8-bit levels (one exact float32 GEMM per tile) and 12-bit levels over
    40 features (14 chunks summed in float64), both kernels; rows and columns that do not divide
    the blocks."""
    rng = np.random.default_rng(11)
    for levels, d in ((256, 50), (4096, 40)):
        step = 1.0 / (levels - 1)
        X = rng.integers(0, levels, size=(130, d)) * step
        X[0, 0] = step                         # level 1 occurs: the detected step is the grid's
        Xt = rng.integers(0, levels, size=(45, d)) * step
        for kernel, bandwidth in (("gaussian", 1.0), ("laplacian", 3.0)):
            op = KernelOperator(X, kernel, bandwidth, rows=16, cols=50)
            Ga = op.points(Xt)[1]
            assert Ga is not None
            assert (len(gr.chunks(d, Ga.max_level, op.grid.max_level)) == 1) == (levels == 256)
            V = rng.standard_normal((130, 3))
            ref = kernel_tile(Xt, X, kernel, bandwidth) @ V
            np.testing.assert_allclose(op.matmul(Xt, V), ref, rtol=0, atol=1e-13 * np.abs(ref).max())


def test_test_points_off_the_grid_take_the_float64_path():
    _, X = _pixels(120, 40)
    Xt = np.random.default_rng(6).random((10, 40))
    op = KernelOperator(X, "gaussian", 2.0, rows=32, cols=50)
    assert not op.on_grid(Xt) and "GEMM expansion" in op.distances_for(Xt)
    V = np.ones((120, 2))
    np.testing.assert_allclose(op.matmul(Xt, V), kernel_tile(Xt, X, "gaussian", 2.0) @ V, rtol=1e-13)


def test_column_blocks_cover_the_symmetric_product_off_the_grid():
    X = np.random.default_rng(7).standard_normal((203, 9))
    V = np.random.default_rng(8).standard_normal((203, 4))
    op = KernelOperator(X, "gaussian", 1.3, rows=37, cols=29)
    assert op.grid is None
    K = kernel_tile(X, X, "gaussian", 1.3)
    np.fill_diagonal(K, 1.0)
    np.testing.assert_allclose(op.symmetric_matmul(V), K @ V, rtol=1e-12, atol=1e-12)


def test_fit_and_predict_on_a_grid_match_lapack():
    """The whole default solve on pixel-like data (exact-distance residual passes, stored float64 Gram
    from grid tiles, grid predictions) against LAPACK on the float64 kernel of the same points."""
    import scipy.linalg

    from kernelfit.solve import SolveOptions, fit_interpolant

    q, X = _pixels(400, 64, seed=9)
    _, Xt = _pixels(90, 64, seed=10)
    y = np.random.default_rng(11).integers(0, 3, 400)
    Y = np.eye(3)[y]
    for strategy in ("stored-float64-gram", "stored-grid-products", "recomputed-float64"):
        m = fit_interpolant(X, Y, SolveOptions(bandwidth=2.5, strategy=strategy))
        assert "integer grid" in m.stats["distances"] and m.stats["strategy"] == strategy
        K = kernel_tile(X, X, "gaussian", 2.5)
        np.fill_diagonal(K, 1.0)
        ref = scipy.linalg.cho_solve(scipy.linalg.cho_factor(K, lower=True), Y)
        assert np.abs(m.alpha - ref).max() <= 1e-9 * np.abs(ref).max()
        assert m.stats["residual_relative"] <= 1e-13
        scores = m.predict(Xt, argmax_groups=3)
        assert "integer grid" in m.stats["predict_scores"] and "predict_rows_recomputed_float64" not in m.stats
        np.testing.assert_allclose(scores, kernel_tile(Xt, X, "gaussian", 2.5) @ m.alpha, rtol=0,
                                   atol=1e-12 * np.abs(scores).max())
    # off the grid, the float32 tiles with their error bound
    m.predict(Xt + 1e-3, argmax_groups=3)
    assert "float32" in m.stats["predict_scores"] and "predict_rows_recomputed_float64" in m.stats


@pytest.mark.parametrize("kernel", ["gaussian", "laplacian"])
def test_stored_grid_products_give_the_float64_kernel(kernel):
    from kernelfit.gram import GridProducts

    _, X = _pixels(301, 90, seed=12)
    V = np.random.default_rng(13).standard_normal((301, 4))
    op = KernelOperator(X, kernel, 3.0, rows=64, cols=80)
    P = GridProducts(op.grid, kernel, 3.0, block=70, rows=32)
    K = kernel_tile(X, X, kernel, 3.0)
    np.fill_diagonal(K, 1.0)
    assert np.abs(P.symmetric_matmul(V) - K @ V).max() <= 1e-13 * np.abs(K @ V).max()
    assert np.abs(P.gram(np.float64).to_dense() - K).max() <= 1e-14
    assert np.abs(P.gram(np.float32).to_dense() - K).max() <= 2e-7
    # 3,000 features at 8-bit levels need several exact chunks: not storable as one float32 product
    _, X3 = _pixels(20, 3000)
    g3 = KernelOperator(X3, kernel, 3.0).grid
    assert not GridProducts.applies(g3)
    with pytest.raises(Exception, match="one float32 GEMM"):
        GridProducts(g3, kernel, 3.0)


def test_grid_products_strategy_is_chosen_only_for_grids_and_when_the_stored_gram_does_not_fit():
    from kernelfit.errors import InputError
    from kernelfit.planning import choose_strategy, plan_solve

    # 60,000 x 784 on 24 GiB: the stored float64 Gram does not fit, the grid products do
    assert plan_solve(60000, 784, available=24 * 2**30, grid_products=True).strategy == "stored-grid-products"
    assert plan_solve(60000, 784, available=24 * 2**30).strategy == "recomputed-float64"
    # where the stored float64 Gram fits it stays the choice; with too little memory, recomputed
    assert plan_solve(20000, 784, available=24 * 2**30, grid_products=True).strategy == "stored-float64-gram"
    assert plan_solve(60000, 784, available=12 * 2**30, grid_products=True).strategy == "recomputed-float64"
    with pytest.raises(InputError, match="integer grid"):
        choose_strategy("mixed", 5000, lambda s: True, "stored-grid-products", grid_products=False)
    # off a grid, fit_interpolant refuses the forced strategy before any work
    from kernelfit.solve import SolveOptions, fit_interpolant

    X = np.random.default_rng(0).random((50, 4))
    with pytest.raises(InputError, match="integer grid"):
        fit_interpolant(X, np.ones((50, 1)), SolveOptions(bandwidth=1.0, strategy="stored-grid-products"))
