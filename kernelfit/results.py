"""Result records: atomic JSON writing, JSON-lines appends, the residual warning, byte formatting, peak
memory, phase timing.

This is the one place that defines how a result reaches disk, so every experiment (kernel solves,
deep-net runs, sweeps) never leaves a half-written or silently overwritten file behind. What ran where
(git SHA, library versions, machine) is :mod:`kernelfit.provenance`; output places checked before any
work (writable directory, free space) are :mod:`kernelfit.places`.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

__all__ = [
    "to_jsonable",
    "dumps",
    "write_json_atomic",
    "append_jsonl",
    "read_jsonl",
    "peak_rss_bytes",
    "warn_residual",
    "PhaseTimer",
    "regression_metrics",
]

# --------------------------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------------------------

def to_jsonable(obj: Any) -> Any:
    """Recursively convert numpy / torch scalars and arrays, Paths, sets, dataclasses to JSON types.

    Non-finite floats become None (strict JSON has no NaN / Infinity); tuples become lists.
    """
    import dataclasses

    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):  # bool was handled above
        return int(obj)
    if isinstance(obj, float):  # includes numpy.float64, a float subclass
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return [to_jsonable(v) for v in sorted(obj, key=repr)]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    np = sys.modules.get("numpy")
    if np is not None:
        if isinstance(obj, np.bool_):
            return bool(obj)
        if isinstance(obj, np.integer):
            return int(obj)
        if isinstance(obj, np.floating):
            return to_jsonable(float(obj))
        if isinstance(obj, np.complexfloating):
            return {"real": to_jsonable(float(obj.real)), "imag": to_jsonable(float(obj.imag))}
        if isinstance(obj, np.ndarray):
            return to_jsonable(obj.tolist())
        if isinstance(obj, np.dtype):
            return str(obj)
    torch = sys.modules.get("torch")
    if torch is not None:
        if isinstance(obj, torch.Tensor):
            return to_jsonable(obj.detach().cpu().tolist())
        if isinstance(obj, (torch.dtype, torch.device)):
            return str(obj)
    if hasattr(obj, "to_dict") and callable(obj.to_dict):
        return to_jsonable(obj.to_dict())
    raise TypeError(
        f"cannot serialize object of type {type(obj).__name__} to JSON; expected dict, list, "
        f"str, number, bool, None, numpy / torch values, Path or a dataclass. Convert it first "
        f"(e.g. str(value))."
    )


def dumps(obj: Any, indent: int | None = 2) -> str:
    """Strict JSON text (no NaN / Infinity) of ``obj`` after :func:`to_jsonable`."""
    return json.dumps(to_jsonable(obj), indent=indent, sort_keys=False, allow_nan=False)


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not supported everywhere (e.g. some network filesystems).
    try:
        fd = os.open(str(directory), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    try:  # read the umask without changing it (Linux)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return 0o022


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
    """Open a temporary file beside ``path`` for writing; on a clean exit flush and fsync it, give it
    the permissions ``open()`` would (mkstemp makes 0600 files) and ``os.replace`` it onto ``path``.

    A reader sees the old file or the complete new one, never a partial one; an exception inside the
    block (a checksum mismatch, a crash in a serializer) removes the temporary file and leaves
    ``path`` untouched. The one place kernelfit and deepfit write results, caches and checkpoints.
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(directory))
    try:
        os.chmod(tmp_name, 0o666 & ~_umask())
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except OSError:
            pass
        raise
    _fsync_dir(directory)


