"""``deepfit`` command line: the randomization tests of Zhang et al. (2017), end to end.

Subcommands
  models   list the model registry with parameter counts (and the paper's)
  train    one run -> one JSON line in --out
  sweep    label-corruption sweep (Fig. 1b/1c) and/or data variants (Fig. 1a), in parallel, skipping
           runs already in --out; writes the figures with --plot-dir
  table1   the paper's Table 1 grid (5 models x crop x weight decay x true/random labels); prints
           the reproduction next to the paper's numbers
  table    print the Table 1 comparison from an existing results file
  plot     Fig. 1a/1b/1c PNGs from a results file
  report   the kernel-vs-network measures report (deepfit.report)
  measure  every applicable complexity measure of a `train` checkpoint, as JSON (deepfit.suite)

Every run's JSON line has the config, run id, seeds, per-epoch history, steps to fit, best test
accuracy, git SHA and library versions; `train` does not append a configuration already in --out.
Extra subcommands (``report``, ``measure``) plug in through ``_EXTENSIONS`` (modules defining
``register_cli(subparsers)``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from kernelfit.catalog import DATASET_NAMES as _DATASETS  # the named datasets kernelfit.data reads
from kernelfit.errors import InputError, KernelfitError
from kernelfit.progress import get_logger, set_verbosity

from .args import add_verbosity_flags, crop_arg, csv_of, device_arg, positive_int

# The place for further subcommands: list a module here that defines ``register_cli(subparsers)``;
# each parser it adds sets ``func=callable(args) -> int`` via set_defaults.
_EXTENSIONS: tuple[str, ...] = ("deepfit.report", "deepfit.suite")


def _add_config_args(p: argparse.ArgumentParser, sweep: bool = False) -> None:
    g = p.add_argument_group("run configuration (changes the result; hashed into the run id)")
    g.add_argument("--model", default="mlp-1x512", help="model name (see `deepfit models`); default mlp-1x512")
    g.add_argument("--dataset", default="cifar10",
                   help=f"{' | '.join(_DATASETS)} (default cifar10; the data directory: --data-dir or $KERNELFIT_DATA)")
    if not sweep:
        g.add_argument("--variant", default="true",
                       help="true | corrupt | random-labels | shuffled-pixels | random-pixels | gaussian")
        g.add_argument("--p", type=float, default=0.0, help="label corruption probability (variant corrupt)")
    g.add_argument("--corrupt-test", action=argparse.BooleanOptionalAction, default=False,
                   help="also corrupt the test labels (default: test labels stay clean)")
    g.add_argument("--data-seed", type=int, default=0, help="seed of the randomization and subset draw")
    g.add_argument("--n-train", type=int, default=None, help="use a stratified subset of this many training images")
    g.add_argument("--n-test", type=int, default=None, help="... and this many test images")
    g.add_argument("--preprocess", default="whiten", choices=("whiten", "normalize"),
                   help="whiten: per-image whitening (paper); normalize: /255 + per-channel standardization")
    g.add_argument("--crop", type=crop_arg, default=28, help="centre crop size (paper: 28) or 'none'")
    g.add_argument("--batch-norm", action=argparse.BooleanOptionalAction, default=None,
                   help="add/remove batch norm where the model supports it (default: the model's own)")
    g.add_argument("--dropout", type=float, default=None, help="dropout probability (default: none)")
    g.add_argument("--width", type=int, default=None, help="width (vgg-cifar, mlp2)")
    g.add_argument("--lr", type=float, default=None, help="initial learning rate (default 0.1 Inception, 0.01 others)")
    g.add_argument("--lr-decay", type=float, default=0.95, help="learning-rate factor per epoch (default 0.95)")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--batch-size", type=int, default=128)
    g.add_argument("--weight-decay", type=float, default=0.0, help="L2 weight decay (default 0: off)")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=False,
                   help="random 28x28 crops during training")
    if not sweep:
        g.add_argument("--seed", type=int, default=0, help="seed of init, batch order, dropout, crops")
    g.add_argument("--target-train-acc", type=float, default=1.0, help="stop at this training accuracy (default 1.0)")
    g.add_argument("--max-epochs", type=int, default=100)
    g.add_argument("--max-steps", type=int, default=None, help="SGD-step budget (default: none)")


def _add_exec_args(p: argparse.ArgumentParser, sweep: bool = False) -> None:
    g = p.add_argument_group("execution (does not change the result)")
    g.add_argument("--out", required=True, help="results file (JSON lines; appended)")
    g.add_argument("--data-dir", default=None, help="directory with the data sets (default: kernelfit's resolution)")
    g.add_argument("--download", action="store_true",
                   help="fetch a missing data set from its canonical source into the data directory")
    g.add_argument("--device", type=device_arg(allow_list=sweep), default="auto",
                   help="auto | cpu | cuda | cuda:N" + (" | cuda:0,cuda:1 (runs are dealt round-robin)" if sweep else ""))
    g.add_argument("--threads", type=positive_int("--threads"), default=None, help="torch CPU threads (per worker)")
    g.add_argument("--checkpoint-dir", default=None,
                   help="save a checkpoint every epoch here and resume from it (refuses other configs)")


def _config_from_args(a, **over):
    from .train import TrainConfig
    fields = dict(
        model=a.model, dataset=a.dataset, variant=getattr(a, "variant", "true"), p=getattr(a, "p", 0.0),
        corrupt_test=a.corrupt_test, data_seed=a.data_seed, n_train=a.n_train, n_test=a.n_test,
        preprocess=a.preprocess, crop=a.crop, batch_norm=a.batch_norm, dropout=a.dropout, width=a.width,
        lr=a.lr, lr_decay=a.lr_decay, momentum=a.momentum, batch_size=a.batch_size, weight_decay=a.weight_decay,
        augment=a.augment, seed=getattr(a, "seed", 0), target_train_acc=a.target_train_acc,
        max_epochs=a.max_epochs, max_steps=a.max_steps,
    )
    fields.update(over)
    return TrainConfig(**fields)


def _check_results_file(path) -> None:
    """--out of train/sweep/table1: a JSON-lines file that is appended to (an existing one is kept and
    extended). Refused before any work when it is a directory or when nothing can be written there."""
    from pathlib import Path

    from kernelfit.places import check_writable_dir
    p = Path(path).expanduser()
    if p.is_dir():
        raise InputError(f"--out {path} is a directory; expected a results file such as {p / 'runs.jsonl'}.")
    if p.exists():
        try:   # opened for appending and closed again: nothing is written
            os.close(os.open(str(p), os.O_WRONLY | os.O_APPEND))
        except OSError as e:
            raise InputError(f"--out {path} cannot be appended to ({e.strerror or e}). "
                             "Fix: make it writable or choose another results file.") from None
    else:
        check_writable_dir(p.parent if str(p.parent) else Path("."), "--out", shown=p)


def _preflight(a, allow_list: bool = False) -> None:
    """Every output place and the device, checked before data is read or anything is trained."""
    from kernelfit.places import check_writable_dir

    from .experiments import _available_devices
    from .train import resolve_device
    _check_results_file(a.out)
    if a.checkpoint_dir is not None:
        check_writable_dir(a.checkpoint_dir, "--checkpoint-dir")
    if getattr(a, "plot_dir", None):
        check_writable_dir(a.plot_dir, "--plot-dir")
    for d in (_available_devices(a.device) if allow_list else [a.device]):
        resolve_device(d)   # a CUDA device on a machine without CUDA is refused here


def _log(a):
    """Per-epoch and per-run lines: the ``deepfit`` logger at info level (-q hides them)."""
    return get_logger("deepfit").info


# --------------------------------------------------------------------------------------------

def cmd_models(a) -> int:
    import torch

    from .models import MODELS, build_model, count_parameters
    print(f"{'name':22s} {'params (3x28x28)':>17s} {'paper':>10s} {'lr':>5s}  description")
    for name, spec in sorted(MODELS.items()):
        shape = (1, 28, 28) if name == "mlp2" else (3, 28, 28)
        with torch.random.fork_rng():
            n = count_parameters(build_model(name, input_shape=shape))
        paper = f"{spec.paper_params:,}" if spec.paper_params else "--"
        print(f"{name:22s} {n:>17,} {paper:>10s} {spec.default_lr:>5g}  {spec.description}"
              + ("  [counted for 1x28x28]" if name == "mlp2" else ""))
    return 0


def cmd_train(a) -> int:
    from .experiments import read_results, run_one
    from .train import config_hash
    cfg = _config_from_args(a)
    _preflight(a)
    run_id = config_hash(cfg)
    done = [r for r in read_results(a.out) if isinstance(r, dict) and r.get("run_id") == run_id]
    if done:  # the same configuration gives the same result: do not append it twice
        rec = done[-1]
        print(f"run {run_id} is already in {a.out} (fitted={rec['fitted']} test_acc={rec['final_test_acc']:.4f}); "
              "nothing run, nothing appended. To run it again, pass another --out.")
        return 0
    rec = run_one(cfg, out=a.out, data_dir=a.data_dir, device=a.device, checkpoint_dir=a.checkpoint_dir,
                  threads=a.threads, experiment="train", log=_log(a), download=a.download)
    print(f"run {rec['run_id']}: fitted={rec['fitted']} steps_to_fit={rec['steps_to_fit']} epochs={rec['epochs']} "
          f"train_acc={rec['final_train_acc']:.4f} test_acc={rec['final_test_acc']:.4f} "
          f"best_test_acc={rec['best_test_acc']:.4f} train_time={rec['train_time_s']:.1f}s -> {a.out}")
    return 0


def cmd_sweep(a) -> int:
    from .experiments import corruption_sweep_configs, read_results, run_sweep, unique_configs, variant_configs
    base = _config_from_args(a)
    configs = []
    if a.ps:
        configs += corruption_sweep_configs(base, a.ps, a.seeds)
    if a.variants:
        configs += variant_configs(base, a.variants, a.seeds)
    configs = unique_configs(configs)   # corrupt p=0 is the true run: trained once
    if not configs:
        raise InputError("sweep: nothing to run; give --ps (e.g. 0,0.2,0.4,0.6,0.8,1) and/or --variants "
                         "(e.g. true,random-labels,shuffled-pixels,random-pixels,gaussian).")
    _preflight(a, allow_list=True)
    run_sweep(configs, out=a.out, workers=a.workers, device=a.device, threads=a.threads, data_dir=a.data_dir,
              checkpoint_dir=a.checkpoint_dir, dask_address=a.dask, experiment="sweep", verbose=a.verbose - a.quiet >= 0,
              download=a.download, log=_log(a))
    if a.plot_dir:
        from .plots import plot_all
        from .train import config_hash
        ids = {config_hash(c) for c in configs}
        recs = [r for r in read_results(a.out) if r.get("run_id") in ids]
        for path in plot_all(recs, a.plot_dir, prefix=a.plot_prefix):
            print(f"wrote {path}")
    return 0


def cmd_table1(a) -> int:
    from .experiments import format_table1, read_results, run_sweep, table1_configs, table1_incomparable, table1_rows

    base = _config_from_args(a)
    grid = table1_configs(base, a.models)
    _preflight(a, allow_list=True)
    why = table1_incomparable(base)
    warning = (f"these numbers cannot be compared with the paper's Table 1: {', '.join(why)}; the records say "
               "paper_comparable=false") if why else None
    if warning:
        get_logger("deepfit").warning(warning)
    run_sweep([c for _, c in grid], out=a.out, workers=a.workers, device=a.device, threads=a.threads,
              data_dir=a.data_dir, checkpoint_dir=a.checkpoint_dir, dask_address=a.dask, experiment="table1",
              download=a.download,
              verbose=a.verbose - a.quiet >= 0, log=_log(a))
    print(format_table1(table1_rows(read_results(a.out), a.models, dataset=base.dataset)))
    if warning:   # again below the table, where it is read
        get_logger("deepfit").warning(warning)
    return 0


def cmd_table(a) -> int:
    from .experiments import format_table1, read_results, table1_rows
    recs = read_results(a.results)
    if not recs:
        raise InputError(f"no results in {a.results!r}; run `deepfit table1 --out {a.results}` first.")
    print(format_table1(table1_rows(recs, a.models, dataset=a.dataset)))
    return 0


def cmd_plot(a) -> int:
    from .experiments import read_results
    from .plots import plot_all
    recs = [r for r in read_results(a.results) if isinstance(r, dict) and "history" in r]
    if a.model:
        recs = [r for r in recs if r["config"]["model"] == a.model]
    if not recs:
        raise InputError(f"no run records in {a.results!r}" + (f" for model {a.model!r}" if a.model else "") + ".")
    from kernelfit.places import check_writable_dir
    check_writable_dir(a.outdir, "--outdir")
    for path in plot_all(recs, a.outdir, prefix=a.prefix):
        print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deepfit", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list models and parameter counts")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("train", help="one training run")
    _add_config_args(p)
    _add_exec_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sweep", help="corruption sweep / variant comparison, in parallel")
    _add_config_args(p, sweep=True)
    _add_exec_args(p, sweep=True)
    p.add_argument("--ps", type=csv_of(float), default=None, help="corruption levels, e.g. 0,0.2,0.4,0.6,0.8,1")
    p.add_argument("--variants", type=csv_of(str), default=None, help="data variants, e.g. true,random-labels,gaussian")
    p.add_argument("--seeds", type=csv_of(int), default=[0], help="seeds (each sets init and randomization seed)")
    p.add_argument("--workers", type=positive_int("--workers"), default=None,
                   help="parallel runs (default: one per GPU, else 1)")
    p.add_argument("--dask", default=None, help="dask scheduler address, or 'local' for a local cluster")
    p.add_argument("--plot-dir", default=None, help="write Fig. 1a/1b/1c PNGs here after the sweep")
    p.add_argument("--plot-prefix", default="deepfit")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("table1", help="the paper's Table 1 grid")
    _add_config_args(p, sweep=True)
    _add_exec_args(p, sweep=True)
    p.add_argument("--models", type=csv_of(str), default=None, help="restrict to these models")
    p.add_argument("--workers", type=positive_int("--workers"), default=None)
    p.add_argument("--dask", default=None)
    p.set_defaults(func=cmd_table1)

    p = sub.add_parser("table", help="print the Table 1 comparison from a results file")
    p.add_argument("--results", required=True)
    p.add_argument("--models", type=csv_of(str), default=None)
    p.add_argument("--dataset", default="cifar10", help=f"{' | '.join(_DATASETS)} (default cifar10)")
    p.set_defaults(func=cmd_table)

    p = sub.add_parser("plot", help="Fig. 1a/1b/1c from a results file")
    p.add_argument("--results", required=True)
    p.add_argument("--outdir", required=True)
    p.add_argument("--model", default=None, help="only this model's runs")
    p.add_argument("--prefix", default="deepfit")
    p.set_defaults(func=cmd_plot)

    # Hook: further subcommands (the measures/report side) register themselves here.
    for mod_name in _EXTENSIONS:
        importlib.import_module(mod_name).register_cli(sub)
    for p in sub.choices.values():
        p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
        if "--verbose" not in p._option_string_actions:   # report's own parser already has them
            add_verbosity_flags(p)
    return parser


def _interrupted(a) -> str:
    """Where an interrupted command left its work (what rerunning it does)."""
    ckdir = getattr(a, "checkpoint_dir", None)
    if a.command == "train":
        if ckdir is None:
            return "interrupted; nothing of the run was kept (pass --checkpoint-dir DIR to make a run resumable)"
        from .train import checkpoint_path
        path = checkpoint_path(ckdir, _config_from_args(a))
        if path.exists():
            return f"interrupted; the checkpoint {path} holds the last finished epoch: rerunning the same command resumes"
        return f"interrupted before the first epoch finished; no checkpoint in {ckdir} yet"
    if a.command in ("sweep", "table1"):
        done = f"runs that finished are in {a.out} and are skipped when the same command is rerun"
        if ckdir is not None:
            return f"interrupted; {done}; unfinished runs resume from their checkpoints in {ckdir}"
        return f"interrupted; {done}; unfinished runs start over (pass --checkpoint-dir DIR to make them resumable)"
    return "interrupted; nothing was written"


def main(argv=None) -> int:
    """Exit status: 0 ok, 1 error, 2 bad arguments or input (argparse errors, InputError)."""
    parser = build_parser()
    a = parser.parse_args(argv)
    set_verbosity(a.verbose - a.quiet)
    try:
        return int(a.func(a) or 0)
    except (KernelfitError, OSError, KeyboardInterrupt) as e:
        if getattr(a, "debug", False):
            raise
        if isinstance(e, KeyboardInterrupt):
            print(f"deepfit {a.command}: error: {_interrupted(a)}", file=sys.stderr)
            return 1
        msg = " ".join(str(e).split()) or type(e).__name__   # one line
        print(f"deepfit {a.command}: error: {msg}", file=sys.stderr)
        return 2 if isinstance(e, (InputError, FileExistsError)) else 1


if __name__ == "__main__":
    sys.exit(main())
