"""Experiment records: one interpolant for several target sets (true labels, random labels, ...),
its train / test metrics and the JSON-able record (see README, "Result record").

The solving itself is ``kernelfit.solve`` (``fit_interpolant``, ``fit_precomputed``,
``fit_distributed``); this module turns targets into the solve's Y and its answer into a record.
"""

from __future__ import annotations

import time

import numpy as np

from .catalog import TASKS
from .errors import InputError
from .interpolant import Interpolant
from .kernels import check_distance_scale
from .results import peak_rss_bytes, residual_stats
from .solve import (
    SolveOptions,
    check_distinct,
    check_gram_mode,
    fit_distributed,
    fit_interpolant,
    fit_precomputed,
    one_hot,
)
from .validate import bandwidth_rule, check_features, check_finite_targets, check_targets

_DEFAULT_OPTIONS = SolveOptions()
_GRAM_OPTIONS = SolveOptions(mode="float64")   # a precomputed Gram has no kernel function for "mixed"

# --------------------------------------------------------------------------------------------
# targets and result records
# --------------------------------------------------------------------------------------------

def infer_num_classes(*labels) -> int:
    """Number of one-hot columns for integer class labels 0..k-1, from (labels, what) pairs: max + 1.

    Labels must be finite, integral and >= 0. Labels whose largest value is far above their number
    of distinct values (e.g. 3 values up to 1e9) are not class indices: a one-hot matrix of max + 1
    columns would be absurd, so this refuses and says how to remap them (or to use regression)."""
    values, top = [], -1
    for y, what in labels:
        if y is None:
            continue
        y = np.asarray(y)
        if y.size == 0:
            continue
        if not np.issubdtype(y.dtype, np.number) or np.issubdtype(y.dtype, np.complexfloating):
            raise InputError(f"{what}: class labels must be integers 0..k-1; got dtype {y.dtype}.")
        check_finite_targets(y, what)
        if y.ndim != 1 or not np.all(y == np.round(y)) or y.min() < 0:
            raise InputError(f"{what}: classification needs 1-D integer class labels 0..k-1; got shape {y.shape}"
                             f"{'' if y.ndim != 1 else f' with values in [{y.min():g}, {y.max():g}]'}. For real-valued "
                             f"targets use --task regression (task='regression').")
        values.append(np.unique(y))
        top = max(top, int(y.max()))
    if top < 0:
        return 1
    distinct = len(np.unique(np.concatenate(values)))
    k = top + 1
    if k > 4 * distinct + 100:
        raise InputError(f"the class labels hold {distinct} distinct values but the largest is {top}: as class indices "
                         f"0..{top} they would need {k} one-hot columns. Remap them to 0..{distinct - 1} "
                         f"(np.unique(y, return_inverse=True)), or, for real-valued targets, use --task regression "
                         f"(task='regression').")
    return k


def check_labels(y, num_classes, name="y") -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1:
        raise InputError(f"expected {name} as 1-D integer labels; got shape {y.shape}.")
    if np.issubdtype(y.dtype, np.number):
        check_finite_targets(y, name)
    if not (np.issubdtype(y.dtype, np.integer) or (np.issubdtype(y.dtype, np.floating) and np.all(y == np.round(y)))):
        raise InputError(f"{name} must hold integer class labels; got dtype {y.dtype}.")
    y = y.astype(np.int64)
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise InputError(f"{name} has labels in [{y.min()}, {y.max()}], outside the class range [0, {num_classes - 1}].")
    return y



def classification_errors(scores, y) -> float:
    return float(np.mean(np.argmax(scores, axis=1) != y)) if len(y) else float("nan")


def _targets(label_sets: dict, n: int, task: str, num_classes):
    """Stack the target sets into Y (one-hot for classification) and say which columns are whose."""
    if task not in TASKS:
        raise InputError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}.")
    if not label_sets:
        raise InputError("label_sets is empty; pass at least {'true': y_train}.")
    blocks, sets = [], {}
    for name, y in label_sets.items():
        if task == "classification":
            y = check_labels(y, num_classes, f"labels[{name!r}]")
            if len(y) != n:
                raise InputError(f"X_train has {n} rows but labels[{name!r}] has {len(y)}.")
            blocks.append(one_hot(y, num_classes))
        else:
            y = np.asarray(y)
            if y.ndim == 2 and y.shape[0] != n or y.ndim == 1 and len(y) != n:
                raise InputError(f"the training set has {n} rows but targets[{name!r}] has {len(y)}.")
            if not np.issubdtype(y.dtype, np.number) or np.issubdtype(y.dtype, np.complexfloating):
                raise InputError(f"regression targets[{name!r}] must be real numbers; got dtype {y.dtype}.")
            blocks.append(check_targets(y, n))
        sets[name] = y
    widths = np.cumsum([0] + [b.shape[1] for b in blocks])
    columns = {name: slice(int(widths[i]), int(widths[i + 1])) for i, name in enumerate(sets)}
    return np.hstack(blocks), sets, columns


