"""The documentation stays true to the code: the CLI reference is regenerated and compared, links
point at files that exist, the README's test command is the one CI runs, and the docs speak about
the project, not about how work on it was organised."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"


def _doc_files() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_cli", DOCS / "gen_cli.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_reference_is_current():
    gen = _load_generator()
    committed = (DOCS / "cli.md").read_text()
    made_with = re.search(r"argparse of Python\s+(\d+\.\d+)", committed)
    assert made_with, "docs/cli.md lacks its header; regenerate: python docs/gen_cli.py > docs/cli.md"
    if made_with.group(1) != gen.PYTHON:
        pytest.skip(f"docs/cli.md was rendered by Python {made_with.group(1)}'s argparse, this is "
                    f"{gen.PYTHON}; argparse lays help out differently across versions")
    fresh = gen.render()
    if fresh != committed:
        import difflib

        diff = "".join(difflib.unified_diff(committed.splitlines(True), fresh.splitlines(True),
                                            "docs/cli.md (committed)", "parsers (now)", n=1))
        pytest.fail("docs/cli.md is stale; regenerate with: python docs/gen_cli.py > docs/cli.md\n"
                    + diff[:4000])


def test_cli_reference_covers_every_command():
    gen = _load_generator()
    text = (DOCS / "cli.md").read_text()
    progs = [prog for prog, _, _ in gen.commands()]
    for prog in ("kernelfit solve", "kernelfit plan", "kernelfit data download", "kernelfit table",
                 "deepfit train", "deepfit sweep", "deepfit report"):
        assert prog in progs
    for prog in progs:
        assert f"\n## {prog}\n" in text, f"docs/cli.md has no section for {prog}"
    # `kernelfit table` is documented with the parser that really parses its arguments
    assert "--randconv-zca-eps" in text


_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HTML_LINK = re.compile(r"""(?:href|src)=["']([^"']+)["']""")


def _strip_code(text: str) -> str:
    """Markdown without fenced code blocks and inline code (commands are not links)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    s = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return s.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    heads = re.findall(r"^#{1,6}\s+(.*?)\s*#*\s*$", _strip_code_blocks_only(path.read_text()), flags=re.M)
    return {_slug(h.replace("`", "")) for h in heads}


def _strip_code_blocks_only(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def _links(path: Path) -> list[str]:
    text = _strip_code(path.read_text())
    return _LINK.findall(text) + _HTML_LINK.findall(text)


@pytest.mark.parametrize("doc", _doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_existing_files(doc):
    broken = []
    for target in _links(doc):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = doc if not file_part else (doc.parent / file_part)
        if not dest.exists():
            broken.append(f"{target} (no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest})")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target} (no heading #{anchor} in {dest.name})")
    assert not broken, f"{doc.relative_to(ROOT)} has broken links: " + "; ".join(broken)


# Words that describe how the work was organised rather than the project.
_PROCESS = [
    (re.compile(r"\bissues?\s*#?\s*\d+", re.I), "an issue number"),
    (re.compile(r"(?<![\w&/(])#\d+\b"), "an issue / pull-request number"),  # not an anchor (#1-...)
    (re.compile(r"\bsessions?\b", re.I), "the word 'session'"),
    (re.compile(r"\bworktrees?\b", re.I), "the word 'worktree'"),
    (re.compile(r"\bcoordinator\b", re.I), "the word 'coordinator'"),
    (re.compile(r"\.\./shared\b"), "a ../shared path (say: a data directory, --data-dir DIR or $KERNELFIT_DATA)"),
    (re.compile(r"<!--\s*SECTIONS\s*-->"), "the stray <!-- SECTIONS --> marker"),
    (re.compile(r"\b(?=[0-9a-f]*\d)(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}\b"), "a git SHA"),
]


@pytest.mark.parametrize("doc", [README, *sorted(p for p in DOCS.glob("*.md") if p.name != "cli.md")],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_speak_about_the_project_not_the_process(doc):
    found = []
    for lineno, line in enumerate(doc.read_text().splitlines(), 1):
        for pattern, what in _PROCESS:
            m = pattern.search(line)
            if m:
                found.append(f"line {lineno}: {what}: {m.group(0)!r}")
    assert not found, f"{doc.relative_to(ROOT)}:\n" + "\n".join(found)


def test_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    marker = next(i for i, line in enumerate(ci) if "second command, verbatim" in line)
    command = ci[marker + 1].strip()
    assert command in README.read_text(), f"README.md must show CI's test command verbatim: {command}"


def test_generator_writes_to_stdout(capsys, monkeypatch):
    gen = _load_generator()
    monkeypatch.setattr(sys, "path", list(sys.path))
    assert gen.main() == 0
    out = capsys.readouterr().out
    assert out.startswith("# Command-line reference") and "## kernelfit solve" in out


def test_every_test_named_in_the_safety_table_exists():
    """docs/safety.md names the test that holds each case; a renamed or deleted test must not leave the
    table pointing at nothing."""
    import re

    root = Path(__file__).resolve().parent.parent
    text = (root / "docs" / "safety.md").read_text()
    refs = re.findall(r"`(test_\w+\.py)::(test_\w+)(\*?)`", text)
    assert len(refs) > 30
    for fname, name, wildcard in refs:
        source = (root / "tests" / fname).read_text()
        assert (f"def {name}" in source) if not wildcard else re.search(rf"def {name}\w*\(", source), (fname, name)
