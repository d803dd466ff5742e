"""Command line interface: ``kernelfit solve | predict | plan | data | table``.

``kernelfit solve``   exact kernel interpolation on a dataset (optionally randomized), one JSON record
``kernelfit plan``    memory plan of a solve, without allocating anything
``kernelfit data``    where data is looked for (``path``), what is found (``info``), ``download``
``kernelfit table``   the kernel table of Zhang et al. (Section 5), see ``kernelfit table --help``
``kernelfit predict`` predictions of a model saved by ``solve --save-model``, streamed in blocks

One module per command, each with ``register(subparsers)`` and ``run(args)``; argument types and shared
groups in :mod:`.args`, what is printed and written in :mod:`.output`. Every input is validated before
any data is loaded or memory allocated; errors name what was expected and how to fix it. Human-readable
summaries go to stderr, the JSON record to stdout or ``--out`` (written atomically, never overwriting an
existing file without ``--overwrite``). Run as ``kernelfit ...`` or ``python -m kernelfit.cli ...``.
Importing this package loads no numpy (``--help`` stays fast); each ``run`` imports what it computes with.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import KernelfitError
from . import data, plan, predict, solve, table
from .args import EXIT_DOES_NOT_FIT, EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, eprint

__all__ = ["main", "build_parser", "EXIT_OK", "EXIT_ERROR", "EXIT_USAGE", "EXIT_DOES_NOT_FIT", "EXIT_INTERRUPTED"]

COMMANDS = (solve, plan, data, predict, table)   # the order of `kernelfit --help`


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="kernelfit",
        description="Exact kernel interpolation at MNIST / CIFAR-10 scale.",
        epilog="Run 'kernelfit <command> --help' for the options of a command.",
    )
    ap.add_argument("--debug", action="store_true",
                    help="show the full traceback of a failure instead of the one-line error (also anywhere "
                         "after the command, or KERNELFIT_DEBUG=1)")
    sub = ap.add_subparsers(dest="command", metavar="{solve,plan,data,table,predict}")
    sub.required = True
    for command in COMMANDS:
        command.register(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 error, 2 usage, 3 plan does not fit, 130 interrupted).

    Every command ends in one line ``kernelfit CMD: error: ...`` for anything that goes wrong at run
    time (bad data, a file that cannot be written, memory, Ctrl-C), never a traceback; ``--debug``
    (anywhere on the line) or ``KERNELFIT_DEBUG=1`` shows the traceback instead.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("KERNELFIT_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    command, args = (argv[0] if argv else "?"), None
    try:
        args = build_parser().parse_args(argv)
        args.argv, command = argv, args.command
        from .. import progress
        from ..parallel import limit_threads

        progress.set_verbosity(args.verbose - args.quiet)
        with limit_threads(getattr(args, "threads", None)):
            return args.run(args)
    except SystemExit:
        raise
    except BaseException as e:
        if debug:
            raise
        return _report_failure(command, args, e)


def _report_failure(command: str, args, e: BaseException) -> int:
    """One line on stderr for a failure at run time, and its exit status."""
    prefix = f"kernelfit {command}: "
    if isinstance(e, KeyboardInterrupt):
        where = (getattr(args, "checkpoint_dir", None) or getattr(args, "scratch_dir", None)) if args is not None else None
        hint = (f"; the panels finished so far are saved in {where}: rerun the same command with --resume to "
                f"continue" if where is not None else "; nothing was written")
        eprint(f"{prefix}interrupted{hint}")
        return EXIT_INTERRUPTED
    if isinstance(e, KernelfitError):
        eprint(f"{prefix}error ({type(e).__name__}): {e}")
    elif isinstance(e, OSError):
        what = f"{e.strerror} ({e.filename})" if e.strerror and e.filename else (e.strerror or str(e))
        eprint(f"{prefix}error: {what}. Fix: check the path, its permissions and the free disk space, then rerun"
               f" (files written so far are complete: every result is written atomically)")
    elif isinstance(e, MemoryError):
        eprint(f"{prefix}error: ran out of memory. Fix: check what fits with 'kernelfit plan' (same sizes), and "
               f"use a smaller --n-train or --mode float32")
    else:
        eprint(f"{prefix}internal error ({type(e).__name__}): {e}. This is a bug: rerun with --debug for the "
               f"traceback and report it")
    return EXIT_ERROR
