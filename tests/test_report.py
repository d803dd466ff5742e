"""deepfit.report: end to end on a tiny MNIST subset, the ratio logic, and CLI input errors."""

from __future__ import annotations

import base64
import json
import math
import re

import pytest

from deepfit import report as R


def _fake_run(labels, n, scale):
    nan = float("nan")
    ms = {k: dict(value=scale * 2.0, normalized=scale * 4.0, capacity=scale * 16.0, exact=True) for k in ("l2", "spectral")}
    ms["sharpness"] = dict(value=0.1 * scale)
    ms["pac-bayes"] = dict(at_target=dict(kl=100.0 * scale), sweep=[dict(kl=1.0, expected_sharpness=(0.1, 0.01, 3))])
    return dict(tag=f"{labels}-{n}", labels=labels, n_train=n,
                network=dict(measures=dict(measures=ms, margin=dict(value=0.5 / scale)), test_acc=0.9, train_acc=1.0,
                             epochs=3),
                kernel=dict(rkhs_norm=10.0 * scale, test_error=nan))


def test_ratios_are_random_over_true_per_size():
    res = dict(runs=[_fake_run("true", 10, 1.0), _fake_run("random", 10, 3.0),
                     _fake_run("true", 20, 2.0), _fake_run("random", 20, 5.0)])
    rat = R.random_true_ratios(res)
    assert set(rat) == {"10", "20"}
    assert rat["10"]["spectral capacity"] == pytest.approx(3.0)
    assert rat["20"]["kernel RKHS norm"] == pytest.approx(2.5)
    assert rat["10"]["margin"] == pytest.approx(1 / 3)
    assert math.isnan(rat["10"]["kernel test error"])


def test_help_names_each_default_once(capsys):
    import re

    with pytest.raises(SystemExit):
        R.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text
    for block in re.split(r" (?=--[a-z])", text):
        assert block.count("default") <= 1, block


def test_missing_data_hint_names_options_report_has(tmp_path, capsys):
    import re

    assert R.main(["--dataset", "cifar10", "--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    known = {o for act in R.build_parser()._actions for o in act.option_strings}
    hinted = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", err))
    assert hinted and hinted <= known, hinted - known


def test_cli_rejects_bad_input(tmp_path, capsys):
    assert R.main(["--sizes", "5", "--out", str(tmp_path)]) == 2
    assert "sizes must be" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        R.main(["--sizes", "a,b"])
    assert "comma-separated integers" in capsys.readouterr().err


def test_register_cli_adds_report_subcommand(tmp_path, capsys):
    import argparse

    parser = argparse.ArgumentParser(prog="deepfit")
    sub = parser.add_subparsers(dest="command")
    R.register_cli(sub)
    a = parser.parse_args(["report", "--sizes", "5", "--out", str(tmp_path)])
    assert a.sizes == (5,)
    assert a.func(a) == 2
    assert "sizes must be" in capsys.readouterr().err


def test_report_end_to_end_tiny(tmp_path, monkeypatch, capsys):
    from matplotlib.figure import Figure

    panels = {}
    save = Figure.savefig

    def recording_savefig(fig, path, *a, **k):  # what each saved figure's visible panels show
        fig.canvas.draw()
        panels[str(path).rsplit("/", 1)[-1]] = [(ax.get_ylabel(), ax.yaxis.get_offset_text().get_text())
                                                for ax in fig.axes if ax.axison]
        return save(fig, path, *a, **k)

    monkeypatch.setattr(Figure, "savefig", recording_savefig)
    out = tmp_path / "rep"
    argv = ["--dataset", "mnist-subset", "--sizes", "60,120", "--mix-true", "60", "--mix-random", "60",
            "--n-test", "100", "--max-epochs", "60", "--width", "64", "--pac-samples", "2", "--pac-alphas", "1e-3,1e-2",
            "--hessian-k", "1", "--hessian-samples", "2", "--basin-directions", "2", "--sharpness-steps", "3",
            "--threads", "1", "--out", str(out)]
    assert R.main(argv) == 0
    err = capsys.readouterr().err   # a progress line when each phase of each run starts and ends
    for phase in ("training mlp2 on 60 images ...", "measure: norms ...", "measure: hessian done (", "kernel interpolant ..."):
        assert f"[report] true-60: {phase}" in err, err
    res = json.loads((out / "report.json").read_text())
    assert [r["tag"] for r in res["runs"]] == ["true-60", "random-60", "true-120", "random-120"]
    assert [r["n_random"] for r in res["mixing"]] == [0, 60]  # one mixing level still has its 0-random baseline
    assert set(panels) == {"fig1_measures_vs_size.png", "fig2_pac_bayes.png", "fig3_mixing.png"}
    for name, axes in panels.items():
        assert all(label for label, _ in axes), f"{name}: a panel without a y label"
        assert not any(offset for _, offset in axes), f"{name}: offset notation on an axis"
    assert "| l2 capacity |" in (out / "report.md").read_text()
    assert res["mixing"][0]["reused_from"] == "true-60"
    assert set(res["ratios"]) == {"60", "120"}
    for r in res["runs"]:
        ms = r["network"]["measures"]["measures"]
        assert set(ms) >= {"l2", "l1-path", "l2-path", "spectral", "spectral-complexity", "neyshabur2018"}
        assert ms["hessian-trace"]["n_samples"] == 2 and r["kernel"]["rkhs_norm"] > 0
        assert len(ms["pac-bayes"]["sweep"]) == 2
    assert res["expressivity"]["labels_recovered"] is True
    page = (out / "report.html").read_text()
    imgs = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)
    assert len(imgs) == 3
    assert all(base64.b64decode(b)[:8] == b"\x89PNG\r\n\x1a\n" for b in imgs)
    assert (out / "fig1_measures_vs_size.png").stat().st_size > 1000
    # refuses to overwrite without --overwrite
    assert R.main(argv) == 2
