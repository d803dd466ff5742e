"""`deepfit measure --model-def FILE.py:Class --weights W --dataset NAME`: the user's own network from the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from deepfit.cli import main
from deepfit.suite import MeasureOptions, measure_all
from kernelfit.data import load_dataset
from kernelfit.results import dumps

NET_SRC = '''
import torch.nn as nn


class Net(nn.Module):
    def __init__(self, width=32):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 5, stride=3), nn.ReLU())
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 8 * 8, width), nn.ReLU(), nn.Linear(width, 10))

    def forward(self, x):
        return self.head(self.features(x))
'''

CHEAP = ["--sharpness-steps", "2", "--pac-alphas", "1e-3,1e-2", "--pac-samples", "2", "--hessian-k", "1",
         "--hessian-samples", "2", "--basin-directions", "2", "--threads", "1"]
CHEAP_OPTS = MeasureOptions(sharpness_steps=2, pac_alphas=(1e-3, 1e-2), pac_samples=2, hessian_k=1, hessian_samples=2,
                            basin_directions=2)


@pytest.fixture(scope="module")
def user_net(tmp_path_factory):
    """A net defined in the user's own .py file, trained a little on mnist-subset pixels / 255."""
    d = tmp_path_factory.mktemp("user")
    (d / "mynet.py").write_text(NET_SRC)
    ns: dict = {}
    exec(compile(NET_SRC, str(d / "mynet.py"), "exec"), ns)
    ds = load_dataset("mnist-subset")
    X = torch.as_tensor(ds.x_train).float().unsqueeze(1) / 255   # independent of deepfit's data code
    y = torch.as_tensor(ds.y_train).long()
    torch.manual_seed(0)
    net = ns["Net"](width=12)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    for _ in range(30):
        opt.zero_grad()
        nn.functional.cross_entropy(net(X[:1000]), y[:1000]).backward()
        opt.step()
    torch.save(net.state_dict(), d / "weights.pt")
    return d, net.eval(), X, y


def _close(a, b, path=""):
    """Recursive equality of two JSON records, floats to 1e-6 relative."""
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (u, v) in enumerate(zip(a, b)):
            _close(u, v, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, (int, float)):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-9), path
    else:
        assert a == b, path


def test_user_net_from_the_cli_equals_measure_all_in_process(user_net, tmp_path, capsys):
    d, net, X, y = user_net
    rc = main(["measure", "--model-def", f"{d / 'mynet.py'}:Net", "--model-kwargs", '{"width": 12}',
               "--weights", str(d / "weights.pt"), "--dataset", "mnist-subset", *CHEAP, "--out", str(tmp_path / "m.json")])
    assert rc == 0
    cli = json.loads(capsys.readouterr().out)
    assert cli["model"]["weights_format"] == "torch state dict" and cli["model"]["model_kwargs"] == {"width": 12}
    assert cli["n_samples"] == 5000 and cli["data"]["preprocess"] == "scale"
    torch.set_num_threads(1)
    py = json.loads(dumps(measure_all(net, X, y, CHEAP_OPTS)))   # NaN -> null as the CLI writes it
    assert {"l2", "l1-path", "spectral", "sharpness", "pac-bayes", "hessian-trace"} <= set(py["measures"])
    for k in ("time_s",):
        py.pop(k), cli.pop(k)
    _close({k: py[k] for k in py}, {k: cli[k] for k in py})