def _test_targets(y_test, m: int | None, task: str, num_classes, k: int):
    if m is None:
        return None
    if y_test is None:
        raise InputError(f"{m} test points were given without test targets y_test.")
    if task == "classification":
        y_test = check_labels(y_test, num_classes, "y_test")
    else:
        y_test = np.asarray(y_test, dtype=np.float64)
        if y_test.ndim not in (1, 2) or (y_test.ndim == 2 and y_test.shape[1] != k) or (y_test.ndim == 1 and k != 1):
            raise InputError(f"y_test has shape {y_test.shape}; expected ({m},) or ({m}, {k}) like the training "
                             f"targets.")
        check_finite_targets(y_test, "y_test")
    if len(y_test) != m:
        raise InputError(f"the test set has {m} rows but y_test has {len(y_test)}.")
    return y_test


def _results(model: Interpolant, Y, sets, columns, test_scores, y_test, task, jitter) -> dict:
    from .results import regression_metrics

    results = {}
    per_output = model.rkhs_norm_per_output
    for name, y in sets.items():
        cols = columns[name]
        a = model.alpha[:, cols]
        R = Y[:, cols] - model.train_scores[:, cols] - jitter * a
        entry = {}
        if task == "classification":
            entry["train_error"] = classification_errors(model.train_scores[:, cols], y)
            entry["test_error"] = classification_errors(test_scores[:, cols], y_test) \
                if test_scores is not None else None
        else:
            train = regression_metrics(Y[:, cols], model.train_scores[:, cols])
            test = regression_metrics(y_test, test_scores[:, cols]) if test_scores is not None else None
            entry.update(train_rmse=train["rmse"], train_r2=train["r2"],
                         test_rmse=None if test is None else test["rmse"], test_r2=None if test is None else test["r2"],
                         test_rmse_per_output=None if test is None else test["rmse_per_output"],
                         test_r2_per_output=None if test is None else test["r2_per_output"])
        entry.update({
            "rkhs_norm": float(np.sqrt(np.sum(per_output[cols] ** 2))),
            ("rkhs_norm_per_class" if task == "classification" else "rkhs_norm_per_output"):
                [float(v) for v in per_output[cols]],
            "alpha_l2": float(np.linalg.norm(a)),
            **residual_stats(R, Y[:, cols]),
        })
        results[name] = entry
    return results


def _provenance():
    try:   # before the solve: the record names the code that ran, even if HEAD moves meanwhile
        from .provenance import provenance

        return provenance()
    except ImportError:  # results.py is optional for library use
        return None


