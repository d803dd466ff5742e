"""The Lipschitz factor each pool contributes to the product (spectral) measures, against the operator
norm of the pool's Jacobian computed by torch.autograd on random inputs; discontinuous activations refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from deepfit_nets import gen as _gen
from deepfit_nets import identity_around
from deepfit_nets import jacobian_norm as _jacobian_norm

from deepfit import measures as M
from kernelfit.errors import InputError

# (pool, input shape of the pool without the batch dim); 1-d pools see (C, L)
LINEAR_POOLS = [
    (nn.AvgPool2d(2), (2, 6, 6)),
    (nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False), (2, 6, 6)),
    (nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False), (1, 5, 5)),
    (nn.AvgPool2d(2, divisor_override=1), (1, 6, 6)),
    (nn.AvgPool2d(3, stride=2, divisor_override=2), (1, 7, 7)),
    (nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True), (1, 6, 6)),
    (nn.AdaptiveAvgPool2d((7, 3)), (2, 5, 5)),   # upsamples along H
    (nn.AdaptiveAvgPool2d(12), (1, 4, 4)),       # each input feeds 3 x 3 outputs: norm 3
    (nn.AdaptiveAvgPool2d(2), (1, 5, 5)),        # overlapping windows
    (nn.AvgPool1d(3, stride=1, padding=1, count_include_pad=False), (2, 7)),
    (nn.AdaptiveAvgPool1d(9), (2, 4)),
]


def _chain(pool, shape):
    with torch.no_grad():
        out = pool(torch.zeros((1,) + shape))
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, int(torch.tensor(shape).prod())),
                        nn.Unflatten(1, shape), pool, nn.Flatten(), nn.Linear(out.numel(), 3))
    return net.double()


@pytest.mark.parametrize("pool, shape", LINEAR_POOLS, ids=[f"{p!r}-{s}" for p, s in LINEAR_POOLS])
def test_linear_pool_factor_is_its_exact_operator_norm(pool, shape):
    info = M.analyse_graph(_chain(pool, shape), (4,))
    assert info.chain, info.reason
    (entry,) = info.pool_lipschitz
    for seed in range(3):   # a linear map: the Jacobian is the operator itself, at every input
        x = torch.randn((1,) + shape, generator=_gen(seed), dtype=torch.float64)
        assert entry["factor"] == pytest.approx(_jacobian_norm(pool, x), rel=1e-9)


def test_upsampling_adaptive_pool_factor_is_the_square_root_of_the_fan_out():
    info = M.analyse_graph(_chain(nn.AdaptiveAvgPool2d(12), (1, 4, 4)), (4,))
    assert info.pool_lipschitz[0]["factor"] == pytest.approx(3.0)   # every input is copied to 9 outputs


@pytest.mark.parametrize("kw, hw", [(dict(kernel_size=3, stride=2), 7), (dict(kernel_size=2), 6),
                                    (dict(kernel_size=3, stride=1, padding=1), 5)])
def test_max_pool_factor_bounds_its_jacobian(kw, hw):
    pool = nn.MaxPool2d(**kw)
    info = M.analyse_graph(_chain(pool, (2, hw, hw)), (4,))
    (entry,) = info.pool_lipschitz
    for seed in range(5):
        x = torch.randn(1, 2, hw, hw, generator=_gen(seed), dtype=torch.float64)
        assert _jacobian_norm(pool, x) <= entry["factor"] * (1 + 1e-12)


def test_global_mean_factor_is_its_operator_norm():
    class MeanNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(1, 3, 3, padding=1), nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).mean((2, 3)))

    net = MeanNet().double()
    info = M.analyse_graph(net, (1, 5, 5))
    (entry,) = info.pool_lipschitz
    x = torch.randn(1, 3, 5, 5, generator=_gen(0), dtype=torch.float64)
    assert entry["factor"] == pytest.approx(_jacobian_norm(lambda t: t.mean((2, 3)), x), rel=1e-12)


def test_spectral_measure_bounds_a_net_with_an_upsampling_pool():
    # identity layers around AdaptiveAvgPool2d(12) on 4x4: the network's Lipschitz constant is the pool's (3)
    net = identity_around(nn.AdaptiveAvgPool2d(12), 144)
    X = torch.randn(4, 1, 4, 4, generator=_gen(1), dtype=torch.float64)
    lipschitz = _jacobian_norm(net, X[:1])
    assert lipschitz == pytest.approx(3.0)
    res = M.compute_norm_measures(net, X, torch.arange(4), names=["spectral", "spectral-complexity", "neyshabur2018"])
    for name in ("spectral", "spectral-complexity", "neyshabur2018"):
        assert res["measures"][name]["value"] >= lipschitz * (1 - 1e-9), name
    assert res["measures"]["spectral"]["value"] == pytest.approx(3.0, rel=1e-9)


@pytest.mark.parametrize("act, name", [(nn.Threshold(0.5, 2.0), "Threshold"), (nn.Hardshrink(0.5), "Hardshrink")])
def test_discontinuous_activation_is_refused_naming_the_module(act, name):
    # it really jumps: inputs 1e-9 apart map to outputs >= 0.5 apart
    x0 = torch.tensor([0.5 - 5e-10, 0.5 + 5e-10], dtype=torch.float64)
    jump = act(x0)
    assert abs(float(jump[1] - jump[0])) >= 0.5
    net = nn.Sequential(nn.Linear(3, 4), act, nn.Linear(4, 2)).double()
    X = torch.randn(6, 3, generator=_gen(0), dtype=torch.float64)
    y = torch.arange(6) % 2
    res = M.compute_norm_measures(net, X, y)
    for m in M.PRODUCT_MEASURES:
        assert m not in res["measures"]
        assert "'1'" in res["not_applicable"][m] and name in res["not_applicable"][m]
        assert "discontinuous" in res["not_applicable"][m] or "Lipschitz" in res["not_applicable"][m]
    with pytest.raises(InputError, match=f"'1' \\({name}"):
        M.compute_norm_measures(net, X, y, names=["spectral"])


def test_functional_threshold_is_refused_continuous_threshold_module_is_kept():
    class Fn(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.b(F.threshold(self.a(x), 0.5, 2.0))

    assert not M.analyse_graph(Fn(), (3,)).chain
    assert "threshold" in M.analyse_graph(Fn(), (3,)).reason
    # Threshold(t, t) is max(x, t): continuous and 1-Lipschitz
    assert M.analyse_graph(nn.Sequential(nn.Linear(3, 4), nn.Threshold(0.5, 0.5), nn.Linear(4, 2)), (3,)).chain
