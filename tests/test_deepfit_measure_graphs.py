"""Measures on average pools, branched networks and overlapping max pools, against independent references
(dense matrices built from basis vectors, autograd Jacobians, brute-force window counts), and the
caller's model left as it was by every measure."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
from deepfit_nets import gen as _gen
from deepfit_nets import identity_around, jacobian_norm

from deepfit import hessian as Hs
from deepfit import measures as M
from deepfit.measures.graph import _maxpool_coverage
from kernelfit.errors import InputError


def _randomize(net, seed):
    g = _gen(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    return net


def _dense(module, in_shape):
    """Dense matrix (out, in) of a linear, bias-free map, from its action on basis vectors."""
    n = int(np.prod(in_shape))
    basis = torch.eye(n, dtype=torch.float64).reshape((n,) + tuple(in_shape))
    with torch.no_grad():
        return module(basis).reshape(n, -1).T.numpy()


def _path_sum_dense(stages, n_in, p):
    """sum over paths of prod |w|^p for a chain of (dense matrix, bias or None) stages: walk the
    entrywise-powered matrices; each bias is a unit of value 1 that starts new paths."""
    v = np.ones(n_in)
    for A, b in stages:
        v = np.abs(A) ** p @ v + (0 if b is None else np.abs(b) ** p)
    return v.sum()


@pytest.mark.parametrize("pool,hw", [
    (nn.AvgPool2d(2), 6),
    (nn.AvgPool2d(3), 6),
    (nn.AvgPool2d(3, stride=1), 5),                                      # overlapping windows
    (nn.AvgPool2d(3, stride=2, padding=1), 5),                           # padding counted in 1/9
    (nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False), 5),  # edge windows 1/4, 1/6
    (nn.AdaptiveAvgPool2d(1), 5),
    (nn.AdaptiveAvgPool2d(3), 5),                                        # uneven, overlapping windows
])
@pytest.mark.parametrize("p", [1, 2])
def test_path_norm_through_average_pools_vs_dense_paths(pool, hw, p):
    conv = nn.Conv2d(2, 3, 3, padding=1).double()
    lin_in = None
    feats = nn.Sequential(conv, nn.ReLU(), pool, nn.Flatten())
    with torch.no_grad():
        lin_in = feats(torch.zeros(1, 2, hw, hw, dtype=torch.float64)).shape[1]
    lin = nn.Linear(lin_in, 4).double()
    net = _randomize(nn.Sequential(conv, nn.ReLU(), pool, nn.Flatten(), lin), seed=hw + 7 * p)
    c_out = conv(torch.zeros(1, 2, hw, hw, dtype=torch.float64)).shape[1:]
    stages = [
        (_dense(lambda t: conv._conv_forward(t, conv.weight, None), (2, hw, hw)),
         conv.bias.detach().numpy().repeat(hw * hw)),
        (_dense(pool, tuple(c_out)), None),
        (lin.weight.detach().numpy(), lin.bias.detach().numpy()),
    ]
    want = _path_sum_dense(stages, 2 * hw * hw, p) ** (1 / p)
    got, exact = M.path_norm(net, (2, hw, hw), p)
    assert exact
    assert got == pytest.approx(want, rel=1e-10)


class _TwoBranch(nn.Module):
    """x -> [a(x), b(x)] concatenated -> c (2 logits, the second constant 0): parallel layers, not a chain."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False), nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.a.weight.fill_(1.0)
            self.b.weight.fill_(1.0)
            self.c.weight.copy_(torch.tensor([[0.5, 0.5], [0.0, 0.0]]))

    def forward(self, x):
        return self.c(torch.cat([self.a(x), self.b(x)], dim=1))


def test_branched_net_product_measures_are_refused_not_misreported():
    net = _TwoBranch()
    X = torch.tensor([[1.0], [2.0], [-1.0], [3.0]])
    y = torch.zeros(4, dtype=torch.long)
    jac = torch.autograd.functional.jacobian(net, X[:1]).reshape(2, 1)
    lipschitz = float(torch.linalg.matrix_norm(jac, ord=2))      # 1.0: the net is x -> (x, 0)
    assert lipschitz == pytest.approx(1.0)
    net2 = nn.Sequential(net, nn.Identity())
    res = M.compute_norm_measures(net2, X, y)
    for name in ("spectral", "l2", "spectral-complexity", "neyshabur2018"):
        # the product over all layers in forward order (0.707 here) is not a bound: refuse it
        assert name not in res["measures"] or res["measures"][name]["value"] >= lipschitz
    assert "spectral" in res["not_applicable"] and "l1-path" in res["not_applicable"]["spectral"]
    with pytest.raises(InputError, match="l1-path, l2-path"):
        M.compute_norm_measures(net2, X, y, names=["spectral"])
    # path norms apply on any DAG: 2 paths of weights (1, 0.5) each
    assert res["measures"]["l1-path"]["value"] == pytest.approx(1.0)
    assert res["measures"]["l2-path"]["value"] == pytest.approx(np.sqrt(2 * 0.25))


def test_registry_inception_product_measures_not_applicable_path_norms_are():
    models = pytest.importorskip("deepfit.models")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = models.build_model("inception-small-nobn", input_shape=(1, 8, 8))
    X = torch.randn(6, 1, 8, 8, generator=_gen(1))
    y = torch.arange(6) % 10
    res = M.compute_norm_measures(net, X, y)
    assert set(res["measures"]) == {"l1-path", "l2-path"}
    assert set(res["not_applicable"]) == {"l2", "spectral", "spectral-complexity", "neyshabur2018"}
    assert "receives" in res["not_applicable"]["l2"]


