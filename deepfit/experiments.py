"""Experiments: one run, corruption sweeps, the variant comparison (Fig. 1a) and the Table 1 grid.

Each run appends one JSON line (config, run id, seed, history, summary, provenance: git SHA and
library versions) to a results file. Sweeps skip run ids already in that file, and run the rest
in parallel: worker processes (one a GPU when there are GPUs) or a dask cluster.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from kernelfit.errors import InputError

from .train import TrainConfig, config_hash, train

__all__ = [
    "run_one", "run_sweep", "finished_run_ids", "corruption_sweep_configs", "variant_configs", "unique_configs",
    "table1_configs", "PAPER_TABLE1", "table1_rows", "format_table1", "read_results", "table1_incomparable",
]

# Zhang et al. (2017), Table 1, CIFAR-10: (model, random crop, weight decay, labels) ->
# (train accuracy %, test accuracy %), as printed in the paper.
PAPER_TABLE1: list[tuple[str, bool, bool, str, float, float]] = [
    ("inception-small", True, True, "true", 100.0, 89.05),
    ("inception-small", True, False, "true", 100.0, 89.31),
    ("inception-small", False, True, "true", 100.0, 86.03),
    ("inception-small", False, False, "true", 100.0, 85.75),
    ("inception-small", False, False, "random", 100.0, 9.78),
    ("inception-small-nobn", False, True, "true", 100.0, 83.00),
    ("inception-small-nobn", False, False, "true", 100.0, 82.00),
    ("inception-small-nobn", False, False, "random", 100.0, 10.12),
    ("alexnet-small", True, True, "true", 99.90, 81.22),
    ("alexnet-small", True, False, "true", 99.82, 79.66),
    ("alexnet-small", False, True, "true", 100.0, 77.36),
    ("alexnet-small", False, False, "true", 100.0, 76.07),
    ("alexnet-small", False, False, "random", 99.82, 9.86),
    ("mlp-3x512", False, True, "true", 100.0, 53.35),
    ("mlp-3x512", False, False, "true", 100.0, 52.39),
    ("mlp-3x512", False, False, "random", 100.0, 10.48),
    ("mlp-1x512", False, True, "true", 99.80, 50.39),
    ("mlp-1x512", False, False, "true", 100.0, 50.51),
    ("mlp-1x512", False, False, "random", 99.34, 10.61),
]

# The paper's setting (Zhang et al. 2017, Sec. 2 and Appendix A): all of CIFAR-10, whitened, centre-cropped to 28.
PAPER_TABLE1_SETTING = dict(dataset="cifar10", n_train=50000, n_test=10000, preprocess="whiten", crop=28)


def table1_incomparable(config: TrainConfig) -> list[str]:
    """Why a Table 1 run's numbers cannot be set beside the paper's (empty: the paper's data setting)."""
    s = PAPER_TABLE1_SETTING
    why = []
    if config.dataset != s["dataset"]:
        why.append(f"dataset {config.dataset} (paper: {s['dataset']})")
    for name in ("n_train", "n_test"):
        v = getattr(config, name)
        if v is not None and int(v) < s[name]:
            why.append(f"{name} {v} (paper: {s[name]})")
    for name in ("preprocess", "crop"):
        if getattr(config, name) != s[name]:
            why.append(f"{name} {getattr(config, name)} (paper: {s[name]})")
    return why


# The paper does not state its weight-decay coefficient; this is the value the grid uses here.
TABLE1_WEIGHT_DECAY = 5e-4


# --------------------------------------------------------------------------------------------
# results files
# --------------------------------------------------------------------------------------------

def _provenance() -> dict:
    from kernelfit.provenance import provenance
    return provenance()


def _append(path, record) -> None:
    from kernelfit.results import append_jsonl
    append_jsonl(path, record)


def read_results(path) -> list[dict]:
    """All records of a results JSON-lines file ([] when it does not exist)."""
    from kernelfit.results import read_jsonl
    p = Path(path)
    return read_jsonl(p) if p.exists() else []


def finished_run_ids(path) -> set[str]:
    return {r["run_id"] for r in read_results(path) if isinstance(r, dict) and "run_id" in r}


# --------------------------------------------------------------------------------------------
# one run
# --------------------------------------------------------------------------------------------

def run_one(
    config: TrainConfig,
    *,
    out: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
    device: str = "auto",
    checkpoint_dir: str | os.PathLike | None = None,
    threads: int | None = None,
    experiment: str = "run",
    log: Callable[[str], None] | None = None,
    data=None,
    download: bool = False,
) -> dict[str, Any]:
    """Prepare the data, train, append the record (with provenance) to ``out``; return the record.

    ``download``: fetch a missing data set from its canonical source (kernelfit.data.download).
    """
    import torch

    from .data import prepare_data

    if threads is not None:
        torch.set_num_threads(int(threads))
    if data is None:
        data = prepare_data(config, data_dir=data_dir, download=download)
    prov = _provenance()   # before training: the code that runs, not what HEAD is when it ends
    result = train(config, data, device=device, checkpoint_dir=checkpoint_dir, log=log)
    record = dict(result.record)
    record["experiment"] = experiment
    if experiment == "table1":   # the record says whether it can stand beside the paper's Table 1
        why = table1_incomparable(config)
        record["paper_comparable"] = not why
        if why:
            record["not_comparable_because"] = why
    record["threads"] = torch.get_num_threads()
    record["provenance"] = prov
    if out is not None:
        try:
            _append(out, record)
        except OSError as e:
            from .train import checkpoint_path
            kept = (f"the finished run's checkpoint {str(checkpoint_path(checkpoint_dir, config))!r} is kept: rerun the "
                    "same command to append the record without training again" if checkpoint_dir is not None
                    else "the trained weights were not saved (pass --checkpoint-dir to keep them)")
            raise OSError(e.errno, f"run {record['run_id']} finished, but its record could not be appended to {str(out)!r} "
                                   f"({e.strerror or e}); the file keeps its earlier records; {kept}") from None
    return record


_WORKER_DEVICE: str | None = None


def _init_worker(device_queue) -> None:
    # Each pool process takes one device for its lifetime, so two runs never share a GPU while another idles.
    global _WORKER_DEVICE
    _WORKER_DEVICE = device_queue.get()


def _worker_task(args: dict) -> dict:
    # Top-level so that spawn-started processes and dask workers can import it.
    config = TrainConfig.from_dict(args["config"])
    if _WORKER_DEVICE is not None:
        args = {**args, "device": _WORKER_DEVICE}
    from kernelfit.progress import get_logger

    log = get_logger("deepfit").info if args.get("verbose") else None
    rec = run_one(config, out=args["out"], data_dir=args.get("data_dir"), device=args.get("device", "auto"),
                  checkpoint_dir=args.get("checkpoint_dir"), threads=args.get("threads"),
                  experiment=args.get("experiment", "sweep"), log=log, download=args.get("download", False))
    # Return a small summary; the full record is already in the results file.
    return {k: rec[k] for k in ("run_id", "fitted", "steps_to_fit", "final_train_acc", "final_test_acc",
                                "best_test_acc", "epochs", "train_time_s")}


def _available_devices(device: str) -> list[str]:
    import torch
    if device == "auto":
        n = torch.cuda.device_count()
        return [f"cuda:{i}" for i in range(n)] if n else ["cpu"]
    return [d.strip() for d in str(device).split(",") if d.strip()]


def run_sweep(
    configs: Sequence[TrainConfig],
    *,
    out: str | os.PathLike,
    workers: int | None = None,
    device: str = "auto",
    threads: int | None = None,
    data_dir=None,
    checkpoint_dir=None,
    dask_address: str | None = None,
    experiment: str = "sweep",
    verbose: bool = False,
    log: Callable[[str], None] = print,
    download: bool = False,
) -> list[dict]:
    """Run every config not already finished in ``out``; return the summaries of the runs done now.

    ``device``: "auto" (every visible GPU, else the CPU), "cpu", or a comma list ("cuda:0,cuda:1");
    each worker process holds one device (dealt round-robin) for all its runs; on dask, runs are
    dealt round-robin. ``workers``: parallel processes (default: one per
    GPU, or 1 on the CPU). ``threads``: torch threads per worker (default: cores // workers).
    ``dask_address``: a dask scheduler address ("tcp://host:8786") or "local" (a LocalCluster of
    ``workers`` processes); runs are then submitted to that cluster instead.
    Checkpoints in ``checkpoint_dir`` let an interrupted sweep resume its unfinished runs.
    """
    seen: set[str] = set()
    unique = []
    for c in configs:
        h = config_hash(c)
        if h not in seen:
            seen.add(h)
            unique.append(c)
    done = finished_run_ids(out)
    todo = [c for c in unique if config_hash(c) not in done]
    summary = f"sweep: {len(unique)} runs, {len(unique) - len(todo)} already in {out}, {len(todo)} to run"
    if len(todo) < len(unique):   # runs asked for are not run: said even with -q
        from kernelfit.progress import get_logger
        get_logger("deepfit.experiments").warning(summary + " (the finished ones are skipped)")
    else:
        log(summary)
    if not todo:
        return []
    devices = _available_devices(device)
    if workers is None:
        workers = len(devices) if devices != ["cpu"] else 1
    workers = max(1, int(workers))
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // workers)
    tasks = [{"config": c.to_dict(), "out": str(out), "data_dir": None if data_dir is None else str(data_dir),
              "device": devices[i % len(devices)], "checkpoint_dir": None if checkpoint_dir is None else str(checkpoint_dir),
              "threads": threads, "experiment": experiment, "verbose": verbose, "download": download}
             for i, c in enumerate(todo)]
    results: list[dict] = []
    if dask_address:
        from dask.distributed import Client, LocalCluster
        cluster = None
        if dask_address == "local":
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
            client = Client(cluster)
        else:
            client = Client(dask_address)
        try:
            futures = client.map(_worker_task, tasks, pure=False)
            for fut in futures:
                results.append(fut.result())
                log(f"done {results[-1]}")
        finally:
            client.close()
            if cluster is not None:
                cluster.close()
        return results
    if workers == 1:
        for t in tasks:
            results.append(_worker_task(t))
            log(f"done {results[-1]}")
        return results
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        device_queue = manager.Queue()
        for i in range(workers):
            device_queue.put(devices[i % len(devices)])
        with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                                    initargs=(device_queue,)) as ex:
            futs = [ex.submit(_worker_task, t) for t in tasks]
            for f in cf.as_completed(futs):
                results.append(f.result())
                log(f"done {results[-1]}")
    return results


