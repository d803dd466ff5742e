"""Measures on user architectures: activation Lipschitz constants, unfolded batch norm, Unflatten, every
measure on its own, second-order measures on the model's own parameters, Student-t PAC-Bayes intervals."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.stats import norm
from scipy.stats import t as student_t

from deepfit import measures as M
from deepfit.measures.layers import _conv_l21
from deepfit.suite import MeasureOptions, measure_all

CHEAP = MeasureOptions(sharpness_steps=2, pac_alphas=(1e-3, 1e-2), pac_samples=5, hessian_k=1, hessian_samples=3,
                       basin_directions=2)


def _xy(n=16, d=4, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    return X, torch.arange(n) % k


def _jac_norm(net, x):
    J = torch.autograd.functional.jacobian(lambda v: net(v[None])[0], x)
    return float(torch.linalg.matrix_norm(J, ord=2))


# activation, its sup |f'| (independent closed forms), an input where |f'| reaches it (or comes within 1%)
ACTS = [
    (nn.LeakyReLU(3.0), 3.0, -1.0),
    (nn.LeakyReLU(0.1), 1.0, 1.0),
    (nn.ELU(2.5), 2.5, -1e-3),
    (nn.SELU(), 1.0507009873554805 * 1.6732632423543772, -1e-3),
    (nn.Tanh(), 1.0, 0.0),
    (nn.GELU(), norm.cdf(math.sqrt(2)) + math.sqrt(2) * norm.pdf(math.sqrt(2)), math.sqrt(2)),
    (nn.Sigmoid(), 0.25, 0.0),
    (nn.Softplus(beta=2.0), 1.0, 8.0),
]


@pytest.mark.parametrize("act, sup, worst", ACTS, ids=lambda v: repr(v) if isinstance(v, nn.Module) else "")
def test_activation_factor_bounds_and_is_tight(act, sup, worst):
    d = 4
    net = nn.Sequential(nn.Linear(d, d), act, nn.Linear(d, d)).double().eval()
    with torch.no_grad():   # identities: the Jacobian is diag(f'(x)), its norm max |f'|
        net[0].weight.copy_(torch.eye(d)), net[0].bias.zero_(), net[2].weight.copy_(torch.eye(d)), net[2].bias.zero_()
    X, y = _xy(d=d, k=d)
    res = M.compute_norm_measures(net, X, y, names=["spectral"])
    (entry,) = res["pool_lipschitz"]
    assert entry["factor"] == pytest.approx(sup, rel=1e-9)
    assert res["measures"]["spectral"]["value"] == pytest.approx(sup, rel=1e-9)
    # tight: the Jacobian at the worst-case input has this norm (within 1%)
    assert _jac_norm(net, torch.full((d,), float(worst), dtype=torch.float64)) == pytest.approx(sup, rel=1e-2)
    # a bound on a random net at random inputs
    torch.manual_seed(1)
    net2 = nn.Sequential(nn.Linear(d, 6), act, nn.Linear(6, 3)).double().eval()
    bound = M.compute_norm_measures(net2, X, y % 3, names=["spectral"])["measures"]["spectral"]["value"]
    for x in torch.randn(50, d, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 3:
        assert _jac_norm(net2, x) <= bound * (1 + 1e-9)


def test_gelu_tanh_approximation_constant_by_dense_grid():
    x = torch.linspace(-6, 6, 1_200_001, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(F.gelu(x, approximate="tanh").sum(), x)
    assert M.gelu_lipschitz("tanh") == pytest.approx(float(g.abs().max()), rel=1e-7)
    assert M.gelu_lipschitz("none") == pytest.approx(1.1289, abs=1e-4)


def test_bn_after_relu_is_measured_as_an_affine_layer():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.BatchNorm1d(4), nn.Linear(4, 2)).double()
    with torch.no_grad():
        net[2].running_mean.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
        net[2].running_var.copy_(torch.tensor([0.5, 2.0, 1.5, 0.25]))
        net[2].weight.copy_(torch.tensor([1.0, -2.0, 0.5, 0.7]))
        net[2].bias.copy_(torch.tensor([0.3, 0.1, -0.4, 0.2]))
    net.eval()
    X, y = _xy(d=3, k=2)
    res = measure_all(net, X, y, CHEAP)   # used to raise "cannot fold"
    ms = res["measures"]
    bn = net[2]
    s = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()
    t = (bn.bias - bn.running_mean * s).detach()
    W1, b1, W2, b2 = (p.detach() for p in (net[0].weight, net[0].bias, net[3].weight, net[3].bias))
    spec = float(torch.linalg.matrix_norm(W1, 2)) * float(s.abs().max()) * float(torch.linalg.matrix_norm(W2, 2))
    assert ms["spectral"]["value"] == pytest.approx(spec, rel=1e-9)
    for p in (1, 2):   # brute-force path enumeration: input/bias1 -> hidden j (-> BN) -> output k, BN shift, bias2
        tot = 0.0
        for j, k in itertools.product(range(4), range(2)):
            tail = abs(float(W2[k, j])) ** p
            tot += sum(abs(float(W1[j, i])) ** p for i in range(3)) * abs(float(s[j])) ** p * tail
            tot += abs(float(b1[j])) ** p * abs(float(s[j])) ** p * tail + abs(float(t[j])) ** p * tail
        tot += sum(abs(float(b)) ** p for b in b2)
        assert ms[f"l{p}-path"]["value"] == pytest.approx(tot ** (1 / p), rel=1e-9)
    assert {"sharpness", "pac-bayes", "hessian-trace"} <= set(ms) and not res["not_applicable"]


class _FunctionalPool(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 2, 3, padding=1), nn.Linear(2 * 2 * 2, 3)

    def forward(self, x):
        return self.fc(F.avg_pool2d(torch.relu(self.conv(x)), 2).flatten(1))


def test_l1_path_kept_when_l2_path_is_refused():
    net = _FunctionalPool().double()
    X = torch.randn(8, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.arange(8) % 3
    res = measure_all(net, X, y, CHEAP, groups=("norms",))
    assert "functional" in res["not_applicable"]["l2-path"]
    # l1: average-pool edges 1/4 to the first power are the function itself, so |W|-forward on ones is exact
    absnet = _FunctionalPool().double()
    absnet.load_state_dict({k: v.abs() for k, v in net.state_dict().items()})
    with torch.no_grad():
        want = float(absnet(torch.ones(1, 1, 4, 4, dtype=torch.float64)).sum())
    assert res["measures"]["l1-path"]["value"] == pytest.approx(want, rel=1e-12)
    assert "spectral" in res["measures"]


def test_unflatten_is_supported_by_path_norms():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Unflatten(1, (2, 4)), nn.Flatten(), nn.Linear(8, 3)).double()
    ref = nn.Sequential(net[0], net[1], net[4])
    X, y = _xy()
    for p in (1, 2):
        assert M.path_norm(net, X[:1], p)[0] == pytest.approx(M.path_norm(ref, X[:1], p)[0], rel=1e-12)


def test_hessian_on_the_models_own_parameters_vs_brute_force():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).double()
    with torch.no_grad():
        net[1].running_var.uniform_(0.5, 2.0), net[1].weight.uniform_(0.5, 1.5)
    net.eval()
    X, y = _xy(d=3, k=2)
    res = measure_all(net, X, y, CHEAP, groups=("hessian",))
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for p in net.parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in net.parameters()])

    def loss(flat):
        parts = torch.split(flat, [math.prod(s) for s in shapes])
        params = {n: v.reshape(s) for n, v, s in zip(names, parts, shapes)}
        return F.cross_entropy(torch.func.functional_call(net, params, (X,)), y)
    Hd = torch.autograd.functional.hessian(loss, flat0)
    assert res["n_parameters"] == flat0.numel() == 4 * 3 + 4 + 4 + 4 + 2 * 4 + 2   # BN gamma, beta counted
    assert res["measures"]["hessian-top-eigenvalues"]["value"][0] == pytest.approx(
        float(torch.linalg.eigvalsh(Hd)[-1]), rel=1e-3)
    assert "own" in res["second_order_parameters"]
    folded = measure_all(net, X, y, MeasureOptions(**{**CHEAP.__dict__, "fold_bn": True}), groups=("hessian",))
    assert folded["n_parameters"] == flat0.numel() - 8 and "folded" in folded["second_order_parameters"]


def test_pac_bayes_interval_uses_student_t():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    X, y = _xy()
    res = measure_all(net, X, y, CHEAP, groups=("pac-bayes",))
    for row in res["measures"]["pac-bayes"]["sweep"]:
        m, se, n = row["expected_sharpness"]
        lo, hi = row["expected_sharpness_ci95"]
        assert n == 5 and (hi - lo) / 2 == pytest.approx(student_t.ppf(0.975, 4) * se, rel=1e-9)
        assert (lo + hi) / 2 == pytest.approx(m, rel=1e-9, abs=1e-15)


def test_one_default_number_of_sharpness_steps():
    import inspect
    assert inspect.signature(M.sharpness).parameters["steps"].default == MeasureOptions().sharpness_steps


def test_one_refusal_never_makes_measure_all_raise():
    class Odd(nn.Module):   # a softmax between layers: no chain, no path norms; margin and second order still work
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)

        def forward(self, x):
            return self.b(torch.softmax(self.a(x), 1))
    X, y = _xy()
    res = measure_all(Odd().double(), X, y, CHEAP)
    assert set(M.MEASURES) <= set(res["not_applicable"])
    assert {"sharpness", "pac-bayes", "hessian-trace"} <= set(res["measures"])


@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("kw", [dict(kernel_size=3, padding=1), dict(kernel_size=3, padding=2, stride=2, dilation=2),
                                dict(kernel_size=(3, 2), padding=(1, 1), groups=2)])
def test_conv_l21_on_the_true_operator_taps(mode, kw):
    torch.manual_seed(0)
    if mode == "reflect" and kw.get("padding") == 2:
        kw = dict(kw, padding=1)
    conv = nn.Conv2d(2, 4, padding_mode=mode, bias=False, **kw).double()
    shape = (2, 5, 6)
    J = torch.autograd.functional.jacobian(lambda v: conv(v.reshape((1,) + shape)).reshape(-1),
                                           torch.zeros(math.prod(shape), dtype=torch.float64))   # dense operator
    assert _conv_l21(conv, shape) == pytest.approx(float(J.norm(dim=1).sum()), rel=1e-12)