def test_overlapping_maxpool_spectral_measure_bounds_the_jacobian():
    # identity 1x1 conv -> max pool 3x3 / stride 2 on 5x5 -> identity linear: the centre pixel is in all
    # four windows, so at an input whose maximum sits there the Jacobian has a column of four ones (norm 2)
    chain = identity_around(nn.MaxPool2d(3, stride=2), 4)
    x = torch.zeros(1, 1, 5, 5, dtype=torch.float64)
    x[0, 0, 2, 2] = 10.0
    lipschitz = jacobian_norm(chain, x)
    assert lipschitz == pytest.approx(2.0)
    X = torch.cat([x, -x])
    y = torch.tensor([0, 1])
    res = M.compute_norm_measures(chain, X, y, names=["spectral"])
    assert res["measures"]["spectral"]["value"] >= lipschitz * (1 - 1e-9)
    # non-overlapping windows keep factor 1
    chain2 = identity_around(nn.MaxPool2d(2), 4)
    assert M.compute_norm_measures(chain2, torch.cat([x[..., :4, :4], -x[..., :4, :4]]), y,
                                   names=["spectral"])["measures"]["spectral"]["value"] == pytest.approx(1.0)


@pytest.mark.parametrize("kw,hw", [
    (dict(kernel_size=3, stride=2), 7), (dict(kernel_size=3, stride=2, padding=1), 8),
    (dict(kernel_size=3, stride=1), 5), (dict(kernel_size=2, stride=2), 6),
    (dict(kernel_size=3, stride=2, ceil_mode=True), 8), (dict(kernel_size=2, stride=1, dilation=2), 6),
])
def test_maxpool_window_coverage_vs_brute_force(kw, hw):
    pool = nn.MaxPool2d(**kw)
    x = torch.randn(1, 1, hw, hw, requires_grad=True)
    out = pool(x)
    # brute force: the windows of each output, from the argmax-free definition via unit impulses
    cover = np.zeros((hw, hw))
    for i in range(hw):
        for j in range(hw):
            e = torch.full((1, 1, hw, hw), -1.0)
            e[0, 0, i, j] = 1.0
            cover[i, j] = float((pool(e) == 1.0).sum())
    assert _maxpool_coverage(out.grad_fn) == int(cover.max())


def _state(net):
    return ([m.training for m in net.modules()], [p.requires_grad for p in net.parameters()],
            [p.detach().clone() for p in net.parameters()])


def _bn_dropout_net():
    torch.manual_seed(0)  # test-only: module init
    net = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 3)).double()
    net.train()
    net[4].bias.requires_grad_(False)  # a frozen parameter must stay frozen
    return net


def _same_state(a, b):
    return a[0] == b[0] and a[1] == b[1] and all(torch.equal(u, v) for u, v in zip(a[2], b[2]))


@pytest.mark.parametrize("measure", [
    lambda n, X, y: Hs.HessianOperator(n, X, y).matvec(torch.ones(sum(p.numel() for p in n.parameters() if p.requires_grad))),
    lambda n, X, y: M.compute_norm_measures(n, X, y),
    lambda n, X, y: M.sharpness(n, X, y, steps=2),
    lambda n, X, y: M.pac_bayes_sweep(n, X, y, [1e-3], n_samples=2),
    lambda n, X, y: M.margin(n, X, y),
    lambda n, X, y: M.layer_statistics(n, X[:1]),
    lambda n, X, y: M.path_norm(n, X[:1], 2),
], ids=["hessian", "norms", "sharpness", "pac-bayes", "margin", "layer-stats", "path-norm"])
def test_every_measure_leaves_mode_flags_and_weights_unchanged(measure):
    net = _bn_dropout_net()
    g = _gen(3)
    X = torch.randn(32, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (32,), generator=g)
    with torch.no_grad():
        net(X)  # running statistics
    before = _state(net)
    measure(net, X, y)
    assert _same_state(_state(net), before)


class _Functional(nn.Module):
    def __init__(self, pool):
        super().__init__()
        self.conv, self.lin, self.pool = nn.Conv2d(1, 2, 3, padding=1), nn.Linear(2 * 2 * 2, 3), pool

    def forward(self, x):
        return self.lin(torch.flatten(self.pool(torch.relu(self.conv(x))), 1))


def test_functional_pools_are_refused_where_their_path_weights_matter():
    avg = _Functional(lambda t: nn.functional.avg_pool2d(t, 2))
    assert M.path_norm(avg, (1, 4, 4), 1)[0] > 0          # 1/k edges are right for p = 1
    with pytest.raises(InputError, match="functional"):
        M.path_norm(avg, (1, 4, 4), 2)
    mx = _Functional(lambda t: nn.functional.max_pool2d(t, 2))
    with pytest.raises(InputError, match="functional"):
        M.path_norm(mx, (1, 4, 4), 1)


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.c(h + torch.relu(self.b(h)))


def test_residual_addition_is_not_a_chain():
    info = M.analyse_graph(_Residual(), (3,))
    assert not info.chain and "joins branches" in info.reason
    assert M.analyse_graph(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), (3,)).chain