# --------------------------------------------------------------------------------------------
# grids
# --------------------------------------------------------------------------------------------

def _parse_floats(ps: Iterable[float]) -> list[float]:
    out = []
    for p in ps:
        p = float(p)
        if not 0.0 <= p <= 1.0:
            raise InputError(f"corruption level p must be in [0, 1], got {p!r}. Fix: e.g. --ps 0,0.2,0.4,0.6,0.8,1.")
        out.append(p)
    return out


def corruption_sweep_configs(base: TrainConfig, ps: Iterable[float], seeds: Iterable[int] = (0,)) -> list[TrainConfig]:
    """Fig. 1b/1c: label corruption level p (variant "corrupt") x seeds."""
    return [base.replace(variant="corrupt", p=p, seed=int(s), data_seed=int(s))
            for p in _parse_floats(ps) for s in seeds]


def unique_configs(configs: Iterable[TrainConfig]) -> list[TrainConfig]:
    """One config per distinct run: ``corrupt`` with p = 0 corrupts nothing, so it is the ``true`` run
    (same data, same config hash); repeated configs are kept once, in first-seen order."""
    out, seen = [], set()
    for c in configs:
        if c.variant == "corrupt" and float(c.p) == 0.0:
            c = c.replace(variant="true", p=0.0)
        h = config_hash(c)
        if h not in seen:
            seen.add(h)
            out.append(c)
    return out