def write_json_atomic(path: str | os.PathLike, obj: Any, overwrite: bool = False) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically; return the resolved path.

    The text goes to a temporary file in the same directory, is flushed and fsynced, and then
    ``os.replace``-d onto ``path``: a reader sees the old file or the complete new one, never a
    partial one. An existing ``path`` is refused unless ``overwrite=True``. Serialization
    happens before anything touches the disk, so a non-serializable ``obj`` leaves no file.
    """
    path = Path(path).expanduser()
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"refusing to overwrite existing result file {str(path)!r}; pass --overwrite "
            f"(overwrite=True) to replace it, or choose a new path."
        )
    if path.exists() and path.is_dir():
        raise IsADirectoryError(f"result path {str(path)!r} is a directory; expected a file path "
                                f"such as {str(path / 'result.json')!r}.")
    text = dumps(obj) + "\n"
    with atomic_file(path, "w") as fh:
        fh.write(text)
        fh.flush()
        if not overwrite and path.exists():
            # Someone created it while we were writing: still never clobber it.
            raise FileExistsError(
                f"refusing to overwrite {str(path)!r}, which appeared while writing; pass "
                f"--overwrite (overwrite=True) or choose a new path."
            )
    return path.resolve()


def append_jsonl(path: str | os.PathLike, record: Any) -> None:
    """Append ``record`` as one JSON line to ``path`` (created if missing), fsynced.

    The whole line goes out in one ``os.write`` on an ``O_APPEND`` descriptor, so concurrent appenders
    on a local filesystem never interleave within a line. A file whose last line was torn (a full disk
    or a kill mid-write) gets a newline first, so the torn fragment stays on a line of its own, which
    :func:`read_jsonl` skips with a warning, and this record stays readable.
    """
    path = Path(path).expanduser()
    line = dumps(record, indent=None)
    if "\n" in line:  # cannot happen with indent=None, but a broken line would corrupt the file
        raise ValueError("JSON line contains a newline")
    if str(path.parent):
        path.parent.mkdir(parents=True, exist_ok=True)
    data = (line + "\n").encode("utf-8")
    fd = os.open(str(path), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        size = os.fstat(fd).st_size
        if size:
            with open(path, "rb") as fh:
                fh.seek(size - 1)
                if fh.read(1) != b"\n":
                    data = b"\n" + data
        written = os.write(fd, data)
        if written != len(data):  # a short write on a full disk: say so instead of leaving half a record
            raise OSError(28, f"only {written} of {len(data)} bytes of a JSON line reached {str(path)!r} "
                              f"(disk full?); the file keeps its earlier records, free space and rerun")
        os.fsync(fd)
    finally:
        os.close(fd)


def read_jsonl(path: str | os.PathLike) -> list[Any]:
    """Read a JSON-lines file. Lines that do not parse (torn by a crash or a full disk mid-write) are
    skipped with one warning naming them, so one bad append never makes the file unreadable."""
    import warnings

    path = Path(path)
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    out, torn = [], []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            torn.append(i + 1)
    if torn:
        warnings.warn(f"{str(path)!r}: skipped {len(torn)} line(s) that are not complete JSON records "
                      f"(line {', '.join(map(str, torn[:5]))}{', ...' if len(torn) > 5 else ''}); a write "
                      f"was interrupted there. The other {len(out)} records were read.", RuntimeWarning,
                      stacklevel=2)
    return out


# --------------------------------------------------------------------------------------------
# residuals and sizes in messages
# --------------------------------------------------------------------------------------------

# training targets are no longer reproduced to half of float64's digits.
RESIDUAL_WARN = 1e-8


def warn_residual(stats: dict, mode: str, threshold: float, refine_tol=None) -> None:
    """Say so (a RuntimeWarning and ``stats["residual_warning"]``) when a float64 or mixed solve ends
    with a relative residual above float64 level: never a result that looks exact and is not.

    A backward-stable solve with a large relative residual means K itself is nearly singular (float64
    cannot do better): near-duplicate points with different labels, or a bandwidth too large for the
    data. A solve that is not even backward stable stalled in the low-precision refinement."""
    rf = stats["refinement"]
    rel = float(stats["residual_relative"])
    level = rf.get("float64_level", rel <= threshold)
    backward = rf.get("backward_error", float("nan"))
    message = None
    if mode == "mixed" and level and refine_tol is not None and not rf.get("tol_reached"):
        message = (f"refine_tol = {refine_tol:.3g} was not reached: the float64-level solution has relative residual "
                   f"{rel:.3g} (backward error {backward:.2e}), which is what float64 can reach for this K.")
    elif mode in ("mixed", "float64") and not (level or rf.get("tol_reached")):
        stable = rf.get("backward_stable", backward <= threshold)
        if stable and rel <= RESIDUAL_WARN:
            # backward stable and the targets reproduced to ~8 digits: float64's best for this K (the
            # record's float64_level says false); a warning on every ill-conditioned but sound run would
            # teach users to ignore it
            return
        if stable:
            why = (f"the solve is backward stable (backward error {backward:.2e}): K is too ill-conditioned "
                   f"for float64 to do better")
        else:
            why = (f"the refinement stalled at backward error {backward:.2e} > {threshold:.1e} "
                   f"({rf.get('fallback_skipped') or 'no float64 fallback'})")
        message = (f"the solve did not reach float64 level: relative residual ||Y - K alpha|| / ||Y|| = {rel:.3g} "
                   f"(float64 level: <= {threshold:.1e}; {rf.get('stop_reason') or 'direct solve'}); {why}. "
                   f"Near-duplicate points with different labels, or a bandwidth too large for the data, make K "
                   f"ill-conditioned: the training targets are interpolated only to that residual. Add a small "
                   f"ridge (--jitter 1e-8, jitter=1e-8), remove near-duplicates, or use a smaller bandwidth.")
    if message is not None:
        stats["residual_warning"] = message
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def format_gib(b: float) -> str:
    """Bytes in GiB with two decimals, whatever the size (memory plans, read limits)."""
    return f"{b / 2**30:.2f} GiB"


def format_bytes(b: float) -> str:
    """Bytes for messages: GiB from 1 GiB, MiB below (so two different small sizes never print alike)."""
    if b >= 2**30:
        return f"{b / 2**30:.2f} GiB"
    return f"{b / 2**20:.1f} MiB" if b >= 2**20 else f"{int(b)} bytes"


# --------------------------------------------------------------------------------------------
# memory and time
# --------------------------------------------------------------------------------------------

def peak_rss_bytes() -> int:
    """Peak resident set size of this process in bytes (ru_maxrss; KiB on Linux, bytes on macOS)."""
    import resource

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if sys.platform == "darwin":
        return int(maxrss)
    return int(maxrss) * 1024


class PhaseTimer:
    """Wall-clock seconds per named phase (``time.perf_counter``); repeated phases accumulate.

    >>> t = PhaseTimer()
    >>> with t.phase("gram"):
    ...     pass
    >>> sorted(t.as_dict())
    ['gram']

    Also usable as ``with PhaseTimer() as t:`` (records a ``"total"`` phase). GPU work must be
    synchronized by the caller inside the phase for the time to be honest.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._stack: list[tuple[str, float]] = []

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + (time.perf_counter() - start)

    __call__ = phase

    def __enter__(self) -> "PhaseTimer":
        self._stack.append(("total", time.perf_counter()))
        return self

    def __exit__(self, *exc: object) -> None:
        name, start = self._stack.pop()
        self.seconds[name] = self.seconds.get(name, 0.0) + (time.perf_counter() - start)

    def as_dict(self) -> dict[str, float]:
        return dict(self.seconds)

    to_dict = as_dict

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v:.3f}s" for k, v in self.seconds.items())
        return f"PhaseTimer({inner})"


