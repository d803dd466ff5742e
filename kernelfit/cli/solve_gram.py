"""``kernelfit solve`` with a precomputed Gram (``--gram``), and what every solve shares: the task,
the model file (``--save-model``) and the dask cluster (``--scheduler``)."""

from __future__ import annotations

from pathlib import Path

from ..catalog import TASKS
from .args import EXIT_OK, check_disk_args, check_out_path, eprint, placement, refuse
from .output import emit_record, print_summary


def add_arguments(s) -> None:
    """solve: precomputed Gram input, regression targets, model files, dask cluster."""
    g = s.add_argument_group("precomputed Gram (instead of a dataset: G = k(X_train, X_train), n x n)")
    g.add_argument("--gram", default=None, metavar="G.npy|G.h5:/dset|G.zarr:/arr",
                   help="training Gram matrix, full square (read through a memory map / in tiles, never "
                        "copied whole); needs --y-train (the targets of the Gram's rows)")
    g.add_argument("--gram-test", default=None, metavar="KT.npy|...",
                   help="test Gram k(X_test, X_train), m x n; needs --y-test")
    t = s.add_argument_group("targets, model file, cluster")
    t.add_argument("--task", choices=TASKS, default="classification",
                   help="classification: integer labels, one-hot, error rates (default); regression: float "
                        "targets (1-D or multi-output), RMSE and R^2")
    t.add_argument("--save-model", type=Path, default=None, metavar="MODEL.safetensors",
                   help="write the fitted interpolant (safetensors: alpha, training points, kernel, "
                        "preprocessing, provenance, checksum) for 'kernelfit predict'")
    t.add_argument("--scheduler", default=None, metavar="tcp://HOST:PORT|local:N",
                   help="build the Gram and factor it on dask.distributed: a running scheduler, or local:N "
                        "to start a LocalCluster of N worker processes (needs kernelfit[dask])")


def check_source(args) -> None:
    """--gram names the whole training input: no dataset, data file or x arrays beside it."""
    other = [flag for flag, v in (("--dataset", args.dataset), ("--data", args.data), ("--data-dir", args.data_dir),
                                  ("--x-train", args.x_train), ("--x-test", args.x_test),
                                  ("--features", None if args.features == "pixels" else args.features))
             if v is not None]
    if other:
        refuse(args, f"--gram {args.gram} is the whole training input; it conflicts with {' '.join(other)}. "
                     f"Give the targets with --y-train (and --gram-test with --y-test), nothing else")
    for flag, bad in (("--data-dir", args.data_dir is not None), ("--n-train", args.n_train is not None),
                      ("--n-test", args.n_test is not None), ("--variant", args.variant != "true"),
                      ("--download", args.download)):
        if bad:
            refuse(args, f"{flag} does not apply to --gram: the Gram fixes the training points and targets come "
                         f"from --y-train; drop {flag}")
    if args.y_train is None:
        refuse(args, "--gram needs --y-train Y.npy (the targets of the Gram's training points)")
    if (args.gram_test is None) != (args.y_test is None):
        refuse(args, "--gram-test and --y-test go together (the test Gram and the test targets)")
    args.mode = args.mode or "float64"
    from ..catalog import GRAM_MODES

    if args.mode not in GRAM_MODES:
        refuse(args, f"--mode {args.mode} needs the kernel function: mixed precision refines with float64 kernel "
                     f"products rebuilt from the data, and a precomputed Gram has no data. Use --mode float64 "
                     f"(default) or float32 (half the memory)")
    if args.resume and args.checkpoint_dir is None and args.scratch_dir is None:
        refuse(args, "--resume needs --checkpoint-dir DIR (the directory the interrupted run saved its panels to), "
                     "or --scratch-dir DIR for a disk solve")
    check_disk_args(args)
    if args.out_of_core == "disk":
        from ..disk_solve import check_gram_file_source
        from ..errors import InputError

        try:
            check_gram_file_source(args.gram, "--gram")
        except InputError as e:
            refuse(args, str(e))
    check_out_path(args, args.out, args.overwrite)


def _read_targets(spec: str, what: str):
    import numpy as np

    from ..data.arrays import open_array
    from ..validate import check_finite_targets

    y = np.asarray(open_array(spec, what=what))
    check_finite_targets(y, what)   # before the Gram is read: names the first NaN / inf row
    return y


def _load_targets(args):
    """(y, y_test, num_classes) of a --gram solve."""
    y = _read_targets(args.y_train, "--y-train")
    yt = None if args.y_test is None else _read_targets(args.y_test, "--y-test")
    num_classes = None
    if args.task == "classification":
        from ..experiment import check_labels, infer_num_classes

        num_classes = infer_num_classes((y, "--y-train"), (yt, "--y-test"))
        check_labels(y, num_classes, "--y-train")
    return y, yt, num_classes


def run(args) -> int:
    """solve --gram: a precomputed training Gram (and optional test Gram) with targets from files."""
    from ..experiment import run_gram_interpolation
    from ..results import PhaseTimer, peak_rss_bytes
    from ..solve import SolveOptions

    timer = PhaseTimer()
    with timer.phase("load"):
        y, yt, num_classes = _load_targets(args)
    options = SolveOptions(mode=args.mode, jitter=args.jitter, force_memory=args.force_memory,
                           placement=placement(args))
    extra = {"dataset": {"name": "precomputed-gram", "gram": args.gram, "gram_test": args.gram_test,
                         "y_train": args.y_train, "y_test": args.y_test}}
    with timer.phase("solve"):
        (record, model), cluster = with_cluster(args, lambda client: run_gram_interpolation(
            args.gram, {"true": y}, args.gram_test, yt, num_classes, options, extra, task=args.task, client=client,
            return_model=True))
    save_model_if_asked(args, record, model, cluster)
    record["cli_timings_s"] = timer.as_dict()
    record["cli_peak_rss_bytes"] = peak_rss_bytes()
    print_summary(record)
    emit_record(args, record)
    return EXIT_OK


def with_cluster(args, work):
    """work(client) on the --scheduler cluster (client None without one); returns (result, cluster info)."""
    if args.scheduler is None:
        return work(None), None
    from ..linalg.distributed import Cluster

    with Cluster(args.scheduler) as cluster:
        info = cluster.info()
        eprint(f"[kernelfit] dask cluster {info['address']} with {info['workers']} worker(s)")
        return work(cluster.client), info


def save_model_if_asked(args, record, model, cluster, preprocessing=None, class_names=None, classes=None) -> None:
    """Write --save-model (before the record, which then names the model file and its sha256)."""
    if cluster is not None:
        record["cluster"] = cluster
    if args.save_model is None:
        return
    from ..data.arrays import sha256_file
    from ..model import save_model

    data = record.get("dataset") or {k: record.get("stats", {}).get(k) for k in ("gram",)}
    try:
        path = save_model(args.save_model, model, task=record["task"], targets=record["target_columns"],
                          num_classes=record.get("num_classes"), classes=classes, class_names=class_names,
                          preprocessing=preprocessing,
                          data=data, provenance=record.get("provenance"), overwrite=args.overwrite)
    except OSError as e:  # the solve is done: keep the record, say the model was not written, fail at the end
        record["model"] = {"path": None, "error": f"could not write --save-model {args.save_model} "
                                                  f"({e.strerror or e}); nothing was written there"}
        return
    record["model"] = {"path": str(path), "sha256": sha256_file(path)}
    eprint(f"wrote model {path}")
