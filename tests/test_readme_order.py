"""Every command of the README, run in README order in one empty directory, as a new user would.

The commands are read from the README's ```bash and ```python blocks (nothing is copied here), so an
edited README is what gets tested. Commands that would train or solve at full size get size-limiting
flags appended (argparse keeps the last value of a repeated flag), which keeps the arguments, the file
names and the chaining between commands (``ckpt/*.pt`` after ``train``, ``pred.csv`` after ``solve
--save-model``) exactly the README's. ``DIR`` is the real data directory. The install lines are not
rerun (the suite already runs on the installed package), nor is the test suite itself.

Slow (about a few minutes on 2 cores): ``python -m pytest -m slow tests/test_readme_order.py``.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"

# Appended to commands that start with these words: small sizes, one epoch, no worker pools.
_LIMITS = [
    (r"kernelfit solve --dataset (mnist|fashion-mnist) ", "--n-train 1000 --n-test 200"),
    (r"kernelfit table --rows", "--n-train-mnist 500 --n-test 200"),
    (r"deepfit train +--model mlp-1x512", "--n-train 200 --n-test 100 --max-epochs 1"),
    (r"deepfit sweep", "--n-train 200 --n-test 100 --max-epochs 1 --ps 0,1 --seeds 0 --workers 1"),
    (r"deepfit table1", "--models mlp-1x512 --n-train 200 --n-test 100 --max-epochs 1 --workers 1"),
    (r"deepfit report --data-dir", "--preset quick"),
]
# Commands whose data is not among the test data (skipped with the reason, the rest still runs).
_NEEDS = {"--dataset fashion-mnist": "fashion-mnist"}


def readme_commands(text: str) -> list[tuple[str, str]]:
    """(kind, command) in README order: kind 'bash' (one shell line, continuations joined) or 'python'."""
    out = []
    for lang, body in re.findall(r"```(bash|python)\n(.*?)```", text, flags=re.S):
        if lang == "python":
            out.append(("python", body))
            continue
        for line in body.replace("\\\n", " ").splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            out.append(("bash", line))
    return out


def _strip_comment(line: str) -> str:
    """The line without a trailing ``# ...`` comment (a '#' after a space, outside quotes)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def prepare(line: str, data_dir: Path) -> str | None:
    """The command to run for one README line, or None for the install / test-suite lines."""
    if line.startswith("python -c"):
        return line  # the one-liner that writes the example arrays (quotes kept as written)
    parts = [p.strip() for p in _strip_comment(line).split("&&")]
    parts = [p for p in parts if not p.startswith("pip install")]
    if not parts or any(p.startswith(("ruff", "python -m pytest")) for p in parts):
        return None
    cmd = " && ".join(parts).replace(" DIR", f" {shlex.quote(str(data_dir))}")
    # scripts of the repository run from where it is (the commands run in an empty directory)
    cmd = re.sub(r"(^|\s)benchmarks/", lambda m: f"{m.group(1)}{shlex.quote(str(README.parent))}/benchmarks/", cmd)
    for prefix, limits in _LIMITS:
        if re.match(prefix, cmd):
            cmd = f"{cmd} {limits}"
    return cmd


def test_readme_commands_are_found():
    cmds = [c for _, c in readme_commands(README.read_text())]
    assert any(c.startswith("pip install") and "kernelfit solve" in c for c in cmds[:2])
    assert any(c.startswith("deepfit measure --checkpoint") for c in cmds)
    assert prepare("kernelfit solve --out a.json   # note", Path("/d")) == "kernelfit solve --out a.json"
    assert prepare("pip install -q x && ruff check . && python -m pytest", Path("/d")) is None
    assert prepare("python benchmarks/x.py --data-dir DIR", Path("/d")) == f"python {README.parent}/benchmarks/x.py --data-dir /d"


@pytest.mark.slow
def test_readme_runs_in_order_in_one_empty_directory(tmp_path, shared_data_dir):
    env = dict(os.environ, KERNELFIT_DATA=str(shared_data_dir), OMP_NUM_THREADS="2",
               MPLBACKEND="Agg", PYTHONWARNINGS="ignore")
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    skipped, ran = [], 0
    for kind, line in readme_commands(README.read_text()):
        if kind == "python":
            argv, shown = [sys.executable, "-c", line], "python <README snippet>"
        else:
            cmd = prepare(line, shared_data_dir)
            if cmd is None:
                continue
            missing = [name for flag, name in _NEEDS.items() if flag in cmd and not (shared_data_dir / name).exists()]
            if missing:
                skipped.append(f"{line!r}: needs {missing[0]} in {shared_data_dir}")
                continue
            argv, shown = ["bash", "-c", cmd], cmd
        r = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, f"README command failed ({r.returncode}): {shown}\n{r.stderr[-3000:]}"
        ran += 1
    assert ran >= 20, f"only {ran} README commands ran"
    if skipped:
        print("skipped:", *skipped, sep="\n  ")
