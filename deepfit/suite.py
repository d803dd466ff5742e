"""Every complexity measure of a trained network in one call: :func:`measure_all` and ``deepfit measure``.

``measure_all(model, X, y)`` takes any ``nn.Module`` (a classifier returning logits) and its
training set and returns one JSON-able dict: every norm measure that applies to the network's
wiring (:mod:`deepfit.measures`), sharpness, the PAC-Bayes sweep, and the Hessian measures
(:mod:`deepfit.hessian`), each in its paper's convention; stochastic estimates come as
``(estimate, stderr, n_samples)``; the measures that do not apply are listed with the reason.
The caller's model is left as it was (mode, weights, ``requires_grad`` flags).

``deepfit measure --checkpoint CKPT`` does the same for a ``deepfit train --checkpoint-dir``
checkpoint, on the training set its configuration describes (same subset, same randomized
labels) or on arrays given with ``--data FILE[:member] --labels FILE[:member]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn

from kernelfit.errors import InputError, ModelFileError
from kernelfit.progress import get_logger

from . import hessian as H
from . import measures as M

__all__ = ["MeasureOptions", "measure_all", "GROUPS", "load_checkpoint_model", "read_checkpoint", "register_cli"]

# What measure_all can compute, by group name; the norm measures are the registry's names.
GROUPS = ("norms", "sharpness", "pac-bayes", "hessian")


@dataclass(frozen=True)
class MeasureOptions:
    """Settings that change the measured numbers.

    ``percentile``: the margin is this percentile of ``f_y(x) - max_{j != y} f_j(x)`` over the
    training set (Neyshabur et al.: 5). Sharpness: box half-width ``sharpness_eps (|w| + 1)``
    (paper 5e-4), ``sharpness_steps`` of projected gradient ascent. PAC-Bayes: ``pac_alphas``
    (sigma_i = alpha (10 |w_i| + 1)), ``pac_samples`` noise draws per alpha, KL read off at
    expected sharpness ``pac_target``. Hessian: ``hessian_k`` top eigenvalues (0 skips every
    Hessian measure), ``hessian_samples`` Hutchinson probes, ``basin_directions`` random directions,
    ``basin_delta`` loss rise that bounds the basin. ``seed`` seeds every random choice. ``fold_bn``:
    take sharpness, PAC-Bayes and the Hessian on the batch-norm-folded parameters instead of the
    model's own (the norm measures always fold, where folding is possible).
    """

    percentile: float = 5.0
    sharpness_eps: float = 5e-4
    sharpness_steps: int = M.SHARPNESS_STEPS
    pac_alphas: tuple[float, ...] = (1e-4, 1e-3, 3e-3, 6e-3, 1e-2, 1.5e-2, 2e-2, 3e-2, 5e-2)
    pac_samples: int = 5
    pac_target: float = 0.1
    hessian_k: int = 3
    hessian_samples: int = 10
    basin_directions: int = 10
    basin_delta: float = 0.1
    batch_size: int = 1024
    seed: int = 0
    fold_bn: bool = False

    def validated(self) -> "MeasureOptions":
        if self.pac_samples < 2 or self.hessian_samples < 2 or self.basin_directions < 2:
            raise InputError("pac_samples, hessian_samples and basin_directions must each be >= 2 (a standard error "
                             f"needs 2 samples), got {self.pac_samples}, {self.hessian_samples}, {self.basin_directions}.")
        if self.hessian_k < 0 or self.sharpness_steps < 1 or self.sharpness_eps <= 0 or self.basin_delta <= 0:
            raise InputError("need hessian_k >= 0, sharpness_steps >= 1, sharpness_eps > 0 and basin_delta > 0; got "
                             f"{self.hessian_k}, {self.sharpness_steps}, {self.sharpness_eps}, {self.basin_delta}.")
        if not self.pac_alphas or any(a <= 0 for a in self.pac_alphas):
            raise InputError(f"pac_alphas must be positive numbers, got {self.pac_alphas!r}. Fix: e.g. 1e-3,1e-2.")
        return self


def _state(model: nn.Module):
    return ([m.training for m in model.modules()], [p.requires_grad for p in model.parameters()])


def measure_all(model: nn.Module, X: torch.Tensor, y: torch.Tensor, options: MeasureOptions = MeasureOptions(), *,
                groups: Sequence[str] = GROUPS, log: Callable[[str], None] | None = None) -> dict:
    """Every applicable measure of ``model`` on its training set ``(X, y)``; see the module docstring.

    ``groups``: a subset of :data:`GROUPS` to compute. Each measure is computed on its own: one that
    does not apply (or fails on bad input) is listed in ``not_applicable`` with the reason and never
    drops another. ``log``: called with a progress line when each phase starts and ends (default: the
    ``deepfit.suite`` logger at info level; see :func:`kernelfit.progress.set_verbosity`).
    Returns ``{"margin", "measures", "not_applicable", "layers",
    "options", "n_samples", "n_parameters", "second_order_parameters", "time_s"}``.
    """
    opts = options.validated()
    bad = [g for g in groups if g not in GROUPS]
    if bad:
        raise InputError(f"unknown measure group(s) {bad}; expected a subset of {list(GROUPS)}.")
    M.check_xy(X, y)
    say = log or get_logger("deepfit.suite").info   # a line when each measure starts and ends
    before = _state(model)
    t0 = time.perf_counter()
    seed = opts.seed
    measures: dict = {}
    skipped: dict[str, str] = {}

    def phase(name, fn):
        """Run one phase; an InputError (the measure does not apply) is recorded, not raised."""
        t = time.perf_counter()
        say(f"measure: {name} ...")
        try:
            out = fn()
        except InputError as e:
            skipped[name] = str(e)
            say(f"measure: {name} not applicable ({time.perf_counter() - t:.1f} s)")
            return None
        say(f"measure: {name} done ({time.perf_counter() - t:.1f} s)")
        return out

    norms = None
    if "norms" in groups:
        norms = phase("norms", lambda: M.compute_norm_measures(model, X, y, percentile=opts.percentile, seed=seed))
    if norms is None:   # the margin alone needs only the logits
        norms = dict(margin=M.margin(model, X, y, opts.percentile), measures={}, not_applicable={}, layers=[],
                     pool_lipschitz=[], chain=None)
    margin = dict(value=norms["margin"], percentile=opts.percentile,
                  definition=f"{opts.percentile:g}th percentile of f_y(x) - max_(j != y) f_j(x) over the training set")
    if "norms" in groups:
        measures.update(norms["measures"])
        skipped.update(norms["not_applicable"])
    n_own = sum(p.numel() for p in model.parameters() if p.requires_grad)
    params_note = ("batch norm folded into the Linear/Conv2d before it (fold_bn=True)" if opts.fold_bn else
                   f"the model's own {n_own} trainable parameters (batch norm not folded; fold_bn=True folds it)")
    if "sharpness" in groups:
        sh = phase("sharpness", lambda: M.sharpness(model, X, y, eps=opts.sharpness_eps, steps=opts.sharpness_steps,
                                                    seed=seed, batch_size=opts.batch_size, fold_bn=opts.fold_bn))
        if sh is not None:
            measures["sharpness"] = dict(
                {k: v for k, v in sh.items() if k != "loss_history"}, parameters=params_note,
                paper="Neyshabur et al. 2017 (Sec. 3)",
                convention="(max_{|nu_i| <= eps(|w_i|+1)} L(w+nu) - L(w)) / (1 + L(w)), cross-entropy on the training "
                           "set; the max is the best point of a projected gradient ascent, so the value is a lower "
                           "bound of it")
    if "pac-bayes" in groups:
        rows = phase("pac-bayes", lambda: M.pac_bayes_sweep(model, X, y, opts.pac_alphas, n_samples=opts.pac_samples,
                                                            seed=seed, batch_size=opts.batch_size, fold_bn=opts.fold_bn))
        if rows is not None:
            measures["pac-bayes"] = dict(
                sweep=rows, at_target=M.pac_bayes_at_sharpness(rows, opts.pac_target), parameters=params_note,
                paper="Neyshabur et al. 2017, Fig. 2",
                convention="expected sharpness E_nu L(w+nu) - L(w) (estimate, stderr, n_samples; "
                           "expected_sharpness_ci95 from Student-t quantiles with n_samples - 1 degrees of freedom) "
                           "against KL = sum w_i^2 / (2 sigma_i^2), sigma_i = alpha (10|w_i| + 1); at_target: the KL "
                           f"where the expected sharpness reaches {opts.pac_target:g}")
    n_params = n_own
    if "hessian" in groups and opts.hessian_k > 0:
        def hess():
            net = M.fold_batchnorm(model, X[:1]) if opts.fold_bn else model
            op = H.HessianOperator(net, X, y, batch_size=opts.batch_size)
            if op.dim <= opts.hessian_k:
                raise InputError(f"the model has {op.dim} trainable parameters; the top {opts.hessian_k} eigenvalues "
                                 "need more. Fix: a smaller hessian_k.")
            paper = "Wu, Zhu, E 2017"
            out = {}
            eigs = H.top_eigenvalues(op, k=opts.hessian_k, seed=seed, tol=1e-4)
            out["hessian-top-eigenvalues"] = dict(
                value=[e["value"] for e in eigs], residual=[e["residual"] for e in eigs], paper=paper,
                convention="largest eigenvalues of the Hessian of the mean training cross-entropy (Lanczos); "
                           "some eigenvalue lies within each residual")
            say("measure: hessian: top eigenvalues done; trace and Frobenius norm ...")
            trace = H.hessian_trace(op, opts.hessian_samples, seed=seed)
            out["hessian-trace"] = dict(zip(("value", "stderr", "n_samples"), trace),
                                        paper=paper, convention="tr H, Hutchinson estimate with Rademacher probes")
            out["hessian-frobenius"] = dict(
                zip(("value", "stderr", "n_samples"), H.hessian_frobenius(op, opts.hessian_samples, seed=seed + 1)),
                paper=paper, convention="||H||_F, from E||Hz||^2 with Rademacher z (Wu et al.'s Hessian norm)")
            out["basin-volume-spectrum"] = dict(
                H.basin_volume_from_spectrum(eigs, opts.basin_delta), paper=paper,
                convention="log volume of {nu: nu^T H nu / 2 <= delta} in the top-k eigenspace (larger = flatter)")
            say("measure: hessian: basin radius along random directions ...")
            br = H.basin_volume_random_directions(op, opts.basin_directions, delta=opts.basin_delta, seed=seed,
                                                  bisection_steps=20)
            out["basin-volume-random"] = dict(
                br, paper=paper, convention="(estimate, stderr, n) of the radius where the loss first rises by delta "
                                            "along random unit directions, and the Jensen lower bound of the log volume")
            for v in out.values():
                v["parameters"] = params_note
            return out, op.dim
        got = phase("hessian", hess)
        if got is not None:
            measures.update(got[0])
            n_params = got[1]
    if _state(model) != before:  # a measure must never leave the caller's model changed
        raise RuntimeError("internal error: a measure changed the model's mode or requires_grad flags")
    return dict(margin=margin, measures=measures, not_applicable=skipped, layers=norms["layers"],
                pool_lipschitz=norms["pool_lipschitz"], chain=norms["chain"], n_samples=int(X.shape[0]),
                n_parameters=int(n_params), second_order_parameters=params_note, options=dataclasses.asdict(opts),
                time_s=time.perf_counter() - t0)


# --------------------------------------------------------------------------------------------
# checkpoints and the CLI
# --------------------------------------------------------------------------------------------

def read_checkpoint(path) -> tuple[dict, "object"]:
    """A ``deepfit train`` checkpoint file and its :class:`deepfit.train.TrainConfig`."""
    from pathlib import Path

    from .train import TrainConfig, load_torch_file

    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError(f"checkpoint {str(p)!r} does not exist. Fix: pass a <run id>.pt file written by "
                         "`deepfit train --checkpoint-dir DIR`.")
    from .usermodel import WHOLE_MODEL_FIX, zip_member_names

    if any("/code/__torch__/" in n or n.endswith("/archive_format") for n in zip_member_names(p)):
        raise InputError(f"{str(p)!r} is a TorchScript / torch.export archive, not a deepfit checkpoint; the measures need "
                         "the network's Python modules. Fix: --model-def your_file.py:YourClass --weights "
                         f"{str(p)!r} --dataset NAME (the archive's weights are read without unpickling).")
    try:
        ckpt = load_torch_file(p, "checkpoint")   # weights only: a file that needs pickle is refused, never run
    except ModelFileError as e:
        if "pickled Python object (" not in str(e):
            raise
        raise ModelFileError(f"{e} A whole model saved with torch.save(model) is such a file; for a network of your own: "
                             f"{WHOLE_MODEL_FIX.removeprefix('Fix: ')}.") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("config"), dict) or not isinstance(ckpt.get("model"), dict):
        raise InputError(f"{str(p)!r} is not a deepfit training checkpoint (expected the keys 'config' and 'model'). "
                         "Fix: pass a file from `deepfit train --checkpoint-dir DIR`, or call measure_all() from Python.")
    return ckpt, TrainConfig.from_dict(ckpt["config"])


def load_checkpoint_model(path, input_shape, num_classes: int | None = None) -> tuple[nn.Module, "object"]:
    """The network (eval mode) a ``deepfit train`` checkpoint holds, and its configuration.

    ``num_classes`` defaults to the output size of the checkpoint's last weight matrix.
    """
    from .models import build_model

    ckpt, cfg = read_checkpoint(path)
    if num_classes is None:
        num_classes = _checkpoint_classes(ckpt)
    with torch.random.fork_rng():
        model = build_model(cfg.model, input_shape=input_shape, num_classes=num_classes, batch_norm=cfg.batch_norm,
                            dropout=cfg.dropout, width=cfg.width)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise InputError(f"the checkpoint's weights do not fit model {cfg.model!r} on inputs {tuple(input_shape)} "
                         f"with {num_classes} classes: {e}. Fix: give the data the network was trained on.") from None
    return model.eval(), cfg


def _checkpoint_classes(ckpt: dict) -> int:
    mats = [v for k, v in ckpt["model"].items() if k.endswith("weight") and getattr(v, "ndim", 0) == 2]
    if not mats:
        raise InputError("cannot tell the number of classes from the checkpoint (no final Linear weight).")
    return int(mats[-1].shape[0])


def _user_arrays(spec_x: str, spec_y: str, cfg, num_classes: int | None):
    """User arrays -> tensors preprocessed as the checkpoint's training data was (NCHW float32)."""
    import numpy as np

    from kernelfit.data.arrays import open_array

    from .data import prepare_arrays

    x = np.array(open_array(spec_x, what="images"))   # a copy: torch wants writable memory
    y = np.array(open_array(spec_y, what="labels")).reshape(-1)
    if len(y) != len(x):
        raise InputError(f"--data has {len(x)} images but --labels has {len(y)} labels. Fix: give one label per image.")
    if num_classes is None:
        num_classes = int(y.max()) + 1 if len(y) else 0
    return prepare_arrays(x, y.astype(np.int64), x[:0], y[:0].astype(np.int64), num_classes,
                          preprocess=cfg.preprocess, crop=cfg.crop, info={"images": spec_x, "labels": spec_y})