# --------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------

def regression_metrics(y_true, y_pred) -> dict[str, Any]:
    """RMSE and R^2 of predictions (1-D or multi-output), overall and per output column.

    ``rmse`` is over all entries, ``r2`` the uniform average of the per-output R^2
    (``sklearn.metrics.r2_score``); R^2 is None where it is undefined (fewer than two samples).
    """
    import numpy as np
    from sklearn.metrics import mean_squared_error, r2_score

    yt = np.asarray(y_true, dtype=np.float64).reshape(len(y_true), -1)
    yp = np.asarray(y_pred, dtype=np.float64).reshape(len(y_pred), -1)
    if yt.shape != yp.shape:
        raise ValueError(f"targets have shape {yt.shape} but predictions {yp.shape}; they must match.")
    if len(yt) == 0:
        return {"rmse": None, "r2": None, "rmse_per_output": [], "r2_per_output": []}
    rmse_each = np.sqrt(mean_squared_error(yt, yp, multioutput="raw_values"))
    if len(yt) < 2:
        r2_each = [None] * yt.shape[1]
        r2 = None
    else:
        r2_each = [float(v) for v in r2_score(yt, yp, multioutput="raw_values")]
        r2 = float(np.mean(r2_each))
    return {"rmse": float(np.sqrt(np.mean((yt - yp) ** 2))), "r2": r2,
            "rmse_per_output": [float(v) for v in rmse_each], "r2_per_output": r2_each}


def residual_stats(R, Y) -> dict:
    """The record's residual fields: max |Y - K alpha| and ||Y - K alpha|| / ||Y||."""
    import numpy as np  # results.py itself stays numpy-free (imported by --help)

    return {"residual_max_abs": float(np.max(np.abs(R))),
            "residual_relative": float(np.linalg.norm(R) / (np.linalg.norm(Y) or 1.0))}
