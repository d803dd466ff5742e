"""The report's views of its numbers: scalar measures and random / true ratios of a run, the Markdown
ratio table, the figures (matplotlib) and the self-contained report.html (Jinja2, images embedded as
base64). Pure functions of the ``report.json`` dict; :mod:`deepfit.report` runs and writes."""

from __future__ import annotations

import base64
import math
from pathlib import Path

from . import measures as M

__all__ = ["scalar_measures", "random_true_ratios", "ratio_table_markdown", "make_plots", "flatten", "write_html"]


def _se(v):
    return v[1] if isinstance(v, (list, tuple)) else float("nan")


def scalar_measures(run: dict) -> dict[str, tuple[float, float]]:
    """``name -> (value, stderr)`` for one run; stderr is nan for deterministic quantities.

    Norm measures appear as their paper's capacity (:data:`deepfit.measures.MEASURES` ``power``:
    ``(value / margin)^2`` for Neyshabur et al., ``value / margin`` for Bartlett et al.).
    """
    res = run["network"]["measures"]
    ms = res["measures"]
    nan = float("nan")
    out = {}
    for name in M.MEASURES:
        if name in ms:
            out[f"{name} capacity"] = (ms[name]["capacity"], nan)
    out["sharpness"] = (ms["sharpness"]["value"], nan)
    out["pac-bayes KL"] = (ms["pac-bayes"]["at_target"]["kl"], nan)
    if "hessian-trace" in ms:
        top = ms["hessian-top-eigenvalues"]
        out["hessian top eig"] = (top["value"][0], top["residual"][0])
        out["hessian trace"] = (ms["hessian-trace"]["value"], ms["hessian-trace"]["stderr"])
        out["hessian frobenius"] = (ms["hessian-frobenius"]["value"], ms["hessian-frobenius"]["stderr"])
        out["-log basin volume (spectrum)"] = (-ms["basin-volume-spectrum"]["log_volume"], ms["basin-volume-spectrum"]["stderr"])
        out["mean basin radius"] = tuple(ms["basin-volume-random"]["mean_radius"][:2])
    if "kernel" in run:
        out["kernel RKHS norm"] = (run["kernel"]["rkhs_norm"], nan)
        out["kernel test error"] = (run["kernel"]["test_error"], nan)
    out["network test error"] = (1.0 - run["network"]["test_acc"], nan)
    out["margin"] = (res["margin"]["value"], nan)
    return out


# y-axis label of each scalar (what the panel plots)
_Y_LABELS = {
    "l2 capacity": "prod ||W_i||_F^2 / margin^2",
    "l1-path capacity": "(l1 path norm)^2 / margin^2",
    "l2-path capacity": "(l2 path norm)^2 / margin^2",
    "spectral capacity": "prod ||W_i||_2^2 / margin^2",
    "spectral-complexity capacity": "R_A / margin",
    "neyshabur2018 capacity": "prod||W||_2^2 sum||W||_F^2/||W||_2^2 / margin^2",
    "sharpness": "(max L(w+nu) - L) / (1 + L)",
    "pac-bayes KL": "KL at target expected sharpness",
    "hessian top eig": "lambda_max(H)",
    "hessian trace": "tr H",
    "hessian frobenius": "||H||_F",
    "-log basin volume (spectrum)": "-log volume",
    "mean basin radius": "radius",
    "kernel RKHS norm": "||f||_H",
    "kernel test error": "test error",
    "network test error": "test error",
    "margin": "5th-percentile margin",
}


def _style_axis(ax, name: str, values) -> None:
    if _LOG_OK(values) and max(values) / min(values) > 20:
        ax.set_yscale("log")
    else:
        ax.ticklabel_format(axis="y", useOffset=False, style="plain")  # the values themselves, no "+1e3" or "1e6" offset text
    ax.ticklabel_format(axis="x", useOffset=False, style="plain")
    ax.set_ylabel(_Y_LABELS.get(name, name), fontsize=8)
    ax.set_title(name, fontsize=10)
    ax.grid(alpha=0.3)


def random_true_ratios(result: dict) -> dict:
    """random / true ratio of every scalar measure at each training-set size."""
    by = {(r["labels"], r["n_train"]): scalar_measures(r) for r in result["runs"]}
    out = {}
    for n in sorted({r["n_train"] for r in result["runs"]}):
        if ("true", n) in by and ("random", n) in by:
            t, r = by[("true", n)], by[("random", n)]
            out[str(n)] = {k: (r[k][0] / t[k][0] if t[k][0] not in (0.0,) and math.isfinite(t[k][0]) else float("nan"))
                           for k in t if k in r}
    return out


