"""report.html (Jinja2) and the figures: readable at 1280 px, no raw JSON, legends, plain axes, unfitted runs marked."""

from __future__ import annotations

import dataclasses
from html.parser import HTMLParser

import pytest

from deepfit import plots as P
from deepfit import report as R


def _run(labels, n, scale, **extra):
    ms = {k: dict(value=scale * 2.0, normalized=scale * 4.0, capacity=scale * 16.0, exact=True) for k in ("l2", "spectral")}
    ms["sharpness"] = dict(value=0.1 * scale)
    ms["pac-bayes"] = dict(at_target=dict(kl=100.0 * scale),
                           sweep=[dict(kl=1.0, expected_sharpness=(0.1, 0.01, 3)),
                                  dict(kl=10.0, expected_sharpness=(0.2, 0.02, 3))])
    return dict(tag=f"{labels}-{n}", labels=labels, n_train=n, experiment="size",
                network=dict(measures=dict(measures=ms, margin=dict(value=0.5 / scale)), test_acc=0.9, train_acc=1.0,
                             epochs=3, fitted=True),
                kernel=dict(rkhs_norm=10.0 * scale, test_error=0.2), **extra)


def _result():
    runs = [_run("true", 100, 1.0), _run("random", 100, 3.0), _run("true", 200, 1.001), _run("random", 200, 3.002)]
    mixing = [dict(_run("true", 100, 1.0), n_random=0), dict(_run("mixed", 150, 2.0), n_random=50)]
    res = dict(options=dataclasses.asdict(R.ReportOptions.quick()), device="cpu",
               dataset=dict(name="mnist-subset", source="bundled", num_classes=10), runs=runs, mixing=mixing,
               expressivity=dict(labels_recovered=True, n=200, max_abs_error=1e-12, note="<b>not markup</b>"),
               total_time_s=12.0, provenance=dict(git_sha="abc", versions=dict(torch="2.x", numpy="1.x")))
    res["ratios"] = R.random_true_ratios(res)
    return res


class _Structure(HTMLParser):
    def __init__(self):
        super().__init__()
        self.stack, self.tables, self.unwrapped, self.text = [], 0, 0, []

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables += 1
            if not any(t == "div" and "scroll" in (dict(a).get("class") or "") for t, a in self.stack):
                self.unwrapped += 1
        self.stack.append((tag, attrs))

    def handle_endtag(self, tag):
        while self.stack and self.stack.pop()[0] != tag:
            pass

    def handle_data(self, data):
        if not any(t == "style" for t, _ in self.stack):
            self.text.append(data)


def test_every_table_scrolls_in_its_own_box_and_no_json_is_dumped(tmp_path):
    res = _result()
    figs = R.make_plots(res, tmp_path)
    page = R.write_html(res, figs, tmp_path / "report.html").read_text()
    s = _Structure()
    s.feed(page)
    # runs, ratios, mixing, expressivity, options, provenance
    assert s.tables == 6 and s.unwrapped == 0
    text = "".join(s.text)
    assert "{" not in text and "}" not in text, "a JSON dump in the page"
    assert "overflow-x: auto" in page
    assert "<b>not markup</b>" not in page and "&lt;b&gt;not markup&lt;/b&gt;" in page   # autoescape
    assert "train.max_epochs" in text and "measure.pac_samples" in text and "versions.torch" in text


def test_every_report_figure_has_legends_and_no_offset_text(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    seen = {}
    save = Figure.savefig

    def recording(fig, path, *a, **k):
        fig.canvas.draw()
        seen[str(path).rsplit("/", 1)[-1]] = [(ax.get_legend() is not None, ax.yaxis.get_offset_text().get_text(),
                                              ax.xaxis.get_offset_text().get_text()) for ax in fig.axes if ax.axison]
        return save(fig, path, *a, **k)

    monkeypatch.setattr(Figure, "savefig", recording)
    R.make_plots(_result(), tmp_path)
    assert set(seen) == {"fig1_measures_vs_size.png", "fig2_pac_bayes.png", "fig3_mixing.png"}
    for name, axes in seen.items():
        assert axes and all(legend for legend, _, _ in axes), f"{name}: a panel without a legend"
        assert not any(y or x for _, y, x in axes), f"{name}: offset text on an axis"


def _zhang_records():
    def rec(p, fitted, steps, seed=0):
        hist = [dict(step=s, train_loss=2.0 / (1 + s / 1000)) for s in (4000, 4004, 4008)]
        return dict(config=dict(model="mlp-1x512", variant="corrupt", p=p, seed=seed, dataset="cifar10", lr=0.01,
                                lr_decay=0.95),
                    fitted=fitted, steps_to_fit=steps if fitted else None, steps=steps, history=hist,
                    final_test_acc=0.5, best_test_acc=0.55)
    return [rec(0.0, True, 4000), rec(0.5, True, 8000), rec(0.8, False, 20000), rec(1.0, False, 20000)]


def test_fig1b_marks_unfitted_runs_without_a_line_through_them(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    captured = {}
    monkeypatch.setattr(plt, "close", lambda fig: captured.setdefault("fig", fig))
    P.plot_steps_to_fit(_zhang_records(), tmp_path / "b.png")
    ax = captured["fig"].axes[0]
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    fitted, unfitted = lines["mlp-1x512: fitted"], lines["mlp-1x512: never fitted (steps run)"]
    assert list(fitted.get_xdata()) == [0.0, 0.5] and list(fitted.get_ydata()) == [4000, 8000]
    assert unfitted.get_linestyle() in ("None", "none", "") and unfitted.get_marker() == "x"
    assert list(unfitted.get_xdata()) == [0.8, 1.0]
    assert {t.get_text() for t in ax.get_legend().get_texts()} == set(lines)
    assert "thousand" not in ax.get_ylabel()


@pytest.mark.parametrize("fn", [P.plot_loss_curves, P.plot_steps_to_fit, P.plot_test_error])
def test_zhang_figures_show_plain_steps_with_a_legend(tmp_path, monkeypatch, fn):
    import matplotlib.pyplot as plt

    captured = {}
    monkeypatch.setattr(plt, "close", lambda fig: captured.setdefault("fig", fig))
    fn(_zhang_records(), tmp_path / "f.png")
    fig = captured["fig"]
    fig.canvas.draw()
    for ax in fig.axes:
        assert ax.get_legend() is not None
        assert ax.xaxis.get_offset_text().get_text() == "" and ax.yaxis.get_offset_text().get_text() == ""
        assert "thousand" not in ax.get_xlabel() + ax.get_ylabel()
