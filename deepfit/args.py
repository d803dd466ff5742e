"""Argument types and flag groups shared by the ``deepfit`` subcommands (cli, report, suite).

Each type checks one value and says what was expected; the verbosity flags map onto
:func:`kernelfit.progress.set_verbosity` as ``verbose - quiet``.
"""

from __future__ import annotations

import argparse

__all__ = ["csv_of", "positive_int", "device_arg", "crop_arg", "add_verbosity_flags"]


def csv_of(cast):
    def parse(text):
        try:
            return [cast(t) for t in str(text).split(",") if t.strip() != ""]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}") from None
    return parse


def positive_int(flag: str):
    def parse(text):
        try:
            v = int(text)
        except ValueError:
            v = 0
        if v < 1:
            raise argparse.ArgumentTypeError(f"{flag} expects a positive integer, got {text!r}. Fix: e.g. {flag} 4.")
        return v
    return parse


def device_arg(allow_list: bool):
    """--device: 'auto' or torch device names (a comma list where runs are dealt to several devices)."""
    def parse(text):
        text = str(text).strip()
        if text == "auto":
            return text
        names = [t.strip() for t in text.split(",") if t.strip()]
        if not names or (len(names) > 1 and not allow_list):
            raise argparse.ArgumentTypeError(
                f"expected one device such as cpu, cuda or cuda:1 (or auto), got {text!r}"
                + ("" if allow_list else "; a comma list is for `deepfit sweep` / `table1`") + ".")
        import torch
        for name in names:
            try:
                torch.device(name)
            except (RuntimeError, ValueError):
                raise argparse.ArgumentTypeError(
                    f"unknown device {name!r}; expected auto, cpu, cuda or cuda:N"
                    + (" (comma-separated for several)" if allow_list else "") + ".") from None
        return ",".join(names)
    return parse


def crop_arg(text):
    if str(text).lower() in ("none", "no", "0"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--crop expects an integer or 'none', got {text!r}") from None


def add_verbosity_flags(p: argparse.ArgumentParser) -> None:
    """``-v/--verbose`` and ``-q/--quiet`` (each may be repeated): verbosity ``verbose - quiet`` (< 0 warnings only,
    0 progress lines, > 0 debug lines such as every training epoch)."""
    p.add_argument("-v", "--verbose", action="count", default=0, help="more lines on standard error (debug lines)")
    p.add_argument("-q", "--quiet", action="count", default=0, help="warnings and errors only on standard error")
