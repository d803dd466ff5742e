"""Device check 2 of 2 (deepfit): the Table 1 rows without random crop and weight decay, true labels
and random labels, for MLP 1x512, small AlexNet and small Inception on CIFAR-10 (JPEG q75 copy),
each trained until 99% train accuracy or a time cap, with samples/s and time to fit beside the
paper's accuracies (``deepfit.experiments.PAPER_TABLE1``). Useful alone; see docs/gpu.md.

    python benchmarks/prep_cifar10_npz.py                     # here, once: runs/data/cifar10-jpeg.npz (~18 MiB)
    python3 benchmarks/device_check_deepfit.py --out "$OUT"   # on the GPU machine, <= 330 s by default

Time: ``--timeout`` for all of it; after the data is decoded, each run gets an equal share of what
is left (a run that fits early leaves its time to the later ones) and stops after the epoch at
which the next one would pass its share. Training uses deepfit's own loop (deepfit.train.train:
SGD, momentum 0.9, lr decay 0.95 per epoch, batch 128, the paper's preprocessing); its
``train_time_s`` excludes the per-epoch evaluations, samples/s = epochs x n_train / train_time_s.

Output under --out (4 files): ``environment.json``, ``deepfit_runs.jsonl`` (one record per run,
written as each ends, success or error), ``deepfit.log``, ``summary.md`` (printed last). The runs
happen in a child process under the timeout, so a hang or a CUDA error still leaves the records
and the summary. Exit status 0 only when every run ended without error (a run stopped by its time
cap is not an error; the summary says it did not fit).

CPU dry run (part of the test suite):
    python benchmarks/device_check_deepfit.py --device cpu --n-train 200 --n-test 50 --max-epochs 1 --data FILE.npz --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from device_check import child_env, environment, fresh_out_dir, gpu_label, run_logged  # noqa: E402

DEFAULT_DATA = ROOT / "runs" / "data" / "cifar10-jpeg.npz"
MODELS = ("mlp-1x512", "alexnet-small", "inception-small")
FILES = ("environment.json", "deepfit_runs.jsonl", "deepfit.log", "summary.md")


class TimeCap(Exception):
    """Raised from the epoch callback when the next epoch would pass the run's share of time."""


def find_data(explicit) -> Path:
    path = Path(explicit) if explicit else DEFAULT_DATA
    if path.is_dir():
        path = path / DEFAULT_DATA.name
    if not path.is_file():
        raise SystemExit(f"{path} not found: make it here with `python benchmarks/prep_cifar10_npz.py` (from "
                         "cifar10-jpeg-q75.tar.gz) and carry runs/data with the tree, or pass --data FILE.npz.")
    return path


def run_all(args) -> int:
    """The worker: decode the data once, then train each (model, labels) row; one record per run."""
    import torch
    from prep_cifar10_npz import load_packed

    from deepfit.data import prepare_arrays
    from deepfit.experiments import PAPER_TABLE1, table1_configs
    from deepfit.train import TrainConfig, train
    from kernelfit.data.dataset import Dataset
    from kernelfit.randomize import Randomization, apply_randomization
    from kernelfit.results import append_jsonl

    t0 = time.perf_counter()
    deadline = t0 + args.seconds
    xtr, ytr, xte, yte, classes = load_packed(args.data, args.n_train, args.n_test)
    ds = Dataset(name="cifar10", x_train=xtr, y_train=ytr, x_test=xte, y_test=yte, classes=classes,
                 source=f"{args.data} (CIFAR-10, JPEG q75 copy)")
    decode_s = time.perf_counter() - t0
    print(f"[deepfit] {len(ytr)} train + {len(yte)} test images decoded in {decode_s:.1f} s", flush=True)
    paper = {(m, lab): (tr, te) for m, a, w, lab, tr, te in PAPER_TABLE1 if not a and not w}
    base = TrainConfig(target_train_acc=args.target, max_epochs=args.max_epochs, batch_size=args.batch_size)
    rows = [(key, cfg) for key, cfg in table1_configs(base, args.models)
            if not key[1] and not key[2] and key[3] in args.labels]
    rows.sort(key=lambda r: (args.models.index(r[0][0]), args.labels.index(r[0][3])))   # cheapest models first
    failed = 0
    for i, ((model, _, _, labels), cfg) in enumerate(rows):
        cap = (deadline - time.perf_counter()) / (len(rows) - i)
        rec = {"kind": "deepfit_device_check", "model": model, "labels": labels, "dataset": "CIFAR-10 (JPEG q75 copy)",
               "n_train": len(ytr), "n_test": len(yte), "target_train_acc": args.target, "cap_s": round(cap, 1),
               "paper_train_acc": paper[(model, labels)][0], "paper_test_acc": paper[(model, labels)][1],
               "decode_s": round(decode_s, 1), "config": cfg.to_dict()}
        history, t_run = [], time.perf_counter()

        def on_epoch(h, history=history, t_run=t_run, cap=cap):
            history.append(h)
            used = time.perf_counter() - t_run
            if used + used / len(history) > cap:      # the next epoch (about the mean so far) would pass the cap
                raise TimeCap
        try:
            if cap <= 0:
                raise TimeCap
            data_ds, rinfo = apply_randomization(ds, Randomization(cfg.variant, p=cfg.p, seed=cfg.data_seed))
            data = prepare_arrays(data_ds.x_train, data_ds.y_train, data_ds.x_test, data_ds.y_test, data_ds.num_classes,
                                  preprocess=cfg.preprocess, crop=cfg.crop, augment=cfg.augment,
                                  info={"randomization": rinfo})
            try:
                result = train(cfg, data, device=args.device, on_epoch_end=on_epoch)
                rec["model_params"] = result.record["model_params"]
                stopped = result.record["stopped_by"]
            except TimeCap:
                stopped = "time cap"
            rec.update(summarize(history, cfg, len(ytr)), stopped_by=stopped, status="ok")
        except Exception as exc:
            failed += 1
            rec.update(summarize(history, cfg, len(ytr)), status="error", error=f"{type(exc).__name__}: {exc}",
                       traceback=traceback.format_exc(limit=6)[-3000:])
        rec["wall_s"] = round(time.perf_counter() - t_run, 1)
        if torch.cuda.is_available():
            rec["gpu"] = torch.cuda.get_device_name()
        append_jsonl(args.records, rec)
        print(f"[deepfit] {model} {labels}: {rec.get('stopped_by', rec.get('error'))}, train acc "
              f"{rec.get('train_acc')}, {rec['wall_s']} s", flush=True)
    return 1 if failed else 0


