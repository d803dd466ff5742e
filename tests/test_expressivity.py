"""Zhang et al. Theorem 1: the 2n + d weight ReLU network fits any labels on n distinct points."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from deepfit.expressivity import build_interpolating_network, verify_fit
from kernelfit.errors import InputError


@pytest.mark.parametrize("n,d", [(1, 3), (50, 5), (400, 30)])
def test_fits_random_labels_exactly(n, d):
    rng = np.random.default_rng(n)
    X = rng.standard_normal((n, d))
    y = rng.integers(0, 10, n)
    net = build_interpolating_network(X, y, seed=1)
    res = verify_fit(net, X, y)
    assert res["num_weights"] == 2 * n + d
    assert res["labels_recovered"]
    # exact up to floating-point summation: |error| <= n eps sum_j |a_j relu(z - b_j)| (+ the matvec)
    w, b, a = (p.detach().numpy() for p in (net.w, net.b, net.a))
    terms = np.abs(a[None, :] * np.maximum((X @ w)[:, None] - b[None, :], 0)).sum(1)
    err = np.abs(net(torch.as_tensor(X)).detach().numpy() - y)
    assert np.all(err <= 2 * (n + d) * np.finfo(np.float64).eps * (terms + np.abs(X).sum(1) * np.abs(w).max() * np.abs(a).sum()))
    assert res["max_rel_residual"] < 1e-6
    # the same function as an ordinary Linear-ReLU-Linear network
    seq = net.to_sequential()
    np.testing.assert_allclose(seq(torch.as_tensor(X)).detach().numpy()[:, 0], y, atol=1e-6 * 10)


def test_construction_solves_the_theorem_triangular_system():
    rng = np.random.default_rng(3)
    n, d = 60, 4
    X = rng.standard_normal((n, d))
    y = rng.standard_normal(n)  # real-valued labels
    net = build_interpolating_network(X, y, seed=2)
    w, b, a = (p.detach().numpy() for p in (net.w, net.b, net.a))
    z = X @ w
    order = np.argsort(z)
    zs = z[order]
    # interleaving b_1 < z_(1) < b_2 < ... < b_n < z_(n)
    assert np.all(b < zs) and np.all(b[1:] > zs[:-1])
    A = np.maximum(zs[:, None] - b[None, :], 0)
    assert np.allclose(A, np.tril(A)) and np.all(np.diag(A) > 0)
    a_ref = scipy.linalg.solve_triangular(A, y[order], lower=True)
    np.testing.assert_allclose(a, a_ref, rtol=1e-8, atol=1e-8 * np.abs(a_ref).max())


def test_one_hot_targets_and_mnist_pixels():
    from kernelfit.data import load_dataset

    ds = load_dataset("mnist-subset")
    X = np.asarray(ds.x_train[:500], dtype=np.float64).reshape(500, -1) / 255.0
    keep = np.unique(X, axis=0, return_index=True)[1]
    X = X[np.sort(keep)]
    rng = np.random.default_rng(0)
    Y = np.eye(10)[rng.integers(0, 10, X.shape[0])]
    res = verify_fit(build_interpolating_network(X, Y, seed=0), X, Y)
    assert res["labels_recovered"] and res["max_abs_residual"] < 1e-6
    assert res["num_weights"] == X.shape[0] * 10 + X.shape[0] + 784


def test_duplicate_points_rejected():
    X = np.array([[0.0, 1.0], [2.0, 3.0], [0.0, 1.0]])
    with pytest.raises(InputError, match="not distinct"):
        build_interpolating_network(X, [0, 1, 2])
    with pytest.raises(InputError, match="shape"):
        build_interpolating_network(X, [0, 1])