def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    from .args import crop_arg, positive_int
    from .data import PREPROCESS_MODES
    d = MeasureOptions()
    p = argparse.ArgumentParser(prog="deepfit measure", add_help=add_help,
                                description="Every applicable complexity measure of a trained network, as JSON.")
    src = p.add_argument_group("the network: --checkpoint, or your own --model-def with --weights")
    src.add_argument("--checkpoint", default=None, help="a <run id>.pt file from `deepfit train --checkpoint-dir DIR`")
    src.add_argument("--model-def", default=None,
                     help="your network's definition: FILE.py:ClassName or package.module:factory (called with "
                          "--model-kwargs), with --weights")
    src.add_argument("--model-kwargs", default=None, help="JSON object of keyword arguments for --model-def")
    src.add_argument("--weights", default=None,
                     help="trained weights for --model-def: a torch.save(model.state_dict()) file, .safetensors, or "
                          "a TorchScript / torch.export .pt2 archive (read without unpickling)")
    ud = p.add_argument_group("data for --model-def (a checkpoint brings its own configuration)")
    ud.add_argument("--dataset", default=None, help="data set the network was trained on, e.g. mnist, fashion-mnist, "
                                                    "cifar10, mnist-subset (or --data FILE --labels FILE)")
    ud.add_argument("--n-train", type=positive_int("--n-train"), default=None,
                    help="measure on a stratified subset of this many training images (default: all)")
    ud.add_argument("--data-seed", type=int, default=0, help="seed of the subset draw (default 0)")
    ud.add_argument("--preprocess", default=None, choices=PREPROCESS_MODES,
                    help="how the images are fed to the network: scale = pixels / 255 (default), normalize = /255 then "
                         "per-channel standardization, whiten = per-image whitening (deepfit train's default)")
    ud.add_argument("--crop", type=crop_arg, default=None, help="centre crop size, or 'none' (default: no crop)")
    p.add_argument("--data", default="config",
                   help="'config' (default): the training set the checkpoint's configuration (or --dataset) describes; "
                        "or an image array FILE[:member] (N,H,W[,C]), with --labels")
    p.add_argument("--labels", default=None, help="integer labels FILE[:member] for --data FILE")
    p.add_argument("--data-dir", default=None, help="directory with the data sets (default: kernelfit's resolution)")
    p.add_argument("--download", action="store_true", help="fetch a missing data set from its canonical source")
    p.add_argument("--groups", default=",".join(GROUPS), help=f"comma-separated subset of {','.join(GROUPS)} (default all)")
    p.add_argument("--out", default=None, help="also write the JSON here (default: standard output only)")
    p.add_argument("--threads", type=positive_int("--threads"), default=None,
                   help="torch CPU threads (default: torch's choice)")
    g = p.add_argument_group("measure settings (see MeasureOptions)")
    for f in dataclasses.fields(MeasureOptions):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(d, f.name)
        if isinstance(default, bool):
            g.add_argument(flag, action="store_true", default=None, help=f"{_HELP[f.name]}")
        elif isinstance(default, tuple):
            g.add_argument(flag, type=_float_list, default=None,
                           help=f"{_HELP[f.name]} (default {','.join(f'{v:g}' for v in default)})")
        else:
            g.add_argument(flag, type=type(default), default=None, help=f"{_HELP[f.name]} (default {default:g})")
    return p


