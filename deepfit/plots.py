"""Figure 1 of Zhang et al. (2017) from result records (PNG, matplotlib Agg).

* :func:`plot_loss_curves` (Fig. 1a): mean training loss per epoch vs. SGD step, one curve per data variant.
* :func:`plot_steps_to_fit` (Fig. 1b): steps to reach the target training accuracy vs. label corruption p
  (the line joins fitted runs only; runs that did not fit are an "x" at the steps they ran, with a legend entry).

Every axis shows plain numbers (no "x 1e3" multiplier or offset text) and every figure has a legend.
* :func:`plot_test_error` (Fig. 1c): test error at the end of training (and the best along the way,
  the early-stopping view) vs. label corruption p.

Records are the dicts that :func:`deepfit.experiments.run_one` writes; several models/seeds may be mixed:
lines are grouped by model and averaged over seeds.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["plot_loss_curves", "plot_steps_to_fit", "plot_test_error", "plot_all"]


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _p_of(rec: dict) -> float | None:
    c = rec["config"]
    if c["variant"] == "corrupt":
        return float(c["p"])
    if c["variant"] == "true":
        return 0.0
    if c["variant"] == "random-labels":
        return 1.0
    return None


def _plain(ax) -> None:
    """Tick labels as the numbers themselves: no scientific multiplier, no offset text such as "+0.004"."""
    for axis in ("x", "y"):
        if (ax.get_xscale() if axis == "x" else ax.get_yscale()) == "linear":
            ax.ticklabel_format(axis=axis, style="plain", useOffset=False)


def _save(plt, fig, path) -> Path:
    for ax in fig.axes:
        _plain(ax)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _title(records, what):
    ds = sorted({r["config"]["dataset"] for r in records})
    ds = ["CIFAR-10 (JPEG q75 copy)" if d == "cifar10" else d for d in ds]
    return f"{what} -- {', '.join(ds)}"


def plot_loss_curves(records: Sequence[dict], path, model: str | None = None) -> Path:
    """Fig. 1a: training loss (mean over each epoch's minibatches) vs. step, by variant."""
    plt = _plt()
    recs = [r for r in records if model is None or r["config"]["model"] == model]
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in sorted(recs, key=lambda r: (r["config"]["model"], r["config"]["variant"], r["config"]["p"])):
        h = r["history"]
        label = f"{r['config']['model']}: {r['config']['variant']}"
        if r["config"]["variant"] == "corrupt":
            label += f" p={r['config']['p']:g}"
        if len({x["config"]["seed"] for x in recs}) > 1:
            label += f" (seed {r['config']['seed']})"
        # runs that differ only in their schedule would otherwise share a legend entry
        if len({(x["config"].get("lr"), x["config"].get("lr_decay")) for x in recs}) > 1:
            label += f" (lr x{r['config'].get('lr_decay'):g}/epoch)"
        # Only measured points: one per epoch, at the step count reached by its end.
        ax.plot([e["step"] for e in h], [e["train_loss"] for e in h], ".-", label=label)
    ax.set_xlabel("SGD steps")
    ax.set_ylabel("average training loss")
    ax.set_title(_title(recs, "Fig. 1a: learning curves"), fontsize=9)
    ax.legend(fontsize=7)
    return _save(plt, fig, path)


def _by_model_p(records):
    # A model's "corrupt" runs form its curve. The "true" run is its p = 0 point (a sweep trains corrupt
    # p=0 as the true run); "random-labels" stands in for p = 1 only where no corrupt p = 1 run exists.
    has_p1 = {r["config"]["model"] for r in records if r["config"]["variant"] == "corrupt" and float(r["config"]["p"]) == 1}
    groups: dict[str, dict[float, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        p = _p_of(r)
        m = r["config"]["model"]
        if p is not None and (r["config"]["variant"] != "random-labels" or m not in has_p1):
            groups[m][p].append(r)
    return groups


def plot_steps_to_fit(records: Sequence[dict], path) -> Path:
    """Fig. 1b: steps to fit (mean over seeds) vs. corruption p; "x" = never fitted (the steps it ran), off the line."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for model, by_p in sorted(_by_model_p(records).items()):
        ps = sorted(by_p)
        steps = [np.mean([r["steps_to_fit"] if r["fitted"] else r["steps"] for r in by_p[p]]) for p in ps]
        fitted = [all(r["fitted"] for r in by_p[p]) for p in ps]
        # the line joins the fitted runs only: a run that never fitted has no "steps to fit" to join
        fit_ps = [p for p, f in zip(ps, fitted) if f]
        line, = ax.plot(fit_ps, [s for s, f in zip(steps, fitted) if f], "o-", label=f"{model}: fitted", zorder=3)
        nf = [(p, s) for p, s, f in zip(ps, steps, fitted) if not f]
        if nf:
            ax.plot([p for p, _ in nf], [s for _, s in nf], "x", linestyle="none", markersize=9, markeredgewidth=2,
                    color=line.get_color(), zorder=3, label=f"{model}: never fitted (steps run)")
    ax.set_xlabel("label corruption p")
    ax.set_ylabel("SGD steps to reach target train accuracy")
    ax.set_title(_title(records, "Fig. 1b: convergence slowdown"), fontsize=9)
    ax.legend(fontsize=7)
    return _save(plt, fig, path)


def plot_test_error(records: Sequence[dict], path) -> Path:
    """Fig. 1c: final test error (solid) and best-along-the-way test error (dashed) vs. p."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for model, by_p in sorted(_by_model_p(records).items()):
        ps = sorted(by_p)
        final = [1 - np.mean([r["final_test_acc"] for r in by_p[p]]) for p in ps]
        best = [1 - np.mean([r["best_test_acc"] for r in by_p[p]]) for p in ps]
        line, = ax.plot(ps, final, "o-", label=f"{model} (end of training)")
        ax.plot(ps, best, "s--", color=line.get_color(), alpha=0.6, label=f"{model} (best during training)")
    ax.axhline(0.9, color="gray", lw=0.8, ls=":", label="chance (10 classes)")
    ax.set_xlabel("label corruption p")
    ax.set_ylabel("test error (clean test labels)")
    ax.set_ylim(0, 1)
    ax.set_title(_title(records, "Fig. 1c: generalization error growth"), fontsize=9)
    ax.legend(fontsize=7)
    return _save(plt, fig, path)


def plot_all(records: Sequence[dict], outdir, prefix: str = "deepfit") -> list[Path]:
    """Write fig1a/fig1b/fig1c PNGs for the records that fit each figure; return the paths written."""
    outdir = Path(outdir)
    out = []
    if records:
        # Fig. 1a compares data variants; corruption levels have their own figures (1b, 1c).
        variants = [r for r in records if r["config"]["variant"] != "corrupt"]
        out.append(plot_loss_curves(variants or records, outdir / f"{prefix}_fig1a_loss_curves.png"))
    if any(len(by_p) >= 2 for by_p in _by_model_p(records).values()):  # a curve needs two p values
        out.append(plot_steps_to_fit(records, outdir / f"{prefix}_fig1b_steps_to_fit.png"))
        out.append(plot_test_error(records, outdir / f"{prefix}_fig1c_test_error.png"))
    return out