def variant_configs(base: TrainConfig, variants: Iterable[str], seeds: Iterable[int] = (0,)) -> list[TrainConfig]:
    """Fig. 1a: the same model on each data variant."""
    from kernelfit.randomize import VARIANTS
    out = []
    for v in variants:
        if v not in VARIANTS:
            raise InputError(f"unknown variant {v!r}. Valid variants: {', '.join(VARIANTS)}.")
        for s in seeds:
            out.append(base.replace(variant=v, seed=int(s), data_seed=int(s)))
    return out


def table1_configs(base: TrainConfig, models: Iterable[str] | None = None) -> list[tuple[tuple, TrainConfig]]:
    """The Table 1 grid as ((model, crop, wd, labels), config) pairs; ``base`` supplies the rest."""
    wanted = set(models) if models is not None else None
    out = []
    for model, aug, wd, labels, _, _ in PAPER_TABLE1:
        if wanted is not None and model not in wanted:
            continue
        cfg = base.replace(model=model, augment=aug, weight_decay=TABLE1_WEIGHT_DECAY if wd else 0.0,
                           variant="random-labels" if labels == "random" else "true", p=0.0, lr=None)
        out.append(((model, aug, wd, labels), cfg))
    return out


def table1_rows(records: Sequence[dict], models: Iterable[str] | None = None,
                dataset: str = "cifar10") -> list[dict]:
    """One row per Table 1 cell (measured or not). A record fills the cell whose model, random
    crop, weight decay on/off and labels (true / random-labels) it has; the latest such record wins."""
    paper = {(m, a, w, lab): (tr, te) for m, a, w, lab, tr, te in PAPER_TABLE1}
    found: dict[tuple, dict] = {}
    for r in records:
        if not (isinstance(r, dict) and "config" in r):
            continue
        c = r["config"]
        labels = {"true": "true", "random-labels": "random"}.get(c["variant"])
        key = (c["model"], bool(c["augment"]), float(c["weight_decay"]) > 0, labels)
        if key in paper and c["dataset"] == dataset:
            found[key] = r
    wanted = set(models) if models is not None else None
    rows = []
    for m, a, w, lab, tr, te in PAPER_TABLE1:
        if wanted is not None and m not in wanted:
            continue
        rec = found.get((m, a, w, lab))
        rows.append({
            "model": m, "random_crop": a, "weight_decay": w, "labels": lab,
            "paper_train_acc": tr, "paper_test_acc": te,
            "train_acc": None if rec is None else 100 * rec["final_train_acc"],
            "test_acc": None if rec is None else 100 * rec["final_test_acc"],
            "best_test_acc": None if rec is None else 100 * rec["best_test_acc"],
            "epochs": None if rec is None else rec["epochs"],
            "n_train": None if rec is None else rec["data"].get("n_train"),
            "run_id": None if rec is None else rec["run_id"],
        })
    return rows


