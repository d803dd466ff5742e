"""Model files: a fitted interpolant saved in a safe format, loaded back, and used to predict in blocks.

Format (``FORMAT_VERSION`` 1): one safetensors file (no pickle: a header of JSON and raw arrays).

tensors   ``alpha`` (n, k) float64; ``y`` (n, k) the targets solved for; ``train_scores`` (n, k) = K alpha;
          ``x_train`` (n, d) float64, the training points the kernel sees (absent for a precomputed Gram,
          whose predictions need a test Gram K(X_test, X_train) instead).
metadata  ``kernelfit`` = JSON: format, format_version, kernel, bandwidth, mode, jitter, task, targets
          (name and columns of each target set), num_classes / classes / class_names, preprocessing (how raw inputs
          become ``x_train``-like rows; rebuilt by name from ``PREPROCESSORS``), data (what was loaded,
          with checksums), provenance; ``sha256`` = digest of that JSON and of every tensor's bytes.

``load_model`` refuses a file that is not a kernelfit model, has another format version, fails its
checksum (corrupt or edited), holds fields that cannot describe a model (``_check_fields``: a
non-finite or non-positive bandwidth, non-finite alpha, a class list that does not match alpha's
columns, nested or mistyped JSON; a checksum recomputed after tampering does not make them valid),
or whose preprocessing this version cannot rebuild, each with a ``ModelFileError`` saying which.
``SavedModel.predict`` streams the inputs in row blocks (a memory map is never read whole) and gives
exactly the scores ``Interpolant.predict`` gives in the fitting process.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .catalog import KERNELS, MODES, TASKS
from .errors import InputError, ModelFileError
from .interpolant import Interpolant, PrecomputedInterpolant

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "PREDICT_BLOCK_ROWS",
    "PREPROCESSORS",
    "SavedModel",
    "load_model",
    "register_preprocessor",
    "save_model",
]

FORMAT = "kernelfit.model"
FORMAT_VERSION = 1
# Test rows per prediction block. A multiple of the row tile of ``Interpolant.predict`` (1024), so
# every kernel tile has the shape it has when all test points are predicted at once: equal scores.
PREDICT_BLOCK_ROWS = 8192
PREDICT_TILE_ROWS = 1024


# --------------------------------------------------------------------------------------------
# preprocessing: raw input rows -> the rows the kernel sees, rebuilt from JSON by name
# --------------------------------------------------------------------------------------------

def _identity(config: dict) -> Callable:
    dtype = np.dtype(config.get("dtype", "float64"))

    def apply(x):
        x = np.asarray(x)
        return np.asarray(x.reshape(len(x), -1), dtype=dtype)

    return apply


def _pixels(config: dict) -> Callable:
    from .data import to_features

    dtype = np.dtype(config.get("dtype", "float32"))
    scale = float(config.get("scale", 255.0))   # 1 for a user's arrays, used as stored
    return lambda x: to_features(np.asarray(x), dtype=dtype, scale=scale)


# name -> (config -> function raw block -> feature rows). Feature maps that need more state (filters,
# ZCA) register a builder that recreates them from their config.
PREPROCESSORS: dict[str, Callable[[dict], Callable]] = {
    "none": _identity,      # rows used as given (flattened, cast to ``dtype``)
    "pixels": _pixels,      # kernelfit.data.to_features: x / scale (images / 255), flattened, in ``dtype``
}


def register_preprocessor(kind: str, builder: Callable[[dict], Callable]) -> None:
    """Make ``{"kind": kind, ...}`` preprocessing configs loadable: ``builder(config)`` returns the map."""
    PREPROCESSORS[str(kind)] = builder


def _build_preprocessor(config: dict, path) -> Callable:
    kind = (config or {}).get("kind", "none")
    builder = PREPROCESSORS.get(kind)
    if builder is None:
        raise ModelFileError(f"{path}: the model's preprocessing {kind!r} cannot be rebuilt by this kernelfit "
                             f"(known: {', '.join(sorted(PREPROCESSORS))}). Fix: load it with the kernelfit "
                             f"version that wrote it (see its provenance), or register the feature map with "
                             f"kernelfit.model.register_preprocessor.")
    try:
        return builder(config)
    except Exception as exc:   # a config the builder refuses: say which, keep the cause
        raise ModelFileError(f"{path}: the model's preprocessing {config!r} cannot be rebuilt ({exc}).") from exc


# --------------------------------------------------------------------------------------------
# saving
# --------------------------------------------------------------------------------------------

def _digest(meta_json: str, tensors: dict) -> str:
    h = hashlib.sha256(meta_json.encode())
    for name in sorted(tensors):
        a = tensors[name]
        h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
        h.update(np.ascontiguousarray(a).data)
    return h.hexdigest()


def _require_safetensors():
    try:
        import safetensors.numpy as stn
    except ImportError:
        raise InputError("model files need the package 'safetensors' (pip install safetensors).") from None
    return stn


def save_model(path, model: Interpolant, *, task: str = "classification", targets: dict | None = None,
               num_classes: int | None = None, classes=None, class_names=None, preprocessing: dict | None = None,
               data: dict | None = None, provenance: dict | None = None, overwrite: bool = False) -> Path:
    """Write ``model`` (from ``fit_interpolant``, ``fit_precomputed`` or ``run_*interpolation``) to ``path``.

    targets: name -> slice (or (start, stop)) of the alpha columns of each target set; default one set
    "true" over all columns. classes: the label predicted for each class column (default
    0..num_classes-1); class_names: optional human-readable names (e.g. "airplane"), kept for the record.
    preprocessing: how raw inputs become training-point rows, e.g. {"kind": "pixels", "dtype": "float32"}.
    The file is written atomically; an existing file is refused unless ``overwrite``.
    """
    from .results import atomic_file, to_jsonable

    stn = _require_safetensors()
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"refusing to overwrite existing model file {str(path)!r}; pass --overwrite "
                              f"(overwrite=True) or choose a new path.")
    alpha = np.ascontiguousarray(model.alpha, dtype=np.float64)
    k = alpha.shape[1]
    targets = {"true": (0, k)} if targets is None else targets
    columns = {name: [int(c.start), int(c.stop)] if isinstance(c, slice) else [int(c[0]), int(c[1])]
               for name, c in targets.items()}
    if task == "classification":
        width = columns[next(iter(columns))][1] - columns[next(iter(columns))][0]
        num_classes = width if num_classes is None else int(num_classes)
        classes = list(range(num_classes)) if classes is None else [to_jsonable(c) for c in classes]
    tensors = {"alpha": alpha, "y": np.ascontiguousarray(model.Y, dtype=np.float64),
               "train_scores": np.ascontiguousarray(model.train_scores, dtype=np.float64)}
    precomputed = model.X_fit is None
    if not precomputed:
        tensors["x_train"] = np.ascontiguousarray(model.X_fit, dtype=np.float64)
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "kernel": "precomputed" if precomputed else model.kernel,
        "bandwidth": None if precomputed else float(model.bandwidth),
        "mode": model.mode, "jitter": float(model.stats.get("jitter", 0.0)),
        "n_train": int(alpha.shape[0]), "n_features": None if precomputed else int(model.X_fit.shape[1]),
        "task": task, "targets": columns,
        "num_classes": num_classes if task == "classification" else None,
        "classes": classes if task == "classification" else None,
        "class_names": None if class_names is None else [str(c) for c in class_names],
        "preprocessing": None if precomputed else (preprocessing or {"kind": "none", "dtype": "float64"}),
        "data": data, "provenance": provenance,
        "fit": {key: model.stats.get(key) for key in ("residual_max_abs", "residual_relative", "factor_dtype",
                                                       "block_size", "bandwidth_rule")},
    }
    meta_json = json.dumps(to_jsonable(meta), sort_keys=True, allow_nan=False)
    header = {"kernelfit": meta_json, "sha256": _digest(meta_json, tensors)}
    blob = stn.save(tensors, metadata=header)
    with atomic_file(path, "wb") as fh:
        fh.write(blob)
    return path.resolve()


# --------------------------------------------------------------------------------------------
# loading and prediction
# --------------------------------------------------------------------------------------------

class SavedModel:
    """A model file loaded: the ``interpolant``, its ``metadata`` and a block-streaming ``predict``."""

    def __init__(self, interpolant: Interpolant, metadata: dict, path):
        self.interpolant, self.metadata, self.path = interpolant, metadata, Path(path)
        self.task = metadata["task"]
        self.targets = {name: slice(*c) for name, c in metadata["targets"].items()}
        self.precomputed = metadata["kernel"] == "precomputed"
        self.preprocess = None if self.precomputed else _build_preprocessor(metadata["preprocessing"], path)

    @property
    def classes(self) -> np.ndarray | None:
        c = self.metadata.get("classes")
        return None if c is None else np.asarray(c)

    def _target(self, target: str | None) -> slice:
        name = next(iter(self.targets)) if target is None else target
        if name not in self.targets:
            raise InputError(f"the model has no target set {name!r}; it holds {', '.join(self.targets)}.")
        return self.targets[name]

    def scores(self, X, block_rows: int = PREDICT_BLOCK_ROWS) -> np.ndarray:
        """Scores of every alpha column for raw inputs X (or a test Gram for a precomputed model),
        computed block by block; X may be a memory map, an HDF5 / zarr dataset or an array."""
        if block_rows % PREDICT_TILE_ROWS:
            raise InputError(f"block_rows must be a multiple of {PREDICT_TILE_ROWS}; got {block_rows}.")
        from .data.rows import release_pages

        m = X.shape[0] if hasattr(X, "shape") else len(X)
        if m == 0:
            raise InputError("no points to predict: the input has 0 rows.")
        if self.precomputed:
            return self.interpolant.predict(X)   # streams the test Gram in row blocks itself
        out = np.empty((m, self.interpolant.alpha.shape[1]), dtype=np.float64)
        for a in range(0, m, block_rows):
            e = min(a + block_rows, m)
            rows = self.preprocess(X[a:e])
            out[a:e] = self.interpolant.predict(rows, rows=PREDICT_TILE_ROWS)
            release_pages(X)
        return out

    def predict(self, X, target: str | None = None, block_rows: int = PREDICT_BLOCK_ROWS) -> np.ndarray:
        """Predicted class labels (classification) or values (regression; (m,) for one output)."""
        cols = self._target(target)
        s = self.scores(X, block_rows)[:, cols]
        if self.task == "classification":
            classes = self.classes
            idx = np.argmax(s, axis=1)
            return idx if classes is None else classes[idx]
        return s[:, 0] if s.shape[1] == 1 else s


_SCALAR = (str, int, float, bool, type(None))


def _short(v) -> str:
    """A JSON value for a message, cut short (a hostile file may nest it deeply or make it huge)."""
    try:
        text = json.dumps(v)
    except (TypeError, ValueError, RecursionError):
        text = type(v).__name__
    return text if len(text) <= 80 else text[:77] + "..."


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_fields(meta, tensors: dict, path) -> None:
    """Everything ``SavedModel`` and ``Interpolant`` rely on, checked on the values themselves (the
    checksum only says the file is as written, not that what was written is a model)."""
    def bad(what: str) -> ModelFileError:
        return ModelFileError(f"{path}: invalid model file: {what}. The file was not written by kernelfit's "
                              f"save_model or was edited; nothing was loaded. Fix: write it again with --save-model.")

    if not isinstance(meta, dict):
        raise bad(f"the metadata is a JSON {type(meta).__name__}, expected an object")
    for key, kinds in (("kernel", str), ("mode", str), ("task", str), ("targets", dict), ("n_train", int)):
        if not isinstance(meta.get(key), kinds) or isinstance(meta.get(key), bool):
            raise bad(f"field {key!r} is {_short(meta.get(key))}, expected a {kinds.__name__}")
    for key in ("preprocessing", "fit"):
        if meta.get(key) is not None and not isinstance(meta[key], dict):
            raise bad(f"field {key!r} is a {type(meta[key]).__name__}, expected an object or null")
    for key in ("fit", "preprocessing"):
        nested = [k for k, v in (meta.get(key) or {}).items() if not isinstance(v, _SCALAR)]
        if nested:
            raise bad(f"field {key!r} holds nested structures under {nested}; only numbers, strings and null belong there")
    kernel, precomputed = meta["kernel"], meta["kernel"] == "precomputed"
    if kernel not in (*KERNELS, "precomputed"):
        raise bad(f"kernel {kernel!r} is not one of {', '.join((*KERNELS, 'precomputed'))}")
    if meta["mode"] not in MODES:
        raise bad(f"mode {meta['mode']!r} is not one of {', '.join(MODES)}")
    if meta["task"] not in TASKS:
        raise bad(f"task {meta['task']!r} is not one of {', '.join(TASKS)}")
    jitter = meta.get("jitter", 0.0)
    if not _is_number(jitter) or not np.isfinite(jitter) or jitter < 0:
        raise bad(f"jitter is {jitter!r}, expected a finite number >= 0")
    if not precomputed:
        bw = meta.get("bandwidth")
        if not _is_number(bw) or not np.isfinite(bw) or bw <= 0:
            raise bad(f"bandwidth is {bw!r}, expected a finite number > 0")
    # tensors: float, 2-D, finite, shapes agreeing with each other and with the metadata
    for name in ("alpha", "y", "train_scores", *(() if precomputed else ("x_train",))):
        t = tensors.get(name)
        if t is None:
            what = f"tensor {name!r} is missing" + (f" for a {kernel!r} kernel model" if name == "x_train" else "")
            raise ModelFileError(f"{path}: {what}; the file is not a complete kernelfit model.")
        if t.dtype.kind != "f" or t.ndim != 2:
            raise bad(f"tensor {name!r} is {t.dtype} of shape {t.shape}, expected a 2-D float array")
        if not np.all(np.isfinite(t)):
            r, c = (int(v) for v in np.argwhere(~np.isfinite(t))[0])
            raise bad(f"tensor {name!r} holds NaN or inf (first at [{r}, {c}] = {t[r, c]})")
    n, k = tensors["alpha"].shape
    for name in ("y", "train_scores"):
        if tensors[name].shape != (n, k):
            raise bad(f"tensor {name!r} has shape {tensors[name].shape}, alpha {(n, k)}; they must agree")
    if meta["n_train"] != n:
        raise bad(f"n_train is {meta['n_train']} but alpha has {n} rows")
    if not precomputed:
        x = tensors["x_train"]
        if x.shape[0] != n or (meta.get("n_features") is not None and meta["n_features"] != x.shape[1]):
            raise bad(f"x_train has shape {x.shape}, but alpha has {n} rows and n_features is {meta.get('n_features')}")
    if not meta["targets"]:
        raise bad("no target sets")
    for name, cols in meta["targets"].items():
        ok = isinstance(cols, list) and len(cols) == 2 and all(_is_number(c) and int(c) == c for c in cols)
        if not ok or not 0 <= cols[0] < cols[1] <= k:
            raise bad(f"target set {name!r} has columns {_short(cols)}, expected [start, stop] with "
                      f"0 <= start < stop <= {k} (alpha's columns)")
    if meta["task"] == "classification":
        classes, num = meta.get("classes"), meta.get("num_classes")
        if not isinstance(classes, list) or not all(isinstance(c, _SCALAR) and c is not None for c in classes):
            raise bad(f"classes is {_short(classes)}, expected a flat list of labels")
        if not _is_number(num) or num != len(classes) or len({json.dumps(c) for c in classes}) != len(classes):
            raise bad(f"num_classes is {num!r} for {len(classes)} classes; they must agree and be distinct")
        widths = sorted({c[1] - c[0] for c in meta["targets"].values()})
        if widths != [len(classes)]:
            raise bad(f"the class list has {len(classes)} classes but the target sets have {widths} alpha columns")
        names = meta.get("class_names")
        if names is not None and (not isinstance(names, list) or len(names) != len(classes)
                                  or not all(isinstance(c, str) for c in names)):
            raise bad(f"class_names is {_short(names)}, expected {len(classes)} strings or null")


def load_model(path) -> SavedModel:
    """Read and verify a model file written by ``save_model``."""
    _require_safetensors()
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file {path} does not exist or is not a file. Fix: check the path "
                             f"(written by kernelfit solve --save-model or kernelfit.model.save_model).")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="np") as f:
            header = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except Exception as exc:  # noqa: BLE001 (safetensors raises its own error types for a malformed file)
        with open(path, "rb") as fh:
            head = fh.read(16)
        raise ModelFileError(f"{path} is not a readable kernelfit model file (safetensors format): {exc} "
                             f"(first bytes {head!r}). The file is corrupt, truncated or of another format.") from None
    if "kernelfit" not in header:
        raise ModelFileError(f"{path} is a safetensors file but not a kernelfit model (its metadata has "
                             f"{sorted(header) or 'no keys'}; expected 'kernelfit' and 'sha256').")
    meta_json = header["kernelfit"]
    try:
        meta = json.loads(meta_json)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ModelFileError(f"{path}: the model metadata is not valid JSON ({type(exc).__name__}: {str(exc)[:200]}); "
                             f"the file is corrupt.") from None
    if not isinstance(meta, dict):
        raise ModelFileError(f"{path}: the model metadata is a JSON {type(meta).__name__}, expected an object; "
                             f"the file is not a kernelfit model.")
    if meta.get("format") != FORMAT:
        raise ModelFileError(f"{path}: metadata format is {_short(meta.get('format'))}, expected {FORMAT!r}.")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ModelFileError(f"{path} is a kernelfit model of format version {_short(meta.get('format_version'))}; "
                             f"this kernelfit reads version {FORMAT_VERSION}. Fix: load it with the kernelfit version "
                             f"that wrote it (see its provenance) or refit.")
    found = _digest(meta_json, tensors)
    if found != header.get("sha256"):
        raise ModelFileError(f"{path}: checksum mismatch (stored sha256 {header.get('sha256')}, computed {found}); "
                             f"the file is corrupt or was modified. Fix: write it again with --save-model.")
    _check_fields(meta, tensors, path)
    common = {"alpha": tensors["alpha"], "Y": tensors["y"], "mode": meta["mode"], "train_scores": tensors["train_scores"],
              "stats": {"jitter": meta.get("jitter", 0.0), **(meta.get("fit") or {})}}
    if meta["kernel"] == "precomputed":
        interp = PrecomputedInterpolant(X_fit=None, kernel="precomputed", bandwidth=float("nan"), **common)
    else:
        interp = Interpolant(X_fit=tensors["x_train"], kernel=meta["kernel"], bandwidth=float(meta["bandwidth"]),
                             **common)
    return SavedModel(interp, meta, path)
