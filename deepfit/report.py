"""The kernel-vs-network report: complexity measures on true vs random labels (Neyshabur et al. Fig. 1-3).

On training subsets of increasing size, with true and with random labels, the report trains a
network (:func:`deepfit.train.train`), solves the exact kernel interpolant on the same points
(:func:`kernelfit.solve.fit_interpolant`), computes every measure of :mod:`deepfit.measures` and
:mod:`deepfit.hessian` plus the kernel's RKHS norm, and writes

* ``report.json``   every number, the resolved options and provenance (git SHA, versions, machine),
* ``fig1_measures_vs_size.png``  measure vs training-set size, true (blue) vs random (red),
* ``fig2_pac_bayes.png``         expected sharpness vs KL for a sweep of alpha, per size,
* ``fig3_mixing.png``            ``mix_true`` true samples plus a growing set of random ones,
* ``report.html``   a self-contained page (images embedded as base64) with the plots and tables,
* ``report.md``     the random / true ratio of every measure per size, as a Markdown table.

Entry point: :func:`main` (``deepfit report``), or ``python -m deepfit.report``. ``--preset quick``
is the cheapest configuration (the bundled MNIST subset, 250/500 samples, a 128-unit MLP, reduced
sample counts for the stochastic measures; about a minute or less on 2 CPU cores). The defaults
(``cpu-mnist``: MNIST subsets 500/1000/2000, a 512-unit MLP, mixing 1000 true + up to 1000 random)
take minutes; ``--preset paper-cifar`` selects the paper-scale VGG / CIFAR-10 rows (a GPU job).
Every network is measured by :func:`deepfit.suite.measure_all`; norm measures are reported in
their paper's convention (``capacity``; see ``deepfit.measures.MEASURES``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from kernelfit.errors import InputError, KernelfitError
from kernelfit.progress import Heartbeat, get_logger
from kernelfit.solve import SolveOptions

from .report_render import make_plots, random_true_ratios, ratio_table_markdown, write_html
from .suite import MeasureOptions, measure_all
from .train import TrainConfig

__all__ = ["ReportOptions", "REPORT_TRAIN", "REPORT_SOLVE", "run_report", "make_plots", "write_html",
           "ratio_table_markdown", "main", "PRESETS"]

# The report's network and kernel, where they differ on purpose from TrainConfig's / SolveOptions' defaults
# (those reproduce Zhang et al.'s CIFAR-10 runs and kernelfit's solve): a small MLP on MNIST pixels / 255,
# trained to 100% training accuracy (300 epochs at most, lr 0.05 decaying 2% per epoch), measured on 1000
# test images; the exact float64 interpolant with the "auto" bandwidth (5 for MNIST pixels / 255, the
# median otherwise; resolved by the report, as no other caller knows the data set).
REPORT_TRAIN = TrainConfig(model="mlp2", dataset="mnist", n_test=1000, preprocess="normalize", crop=None, width=512,
                           lr=0.05, lr_decay=0.98, max_epochs=300)
REPORT_SOLVE = SolveOptions(kernel="gaussian", bandwidth="auto", mode="float64", jitter=0.0)


@dataclass(frozen=True)
class ReportOptions:
    """Everything that changes the report's numbers: report-only fields plus the three option sets it composes.

    Report-only: ``sizes`` (training subset sizes; nested prefixes of one seeded permutation),
    ``mix_true`` true-label samples plus each of ``mix_random`` random-label samples in the mixing
    experiment (empty = skip), ``data_dir``, ``run_kernel``.

    ``train`` (:class:`deepfit.train.TrainConfig`, default :data:`REPORT_TRAIN`): the data set
    (``dataset``, ``n_test``, ``preprocess``, ``crop``, ``data_seed``: permutation and random labels)
    and the network (``model``, ``width``, ``batch_norm``, SGD ``lr``, ``lr_decay``, ``momentum``,
    ``batch_size``, ``max_epochs``, ``target_train_acc``, ``seed``). The report sets ``n_train`` and
    the labels of each run itself, so ``n_train`` must stay None and ``variant`` "true".

    ``measure`` (:class:`deepfit.suite.MeasureOptions`, its defaults): margin percentile, sharpness,
    PAC-Bayes, Hessian and basin settings, ``seed``.

    ``solve`` (:class:`kernelfit.solve.SolveOptions`, default :data:`REPORT_SOLVE`): the kernel
    interpolant; its ``bandwidth`` may also be "auto" (5.0 for MNIST pixels / 255, median otherwise).

    :meth:`quick` is the cheapest documented configuration, :meth:`paper_cifar` the paper-scale one.
    """

    sizes: tuple[int, ...] = (500, 1000, 2000)
    mix_true: int = 1000
    mix_random: tuple[int, ...] = (0, 250, 500, 1000)
    data_dir: str | None = None
    run_kernel: bool = True
    train: TrainConfig = REPORT_TRAIN
    measure: MeasureOptions = MeasureOptions()
    solve: SolveOptions = REPORT_SOLVE

    @classmethod
    def quick(cls) -> "ReportOptions":
        """A first look in about a minute on 2 CPU cores: the bundled MNIST subset, 250/500 samples, a 128-unit
        MLP (100 epochs at most), 500 test images, fewer steps and samples for the stochastic measures."""
        return cls(sizes=(250, 500), mix_true=250, mix_random=(250,),
                   train=dataclasses.replace(REPORT_TRAIN, dataset="mnist-subset", n_test=500, width=128, max_epochs=100),
                   measure=MeasureOptions(sharpness_steps=5, pac_alphas=(1e-3, 1e-2, 3e-2, 1e-1), pac_samples=4,
                                          hessian_k=2, hessian_samples=6, basin_directions=6))

    @classmethod
    def paper_cifar(cls) -> "ReportOptions":
        """Neyshabur et al. 2017's scale: VGG on CIFAR-10 subsets up to 50K, 10K true + random mixing (a GPU job)."""
        return cls(sizes=(5000, 10000, 20000, 30000, 40000, 50000), mix_true=10000,
                   mix_random=(0, 5000, 10000, 20000, 30000, 40000),
                   train=dataclasses.replace(REPORT_TRAIN, dataset="cifar10", model="vgg-cifar", width=64, n_test=10000,
                                             lr=0.01, lr_decay=0.98, max_epochs=300),
                   measure=MeasureOptions(hessian_k=3, pac_samples=5),
                   solve=dataclasses.replace(REPORT_SOLVE, mode="mixed", bandwidth="median"))

    def kernel_options(self) -> SolveOptions:
        """:attr:`solve` with the "auto" bandwidth resolved for :attr:`train`'s data set."""
        bw = self.solve.bandwidth
        if bw == "auto":
            bw = 5.0 if self.train.dataset.startswith("mnist") else "median"
        return dataclasses.replace(self.solve, bandwidth=bw)

    def validated(self) -> "ReportOptions":
        if not self.sizes or any(int(s) < 10 for s in self.sizes):
            raise InputError(
                f"sizes must be a non-empty list of integers >= 10, got {self.sizes!r}. Fix: e.g. --sizes 500,1000,2000."
            )
        if any(int(r) < 0 for r in self.mix_random) or (self.mix_random and int(self.mix_true) < 10):
            raise InputError(f"mix_true must be >= 10 and mix_random >= 0, got {self.mix_true!r} and {self.mix_random!r}.")
        if self.train.n_train is not None or self.train.variant != "true":
            raise InputError(f"the report chooses each run's training set and labels itself, but train has n_train="
                             f"{self.train.n_train!r}, variant={self.train.variant!r}. Fix: leave them at None and 'true' "
                             "and set sizes / mix_true / mix_random instead.")
        self.kernel_options().validated()
        self.measure.validated()
        return self