def format_table1(rows: Sequence[dict], note: str = "") -> str:
    def f(v):
        return "   --  " if v is None else f"{v:7.2f}"
    lines = [
        "Table 1 (Zhang et al. 2017, CIFAR-10) -- measured here vs. paper" + (f" [{note}]" if note else ""),
        "accuracies in %; 'test' = at the end of training, 'best' = best test accuracy along the way;",
        "weight decay here = " + f"{TABLE1_WEIGHT_DECAY:g}" + " (the paper does not state its value); '--' = not run",
        f"{'model':22s} {'crop':>5s} {'wd':>5s} {'labels':>7s} | {'train':>7s} {'test':>7s} {'best':>7s} {'epochs':>6s} | "
        f"{'paper tr':>8s} {'paper te':>8s} {'n_train':>7s}",
    ]
    for r in rows:
        lines.append(
            f"{r['model']:22s} {'yes' if r['random_crop'] else 'no':>5s} {'yes' if r['weight_decay'] else 'no':>5s} "
            f"{r['labels']:>7s} | {f(r['train_acc'])} {f(r['test_acc'])} {f(r['best_test_acc'])} "
            f"{'--' if r['epochs'] is None else r['epochs']:>6} | {r['paper_train_acc']:8.2f} {r['paper_test_acc']:8.2f} "
            f"{'--' if r['n_train'] is None else r['n_train']:>7}"
        )
    return "\n".join(lines)