_HELP = dict(
    percentile="the margin is this percentile of f_y(x) - max_j f_j(x) over the training set",
    sharpness_eps="sharpness box half-width eps (|w|+1)", sharpness_steps="projected gradient ascent steps",
    pac_alphas="PAC-Bayes noise scales alpha, comma-separated", pac_samples="noise draws per alpha",
    pac_target="expected sharpness at which the KL is read off",
    hessian_k="top Hessian eigenvalues (0 skips every Hessian measure)", hessian_samples="Hutchinson probes",
    basin_directions="random directions for the basin radius", basin_delta="loss rise that bounds the basin",
    batch_size="samples per forward pass", seed="seed of every random choice",
    fold_bn="sharpness, PAC-Bayes and Hessian on batch-norm-folded parameters (default: the model's own)",
)


def _float_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 1e-3,1e-2, got {text!r}") from None


def _checkpoint_model_and_data(a):
    from .data import prepare_data

    extra = [f for f in ("weights", "model_kwargs", "dataset", "n_train", "preprocess", "crop") if getattr(a, f) is not None]
    if a.checkpoint is None:
        raise InputError("deepfit measure needs a network: --checkpoint CKPT (from `deepfit train --checkpoint-dir`) or "
                         "--model-def FILE.py:ClassName --weights WEIGHTS --dataset NAME for a network of your own.")
    if extra:
        raise InputError(f"--{extra[0].replace('_', '-')} applies to --model-def; a --checkpoint brings its own model and "
                         "data configuration. Fix: drop it, or measure your own network with --model-def.")
    ckpt, cfg = read_checkpoint(a.checkpoint)   # bad input fails here, before any data is read
    if a.data == "config":
        data = prepare_data(cfg, data_dir=a.data_dir, download=a.download)
    else:
        data = _user_arrays(a.data, a.labels, cfg, _checkpoint_classes(ckpt))
    if a.threads:
        torch.set_num_threads(int(a.threads))
    model, _ = load_checkpoint_model(a.checkpoint, data.input_shape, data.num_classes)
    return cfg, data, model