_log = get_logger("deepfit.report")

# Presets: each a ReportOptions constructor; flags given on the command line then override its fields.
PRESETS: dict[str, Callable[[], ReportOptions]] = {
    "quick": ReportOptions.quick,
    "cpu-mnist": ReportOptions,   # the defaults: reduced scale for a 2-core CPU
    "paper-cifar": ReportOptions.paper_cifar,
}


# --------------------------------------------------------------------------------------------
# one run: train + measure + kernel
# --------------------------------------------------------------------------------------------

def _kernel_run(x_train, y_train, x_test, y_test, k: int, opts: ReportOptions) -> dict:
    from kernelfit.data import to_features
    from kernelfit.solve import fit_interpolant, one_hot

    t0 = time.perf_counter()
    Xf = to_features(x_train, np.float64)
    interp = fit_interpolant(Xf, one_hot(y_train, k), opts.kernel_options())
    scores = interp.predict(to_features(x_test, np.float64))
    return dict(rkhs_norm=interp.rkhs_norm, test_error=float(np.mean(scores.argmax(1) != y_test)),
                bandwidth=interp.bandwidth, mode=interp.mode, residual_relative=interp.stats["residual_relative"],
                time_s=time.perf_counter() - t0)


def _one_run(tag: str, x_tr, y_tr, x_te, y_te, k: int, opts: ReportOptions, device) -> dict:
    from deepfit.data import prepare_arrays
    from deepfit.train import train

    t = opts.train
    say = lambda line: _log.info(f"[report] {tag}: {line}")  # noqa: E731
    data = prepare_arrays(x_tr, y_tr, x_te, y_te, k, preprocess=t.preprocess, crop=t.crop,
                          info={"report_run": tag, "n_train": int(len(y_tr))})
    cfg = dataclasses.replace(t, n_train=int(len(y_tr)), n_test=int(len(y_te)))
    say(f"training {t.model} on {len(y_tr)} images ...")
    beat = Heartbeat(_log)   # the per-epoch lines: all of them at -v, one every few seconds otherwise

    def epoch_line(line):
        if _log.isEnabledFor(logging.DEBUG):
            _log.debug(f"[report] {tag}: {line}")
        else:
            beat.tick(f"[report] {tag}: {line}")

    res = train(cfg, data, device=device, log=epoch_line)
    rec = res.record
    say(f"trained {rec['epochs']} epochs, train acc {rec['final_train_acc']:.4f}, "
        f"test acc {rec['final_test_acc']:.4f} ({rec['train_time_s']:.1f}s)")
    dev = next(res.model.parameters()).device
    X = data.x_train.to(dev)
    y = data.y_train.to(dev)
    net = measure_all(res.model, X, y, opts.measure, log=say)
    out = dict(tag=tag, n_train=int(len(y_tr)),
               network=dict(run_id=rec["run_id"], epochs=rec["epochs"], fitted=rec["fitted"],
                            train_acc=rec["final_train_acc"], test_acc=rec["final_test_acc"],
                            train_time_s=rec["train_time_s"], model_params=rec["model_params"], measures=net))
    if opts.run_kernel:
        say("kernel interpolant ...")
        out["kernel"] = _kernel_run(x_tr, y_tr, x_te, y_te, k, opts)
    m = out["network"]["measures"]
    sharp = m["measures"].get("sharpness", {}).get("value", float("nan"))
    say(f"margin {m['margin']['value']:.3g}, sharpness {sharp:.3g}"
        + (f", kernel RKHS norm {out['kernel']['rkhs_norm']:.4g}" if opts.run_kernel else "")
        + f" (measures {m['time_s']:.1f}s)")
    return out


