"""What the commands print and write: the solve summary (stderr), the JSON record (stdout or --out,
atomically, never lost when --out fails), and prediction files (.npy, .csv with a header, .json)."""

from __future__ import annotations

import sys
from pathlib import Path

from .args import eprint

PREDICTION_SUFFIXES = (".npy", ".csv", ".json")


def emit_record(args, record: dict) -> None:
    """The record to --out (atomically) or stdout. If --out cannot be written after the work (disk
    full, directory gone), the record is not lost: it goes to stdout and the command fails."""
    from ..errors import OutputError
    from ..results import write_json_atomic

    if args.out is not None:
        try:
            eprint(f"wrote {write_json_atomic(args.out, record, overwrite=args.overwrite)}")
        except OSError as e:
            print_json(record)
            raise OutputError(f"could not write --out {args.out} ({e.strerror or e}); nothing was written "
                              f"there, and the full record was printed on stdout instead. Fix: free space "
                              f"or choose another path, and save stdout next time (> result.json).") from None
    else:
        print_json(record)
    failed = (record.get("model") or {}).get("error")
    if failed:
        raise OutputError(f"{failed}; the record was written without it. Fix: free space or choose another "
                          f"path, and rerun.")


def print_summary(record: dict) -> None:
    ds = record.get("dataset", {})
    st = record.get("stats", {})
    sigma = st.get("bandwidth")
    sigma_s = "" if sigma is None else f" sigma={sigma:.4g} ({st.get('bandwidth_rule')})"
    eprint(f"[kernelfit] {ds.get('name')} n_train={record.get('n_train')} n_test={record.get('n_test')} "
            f"kernel={st.get('kernel')}{sigma_s} mode={st.get('mode')} task={record.get('task', 'classification')}")
    for name, res in record.get("results", {}).items():
        if "train_error" in res:
            te = res.get("test_error")
            te_s = "n/a" if te is None else f"{100 * te:.2f}%"
            fit = f"train error {100 * res['train_error']:.2f}%  test error {te_s}"
        else:
            te, r2 = res.get("test_rmse"), res.get("test_r2")
            fit = (f"train RMSE {res['train_rmse']:.3g}  test RMSE {'n/a' if te is None else f'{te:.4g}'}  "
                   f"test R^2 {'n/a' if r2 is None else f'{r2:.4f}'}")
        resid = (f"max |residual| {res['residual_max_abs']:.2e}" if "residual_max_abs" in res
                 else f"relative residual {res['residual_relative']:.2e}")
        eprint(f"  {name:>16}: {fit}  RKHS norm {res['rkhs_norm']:.4g}  {resid}")
    fact = (st.get("refinement") or {}).get("factorization") or st.get("factorization") or {}
    if isinstance(fact, dict) and fact.get("resumed_from_panel"):
        eprint(f"  resumed the factorization from panel {fact['resumed_from_panel']} (block "
                f"{fact.get('block')}) of the checkpoint in {(fact.get('checkpoint') or {}).get('dir', '?')}")
    if st.get("strategy") == "disk":
        eprint(f"  strategy disk ({st.get('factor_dtype')} factor in {st.get('scratch_dir')}, {st.get('slabs')} slabs, "
               f"RAM budget {st.get('memory_budget_bytes', 0) / 2**30:.2f} GiB): read "
               f"{st.get('bytes_read', 0) / 2**30:.2f} GiB, wrote {st.get('bytes_written', 0) / 2**30:.2f} GiB, "
               f"I/O wait {st.get('io_wait_s', 0.0):.2f}s"
               + (f"; resumed after panel {st['resumed']['finished_panels']}" if st.get("resumed") else ""))
    elif st.get("strategy"):
        eprint(f"  strategy {st['strategy']} (in RAM)")
    t = st.get("timings_s", {})
    if t:
        eprint("  time: " + ", ".join(f"{k} {v:.2f}s" for k, v in t.items())
                + f"; peak RSS {st.get('peak_rss_bytes', 0) / 2**30:.2f} GiB")


def write_predictions(out: Path, values, payload: dict, overwrite: bool, labels=None) -> None:
    """Predictions to .json (the payload), .npy (the array) or .csv (a header, the row index, the
    prediction or one column per score, and the true label when it was given)."""
    import numpy as np

    from ..results import atomic_file, write_json_atomic

    if out.suffix.lower() == ".json":
        write_json_atomic(out, payload, overwrite=overwrite)
        return
    if out.exists() and not overwrite:
        raise FileExistsError(f"refusing to overwrite {out}; pass --overwrite or choose a new path")
    with atomic_file(out, "wb") as fh:
        if out.suffix.lower() == ".npy":
            np.save(fh, values, allow_pickle=False)
            return
        table = values.reshape(len(values), -1)
        names = ["prediction"] if table.shape[1] == 1 else [f"{'score' if 'scores' in payload else 'prediction'}_{j}"
                                                           for j in range(table.shape[1])]
        columns = [np.arange(len(table))[:, None], table]
        if labels is not None:
            names.append("label")
            columns.append(np.asarray(labels).reshape(len(table), -1))
        header = ",".join(["index", *names])
        integer = all(np.issubdtype(c.dtype, np.integer) for c in columns)
        fmt = "%d" if integer else ["%d", *(["%d" if np.issubdtype(table.dtype, np.integer) else "%.17g"] * table.shape[1]),
                                    *(["%.17g"] if labels is not None else [])]
        np.savetxt(fh, np.hstack([c.astype(np.float64) if not integer else c for c in columns]), fmt=fmt,
                   delimiter=",", header=header, comments="")


def print_json(obj) -> None:
    """A record or payload as one JSON document on stdout."""
    from ..results import dumps

    sys.stdout.write(dumps(obj) + "\n")
    sys.stdout.flush()
