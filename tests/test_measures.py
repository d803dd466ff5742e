"""deepfit.measures against closed forms, brute-force path enumeration and dense matrices."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from deepfit import measures as M
from kernelfit.errors import InputError


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _mlp(sizes, seed, bias=True):
    g = _gen(seed)
    layers = []
    for i in range(len(sizes) - 1):
        lin = nn.Linear(sizes[i], sizes[i + 1], bias=bias).double()
        with torch.no_grad():
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g, dtype=torch.float64))
            if bias:
                lin.bias.copy_(torch.randn(lin.bias.shape, generator=g, dtype=torch.float64))
        layers.append(lin)
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _dense_of_conv(conv, in_shape):
    """The dense matrix of the bias-free conv, built by applying it to basis vectors."""
    n = int(np.prod(in_shape))
    basis = torch.eye(n, dtype=conv.weight.dtype).reshape((n,) + tuple(in_shape))
    with torch.no_grad():
        cols = conv._conv_forward(basis, conv.weight, None).reshape(n, -1)
    return cols.T.numpy()  # (out, in)


def test_one_layer_linear_closed_forms():
    net = _mlp([7, 4], seed=1, bias=False)
    W = net[0].weight.detach().numpy()
    s = np.linalg.svd(W, compute_uv=False)
    st = M.layer_statistics(net, (7,))
    assert st[0]["spectral"] == pytest.approx(s[0], rel=1e-12)
    assert st[0]["frobenius"] == pytest.approx(np.sqrt((W ** 2).sum()), rel=1e-12)
    X = torch.randn(20, 7, generator=_gen(0), dtype=torch.float64)
    y = torch.zeros(20, dtype=torch.long)
    res = M.compute_norm_measures(net, X, y)["measures"]
    assert res["spectral"]["value"] == pytest.approx(s[0], rel=1e-12)
    assert res["l2"]["value"] == pytest.approx(np.linalg.norm(W), rel=1e-12)
    # one layer: Bartlett's complexity is ||W^T||_{2,1}, Neyshabur 2018's is ||W||_F
    assert res["spectral-complexity"]["value"] == pytest.approx(np.linalg.norm(W, axis=1).sum(), rel=1e-12)
    assert res["neyshabur2018"]["value"] == pytest.approx(np.linalg.norm(W), rel=1e-12)
    # one linear layer: path norms are entrywise norms
    assert res["l1-path"]["value"] == pytest.approx(np.abs(W).sum(), rel=1e-12)
    assert res["l2-path"]["value"] == pytest.approx(np.sqrt((W ** 2).sum()), rel=1e-12)


def _enumerate_paths(net, p):
    """sum over all paths (from inputs and from biases) of prod |w|^p, by explicit enumeration."""
    lins = [m for m in net if isinstance(m, nn.Linear)]
    Ws = [lin.weight.detach().numpy() for lin in lins]
    bs = [lin.bias.detach().numpy() for lin in lins]
    total = 0.0
    # a path starts at layer s (input units if s = 0 uses W_0 from an input; bias of layer s), then
    # follows weights of layers s+1..L-1
    for start in range(len(lins)):
        dims = [Ws[k].shape[0] for k in range(start, len(lins))]
        for units in itertools.product(*[range(d) for d in dims]):
            tail = 1.0
            for k in range(1, len(units)):
                tail *= abs(Ws[start + k][units[k], units[k - 1]]) ** p
            total += abs(bs[start][units[0]]) ** p * tail  # bias path
            if start == 0:
                for i in range(Ws[0].shape[1]):  # input paths
                    total += abs(Ws[0][units[0], i]) ** p * tail
    return total ** (1.0 / p)


@pytest.mark.parametrize("p", [1, 2])
def test_path_norms_by_enumeration(p):
    net = _mlp([3, 4, 3, 2], seed=2)
    val, exact = M.path_norm(net, (3,), p)
    assert exact
    assert val == pytest.approx(_enumerate_paths(net, p), rel=1e-12)


def test_path_norm_maxpool_is_flagged_upper_bound():
    g = _gen(3)
    conv = nn.Conv2d(1, 2, 3, padding=1).double()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g, dtype=torch.float64))
    net_max = nn.Sequential(conv, nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
    net_avg = nn.Sequential(conv, nn.ReLU(), nn.AvgPool2d(2), nn.Flatten())
    vmax, exact_max = M.path_norm(net_max, (1, 4, 4), 1)
    vavg, exact_avg = M.path_norm(net_avg, (1, 4, 4), 1)
    assert not exact_max and exact_avg
    assert vmax == pytest.approx(4 * vavg, rel=1e-12)  # sum-pool = 4 x avg-pool over 2x2 windows
    # average pool path norm against enumeration through the dense conv matrix and the pool matrix
    D = np.abs(_dense_of_conv(conv, (1, 4, 4)))
    b = np.repeat(np.abs(conv.bias.detach().numpy()), 16)
    P = np.zeros((8, 32))
    for c in range(2):
        for i in range(2):
            for j in range(2):
                for di in range(2):
                    for dj in range(2):
                        P[c * 4 + i * 2 + j, c * 16 + (2 * i + di) * 4 + 2 * j + dj] = 0.25
    assert vavg == pytest.approx((P @ (D @ np.ones(16) + b)).sum(), rel=1e-12)


@pytest.mark.parametrize("kw,shape", [
    (dict(stride=1, padding=1), (2, 6, 6)),
    (dict(stride=2, padding=1), (2, 7, 7)),   # output_padding needed for the adjoint
    (dict(stride=2, padding=0, dilation=2), (2, 8, 9)),
    (dict(stride=1, padding=1, padding_mode="circular"), (2, 5, 5)),
    (dict(stride=1, padding=1, groups=2), (2, 5, 5)),
])
def test_conv_operator_norm_vs_dense(kw, shape):
    g = _gen(4)
    conv = nn.Conv2d(shape[0], 4, 3, **kw).double()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g, dtype=torch.float64))
    D = _dense_of_conv(conv, shape)
    s = np.linalg.svd(D, compute_uv=False)
    sigma, _ = M.conv_operator_norm(conv, shape, tol=1e-10)
    assert sigma == pytest.approx(s[0], rel=1e-8)
    # power iteration: a lower bound that converges (rate (s1/s0)^2 per step)
    sp, _ = M.conv_operator_norm(conv, shape, method="power", tol=1e-9, max_iter=500)
    assert sp <= s[0] * (1 + 1e-12)
    assert sp == pytest.approx(s[0], rel=1e-3)
    # the reshaped-kernel norm is a different number: the measure uses the operator
    st = M.layer_statistics(nn.Sequential(conv), shape, fold_bn=False)[0]
    assert st["l21"] == pytest.approx(np.linalg.norm(D, axis=1).sum(), rel=1e-10)
    assert st["frobenius"] == pytest.approx(float(conv.weight.detach().norm()), rel=1e-12)


def test_margin_percentile_hand_made():
    # 20 samples, 3 classes; margins 1..20 by construction (true logit = m, others 0 and -1)
    n = 20
    y = torch.tensor([i % 3 for i in range(n)])
    logits = torch.zeros(n, 3)
    for i in range(n):
        logits[i, y[i]] = i + 1.0
        logits[i, (y[i] + 1) % 3] = -1.0
    m = M.margins_from_logits(logits, y)
    assert torch.allclose(m, torch.arange(1, n + 1, dtype=torch.float32))
    net = nn.Identity()
    # numpy linear interpolation: position 0.05 * 19 = 0.95 -> 1 + 0.95
    assert M.margin(net, logits, y) == pytest.approx(1.95)
    logits[0, (y[0] + 2) % 3] = 5.0  # a misclassified point has a negative margin
    assert M.margins_from_logits(logits, y)[0] == pytest.approx(-4.0)


def _trained_bn(module, x):
    module.train()
    with torch.no_grad():
        for _ in range(3):
            module(x)
    for m in module.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and m.affine:
            with torch.no_grad():
                m.weight.uniform_(0.5, 2.0)
                m.bias.uniform_(-1, 1)
    return module.eval()


def test_bn_folding_preserves_eval_outputs():
    torch.manual_seed(0)  # test-only: module init; library code never seeds globally
    x = torch.randn(16, 3, 8, 8)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                        nn.Linear(16, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))
    net = _trained_bn(net, x)
    folded = M.fold_batchnorm(net, x[:1])
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    torch.testing.assert_close(folded(x), net(x), rtol=1e-5, atol=1e-5)
    # the original is untouched
    assert sum(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in net.modules()) == 3


def test_bn_after_relu_is_rejected_by_strict_folding():
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.BatchNorm1d(4), nn.Linear(4, 2)).eval()
    with pytest.raises(InputError, match="cannot fold"):
        M.fold_batchnorm(net, (3,), strict=True)


def test_registry_models_if_available():
    models = pytest.importorskip("deepfit.models")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = models.build_model("inception-small", input_shape=(1, 28, 28), batch_norm=True).eval()
    x = torch.randn(2, 1, 28, 28, generator=_gen(0))
    folded = M.fold_batchnorm(net, x[:1])
    torch.testing.assert_close(folded(x), net(x), rtol=1e-4, atol=1e-4)
    v, exact = M.path_norm(net, (1, 28, 28), 2)
    assert v > 0 and not exact  # inception-small has max pools


def _tiny_problem(seed=0, n=64):
    g = _gen(seed)
    X = torch.randn(n, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    net = _mlp([5, 8, 3], seed=seed + 10)
    return net, X, y


def test_sharpness_ascends_and_stays_in_box():
    net, X, y = _tiny_problem()
    eps = 5e-3
    res = M.sharpness(net, X, y, eps=eps, steps=15, seed=1)
    assert res["max_box_violation"] <= 1e-15
    assert res["max_loss"] > res["loss"]
    assert res["value"] == pytest.approx((res["max_loss"] - res["loss"]) / (1 + res["loss"]))
    # ascent beats random points in the same box by a wide margin
    g = _gen(5)
    w = {k: v.detach() for k, v in net.named_parameters()}
    rand_best = -math.inf
    with torch.no_grad():
        for _ in range(20):
            nu = {k: (torch.rand(v.shape, generator=g, dtype=torch.float64) * 2 - 1) * eps * (v.abs() + 1) for k, v in w.items()}
            rand_best = max(rand_best, float(M.cross_entropy_loss(net, {k: w[k] + nu[k] for k in w}, X, y)))
    assert res["max_loss"] - res["loss"] > 2 * (rand_best - res["loss"])
    # the loss along the ascent does not go down overall
    assert res["loss_history"][-1] > res["loss_history"][0]
    # the model's own weights are unchanged
    assert all(torch.equal(a, b) for a, b in zip(w.values(), [p.detach() for p in net.parameters()]))


def test_pac_bayes_noise_std_is_sigma():
    w = {"a": torch.tensor([0.0, 0.2, -1.0, 3.0], dtype=torch.float64)}
    alpha = 0.03
    sigma = alpha * (10 * w["a"].abs() + 1)  # 0.03, 0.09, 0.33, 0.93: sigma^2 would differ strongly
    g = _gen(7)
    draws = torch.stack([M.pac_bayes_noise(w, alpha, g)["a"] for _ in range(20000)])
    assert torch.allclose(draws.mean(0), torch.zeros(4, dtype=torch.float64), atol=4 * float(sigma.max()) / math.sqrt(20000))
    std = draws.std(0)
    assert torch.allclose(std, sigma, rtol=0.03)
    assert M.pac_bayes_kl(w, alpha) == pytest.approx(float((w["a"] ** 2 / (2 * sigma ** 2)).sum()))


def test_pac_bayes_sweep_returns_stderr_and_grows_with_alpha():
    net, X, y = _tiny_problem()
    rows = M.pac_bayes_sweep(net, X, y, [1e-3, 3e-2, 3e-1], n_samples=8, seed=0)
    assert [r["alpha"] for r in rows] == [1e-3, 3e-2, 3e-1]
    kls = [r["kl"] for r in rows]
    assert kls[0] > kls[1] > kls[2]
    es = [r["expected_sharpness"] for r in rows]
    assert all(e[2] == 8 and e[1] >= 0 for e in es)
    assert es[2][0] > es[0][0]
    pick = M.pac_bayes_at_sharpness(rows, target=abs(es[0][0]) + 1e-9)
    assert pick["alpha"] >= 1e-3


def test_pac_bayes_read_off_interpolates_log_kl():
    rows = [dict(alpha=a, kl=kl, expected_sharpness=(s, 0.0, 3)) for a, kl, s in
            [(0.01, 1e6, 0.0), (0.03, 1e5, 0.05), (0.1, 1e4, 0.25)]]
    pick = M.pac_bayes_at_sharpness(rows[::-1], target=0.1)  # order of the sweep does not matter
    assert pick["bracketed"]
    # a quarter of the way from sharpness 0.05 to 0.25: log10 KL = 5 - 0.25
    assert pick["kl"] == pytest.approx(10 ** 4.75, rel=1e-12)
    assert M.pac_bayes_at_sharpness(rows, target=1.0)["kl"] == 1e4 and not M.pac_bayes_at_sharpness(rows, 1.0)["bracketed"]
    assert math.isnan(M.pac_bayes_at_sharpness(rows, target=-1.0)["kl"])


def test_bad_inputs_raise_clear_errors():
    net, X, y = _tiny_problem()
    with pytest.raises(InputError, match="labels"):
        M.margin(net, X, y + 5)
    with pytest.raises(InputError, match="shape"):
        M.margin(net, X, y[:3])
    with pytest.raises(InputError, match="unknown measure"):
        M.compute_norm_measures(net, X, y, names=["nope"])
    with pytest.raises(InputError, match="LocalResponseNorm"):
        M.path_norm(nn.Sequential(nn.Linear(2, 2), nn.LocalResponseNorm(2)), (2,), 1)