def run_report(opts: ReportOptions = ReportOptions(), *, device: str = "auto", download: bool = False) -> dict:
    """Train, solve and measure every configuration; return the JSON-able result.

    Progress lines go to the ``deepfit`` logger (:func:`kernelfit.progress.set_verbosity`): one when each
    run starts, trains, is measured (per measure) and solved, and a count of the runs done.

    ``download``: fetch a missing data set from its canonical source (kernelfit.data.download).
    """
    from deepfit.train import resolve_device
    from kernelfit.data import load_dataset
    from kernelfit.randomize import random_labels

    opts = opts.validated()
    dev = resolve_device(device)
    ds = load_dataset(opts.train.dataset, data_dir=opts.data_dir, download=download)
    k = ds.num_classes
    need = max(max(opts.sizes), (opts.mix_true + max(opts.mix_random)) if opts.mix_random else 0)
    if need > len(ds.y_train):
        raise InputError(f"the report needs {need} training examples but {opts.train.dataset!r} has {len(ds.y_train)}. "
                         "Fix: use smaller --sizes / --mix-random, or a larger dataset (e.g. --dataset mnist with --data-dir).")
    n_test = len(ds.y_test) if opts.train.n_test is None else opts.train.n_test
    if n_test > len(ds.y_test):
        raise InputError(
            f"n_test={n_test} but {opts.train.dataset!r} has {len(ds.y_test)} test examples. Fix: --n-test {len(ds.y_test)}."
        )
    rng_perm, rng_lab, rng_test = (np.random.default_rng(s) for s in np.random.SeedSequence(opts.train.data_seed).spawn(3))
    perm = rng_perm.permutation(len(ds.y_train))[:need]
    x_all, y_true = ds.x_train[perm], ds.y_train[perm]
    y_rand = random_labels(y_true, k, rng_lab)  # one draw: nested subsets share their random labels
    te = np.sort(rng_test.permutation(len(ds.y_test))[:n_test])
    x_te, y_te = ds.x_test[te], ds.y_test[te]
    t0 = time.perf_counter()
    n_runs = 2 * len(opts.sizes) + len(set(opts.mix_random) - {0})
    _log.info(f"[report] {n_runs} runs of {opts.train.model} on {ds.name} (sizes {list(opts.sizes)}), device {dev}")
    runs = []
    for n in opts.sizes:
        for lab, yy in (("true", y_true), ("random", y_rand)):
            r = _one_run(f"{lab}-{n}", x_all[:n], yy[:n], x_te, y_te, k, opts, dev)
            _log.info(f"[report] run {len(runs) + 1} of {n_runs} done ({time.perf_counter() - t0:.0f} s)")
            r.update(labels=lab, experiment="size")
            runs.append(r)
    mixing = []
    # the 0-random baseline is always part of the mixing curve (reused from the size runs when possible)
    for r_extra in sorted({0, *opts.mix_random}) if opts.mix_random else ():
        n = opts.mix_true + r_extra
        reuse = next((r for r in runs if r["labels"] == "true" and r["n_train"] == n and r_extra == 0), None)
        if reuse is not None:
            r = dict(reuse, experiment="mixing", n_random=0, reused_from=reuse["tag"])
        else:
            yy = np.concatenate([y_true[:opts.mix_true], y_rand[opts.mix_true:n]])
            r = _one_run(f"mix-{opts.mix_true}+{r_extra}", x_all[:n], yy, x_te, y_te, k, opts, dev)
            _log.info(f"[report] mixing run +{r_extra} done ({time.perf_counter() - t0:.0f} s)")
            r.update(labels="mixed", experiment="mixing", n_random=int(r_extra))
        mixing.append(r)
    # Theorem 1 of Zhang et al. on the largest random-label subset: the 2n + d network fits it exactly
    from kernelfit.data import to_features

    from .expressivity import build_interpolating_network, verify_fit

    nmax = max(opts.sizes)
    Xf = to_features(x_all[:nmax], np.float64)
    try:
        expr = verify_fit(build_interpolating_network(Xf, y_rand[:nmax], seed=opts.train.seed), Xf, y_rand[:nmax])
    except InputError as e:  # duplicate images make the construction impossible; say so in the report
        expr = dict(error=str(e))
    result = dict(options=dataclasses.asdict(opts), device=str(dev), dataset=dict(name=ds.name, source=ds.source, num_classes=k),
                  runs=runs, mixing=mixing, expressivity=dict(expr, n=nmax, labels="random"),
                  total_time_s=time.perf_counter() - t0)
    result["ratios"] = random_true_ratios(result)
    return result


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

