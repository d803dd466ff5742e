"""deepfit.suite: measure_all on a user's nn.Module and `deepfit measure` on a `deepfit train` checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from deepfit import cli
from deepfit import measures as M
from deepfit.suite import MeasureOptions, measure_all
from kernelfit.errors import InputError

CHEAP = MeasureOptions(sharpness_steps=2, pac_alphas=(1e-3, 1e-2), pac_samples=2, hessian_k=1, hessian_samples=3,
                       basin_directions=2)


def _problem(seed=0, n=48):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 5, generator=g, dtype=torch.float64)
    y = (X[:, 0] > 0).long() + (X[:, 1] > 0.5).long()
    torch.manual_seed(seed)  # test-only: module init
    net = nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3)).double()
    opt = torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.9)
    for _ in range(200):
        opt.zero_grad()
        nn.functional.cross_entropy(net(X), y).backward()
        opt.step()
    return net, X, y


def test_measure_all_reports_every_measure_in_its_convention():
    net, X, y = _problem()
    net.train()
    res = measure_all(net, X, y, CHEAP)
    assert all(m.training for m in net.modules())  # the caller's model still trains
    folded = M.fold_batchnorm(net, X[:1])
    with torch.no_grad():
        out = folded(X)
    true = out.gather(1, y[:, None]).squeeze(1)
    other = out.clone().scatter_(1, y[:, None], float("-inf")).max(1).values
    gamma = float(np.percentile((true - other).numpy(), 5))
    assert res["margin"]["value"] == pytest.approx(gamma, rel=1e-12)
    assert gamma > 0
    ms = res["measures"]
    assert set(M.MEASURES) <= set(ms) and not res["not_applicable"]
    for name, m in M.MEASURES.items():
        assert ms[name]["capacity"] == pytest.approx((ms[name]["value"] / gamma) ** m.power, rel=1e-12)
        assert ms[name]["convention"]
    # Neyshabur et al. plot gamma^-2 prod ||W||_F^2 for l2; Bartlett et al. R_A / gamma unsquared
    W = [p.detach() for n, p in folded.named_parameters() if n.endswith("weight")]
    assert ms["l2"]["capacity"] == pytest.approx(float(np.prod([float(w.norm()) ** 2 for w in W])) / gamma ** 2, rel=1e-10)
    assert ms["spectral-complexity"]["power"] == 1
    for name in ("hessian-trace", "hessian-frobenius"):
        assert ms[name]["n_samples"] == 3 and ms[name]["stderr"] > 0
    assert all(len(r["expected_sharpness"]) == 3 for r in ms["pac-bayes"]["sweep"])
    assert 0 <= ms["sharpness"]["value"]
    json.dumps(res)  # JSON-able


def test_measure_all_lists_what_does_not_apply():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.LocalResponseNorm(2), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    X = torch.randn(8, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    y = torch.arange(8) % 3
    res = measure_all(net, X, y, CHEAP, groups=("norms",))
    assert set(res["not_applicable"]) == set(M.MEASURES)
    assert "LocalResponseNorm" in res["not_applicable"]["l1-path"]
    assert "Lipschitz" in res["not_applicable"]["spectral"] and "path norms" in res["not_applicable"]["spectral"]
    with pytest.raises(InputError, match="unknown measure group"):
        measure_all(net, X, y, CHEAP, groups=("nope",))
    with pytest.raises(InputError, match="pac_samples"):
        measure_all(net, X, y, MeasureOptions(pac_samples=1))


def test_deepfit_measure_cli_on_a_train_checkpoint(tmp_path, capsys):
    ck = tmp_path / "ckpt"
    base = ["--model", "mlp2", "--width", "16", "--dataset", "mnist-subset", "--n-train", "120", "--n-test", "50",
            "--preprocess", "normalize", "--max-epochs", "2", "--threads", "1", "--quiet"]
    assert cli.main(["train", *base, "--checkpoint-dir", str(ck), "--out", str(tmp_path / "runs.jsonl")]) == 0
    capsys.readouterr()
    (path,) = ck.glob("*.pt")
    cheap = ["--sharpness-steps", "2", "--pac-alphas", "1e-3,1e-2", "--pac-samples", "2", "--hessian-k", "1",
             "--hessian-samples", "2", "--basin-directions", "2", "--threads", "1"]
    assert cli.main(["measure", "--checkpoint", str(path), *cheap, "--out", str(tmp_path / "m.json")]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res == json.loads((tmp_path / "m.json").read_text())
    assert res["n_samples"] == 120 and res["config"]["model"] == "mlp2"
    assert {"l2", "l1-path", "spectral", "sharpness", "pac-bayes", "hessian-trace"} <= set(res["measures"])
    # the same network measured from Python on the same data gives the same norms
    from deepfit.data import prepare_data
    from deepfit.suite import load_checkpoint_model
    from deepfit.train import TrainConfig
    data = prepare_data(TrainConfig.from_dict(res["config"]))
    model, _ = load_checkpoint_model(path, data.input_shape)
    py = measure_all(model, data.x_train, data.y_train, MeasureOptions(), groups=("norms",))
    assert py["measures"]["l2"]["value"] == pytest.approx(res["measures"]["l2"]["value"], rel=1e-6)
    # user arrays: raw uint8 images (N, H, W) and labels, preprocessed as the checkpoint's config says
    from kernelfit.data import load_dataset
    ds = load_dataset("mnist-subset")
    np.save(tmp_path / "x.npy", ds.x_test[:40])
    np.save(tmp_path / "y.npy", ds.y_test[:40])
    assert cli.main(["measure", "--checkpoint", str(path), "--data", str(tmp_path / "x.npy"), "--labels",
                     str(tmp_path / "y.npy"), "--groups", "norms"]) == 0
    assert json.loads(capsys.readouterr().out)["n_samples"] == 40


def test_deepfit_measure_cli_errors(tmp_path, capsys):
    assert cli.main(["measure", "--checkpoint", str(tmp_path / "none.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    torch.save({"weights": 1}, tmp_path / "other.pt")
    assert cli.main(["measure", "--checkpoint", str(tmp_path / "other.pt")]) == 2
    assert "not a deepfit training checkpoint" in capsys.readouterr().err