def ratio_table_markdown(result: dict) -> str:
    """The random / true ratios as a Markdown table, one row a measure, one column a training-set size."""
    ratios = result.get("ratios") or {}
    if not ratios:
        return ""
    sizes = list(ratios)
    names = [n for n in scalar_measures(result["runs"][0]) if any(n in ratios[s] for s in sizes)]
    lines = ["| measure (random / true) | y axis | " + " | ".join(f"n = {s}" for s in sizes) + " |",
             "|---|---|" + "---|" * len(sizes)]
    for n in names:
        vals = [ratios[s].get(n, float("nan")) for s in sizes]
        label = _Y_LABELS.get(n, n).replace("|", "\\|")  # a bare | would end the Markdown cell
        lines.append(f"| {n} | {label} | " + " | ".join("nan" if not math.isfinite(v) else f"{v:.3g}" for v in vals) + " |")
    return "\n".join(lines) + "\n"


_LOG_OK = lambda vals: all(v > 0 and math.isfinite(v) for v in vals)  # noqa: E731


def make_plots(result: dict, out_dir: Path) -> dict[str, Path]:
    """Write the three PNG figures; return ``{figure name: path}``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    paths = {}
    runs = result["runs"]
    names = list(scalar_measures(runs[0]).keys())
    ncol = 4
    nrow = math.ceil(len(names) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4 * ncol, 3.1 * nrow), squeeze=False)
    for ax, name in zip(axes.flat, names):
        for lab, color in (("true", "tab:blue"), ("random", "tab:red")):
            rs = sorted((r for r in runs if r["labels"] == lab), key=lambda r: r["n_train"])
            xs = [r["n_train"] for r in rs]
            vals = [scalar_measures(r)[name] for r in rs]
            ys, es = [v[0] for v in vals], [0.0 if math.isnan(v[1]) else v[1] for v in vals]
            ax.errorbar(xs, ys, yerr=es, marker="o", color=color, label=f"{lab} labels", capsize=3)
        allv = [v for v in (scalar_measures(r)[name][0] for r in runs) if math.isfinite(v)]
        _style_axis(ax, name, allv or [1.0])
        ax.set_xlabel("training-set size")
        ax.legend(fontsize=7)   # on every panel: a panel read alone still says which curve is which
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(f"Measures vs training-set size, true vs random labels ({result['dataset']['name']}, "
                 f"{result['options']['train']['model']})")
    fig.tight_layout()
    paths["fig1"] = out_dir / "fig1_measures_vs_size.png"
    fig.savefig(paths["fig1"], dpi=72)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    sizes = sorted({r["n_train"] for r in runs})
    cmap = plt.get_cmap("viridis")
    for ax, lab in zip(axes, ("true", "random")):
        for i, n in enumerate(sizes):
            r = next((r for r in runs if r["labels"] == lab and r["n_train"] == n), None)
            if r is None:
                continue
            rows = r["network"]["measures"]["measures"]["pac-bayes"]["sweep"]
            kl = [row["kl"] for row in rows]
            es = [row["expected_sharpness"] for row in rows]
            ax.errorbar(kl, [e[0] for e in es], yerr=[e[1] for e in es], marker="o", capsize=2,
                        color=cmap(i / max(1, len(sizes) - 1)), label=f"n = {n}")
        ax.set_xscale("log")
        ax.set_xlabel("KL = sum w^2 / (2 sigma^2)")
        ax.set_ylabel("expected sharpness  E L(w+nu) - L(w)")
        ax.yaxis.set_tick_params(labelleft=True)
        ax.ticklabel_format(axis="y", useOffset=False, style="plain")
        ax.set_title(f"{lab} labels")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("PAC-Bayes: expected sharpness vs KL over alpha (sigma_i = alpha (10|w_i| + 1))")
    fig.tight_layout()
    paths["fig2"] = out_dir / "fig2_pac_bayes.png"
    fig.savefig(paths["fig2"], dpi=72)
    plt.close(fig)

    mix = result.get("mixing") or []
    if mix:
        names_m = [n for n in names if n not in ("margin",)]
        nrow = math.ceil(len(names_m) / ncol)
        fig, axes = plt.subplots(nrow, ncol, figsize=(4 * ncol, 3.1 * nrow), squeeze=False)
        xs = [r["n_random"] for r in mix]
        for ax, name in zip(axes.flat, names_m):
            vals = [scalar_measures(r)[name] for r in mix]
            ax.errorbar(xs, [v[0] for v in vals], yerr=[0.0 if math.isnan(v[1]) else v[1] for v in vals],
                        marker="o", color="tab:purple", capsize=3,
                        label=f"{result['options']['mix_true']} true + n random labels")
            _style_axis(ax, name, [v[0] for v in vals if math.isfinite(v[0])] or [1.0])
            ax.set_xlabel("# random-label samples added")
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(names_m):]:
            ax.axis("off")
        fig.suptitle(f"Mixing: {result['options']['mix_true']} true samples + a growing set of random-label samples")
        fig.tight_layout()
        paths["fig3"] = out_dir / "fig3_mixing.png"
        fig.savefig(paths["fig3"], dpi=72)
        plt.close(fig)
    return paths


def _fmt(v) -> str:
    """One table cell as plain text (the template escapes it)."""
    if isinstance(v, (tuple, list)) and len(v) >= 2 and all(isinstance(x, (int, float)) for x in v[:2]):
        return f"{_fmt(v[0])} \u00b1 {_fmt(v[1])}" if math.isfinite(v[1]) else _fmt(v[0])
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else "nan"
    return str(v)


def flatten(d, prefix: str = "") -> list[tuple[str, str]]:
    """A nested JSON value as ``(dotted key, text)`` rows: how the report shows options, provenance and
    expressivity as tables instead of a JSON dump. Lists of numbers or strings stay one cell."""
    if isinstance(d, dict):
        rows = []
        for k, v in d.items():
            rows += flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return rows
    if isinstance(d, (list, tuple)) and any(isinstance(x, (dict, list, tuple)) for x in d):
        rows = []
        for i, v in enumerate(d):
            rows += flatten(v, f"{prefix}[{i}]")
        return rows
    if isinstance(d, (list, tuple)):
        return [(prefix, ", ".join(_fmt(x) for x in d) or "(none)")]
    return [(prefix, _fmt(d))]


def _template():
    from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

    env = Environment(loader=PackageLoader("deepfit", "templates"), autoescape=select_autoescape(["html", "j2"]),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    return env.get_template("report.html.j2")


def write_html(result: dict, figures: dict[str, Path], path: Path) -> Path:
    """A self-contained HTML page (deepfit/templates/report.html.j2; images as base64 PNG): the figures, the
    per-run tables, the ratios, and the expressivity check, options and provenance as key / value tables."""
    o = result["options"]
    tr, me, so = o["train"], o["measure"], o["solve"]
    names = list(scalar_measures(result["runs"][0]).keys())

    def run_table(title, runs, mixing):
        head = ["run", "n"] + (["n random"] if mixing else []) + ["fitted", "train acc", "epochs"] + names
        rows = []
        for r in runs:
            sm = scalar_measures(r)
            lead = [r["tag"], r["n_train"]] + ([r.get("n_random", "")] if mixing else [])
            rows.append([_fmt(v) for v in lead + [r["network"]["fitted"], r["network"]["train_acc"], r["network"]["epochs"]]]
                        + [_fmt(sm[n]) for n in names])
        return dict(title=title, head=head, rows=rows, note="value \u00b1 standard error where the measure is a "
                                                           "stochastic estimate")

    tables = [run_table("Runs: true vs random labels", result["runs"], False)]
    if result.get("ratios"):
        ratios = result["ratios"]
        tables.append(dict(title="Ratio random / true", note="", head=["measure", "y axis"] + [f"n = {n}" for n in ratios],
                           rows=[[n, _Y_LABELS.get(n, n)] + [_fmt(r.get(n, float("nan"))) for r in ratios.values()]
                                 for n in names]))
    if result.get("mixing"):
        tables.append(run_table("Mixing experiment", result["mixing"], True))
    for title, value in (("Finite-sample expressivity (Zhang et al., Theorem 1)", result.get("expressivity", {})),
                         ("Options", o), ("Provenance", result.get("provenance") or {})):
        tables.append(dict(title=title, note="", head=["key", "value"], rows=[list(kv) for kv in flatten(value)]))
    figs = [dict(key=key, title=title, b64=base64.b64encode(Path(figures[key]).read_bytes()).decode())
            for key, title in (("fig1", "Figure 1: measures vs training-set size"), ("fig2", "Figure 2: PAC-Bayes"),
                               ("fig3", "Figure 3: mixing true and random labels")) if key in figures]
    ds = result["dataset"]["name"]
    page = _template().render(
        dataset=ds, dataset_note="CIFAR-10 (JPEG q75 copy) when read from the shared data" if ds.startswith("cifar") else "",
        model=tr["model"], width=tr["width"], device=result["device"], total_time_s=result["total_time_s"],
        percentile=_fmt(me["percentile"]), sharpness_eps=_fmt(me["sharpness_eps"]), pac_target=_fmt(me["pac_target"]),
        kernel=so["kernel"], figures=figs, tables=tables)
    path = Path(path)
    path.write_text(page, encoding="utf-8")
    return path