def _user_model_and_data(a):
    """--model-def/--weights and the data set it is measured on; every mismatch refused before measuring."""
    from types import SimpleNamespace

    from .data import prepare_data
    from .usermodel import build_user_model

    if a.checkpoint is not None:
        raise InputError("give either --checkpoint or --model-def, not both.")
    if a.weights is None:
        raise InputError("--model-def needs --weights FILE: save them with torch.save(model.state_dict(), 'weights.pt').")
    if a.dataset is None and a.data == "config":
        raise InputError("--model-def needs the data the network is measured on: --dataset NAME (e.g. mnist, cifar10, "
                         "mnist-subset) or --data FILE[:member] --labels FILE[:member].")
    model, source = build_user_model(a.model_def, a.weights, a.model_kwargs)
    cfg = SimpleNamespace(dataset=a.dataset, n_train=a.n_train, n_test=None, data_seed=a.data_seed, variant="true",
                          p=0.0, corrupt_test=False, preprocess=a.preprocess or "scale", crop=a.crop, augment=False)
    if a.data == "config":
        data = prepare_data(cfg, data_dir=a.data_dir, download=a.download)
    else:
        data = _user_arrays(a.data, a.labels, cfg, None)
    if a.threads:
        torch.set_num_threads(int(a.threads))
    p0 = next(iter(model.parameters()), None)
    X = data.x_train if p0 is None else data.x_train.to(p0.dtype)
    data.x_train = X
    try:
        with torch.no_grad():
            out = model(X[:2])
    except Exception as e:
        raise InputError(f"the --model-def network fails on the data's images of shape {tuple(X.shape[1:])} "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:200]}). Fix: --crop / --preprocess, or a first "
                         "layer such as nn.Flatten() that takes (N, C, H, W) images.") from e
    k = int(data.y_train.max()) + 1
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[1] < max(k, 2):
        raise InputError(f"the --model-def network must return logits of shape (N, classes >= {max(k, 2)}) for these "
                         f"labels; it returned {tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}.")
    return model, source, cfg, data