def _ints(s: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in s.split(",") if v.strip() != "")
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 500,1000,2000, got {s!r}") from None


def _floats(s: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in s.split(",") if v.strip() != "")
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 1e-3,1e-2, got {s!r}") from None


def _bandwidth(s: str):
    if s in ("auto", "median"):
        return s
    try:
        return float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, 'median' or 'auto', got {s!r}") from None


def _default_text(v) -> str:
    if isinstance(v, tuple):
        return ",".join(f"{x:g}" if isinstance(x, float) else str(x) for x in v) or "(none)"
    return "none" if v is None else (f"{v:g}" if isinstance(v, float) else str(v))


def _get(opts: ReportOptions, path: str):
    obj = opts
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _with(opts: ReportOptions, path: str, value) -> ReportOptions:
    """``opts`` with the field at ``path`` ("sizes", "train.lr", ...) replaced by ``value``."""
    head, _, rest = path.partition(".")
    if not rest:
        return dataclasses.replace(opts, **{head: value})
    return dataclasses.replace(opts, **{head: dataclasses.replace(getattr(opts, head), **{rest: value})})


# flag -> the ReportOptions field(s) it sets (--seed seeds both the network and every measure)
_FLAG_FIELDS: dict[str, tuple[str, ...]] = {}


def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The ``deepfit report`` options; each help line names its default once (the cpu-mnist values)."""
    p = argparse.ArgumentParser(prog="deepfit report", description=__doc__.split("\n")[0], add_help=add_help)
    d = ReportOptions()

    def opt(group, flag, path, help_text="", **kw):
        paths = (path,) if isinstance(path, str) else tuple(path)
        dest = flag[2:].replace("-", "_")
        _FLAG_FIELDS[dest] = paths
        shown = kw.pop("shown", None) or _default_text(_get(d, paths[0]))
        kw.setdefault("default", None)  # None = not given: the preset or ReportOptions decides
        group.add_argument(flag, dest=dest, help=(help_text + " " if help_text else "") + f"(default {shown})", **kw)

    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="start from a preset, then apply the flags given: quick (ReportOptions.quick(): about a minute "
                        "on 2 CPU cores), cpu-mnist (the defaults below), paper-cifar (paper scale, a GPU job)")
    p.add_argument("--out", default=None, help="output directory (default ./report_<dataset>_<model>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report in --out")
    from .args import add_verbosity_flags, device_arg, positive_int
    p.add_argument("--device", type=device_arg(allow_list=False), default="auto", help="auto | cpu | cuda (default auto)")
    p.add_argument("--threads", type=positive_int("--threads"), default=None,
                   help="torch intra-op threads (default: torch's choice)")
    add_verbosity_flags(p)
    g = p.add_argument_group("data")
    opt(g, "--dataset", "train.dataset", "mnist | mnist-subset | cifar10")
    opt(g, "--data-dir", "data_dir", "directory with the data sets", shown="kernelfit's resolution")
    g.add_argument("--download", action="store_true", help="fetch a missing data set from its canonical source")
    opt(g, "--sizes", "sizes", "training subset sizes", type=_ints)
    opt(g, "--n-test", "train.n_test", "test images", type=int)
    opt(g, "--preprocess", "train.preprocess", "", choices=["normalize", "whiten"])
    opt(g, "--crop", "train.crop", "centre crop size", type=int)
    opt(g, "--data-seed", "train.data_seed", "seed of the subset permutation and the random labels", type=int)
    opt(g, "--mix-true", "mix_true", "true-label samples in the mixing experiment (paper 10000)", type=int)
    opt(g, "--mix-random", "mix_random", "random-label samples added to them; the 0 baseline is always included; "
                                         "'' skips mixing", type=_ints)
    g = p.add_argument_group("network")
    opt(g, "--model", "train.model", "a deepfit.models name")
    opt(g, "--width", "train.width", "", type=int)
    opt(g, "--batch-norm", "train.batch_norm", "add batch norm where the model supports it", action="store_const",
        const=True, shown="the model's own")
    opt(g, "--lr", "train.lr", "initial SGD learning rate", type=float)
    opt(g, "--lr-decay", "train.lr_decay", "learning-rate factor per epoch", type=float)
    opt(g, "--batch-size", "train.batch_size", "", type=int)
    opt(g, "--max-epochs", "train.max_epochs", "trains to 100%% training accuracy or this many epochs", type=int)
    opt(g, "--seed", ("train.seed", "measure.seed"), "seed of init, batch order and every measure", type=int)
    g = p.add_argument_group("measures")
    opt(g, "--sharpness-eps", "measure.sharpness_eps", "sharpness box half-width eps (|w|+1)", type=float)
    opt(g, "--sharpness-steps", "measure.sharpness_steps", "projected gradient ascent steps", type=int)
    opt(g, "--pac-alphas", "measure.pac_alphas", "PAC-Bayes noise scales alpha", type=_floats)
    opt(g, "--pac-samples", "measure.pac_samples", "noise draws per alpha", type=int)
    opt(g, "--pac-target", "measure.pac_target", "expected sharpness at which the PAC-Bayes KL is read off", type=float)
    opt(g, "--hessian-k", "measure.hessian_k", "top Hessian eigenvalues (0: skip the Hessian measures)", type=int)
    opt(g, "--hessian-samples", "measure.hessian_samples", "Hutchinson probes", type=int)
    opt(g, "--basin-directions", "measure.basin_directions", "random directions for the basin radius", type=int)
    g = p.add_argument_group("kernel")
    opt(g, "--bandwidth", "solve.bandwidth", "a number, median, or auto (5 for MNIST pixels / 255, median otherwise)",
        type=_bandwidth)
    opt(g, "--kernel-mode", "solve.mode", "", choices=["float64", "float32", "mixed"])
    opt(g, "--no-kernel", "run_kernel", "skip the kernel interpolant", action="store_const", const=False,
        shown="the kernel runs")
    return p


def options_from_args(args: argparse.Namespace) -> ReportOptions:
    """The preset's ReportOptions (default: cpu-mnist) with every flag given applied; validated."""
    opts = PRESETS[args.preset or "cpu-mnist"]()
    for dest, paths in _FLAG_FIELDS.items():
        v = getattr(args, dest, None)
        if v is not None:
            for path in paths:
                opts = _with(opts, path, v)
    return opts.validated()


