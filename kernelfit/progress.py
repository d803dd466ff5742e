"""Progress and log lines: the ``kernelfit`` / ``deepfit`` loggers, a verbosity knob, a bar only on a terminal.

Every progress or info line of kernelfit and deepfit goes through the standard :mod:`logging` module,
to the logger named ``"kernelfit"`` or ``"deepfit"`` (or a child such as ``"kernelfit.data.cifar"``).
:func:`set_verbosity` sets how much of it reaches standard error:

* ``v < 0``: warnings only (``-q``),
* ``v == 0``: progress and info lines (the default),
* ``v > 0``: debug lines too (``-v``).

An application that configures :mod:`logging` itself can ignore all this: the records propagate to
the root logger as usual (call ``set_verbosity(v, handler=False)`` to drop this module's stderr
handler and avoid printing a line twice).

A redirected stderr (a log file, a batch job, CI) filled with ``\\r`` frames of a bar is unreadable, so
a bar (tqdm) is drawn only when stderr is a terminal and the verbosity is >= 0; otherwise a phase logs
one line when it starts, one at most every :data:`HEARTBEAT_S` seconds while it runs, and one when it
ends. Every progress consumer takes the object returned by :func:`progress_bar`: it has tqdm's
``update``, ``n``, ``total``, ``refresh`` and ``close``.
"""

from __future__ import annotations

import logging
import sys
import time

__all__ = ["PhaseLines", "progress_bar", "set_verbosity", "get_verbosity", "get_logger", "Heartbeat", "HEARTBEAT_S"]

# The longest silence of a phase that reports its progress: a line at least this often.
HEARTBEAT_S = 5.0

_ROOTS = ("kernelfit", "deepfit")
_verbosity = 0
_configured = False


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at the time of the record (pytest, redirections)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(self.format(record), file=sys.stderr, flush=True)
        except Exception:  # noqa: BLE001  logging must never break the computation it reports on
            self.handleError(record)


class _Formatter(logging.Formatter):
    """``[kernelfit] text`` as kernelfit's lines always read; deepfit's info lines carry their own tag
    (``[report] ...``, ``measure: ...``, ``[run id] epoch ...``) and stay as they were; a warning or error
    always names its package and level."""

    def format(self, record: logging.LogRecord) -> str:
        root = record.name.split(".", 1)[0]
        level = "" if record.levelno in (logging.INFO, logging.DEBUG) else f"{record.levelname.lower()}: "
        if root == "deepfit" and not level:
            return record.getMessage()
        return f"[{root}] {level}{record.getMessage()}"


def _level(v: int) -> int:
    return logging.WARNING if v < 0 else (logging.INFO if v == 0 else logging.DEBUG)


def set_verbosity(v: int = 0, *, handler: bool = True) -> None:
    """``v < 0``: warnings only; ``0``: progress / info lines; ``> 0``: debug lines too (see the module docstring).

    ``handler``: keep one stderr handler on the ``kernelfit`` and ``deepfit`` loggers (False removes it,
    for an application whose own logging configuration prints the records).
    """
    global _verbosity, _configured
    _verbosity = int(v)
    _configured = True
    for name in _ROOTS:
        log = logging.getLogger(name)
        log.setLevel(_level(_verbosity))
        ours = [h for h in log.handlers if isinstance(h, _StderrHandler)]
        if handler and not ours:
            h = _StderrHandler()
            h.setFormatter(_Formatter())
            log.addHandler(h)
        elif not handler:
            for h in ours:
                log.removeHandler(h)


def get_verbosity() -> int:
    return _verbosity


def get_logger(name: str = "kernelfit") -> logging.Logger:
    """The logger ``name`` (``"kernelfit..."`` or ``"deepfit..."``), configured at verbosity 0 on first use."""
    if not _configured:
        set_verbosity(0)
    return logging.getLogger(name)


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or file-like objects without isatty
        return False


def _amount(x: float, unit: str) -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}".rstrip()
    return f"{x:.4g} {unit}".rstrip()


class Heartbeat:
    """Throttled progress lines: ``tick(text)`` logs ``text`` only when ``every`` seconds have passed."""

    def __init__(self, logger: logging.Logger, every: float | None = None):
        self.logger, self.every = logger, HEARTBEAT_S if every is None else every
        self._last = time.perf_counter()

    def tick(self, text: str) -> bool:
        now = time.perf_counter()
        if now - self._last < self.every:
            return False
        self._last = now
        self.logger.info(text)
        return True


class PhaseLines:
    """tqdm's interface as log lines: ``desc: started``, ``desc: X of Y`` every few seconds, ``desc: done ... in T s``.

    ``stream``: write the lines there directly (formatted as the logger would) instead of logging them.
    """

    def __init__(self, total=None, desc: str = "", unit: str = "", stream=None, logger: str = "kernelfit"):
        self.total, self.desc, self.unit = total, desc, unit
        self.n = 0
        self.stream = stream
        self._log = get_logger(logger)
        self._beat = Heartbeat(self._log)
        self._t0 = time.perf_counter()
        self._closed = False
        self._print(f"{desc}: started" + ("" if total is None else f" ({_amount(total, unit)})"))

    def _print(self, text: str) -> None:
        if self.stream is not None:
            if _verbosity < 0:  # warnings only
                return
            print(f"[{self._log.name.split('.')[0]}] {text}", file=self.stream, flush=True)
        else:
            self._log.info(text)

    def update(self, k=1) -> None:
        self.n += k
        if self.stream is None:
            of = "" if self.total is None else f" of {_amount(self.total, self.unit)}"
            self._beat.tick(f"{self.desc}: {_amount(self.n, self.unit)}{of} "
                            f"({time.perf_counter() - self._t0:.0f} s)")

    def refresh(self) -> None:  # nothing to redraw
        pass

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        dt = time.perf_counter() - self._t0
        self._print(f"{self.desc}: done {_amount(self.n, self.unit)} in {dt:.1f} s")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def progress_bar(total=None, desc: str = "", unit: str = "", enabled: bool = True, stream=None,
                 mininterval: float = 1.0, logger: str = "kernelfit"):
    """A progress object for one phase, or None when ``enabled`` is false.

    A tqdm bar when the stream (default ``sys.stderr``) is a terminal and the verbosity is >= 0;
    otherwise :class:`PhaseLines` (log lines on ``logger``, or lines on ``stream`` when one is given).
    """
    if not enabled:
        return None
    target = sys.stderr if stream is None else stream
    if _verbosity < 0 or not _is_terminal(target):
        return PhaseLines(total=total, desc=desc, unit=unit, stream=stream, logger=logger)
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, leave=False, mininterval=mininterval,
                file=target)
