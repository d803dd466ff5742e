"""``kernelfit predict``: predictions of a model saved by ``solve --save-model``, streamed in blocks."""

from __future__ import annotations

from pathlib import Path

from .args import EXIT_OK, add_common, check_out_path, eprint, refuse
from .output import PREDICTION_SUFFIXES, print_json, write_predictions


def register(sub) -> None:
    p = sub.add_parser("predict", help="predict with a model saved by 'kernelfit solve --save-model'",
                       description="Predict class labels (classification) or values (regression) for new "
                                   "points with a saved model; the points are read and predicted in blocks.")
    p.add_argument("--model", type=Path, required=True, metavar="MODEL.safetensors")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", default=None, metavar="FILE.npz",
                     help="an .npz with x_test (and optionally y_test: then the metrics are reported)")
    src.add_argument("--x-test", default=None, metavar="X.npy|X.h5:/dset|X.zarr:/arr",
                     help="test points in the model's input layout (e.g. raw images for a dataset model)")
    src.add_argument("--gram-test", default=None, metavar="KT.npy|...",
                     help="precomputed-Gram models: the test Gram k(X_test, X_train), m x n")
    p.add_argument("--y-test", default=None, metavar="YT.npy|...", help="test targets: report error / RMSE")
    p.add_argument("--target", default=None, metavar="NAME",
                   help="target set of the model to predict (default: its first, e.g. 'true')")
    p.add_argument("--scores", action="store_true",
                   help="write the raw scores k(x, X) alpha (n, outputs) instead of labels")
    p.add_argument("--out", type=Path, default=None, metavar="PRED.npy|.csv|.json",
                   help="write predictions here (atomically); default: JSON on stdout")
    p.add_argument("--overwrite", action="store_true", help="allow replacing an existing --out file")
    add_common(p)
    p.set_defaults(run=run)


def run(args) -> int:
    if args.out is not None and args.out.suffix.lower() not in PREDICTION_SUFFIXES:
        refuse(args, f"--out {args.out}: expected a file ending in {', '.join(PREDICTION_SUFFIXES)}")
    check_out_path(args, args.out, args.overwrite, "--out", "pred.npy")
    import numpy as np

    from ..model import load_model

    model = load_model(args.model)
    if model.precomputed and args.gram_test is None:
        refuse(args, f"{args.model} was fitted on a precomputed Gram: predict with --gram-test KT.npy "
                     f"(k(X_test, X_train), m x {model.metadata['n_train']})")
    if not model.precomputed and args.gram_test is not None:
        refuse(args, f"{args.model} has a {model.metadata['kernel']} kernel and its training points: give the "
                     f"test points with --x-test or --data, not a test Gram")
    X, y_test = _inputs(args, model)
    scores = model.scores(X)[:, model._target(args.target)]
    if model.task == "classification":
        idx = np.argmax(scores, axis=1)
        predictions = idx if model.classes is None else model.classes[idx]
    else:
        predictions = scores[:, 0] if scores.shape[1] == 1 else scores
    payload = {"model": str(args.model), "task": model.task, "n": len(predictions),
               "target": args.target or next(iter(model.targets))}
    if y_test is not None:
        payload.update(_metrics(model, predictions, y_test))
    values = scores if args.scores else predictions
    payload["scores" if args.scores else "predictions"] = values
    if args.out is None:
        print_json(payload)
    else:
        write_predictions(args.out, np.asarray(values), payload, args.overwrite, labels=y_test)
        eprint(f"wrote {args.out}")
    return EXIT_OK


def _inputs(args, model):
    """The test points (an array or a memory map) and the test targets, if given."""
    import numpy as np

    from ..data.arrays import open_array
    from ..errors import InputError

    y_test = None
    if args.data is not None:
        X = open_array(f"{args.data}:x_test", what="--data")
        if args.y_test is None:
            with np.load(args.data, allow_pickle=False) as z:
                has_labels = "y_test" in z.files
            y_test = np.asarray(open_array(f"{args.data}:y_test", what="--data")) if has_labels else None
    else:
        X = open_array(args.x_test or args.gram_test, what="--x-test" if args.x_test else "--gram-test")
    if args.y_test is not None:
        y_test = np.asarray(open_array(args.y_test, what="--y-test"))
    if y_test is not None and model.task == "classification" and y_test.ndim != 1 and \
            not (y_test.ndim == 2 and y_test.shape[1] == 1):
        raise InputError(f"--y-test: expected one class label per test point (shape (m,) or (m, 1)), got shape "
                         f"{tuple(y_test.shape)}. Fix: pass the label column, not one-hot scores "
                         f"(np.argmax(Y, axis=1)).")
    return X, y_test


def _metrics(model, predictions, y_test) -> dict:
    """Test error (classification) or RMSE and R^2 (regression), also said on stderr."""
    import numpy as np

    from ..errors import InputError

    if len(y_test) != len(predictions):
        raise InputError(f"--y-test has {len(y_test)} rows but there are {len(predictions)} test points.")
    if model.task == "classification":
        error = float(np.mean(predictions != y_test.reshape(-1)))
        eprint(f"[kernelfit] test error {100 * error:.2f}% on {len(predictions)} points")
        return {"test_error": error}
    from ..results import regression_metrics

    m = regression_metrics(y_test, predictions)
    eprint(f"[kernelfit] test RMSE {m['rmse']:.4g}, R^2 {m['r2']} on {len(predictions)} points")
    return {"test_rmse": m["rmse"], "test_r2": m["r2"]}