def main(argv: Sequence[str] | None = None) -> int:
    """``deepfit report [options]``: run the report and write JSON, PNG and HTML. Returns an exit code."""
    args = build_parser().parse_args(argv)
    return _run_args(args, argv)


def register_cli(subparsers) -> None:
    """Hook for ``deepfit.cli``: adds the ``report`` subcommand (``_EXTENSIONS = ("deepfit.report",)``)."""
    p = subparsers.add_parser("report", parents=[build_parser(add_help=False)], help="kernel-vs-network measures report",
                              description=__doc__.split("\n")[0])
    p.set_defaults(func=lambda a: _run_args(a, None))


def _run_args(args: argparse.Namespace, argv) -> int:
    from kernelfit.progress import set_verbosity
    from kernelfit.provenance import provenance
    from kernelfit.results import write_json_atomic

    set_verbosity(args.verbose - args.quiet)
    try:
        opts = options_from_args(args)
    except InputError as e:
        print(f"deepfit report: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path(f"report_{opts.train.dataset}_{opts.train.model}")
    if (out / "report.json").exists() and not args.overwrite:
        print(f"deepfit report: error: {out / 'report.json'} exists. Fix: pass --overwrite or another --out.", file=sys.stderr)
        return 2
    from kernelfit.places import check_writable_dir
    try:
        check_writable_dir(out, "--out")   # before hours of training, not after
    except InputError as e:
        print(f"deepfit report: error: {e}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(int(args.threads))
    prov = provenance(["deepfit", "report", *(argv if argv is not None else sys.argv[1:])])   # the code that runs
    try:
        result = run_report(opts, device=args.device, download=args.download)
    except KernelfitError as e:  # bad input and missing data alike: say what to fix, exit 2
        print(f"deepfit report: error: {e}", file=sys.stderr)
        return 2
    result["provenance"] = prov
    figures = make_plots(result, out)
    result["figures"] = {k: v.name for k, v in figures.items()}
    write_json_atomic(out / "report.json", result, overwrite=True)
    write_html(result, figures, out / "report.html")
    (out / "report.md").write_text(ratio_table_markdown(result), encoding="utf-8")
    print(json.dumps({"out": str(out), "ratios_random_over_true": result["ratios"]}, default=str))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