@pytest.mark.parametrize("fmt", ["safetensors", "torchscript", "torch.export"])
def test_weights_from_safetensors_torchscript_and_export_archives_agree(user_net, tmp_path, capsys, fmt):
    d, net, X, y = user_net
    if fmt == "safetensors":
        from safetensors.torch import save_file
        path = tmp_path / "w.safetensors"
        save_file(net.state_dict(), str(path))
    elif fmt == "torchscript":
        path = tmp_path / "w.ts"
        torch.jit.save(torch.jit.script(net), str(path))
    else:
        path = tmp_path / "w.pt2"
        torch.export.save(torch.export.export(net, (X[:2],)), str(path))
    rc = main(["measure", "--model-def", f"{d / 'mynet.py'}:Net", "--model-kwargs", '{"width": 12}', "--weights", str(path),
               "--dataset", "mnist-subset", "--n-train", "200", "--groups", "norms", "--threads", "1"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert res["model"]["weights_format"] == fmt
    W = [p.detach().double() for n, p in net.named_parameters() if n.endswith("weight")]
    assert res["measures"]["l2"]["value"] == pytest.approx(float(np.prod([float(w.norm()) for w in W])), rel=1e-6)


def _one_line(err):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_whole_model_pickle_is_refused_in_one_line_and_never_unpickled(user_net, tmp_path, capsys):
    d, net, X, y = user_net
    whole = tmp_path / "whole.pt"
    torch.save(nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), whole)
    canary = tmp_path / "canary"

    class Evil:
        def __reduce__(self):
            return (open, (str(canary), "w"))
    evil = tmp_path / "evil.pt"
    torch.save({"a": Evil()}, evil)
    for flag, path in (("--weights", whole), ("--weights", evil), ("--checkpoint", whole)):
        argv = ["measure", flag, str(path)]
        if flag == "--weights":
            argv += ["--model-def", f"{d / 'mynet.py'}:Net", "--dataset", "mnist-subset"]
        assert main(argv) == 1
        line = _one_line(capsys.readouterr().err)
        assert "refusing to load" in line and "torch.save(model.state_dict()" in line and "--model-def" in line, line
    assert not canary.exists()
    with open(evil, "rb") as fh:   # the file really would have run code
        torch.load(fh, weights_only=False)
    assert canary.exists()


@pytest.mark.parametrize("argv, needle", [
    (["--model-def", "nope.py:Net", "--weights", "W", "--dataset", "mnist-subset"], "does not exist"),
    (["--model-def", "DIR/mynet.py:Nope", "--weights", "W", "--dataset", "mnist-subset"], "nn.Module classes defined there: Net"),
    (["--model-def", "DIR/mynet.py", "--weights", "W", "--dataset", "mnist-subset"], "FILE.py:ClassName"),
    (["--model-def", "DIR/mynet.py:Net", "--weights", "W", "--dataset", "mnist-subset"], "shapes differ: head.1.weight"),
    (["--model-def", "DIR/mynet.py:Net", "--model-kwargs", "{width: 1}", "--weights", "W", "--dataset", "x"], "not valid JSON"),
    (["--model-def", "DIR/mynet.py:Net", "--model-kwargs", '{"width": 12}', "--weights", "W"], "--dataset NAME"),
    (["--model-def", "DIR/mynet.py:Net", "--dataset", "mnist-subset"], "--model-def needs --weights"),
    (["--model-def", "DIR/mynet.py:Net", "--model-kwargs", '{"width": 12}', "--weights", "W", "--dataset", "mnist-subset",
      "--crop", "20"], "fails on the data's images of shape (1, 20, 20)"),
    ([], "needs a network"),
    (["--checkpoint", "c.pt", "--dataset", "mnist"], "--dataset applies to --model-def"),
])
def test_user_model_errors_are_one_clear_line(user_net, tmp_path, capsys, argv, needle):
    d, *_ = user_net
    argv = [a.replace("DIR", str(d)).replace("W", str(d / "weights.pt")) if a in ("W",) or "DIR" in a else a for a in argv]
    assert main(["measure", *argv]) == 2
    assert needle in _one_line(capsys.readouterr().err)


def test_measure_prints_progress_lines_on_stderr_and_quiet_silences_them(user_net, capsys):
    d, *_ = user_net
    argv = ["measure", "--model-def", f"{d / 'mynet.py'}:Net", "--model-kwargs", '{"width": 12}', "--weights",
            str(d / "weights.pt"), "--dataset", "mnist-subset", "--n-train", "100", *CHEAP]
    assert main(argv) == 0
    err = capsys.readouterr().err.splitlines()
    for phase in ("norms", "sharpness", "pac-bayes", "hessian"):
        assert f"measure: {phase} ..." in err and any(ln.startswith(f"measure: {phase} done (") for ln in err), err
    assert main([*argv, "--quiet"]) == 0
    assert capsys.readouterr().err == ""
