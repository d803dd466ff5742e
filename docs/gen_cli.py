"""Write the command-line reference (docs/cli.md) from the argparse parsers themselves.

    python docs/gen_cli.py > docs/cli.md

The reference is each parser's own ``--help`` text, so it cannot drift from the code; a test
regenerates it and fails when the committed file is stale. Help is rendered at a fixed width
(``WIDTH`` columns) so the output does not depend on the terminal.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from pathlib import Path

WIDTH = 100

PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"  # argparse's layout varies by version

HEADER = f"""\
# Command-line reference

Generated from the argparse parsers by `python docs/gen_cli.py > docs/cli.md` (argparse of Python
{PYTHON}); do not edit by hand: `tests/test_docs.py` fails when this file is stale. Every command
also answers `--help`.
"""


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser, str]]:
    """(name, parser, one-line help) of each subcommand, in the order they were added."""
    out = []
    for action in parser._actions:  # argparse keeps subparsers only here
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            seen = set()
            for name, sub in action.choices.items():
                if id(sub) not in seen:  # aliases map to the same parser
                    seen.add(id(sub))
                    out.append((name, sub, helps.get(name, "")))
    return out


def _walk(prog: str, parser: argparse.ArgumentParser, summary: str = ""
          ) -> Iterator[tuple[str, argparse.ArgumentParser, str]]:
    """Depth-first (command, parser, summary)."""
    yield prog, parser, summary
    for name, sub, help_ in _subcommands(parser):
        yield from _walk(f"{prog} {name}", sub, help_)


def commands() -> list[tuple[str, argparse.ArgumentParser, str]]:
    """Every command of both tools with its parser."""
    from deepfit.cli import build_parser as deepfit_parser
    from kernelfit.cli import build_parser as kernelfit_parser

    return [*_walk("kernelfit", kernelfit_parser()), *_walk("deepfit", deepfit_parser())]


def render() -> str:
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(WIDTH)  # argparse's formatter reads the width from here
    try:
        cmds = commands()
        lines = [HEADER, "## Commands", ""]
        for prog, _, summary in cmds:
            anchor = prog.replace(" ", "-")
            lines.append(f"- [`{prog}`](#{anchor})" + (f": {summary}" if summary else ""))
        for prog, parser, _ in cmds:
            text = parser.format_help().rstrip()
            lines += ["", f"## {prog}", "", "```text", text, "```"]
        return "\n".join(lines) + "\n"
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old


def main() -> int:
    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root))  # document this checkout's code, not an installed copy
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
