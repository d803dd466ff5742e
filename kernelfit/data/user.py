"""A user's own arrays as a ``Dataset``: one .npz, or separate x / y files (.npy, HDF5, zarr).

``load_arrays(data="d.npz")``                                 members x_train, y_train [, x_test, y_test]
``load_arrays(x_train="X.npy", y_train="y.npy", ...)``         each a spec ``kernelfit.data.arrays`` opens:
                                                              ``X.npy`` (memory-mapped), ``F.npz:member``,
                                                              ``F.h5:/dset``, ``S.zarr:/arr``

Features are used as stored (``Dataset.scale = 1``): no division by 255. Class labels must be
finite integers >= 0; the classes are the distinct label values (``np.unique``), named ``str(value)``,
and the dataset's labels index them (labels 0..K-1 are kept as they are). ``task="regression"``
keeps float targets (never counted as classes).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kernelfit.catalog import TASKS
from kernelfit.errors import DataError, InputError

from .arrays import open_array, parse_spec
from .dataset import Dataset

__all__ = ["load_arrays", "peek_arrays", "peek_outputs"]

_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def _npz_specs(data) -> dict[str, str | None]:
    path = Path(data)
    if not path.exists():
        raise DataError(f"--data {path} does not exist. Fix: check the path.")
    try:
        with np.load(path, allow_pickle=False) as z:
            if not isinstance(z, np.lib.npyio.NpzFile):
                raise DataError(f"--data {path}: expected an .npz archive with arrays {list(_NPZ_KEYS)}, "
                                f"found a single .npy array. Fix: pass it as --x-train {path} (with --y-train).")
            keys = set(z.files)
    except ValueError as e:   # not a zip / npy: say what the file starts with
        with open(path, "rb") as fh:
            head = fh.read(8)
        raise DataError(f"--data {path}: not an .npz archive (first bytes {head!r}; an .npz starts with "
                        f"b'PK\\x03\\x04'): {e}. Fix: save it with numpy.savez(path, x_train=..., "
                        f"y_train=..., x_test=..., y_test=...).") from None
    missing = [k for k in ("x_train", "y_train") if k not in keys]
    if missing:
        raise DataError(f"--data {path}: missing arrays {missing}; expected x_train, y_train and optionally "
                        f"x_test, y_test, found {sorted(keys)}. Fix: numpy.savez(path, x_train=X, y_train=y).")
    if ("x_test" in keys) != ("y_test" in keys):
        have = "x_test" if "x_test" in keys else "y_test"
        raise DataError(f"--data {path}: has {have} but not its partner; found {sorted(keys)}. A test split "
                        f"needs both x_test and y_test.")
    return {k: (f"{path}:{k}" if k in keys else None) for k in _NPZ_KEYS}


def _specs(data, x_train, y_train, x_test, y_test) -> dict[str, str | None]:
    if data is not None:
        if any(v is not None for v in (x_train, y_train, x_test, y_test)):
            raise InputError("--data FILE.npz and --x-train/--y-train/--x-test/--y-test both given; use one: "
                             "an .npz holding x_train, y_train (x_test, y_test), or the separate files.")
        return _npz_specs(data)
    if x_train is None or y_train is None:
        got = "--x-train only" if x_train is not None else "--y-train only" if y_train is not None else "neither"
        raise InputError(f"user arrays need both --x-train and --y-train; got {got}.")
    if (x_test is None) != (y_test is None):
        raise InputError(f"a test split needs both --x-test and --y-test; got only "
                         f"{'--x-test' if x_test is not None else '--y-test'}.")
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _open_all(specs) -> dict:
    arrays = {}
    for key, spec in specs.items():
        if spec is None:
            continue
        a = open_array(spec, what=_flag(key))
        if len(a.shape) == 0 or a.shape[0] == 0:
            raise InputError(f"{_flag(key)} {spec}: {'a scalar' if len(a.shape) == 0 else '0 rows'} "
                             f"(shape {tuple(a.shape)}); a split needs at least one example.")
        arrays[key] = a
    for split in ("train", "test"):
        x, y = arrays.get("x_" + split), arrays.get("y_" + split)
        if x is not None and x.shape[0] != y.shape[0]:
            raise InputError(f"x_{split} has {x.shape[0]} rows ({specs['x_' + split]}) but y_{split} has "
                             f"{y.shape[0]} ({specs['y_' + split]}); they must match one to one.")
    return arrays


def peek_arrays(data=None, x_train=None, y_train=None, x_test=None, y_test=None) -> dict:
    """Shapes and dtypes of a user's arrays without reading them (for planning):
    ``{"x_train": (shape, dtype), ...}``; also validates names, lengths and row counts."""
    arrays = _open_all(_specs(data, x_train, y_train, x_test, y_test))
    return {k: (tuple(int(s) for s in a.shape), np.dtype(a.dtype)) for k, a in arrays.items()}


def _materialize(a) -> np.ndarray:
    # np.memmap / in-memory arrays pass through uncopied; h5py / zarr datasets are read here
    return a if isinstance(a, np.ndarray) else np.asarray(a[...])


def _labels(y, what: str) -> np.ndarray:
    """Validated class labels (1-D, integer-valued, finite, >= 0), in their own dtype."""
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise InputError(f"{what}: class labels must be 1-D (N,), got shape {y.shape}. For multi-output "
                         f"real targets use task='regression' (--task regression).")
    if np.issubdtype(y.dtype, np.floating):
        bad = ~np.isfinite(y)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise InputError(f"{what}: {int(bad.sum())} class label(s) are NaN or inf (first at row {i}: {y[i].item()}); "
                             f"class labels must be finite integers. Fix: drop or relabel those rows.")
        frac = y != np.round(y)
        if frac.any():
            i = int(np.flatnonzero(frac)[0])
            raise InputError(f"{what}: class labels must be integers, got non-integer floats (dtype {y.dtype}; "
                             f"first at row {i}: {y[i].item()!r}). For real targets use task='regression' "
                             f"(--task regression).")
    elif y.dtype == bool or not np.issubdtype(y.dtype, np.integer):
        raise InputError(f"{what}: class labels must be integers >= 0, got dtype {y.dtype}. Map class names "
                         f"to 0..K-1 first, e.g. numpy.unique(y, return_inverse=True)[1].")
    if len(y) and y.min() < 0:
        raise InputError(f"{what}: class labels must be >= 0, found {y.min().item()!r} (row {int(np.argmin(y))}).")
    return y


def _class_name(v) -> str:
    return str(int(v))


def _classes(y_train: np.ndarray, y_test: np.ndarray):
    """(classes, y_train, y_test): the distinct label values (``np.unique``, never 0..max label) and the
    labels as indices into them. Labels already 0..K-1 stay as they are; a label of 10**9 among a few
    others makes a few classes, not 10**9."""
    values, inverse = np.unique(np.concatenate([y_train, y_test]), return_inverse=True)
    classes = tuple(_class_name(v) for v in values)
    if len(values) and values[0] == 0 and values[-1] == len(values) - 1:   # already 0..K-1
        return classes, y_train.astype(np.int64), y_test.astype(np.int64)
    inverse = inverse.reshape(-1).astype(np.int64)
    return classes, inverse[:len(y_train)], inverse[len(y_train):]


def peek_outputs(data=None, x_train=None, y_train=None, x_test=None, y_test=None, *,
                 task: str = "classification") -> int:
    """Columns of the right-hand side a user's arrays make, for planning: the number of distinct class
    labels (train and test, labels validated and read) or, for ``task="regression"``, the number of
    target columns (from the header; targets are never counted as classes)."""
    if task not in TASKS:
        raise InputError(f"task must be one of {TASKS}, got {task!r}.")
    arrays = _open_all(_specs(data, x_train, y_train, x_test, y_test))
    y = arrays["y_train"]
    if task == "regression":
        return 1 if len(y.shape) == 1 else int(np.prod(y.shape[1:], dtype=np.int64))
    labels = [_labels(_materialize(arrays[k]), k) for k in ("y_train", "y_test") if k in arrays]
    return len(np.unique(np.concatenate(labels)))


def load_arrays(data=None, x_train=None, y_train=None, x_test=None, y_test=None, *,
                task: str = "classification", name: str | None = None) -> Dataset:
    """Read a user's arrays (see the module docstring) into a ``Dataset``.

    ``.npy`` features stay memory-mapped (not copied) until features are built; HDF5 / zarr / npz
    members are read into memory. Without a test split the dataset's test split is empty.
    Raises ``DataError`` / ``InputError`` for a missing file, an unrecognised format (naming its
    first bytes or its keys), x and y of different lengths, or 0 rows.
    """
    if task not in TASKS:
        raise InputError(f"task must be one of {TASKS}, got {task!r}.")
    specs = _specs(data, x_train, y_train, x_test, y_test)
    arrays = {k: _materialize(a) for k, a in _open_all(specs).items()}
    x_tr, y_tr = arrays["x_train"], arrays["y_train"]
    if "x_test" in arrays:
        x_te, y_te = arrays["x_test"], arrays["y_test"]
    else:
        x_te = np.empty((0, *x_tr.shape[1:]), dtype=x_tr.dtype)
        y_te = np.empty((0, *y_tr.shape[1:]), dtype=y_tr.dtype)
    if task == "classification":
        y_tr = _labels(y_tr, "y_train")
        y_te = _labels(y_te, "y_test") if len(y_te) else np.empty(0, y_tr.dtype)
        classes, y_tr, y_te = _classes(y_tr, y_te)
    else:
        classes = None
    files = sorted({str(parse_spec(s).path) for s in specs.values() if s is not None})
    label = name or (str(data) if data is not None else str(parse_spec(specs["x_train"]).path))
    return Dataset(label, x_tr, y_tr, x_te, y_te, classes, source=label, files=tuple(files), scale=1.0)