def _record(model, Y, sets, columns, test_scores, y_test, task, num_classes, options_record, n_test, extra, prov):
    record = {
        "kind": "kernelfit.solve",
        "task": task,
        "options": options_record,
        "n_train": int(Y.shape[0]), "n_test": int(n_test),
        "num_classes": int(num_classes) if task == "classification" else None,
        "num_outputs": int(Y.shape[1] // len(sets)),
        "target_columns": {name: [c.start, c.stop] for name, c in columns.items()},
        "results": _results(model, Y, sets, columns, test_scores, y_test, task, float(model.stats.get("jitter", 0.0))),
        "stats": model.stats,
    }
    if extra:
        record.update(extra)
    if prov is not None:
        record["provenance"] = prov
    return record


def run_interpolation(X_train, label_sets: dict, X_test, y_test, num_classes: int | None,
                      options: SolveOptions = _DEFAULT_OPTIONS, extra: dict | None = None, *,
                      task: str = "classification", client=None, return_model: bool = False):
    """Fit one interpolant for several target sets at once (one Gram, one factorization) and report.

    label_sets: name -> training targets, e.g. {"true": y, "random-labels": y_random}. For
    ``task="classification"`` they are integer labels, one-hot encoded, and the record reports error
    rates; for ``task="regression"`` float targets (n,) or (n, k), and the record reports RMSE and
    R^2 (``num_classes`` is ignored). Test metrics are measured against ``y_test`` for every set.
    Duplicate training rows are refused first when ``options.jitter`` is 0. With ``client`` (a dask
    Client) the Gram and the factorization run on its workers (``fit_distributed``).
    Returns a JSON-able record (see README, "Result record"), or (record, model) with ``return_model``.
    """
    X_train = check_features(X_train, "X_train")
    X_test = check_features(X_test, "X_test") if X_test is not None and len(X_test) else None
    if X_test is not None and X_test.shape[1] != X_train.shape[1]:
        raise InputError(f"X_test has {X_test.shape[1]} features but X_train has {X_train.shape[1]}.")
    Y, sets, columns = _targets(label_sets, X_train.shape[0], task, num_classes)
    y_test = _test_targets(y_test, None if X_test is None else len(X_test), task, num_classes,
                           Y.shape[1] // len(sets))
    options.validated()
    check_distinct(X_train, options.jitter, "X_train")
    if X_test is not None:   # float32 prediction tiles centre the test points on the training mean
        rule = bandwidth_rule(options.bandwidth)
        check_distance_scale(X_test, options.kernel, None if rule.is_median else rule.value,
                             "X_test", center=np.asarray(X_train).mean(axis=0, dtype=np.float64))
    prov = _provenance()

    if client is None:
        model = fit_interpolant(X_train, Y, options, n_test=0 if X_test is None else len(X_test))
    else:
        model = fit_distributed(X_train, Y, options, client)
    t = time.perf_counter()
    if X_test is None:
        test_scores = None
    elif task == "classification" and isinstance(model, Interpolant):
        # only argmax classes are reported: float32 tiles, near-ties re-checked in float64
        test_scores = model.predict(X_test, argmax_groups=num_classes)
    else:
        test_scores = model.predict(X_test)
    model.stats["timings_s"]["predict"] = time.perf_counter() - t
    model.stats["peak_rss_bytes"] = peak_rss_bytes()
    options_record = options.to_record()
    record = _record(model, Y, sets, columns, test_scores, y_test, task, num_classes, options_record,
                     0 if X_test is None else len(X_test), extra, prov)
    return (record, model) if return_model else record


def run_gram_interpolation(G, label_sets: dict, G_test, y_test, num_classes: int | None,
                           options: SolveOptions = _GRAM_OPTIONS, extra: dict | None = None, *,
                           task: str = "classification", client=None, return_model: bool = False):
    """``run_interpolation`` for a precomputed Gram: G (n x n) and optional G_test (m x n), as paths or arrays.

    Same targets, record and metrics; the record's options say ``kernel: "precomputed"`` and its
    ``stats.gram`` names the file (sha256), shape, dtype and the checks that ran.
    """
    from .data.gram import check_test_gram, open_gram

    check_gram_mode(options.mode)
    G_open = open_gram(G, what="--gram")
    if len(G_open.shape) != 2:
        raise InputError(f"--gram: expected a square n x n training Gram matrix; got shape {tuple(G_open.shape)}.")
    n = G_open.shape[0]
    Y, sets, columns = _targets(label_sets, n, task, num_classes)
    Kt = None
    if G_test is not None:
        Kt = open_gram(G_test, what="--gram-test")
        check_test_gram(Kt, n)
    y_test = _test_targets(y_test, None if Kt is None else Kt.shape[0], task, num_classes, Y.shape[1] // len(sets))
    prov = _provenance()

    model = fit_precomputed(G, Y, options, n_test=0 if Kt is None else Kt.shape[0], client=client)
    t = time.perf_counter()
    test_scores = model.predict(Kt) if Kt is not None else None
    model.stats["timings_s"]["predict"] = time.perf_counter() - t
    if G_test is not None:
        from .data.gram import gram_source_info

        model.stats["gram_test"] = gram_source_info(G_test, Kt)
    model.stats["peak_rss_bytes"] = peak_rss_bytes()
    options_record = options.to_record()
    options_record.update(kernel="precomputed", bandwidth=None)
    record = _record(model, Y, sets, columns, test_scores, y_test, task, num_classes, options_record,
                     0 if Kt is None else Kt.shape[0], extra, prov)
    return (record, model) if return_model else record
