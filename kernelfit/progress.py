"""Progress on stderr: a tqdm bar on a terminal, one line per phase otherwise.

A redirected stderr (a log file, a batch job, CI) filled with ``\\r`` frames of a bar is unreadable, so
when the stream is not a terminal a phase prints one line when it starts and one when it ends, with
what it did and how long it took. Every progress consumer in kernelfit and deepfit takes the object
returned by :func:`progress_bar`: it has tqdm's ``update``, ``n``, ``total``, ``refresh`` and ``close``.
"""

from __future__ import annotations

import sys
import time

__all__ = ["PhaseLines", "progress_bar"]


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


class PhaseLines:
    """tqdm's interface, printing ``desc: started`` once and ``desc: done ... in T s`` once."""

    def __init__(self, total=None, desc: str = "", unit: str = "", stream=None):
        self.total, self.desc, self.unit = total, desc, unit
        self.n = 0
        self.stream = sys.stderr if stream is None else stream
        self._t0 = time.perf_counter()
        self._closed = False
        self._print(f"{desc}: started" + ("" if total is None else f" ({_amount(total, unit)})"))

    def _print(self, text: str) -> None:
        print(f"[kernelfit] {text}", file=self.stream, flush=True)

    def update(self, k=1) -> None:
        self.n += k

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
                 mininterval: float = 1.0):
    """A progress object for one phase, or None when ``enabled`` is false.

    ``stream`` defaults to ``sys.stderr``; a terminal gets a tqdm bar, anything else :class:`PhaseLines`.
    """
    if not enabled:
        return None
    stream = sys.stderr if stream is None else stream
    if not _is_terminal(stream):
        return PhaseLines(total=total, desc=desc, unit=unit, stream=stream)
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, leave=False, mininterval=mininterval,
                file=stream)