def _run(a) -> int:
    from kernelfit.places import check_output_file
    from kernelfit.provenance import provenance
    from kernelfit.results import dumps, write_json_atomic

    groups = [g.strip() for g in a.groups.split(",") if g.strip()]
    kw = {f.name: getattr(a, f.name) for f in dataclasses.fields(MeasureOptions) if getattr(a, f.name) is not None}
    opts = MeasureOptions(**kw).validated()
    if a.out:   # replaced as before, but refused now if it is a directory or cannot be written
        check_output_file(a.out, "--out", overwrite=True)
    if a.data != "config" and a.labels is None:
        raise InputError("--data FILE needs --labels FILE[:member] (integer class labels, one per image).")
    if a.model_def is not None:
        model, source, cfg, data = _user_model_and_data(a)
        head = dict(model=source)
    else:
        cfg, data, model = _checkpoint_model_and_data(a)
        head = dict(checkpoint=str(a.checkpoint), config=cfg.to_dict())
    X = getattr(data, "x_train_eval", None)   # un-augmented training images
    X = data.x_train if X is None else X
    res = measure_all(model, X, data.y_train, opts, groups=groups, log=get_logger("deepfit.suite").info)
    res = dict(head, data=dict(data.info), **res,
               provenance=provenance(["deepfit", "measure", *sys.argv[2:]]))
    print(dumps(res), flush=True)   # first, so that a failing --out write loses nothing
    if a.out:
        try:
            write_json_atomic(a.out, res, overwrite=True)
        except OSError as e:
            raise OSError(e.errno, f"could not write --out {a.out} ({e.strerror or e}); the measures were printed "
                                   "to standard output above, and --out was left as it was") from None
    return 0


def register_cli(subparsers) -> None:
    """Hook for ``deepfit.cli``: adds the ``measure`` subcommand."""
    p = subparsers.add_parser("measure", parents=[build_parser(add_help=False)], help="measures of a trained checkpoint",
                              description="Every applicable complexity measure of a trained network, as JSON.")
    p.set_defaults(func=_run)
