"""SGD training for the randomization tests: train to 100% training accuracy (or a budget).

Zhang et al. (2017), appendix A: SGD, momentum 0.9, initial learning rate 0.1 (Inception) or 0.01
(the others), decayed by a factor 0.95 every epoch, batch 128. The loop holds the whole data set
as device tensors and indexes batches with a permutation drawn from its own ``torch.Generator``
(no DataLoader), evaluates train and test accuracy after every epoch, stops at the target training
accuracy, and checkpoints atomically every epoch so a killed run resumes and ends with the same
weights as an uninterrupted one.

:class:`TrainConfig` holds everything that changes a result; its hash (:func:`config_hash`) is the
run id and guards checkpoints. Paths, device and thread count are arguments of :func:`train`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from kernelfit.errors import InputError, KernelfitError, ModelFileError
from kernelfit.results import atomic_file

from .models import MODELS, build_model, count_parameters

__all__ = ["TrainConfig", "TrainResult", "config_hash", "lr_at_epoch", "train", "resolve_device", "CheckpointMismatchError",
           "TrainingDivergedError", "load_torch_file"]


class CheckpointMismatchError(InputError):
    """A checkpoint belongs to a different configuration; resuming from it would mix two runs."""


class TrainingDivergedError(KernelfitError):
    """The training loss became NaN or infinite; the run is stopped and not recorded."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything that changes a result (hashed into the run id).

    Data: ``dataset`` ("cifar10", "mnist", "mnist-subset"), ``variant`` (a kernelfit.randomize
    variant), ``p`` (corruption probability, used by "corrupt"), ``corrupt_test`` (apply the
    randomization to the test set too; default False = clean test labels), ``data_seed`` (seed of
    the randomization and of the subset draw), ``n_train`` / ``n_test`` (None = all), ``crop``
    (centre crop to crop x crop; 28 as the paper; a no-op on 28x28 MNIST; None = no crop),
    ``preprocess`` ("whiten": per-image whitening, as the paper; "normalize": pixels / 255
    standardized per channel with training-set statistics).

    Model: ``model`` (a name in ``deepfit.models.MODELS``), ``batch_norm`` / ``dropout`` / ``width``
    (None = the model's default).

    Optimisation: ``lr`` (None = 0.1 for Inception, 0.01 otherwise), ``lr_decay`` per epoch,
    ``momentum``, ``batch_size``, ``weight_decay`` (0 = off), ``augment`` (random 28x28 crops of the
    32x32 image, or of the image padded by 2 when it is already 28x28), ``seed`` (weights init,
    batch order, dropout, crops).

    Stopping: ``target_train_acc`` (stop once reached; 1.0 = "fit"), ``max_epochs``, ``max_steps``
    (SGD-step budget; None = no limit).
    """

    model: str = "mlp-1x512"
    dataset: str = "cifar10"
    variant: str = "true"
    p: float = 0.0
    corrupt_test: bool = False
    data_seed: int = 0
    n_train: int | None = None
    n_test: int | None = None
    preprocess: str = "whiten"
    crop: int | None = 28
    batch_norm: bool | None = None
    dropout: float | None = None
    width: int | None = None
    lr: float | None = None
    lr_decay: float = 0.95
    momentum: float = 0.9
    batch_size: int = 128
    weight_decay: float = 0.0
    augment: bool = False
    seed: int = 0
    target_train_acc: float = 1.0
    max_epochs: int = 100
    max_steps: int | None = None

    def __post_init__(self):
        # Canonical types, so that p=0 and p=0.0 (or a config read back from JSON) hash alike.
        for name in ("p", "lr", "lr_decay", "momentum", "weight_decay", "target_train_acc", "dropout"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, bool) and isinstance(v, (int, float)):
                object.__setattr__(self, name, float(v))
        for name in ("data_seed", "n_train", "n_test", "crop", "width", "batch_size", "seed", "max_epochs", "max_steps"):
            v = getattr(self, name)
            if isinstance(v, float) and v.is_integer():
                object.__setattr__(self, name, int(v))
        if self.model not in MODELS:
            raise InputError(f"unknown model {self.model!r}. Valid models: {', '.join(sorted(MODELS))}.")
        if not (isinstance(self.p, (int, float)) and 0.0 <= float(self.p) <= 1.0):
            raise InputError(f"p (corruption probability) must be in [0, 1], got {self.p!r}. Fix: e.g. --p 0.5.")
        if self.preprocess not in ("whiten", "normalize"):
            raise InputError(f"preprocess must be 'whiten' or 'normalize', got {self.preprocess!r}.")
        if self.crop is not None and int(self.crop) < 1:
            raise InputError(f"crop must be a positive integer or None (no crop), got {self.crop!r}.")
        for name in ("batch_size", "max_epochs"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"{name} must be a positive integer, got {getattr(self, name)!r}.")
        if self.max_steps is not None and int(self.max_steps) < 1:
            raise InputError(f"max_steps must be a positive integer or None, got {self.max_steps!r}.")
        if self.lr is not None and not (float(self.lr) > 0):
            raise InputError(f"lr must be > 0, got {self.lr!r}.")
        if not (0.0 < float(self.lr_decay) <= 1.0):
            raise InputError(f"lr_decay must be in (0, 1], got {self.lr_decay!r} (the paper uses 0.95).")
        if not (0.0 <= float(self.momentum) < 1.0):
            raise InputError(f"momentum must be in [0, 1), got {self.momentum!r}.")
        if float(self.weight_decay) < 0:
            raise InputError(f"weight_decay must be >= 0, got {self.weight_decay!r}.")
        if not (0.0 < float(self.target_train_acc) <= 1.0):
            raise InputError(f"target_train_acc must be in (0, 1], got {self.target_train_acc!r}.")
        for name in ("n_train", "n_test"):
            v = getattr(self, name)
            if v is not None and int(v) < 1:
                raise InputError(f"{name} must be a positive integer or None (all), got {v!r}.")

    @property
    def initial_lr(self) -> float:
        return float(self.lr) if self.lr is not None else MODELS[self.model].default_lr

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise InputError(f"unknown TrainConfig field(s) {unknown}; valid fields: {sorted(names)}.")
        return cls(**d)

    def replace(self, **kw) -> "TrainConfig":
        return dataclasses.replace(self, **kw)


def config_hash(config: TrainConfig) -> str:
    """Stable 16-hex-digit id of everything that changes the result."""
    text = json.dumps(config.to_dict(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def lr_at_epoch(lr0: float, decay: float, epoch: int) -> float:
    """Learning rate during epoch ``epoch`` (0-based): ``lr0 * decay ** epoch``."""
    return float(lr0) * float(decay) ** int(epoch)


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {str(device)!r} requested but CUDA is not available here. Fix: use --device cpu or auto.")
    return dev


# --------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------

def _save_atomic(obj: Any, path: Path) -> None:
    with atomic_file(path, "wb") as fh:
        torch.save(obj, fh)


_HOW_TO_SAVE = ("Fix: save plain tensors, e.g. torch.save(model.state_dict(), path), or use a checkpoint written by "
                "`deepfit train --checkpoint-dir DIR`")


def load_torch_file(path: str | os.PathLike, what: str = "checkpoint") -> Any:
    """``torch.load(path, weights_only=True)``: tensors, dicts, lists and numbers only, never code.

    A file that needs pickle (an arbitrary Python object, which loading would have to run) and a
    corrupt or truncated file are refused with one line (:class:`ModelFileError`) naming what was found.
    """
    import pickle
    import re
    import warnings

    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of foreign files
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        if "Weights only load failed" not in text:
            raise _corrupt(path, what, e) from None
        glob = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        if glob:
            found = f"a pickled Python object ({glob.group(1)})"
        else:
            op = re.search(r"Unsupported operand (\d+)", text)
            found = ("pickle instruction " + op.group(1) if op else "a pickle instruction") + \
                " that a plain tensor file never holds (a pickled object, or not a torch file at all)"
        raise ModelFileError(
            f"refusing to load {what} {str(path)!r}: it holds {found}; rebuilding it would need full unpickling, "
            f"which can run any code, so nothing was loaded. {_HOW_TO_SAVE}."
        ) from None
    except (RuntimeError, EOFError, ValueError, KeyError, IndexError, TypeError, AttributeError, MemoryError) as e:
        raise _corrupt(path, what, e) from None


def _corrupt(path, what: str, e: BaseException) -> ModelFileError:
    text = str(e).strip()
    reason = text.split(". ")[0].splitlines()[0] if text else f"{type(e).__name__}: the file ends early"
    return ModelFileError(f"{what} {str(path)!r} is corrupt, truncated or not a torch file ({reason[:160]}). "
                          f"{_HOW_TO_SAVE}.")


def checkpoint_path(checkpoint_dir: str | os.PathLike, config: TrainConfig) -> Path:
    return Path(checkpoint_dir).expanduser() / f"{config_hash(config)}.pt"


def _load_checkpoint(path: Path, config: TrainConfig) -> dict | None:
    if not path.exists():
        return None
    ckpt = load_torch_file(path, "checkpoint")
    if not isinstance(ckpt, dict) or not {"config_hash", "model", "optimizer", "epoch"} <= set(ckpt):
        raise ModelFileError(f"{str(path)!r} in --checkpoint-dir is not a deepfit training checkpoint (expected a dict "
                             "with config_hash, model, optimizer, epoch). Nothing was deleted. Fix: move it away or "
                             "use another --checkpoint-dir.")
    want = config_hash(config)
    if ckpt.get("config_hash") != want:
        theirs = ckpt.get("config", {})
        diff = {k: (theirs.get(k), v) for k, v in config.to_dict().items() if theirs.get(k) != v}
        raise CheckpointMismatchError(
            f"checkpoint {str(path)!r} was written by a different configuration (hash "
            f"{ckpt.get('config_hash')!r}, this run {want!r}); differing fields (checkpoint, this run): "
            f"{diff}. Refusing to mix two runs. Fix: use the original configuration, another "
            f"--checkpoint-dir, or delete the checkpoint to start over."
        )
    return ckpt


# --------------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> tuple[float, float]:
    """(mean cross-entropy loss, accuracy) of ``model`` in eval mode on (x, y)."""
    was_training = model.training
    model.eval()
    total_loss, correct = 0.0, 0
    for i in range(0, x.shape[0], batch_size):
        out = model(x[i:i + batch_size])
        yb = y[i:i + batch_size]
        total_loss += float(nn.functional.cross_entropy(out, yb, reduction="sum"))
        correct += int((out.argmax(1) == yb).sum())
    model.train(was_training)
    n = max(1, x.shape[0])
    return total_loss / n, correct / n


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(
    config: TrainConfig,
    data,
    *,
    device: str | torch.device | None = "auto",
    checkpoint_dir: str | os.PathLike | None = None,
    on_epoch_end: Callable[[dict], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> "TrainResult":
    """Train ``config.model`` on ``data``; return a :class:`TrainResult` (JSON-able record + model).

    ``data`` is a :class:`deepfit.data.PreparedData` (or anything with ``x_train``, ``y_train``,
    ``x_test``, ``y_test`` float/int64 tensors, ``input_shape``, ``num_classes``, ``info`` and a
    ``train_batch(x, gen)`` transform). With ``checkpoint_dir`` the state is saved after every
    epoch to ``<dir>/<run id>.pt`` and an existing checkpoint of the same configuration is resumed
    (one of a different configuration is refused). ``on_epoch_end(epoch_record)`` is called after
    each epoch's checkpoint is written (raising from it simulates a kill).
    """
    dev = resolve_device(device)
    run_id = config_hash(config)
    x_train, y_train = data.x_train.to(dev), data.y_train.to(dev)
    x_test, y_test = data.x_test.to(dev), data.y_test.to(dev)
    # With augmentation, batches come from raw images; accuracy is measured on the preprocessed ones.
    x_train_eval = getattr(data, "x_train_eval", None)
    x_train_eval = x_train if x_train_eval is None else x_train_eval.to(dev)
    n = int(x_train.shape[0])
    if n == 0:
        raise InputError("the training set is empty; expected at least one example. Fix: check n_train.")

    # Everything random (init, dropout, batch order, crops) is drawn from state seeded here; fork_rng
    # restores the caller's global RNG state on exit, so library users are not reseeded.
    fork_devices = [dev.index or 0] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(config.seed)
        model = build_model(
            config.model, input_shape=data.input_shape, num_classes=data.num_classes,
            batch_norm=config.batch_norm, dropout=config.dropout, width=config.width,
        ).to(dev)
        opt = torch.optim.SGD(model.parameters(), lr=config.initial_lr, momentum=config.momentum,
                              weight_decay=config.weight_decay)
        gen = torch.Generator(device="cpu")
        gen.manual_seed(config.seed + 1_000_003)

        history: list[dict] = []
        start_epoch, step, train_time = 0, 0, 0.0
        ckpt_file = checkpoint_path(checkpoint_dir, config) if checkpoint_dir is not None else None
        resumed_from = None
        if ckpt_file is not None:
            from kernelfit.places import check_free_space

            # weights + momentum buffers, twice: the old checkpoint stays until the new one is complete
            state_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
            check_free_space(ckpt_file.parent, 2 * (2 * state_bytes + (1 << 20)), "--checkpoint-dir", "a checkpoint")
            ckpt = _load_checkpoint(ckpt_file, config)
            if ckpt is not None:
                try:
                    model.load_state_dict(ckpt["model"])
                    opt.load_state_dict(ckpt["optimizer"])
                    gen.set_state(ckpt["gen_state"])
                    torch.set_rng_state(ckpt["torch_rng"])
                    if dev.type == "cuda" and ckpt.get("cuda_rng") is not None:
                        torch.cuda.set_rng_state(ckpt["cuda_rng"], dev)
                    history = list(ckpt["history"])
                    start_epoch, step, train_time = int(ckpt["epoch"]), int(ckpt["step"]), float(ckpt["train_time_s"])
                except (KeyError, RuntimeError, TypeError, ValueError) as e:
                    raise ModelFileError(
                        f"checkpoint {str(ckpt_file)!r} matches this configuration but cannot be resumed "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else 'missing field'}). "
                        "Nothing was deleted. Fix: move it away to start over, or use another --checkpoint-dir."
                    ) from None
                resumed_from = start_epoch
                if log:
                    log(f"[{run_id}] resumed from {ckpt_file} at epoch {start_epoch}, step {step}")

        done = bool(history) and _finished(history[-1], config, step)
        epoch = start_epoch
        while not done:
            lr = lr_at_epoch(config.initial_lr, config.lr_decay, epoch)
            for g in opt.param_groups:
                g["lr"] = lr
            model.train()
            perm = torch.randperm(n, generator=gen).to(dev)
            loss_sum = torch.zeros((), device=dev)
            # First step of the epoch whose loss was NaN/inf (-1: none); kept on the device, so no sync per step.
            bad_step = torch.full((), -1, dtype=torch.long, device=dev)
            seen = 0
            _sync(dev)
            t0 = time.perf_counter()
            for i in range(0, n, config.batch_size):
                if config.max_steps is not None and step >= config.max_steps:
                    break
                idx = perm[i:i + config.batch_size]
                xb = data.train_batch(x_train[idx], gen) if config.augment else x_train[idx]
                out = model(xb)
                loss = nn.functional.cross_entropy(out, y_train[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_sum += loss.detach() * idx.numel()
                bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss.detach()), step + 1, bad_step)
                seen += idx.numel()
                step += 1
            _sync(dev)
            if int(bad_step) >= 0:  # before the checkpoint: the last one saved stays the last finite state
                raise TrainingDivergedError(
                    f"run {run_id}: the training loss became {float(loss_sum):g} (not finite) at epoch {epoch + 1}, "
                    f"SGD step {int(bad_step)} (learning rate {lr:g}); the weights diverged, so the run was stopped "
                    "and not recorded. Fix: a lower learning rate (--lr, e.g. "
                    f"{config.initial_lr / 10:g}), or batch norm / weight decay."
                    + (f" The checkpoint {str(ckpt_file)!r} keeps the last finite epoch." if ckpt_file is not None
                       and ckpt_file.exists() else "")
                )
            train_time += time.perf_counter() - t0
            # Evaluation excluded from training time. Train accuracy is measured on the
            # un-augmented training set in eval mode (what "fits the training set" means).
            tr_loss_eval, tr_acc = evaluate(model, x_train_eval, y_train)
            te_loss, te_acc = evaluate(model, x_test, y_test) if x_test.shape[0] else (float("nan"), float("nan"))
            rec = {
                "epoch": epoch + 1, "step": step, "lr": lr,
                "train_loss": float(loss_sum) / max(1, seen),  # mean minibatch loss during the epoch
                "train_loss_eval": tr_loss_eval, "train_acc": tr_acc,
                "test_loss": te_loss, "test_acc": te_acc, "train_time_s": train_time,
            }
            history.append(rec)
            epoch += 1
            done = _finished(rec, config, step)
            if log:
                log(f"[{run_id}] epoch {rec['epoch']:4d} step {step:7d} lr {lr:.5f} loss {rec['train_loss']:.4f} "
                    f"train {tr_acc:.4f} test {te_acc:.4f} ({train_time:.1f}s)")
            if ckpt_file is not None:
                _save_atomic({
                    "config_hash": run_id, "config": config.to_dict(), "model": model.state_dict(),
                    "optimizer": opt.state_dict(), "gen_state": gen.get_state(),
                    "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None,
                    "epoch": epoch, "step": step, "history": history, "train_time_s": train_time,
                }, ckpt_file)
            if on_epoch_end is not None:
                on_epoch_end(rec)

    fitted_at = next((h for h in history if h["train_acc"] >= config.target_train_acc), None)
    best = max(history, key=lambda h: (h["test_acc"] if not math.isnan(h["test_acc"]) else -1.0))
    last = history[-1]
    record = {
        "run_id": run_id,
        "config": config.to_dict(),
        "seed": config.seed,
        "data_seed": config.data_seed,
        "data": dict(data.info),
        "test_labels": "corrupted" if config.corrupt_test else "clean",
        "model_params": count_parameters(model),
        "initial_lr": config.initial_lr,
        "device": str(dev),
        "fitted": fitted_at is not None,
        "steps_to_fit": fitted_at["step"] if fitted_at else None,
        "epochs_to_fit": fitted_at["epoch"] if fitted_at else None,
        "epochs": last["epoch"],
        "steps": last["step"],
        "final_train_acc": last["train_acc"],
        "final_test_acc": last["test_acc"],
        "best_test_acc": best["test_acc"],
        "best_test_epoch": best["epoch"],
        "train_time_s": last["train_time_s"],
        "stopped_by": ("target_train_acc" if last["train_acc"] >= config.target_train_acc
                       else "max_steps" if config.max_steps is not None and last["step"] >= config.max_steps
                       else "max_epochs"),
        "resumed_from_epoch": resumed_from,
        "history": history,
    }
    return TrainResult(record=record, model=model)


@dataclass
class TrainResult:
    """``record``: the JSON-able result (config, run id, history, summary); ``model``: the trained net."""

    record: dict[str, Any]
    model: nn.Module


def _finished(rec: dict, config: TrainConfig, step: int) -> bool:
    return (rec["train_acc"] >= config.target_train_acc or rec["epoch"] >= config.max_epochs
            or (config.max_steps is not None and step >= config.max_steps))