def summarize(history, cfg, n_train) -> dict:
    if not history:
        return {"epochs": 0}
    last = history[-1]
    fit = next((h for h in history if h["train_acc"] >= cfg.target_train_acc), None)
    return {"epochs": last["epoch"], "train_acc": 100 * last["train_acc"], "test_acc": 100 * last["test_acc"],
            "best_test_acc": 100 * max(h["test_acc"] for h in history), "train_time_s": last["train_time_s"],
            "samples_per_s": last["epoch"] * n_train / max(last["train_time_s"], 1e-9),
            "fitted": fit is not None, "time_to_fit_s": None if fit is None else fit["train_time_s"],
            "epochs_to_fit": None if fit is None else fit["epoch"]}


def _f(v, spec):
    return "-" if v is None else format(v, spec)


def summary_table(records, gpu, run, note="") -> str:
    lines = [f"# Device check 2 (deepfit, Table 1 rows) on {gpu}", "",
             f"runs: rc {run['rc']}, {run['seconds']} s{', TIMED OUT' if run['timed_out'] else ''}"
             + (f"; {note}" if note else ""),
             "CIFAR-10 (JPEG q75 copy); no random crop, no weight decay; target 99% train accuracy or the time cap", "",
             "| model | labels | status | epochs | train acc % | paper train % | test acc % | paper test % "
             "| time to fit s | train s | samples/s | cap s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        status = (("fitted" if r.get("fitted") else f"not fitted ({r.get('stopped_by')})") if r["status"] == "ok"
                  else f"error: {r.get('error', '')[:60]}")
        lines.append(f"| {r['model']} | {r['labels']} | {status} | {r.get('epochs')} | {_f(r.get('train_acc'), '.2f')} "
                     f"| {r['paper_train_acc']:.2f} | {_f(r.get('test_acc'), '.2f')} | {r['paper_test_acc']:.2f} "
                     f"| {_f(r.get('time_to_fit_s'), '.1f')} | {_f(r.get('train_time_s'), '.1f')} "
                     f"| {_f(r.get('samples_per_s'), '.0f')} | {r['cap_s']:.0f} |")
    if not records:
        lines.append("| (no records) |" + " |" * 11)
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu for a dry run")
    p.add_argument("--out", default=os.environ.get("OUT"), help="output folder (default $OUT)")
    p.add_argument("--data", default=None, help=f"the packed .npz (default {DEFAULT_DATA.relative_to(ROOT)})")
    p.add_argument("--timeout", type=float, default=330.0, help="seconds for the whole check (default 330)")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--labels", nargs="+", default=["true", "random"], choices=["true", "random"])
    p.add_argument("--target", type=float, default=0.99, help="train accuracy that counts as fitted (default 0.99)")
    p.add_argument("--max-epochs", type=int, default=1000, help="epoch limit per run (the time cap usually ends first)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--n-train", type=int, default=None, help="training images (default all 50,000; dry runs: few)")
    p.add_argument("--n-test", type=int, default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--seconds", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--records", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return run_all(args)
    out = fresh_out_dir(args.out, FILES)
    t0 = time.perf_counter()
    info = environment(args.device)
    gpu = gpu_label(info, args.device)
    records, note = [], ""
    run = {"rc": None, "seconds": 0.0, "timed_out": False}
    try:
        data = find_data(args.data)
        info["data"] = str(data)
    except SystemExit as exc:
        data, info["data_error"], note = None, str(exc), f"not run: {exc}"
    (out / "environment.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"[device_check_deepfit] {gpu}", flush=True)
    if data is not None:
        left = args.timeout - (time.perf_counter() - t0)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--device", args.device, "--data", data,
               "--seconds", max(1.0, left - 25), "--records", out / "deepfit_runs.jsonl", "--models", *args.models,
               "--labels", *args.labels, "--target", args.target, "--max-epochs", args.max_epochs,
               "--batch-size", args.batch_size, *(["--n-train", args.n_train] if args.n_train else []),
               *(["--n-test", args.n_test] if args.n_test else [])]
        run = run_logged(cmd, out / "deepfit.log", child_env(None), left - 5)
        from kernelfit.results import read_jsonl

        jsonl = out / "deepfit_runs.jsonl"
        records = read_jsonl(jsonl) if jsonl.exists() else []
    else:
        (out / "deepfit.log").write_text(note + "\n")
    table = summary_table(records, gpu, run, note)
    (out / "summary.md").write_text(table)
    print(f"[device_check_deepfit] finished in {time.perf_counter() - t0:.0f} s; files in {out}", flush=True)
    print(table, flush=True)
    ok = run["rc"] == 0 and records and all(r["status"] == "ok" for r in records)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
