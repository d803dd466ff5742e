"""The layer order written in docs/design.md (the fenced ```layers block) holds for every import.

Every import of kernelfit/ and deepfit/ is read with ``ast``, at module level and inside functions
(a string constant naming one of our modules, as a lazy registry holds, counts as an import too).
A module may import from its own layer or a lower one; no modules import each other around a loop;
every module is placed in the table. Nothing is imported: the test reads source only.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("kernelfit", "deepfit")


def parse_layers(text: str):
    """(layers, never): layers is [(number, name, [path, ...])], never is [([from paths], [to paths])]."""
    m = re.search(r"^```layers\n(.*?)^```", text, re.M | re.S)
    if m is None:
        raise AssertionError("docs/design.md has no ```layers fenced block")
    layers, never = [], []
    for raw in m.group(1).splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        words = line.split()
        if words[0] == "never":
            arrow = words.index("->")
            never.append((words[1:arrow], words[arrow + 1:]))
        elif words[0].isdigit():
            layers.append((int(words[0]), words[1], words[2:]))
        elif raw[:1].isspace() and layers:
            layers[-1][2].extend(words)
        else:
            raise AssertionError(f"layers block: cannot read line {raw!r}")
    numbers = [n for n, _, _ in layers]
    assert numbers == sorted(set(numbers)), f"layer numbers must increase: {numbers}"
    return layers, never


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def matches(path: str, pattern: str) -> bool:
    return path.startswith(pattern) if pattern.endswith("/") else path == pattern


def best_match(path: str, patterns) -> str | None:
    """The longest pattern naming ``path`` (a file beats the folder holding it)."""
    hits = [p for p in patterns if matches(path, p)]
    return max(hits, key=len) if hits else None


def place(modules, layers):
    """Module name -> layer number; modules the table does not name are returned apart."""
    pattern_layer = {p: n for n, _, paths in layers for p in paths}
    placed, unplaced = {}, []
    for name, path in modules.items():
        rel = path.relative_to(ROOT).as_posix()
        pattern = best_match(rel, pattern_layer)
        if pattern is None:
            unplaced.append(rel)
        else:
            placed[name] = pattern_layer[pattern]
    return placed, unplaced


def _resolve(target: str, modules) -> str | None:
    """The deepest of our modules that ``target`` (a dotted name) names or lies in."""
    parts = target.split(".")
    while parts:
        name = ".".join(parts)
        if name in modules:
            return name
        parts.pop()
    return None


def imports_of(name: str, path: Path, modules) -> set[tuple[str, int]]:
    """Our modules that ``name`` imports anywhere in its source, each with the first line doing so."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: dict[str, int] = {}

    def add(target: str, line: int):
        mod = _resolve(target, modules)
        if mod is not None and mod != name:
            found.setdefault(mod, line)

    # a logger's name is not an import, even when it spells a module: getLogger("a.b"), f(..., logger="a.b")
    loggers = {id(a) for n in ast.walk(tree) if isinstance(n, ast.Call) and ast.unparse(n.func).endswith("getLogger")
               for a in n.args}
    loggers |= {id(k.value) for n in ast.walk(tree) if isinstance(n, ast.Call) for k in n.keywords if k.arg == "logger"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                # ``from pkg import submodule`` imports the submodule; ``from mod import name`` the module.
                sub = f"{source}.{alias.name}"
                add(sub if sub in modules else source, node.lineno)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "." in node.value:
            if node.value in modules and id(node) not in loggers:
                add(node.value, node.lineno)
    return set(found.items())


def import_graph(modules):
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycles(graph) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each as a sorted list."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w, _ in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def check_tree(text: str, modules) -> list[str]:
    """Every breach of the table in ``text`` by the source of ``modules``, as readable lines."""
    layers, never = parse_layers(text)
    placed, unplaced = place(modules, layers)
    problems = [f"{rel}: not placed in the layers block of docs/design.md" for rel in unplaced]
    graph = import_graph(modules)
    rel = {name: path.relative_to(ROOT).as_posix() for name, path in modules.items()}
    for src, targets in sorted(graph.items()):
        for dst, line in sorted(targets):
            if src in placed and dst in placed and placed[dst] > placed[src]:
                problems.append(f"{rel[src]}:{line} imports {dst} (layer {placed[dst]}) from layer {placed[src]}")
            for froms, tos in never:
                if any(matches(rel[src], p) for p in froms) and any(matches(rel[dst], p) for p in tos):
                    problems.append(f"{rel[src]}:{line} imports {dst}, which the layers block forbids")
    for comp in find_cycles(graph):
        edges = [f"{a} -> {b}" for a in comp for b, _ in sorted(graph[a]) if b in comp]
        problems.append("import cycle: " + "; ".join(edges))
    return problems


def test_layer_order_and_no_cycles():
    problems = check_tree((ROOT / "docs" / "design.md").read_text(), all_modules())
    assert not problems, "\n".join(problems)


# The checker itself, on small fake trees: each breach it must see.
TABLE = """```layers
0 low   pkg/a.py pkg/__init__.py
1 mid   pkg/sub/
2 high  pkg/b.py
never pkg/b.py -> pkg/sub/c.py
```
"""


@pytest.fixture
def fake_tree(tmp_path, monkeypatch):
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    for f in ("pkg/__init__.py", "pkg/sub/__init__.py"):
        (tmp_path / f).write_text("")

    def build(files: dict[str, str]):
        for f, src in files.items():
            (tmp_path / f).write_text(src)
        return {module_name(p): p for p in sorted((tmp_path / "pkg").rglob("*.py"))}

    return build


def test_checker_sees_upward_import_inside_function(fake_tree):
    mods = fake_tree({"pkg/a.py": "def f():\n    from .sub import c\n", "pkg/sub/c.py": "", "pkg/b.py": ""})
    problems = check_tree(TABLE, mods)
    assert any("pkg/a.py:2 imports pkg.sub.c (layer 1) from layer 0" in p for p in problems), problems


def test_checker_sees_cycle_and_unplaced_module_and_never(fake_tree):
    mods = fake_tree({
        "pkg/a.py": "",
        "pkg/sub/c.py": "import pkg.sub.d\n",
        "pkg/sub/d.py": "X = 'pkg.sub.c'\nlog = logging.getLogger('pkg.b')\n",  # a lazy registry entry counts
        "pkg/b.py": "from pkg.sub import c\n",
        "pkg/e.py": "",
    })
    problems = check_tree(TABLE, mods)
    assert any(p.startswith("import cycle:") and "pkg.sub.c -> pkg.sub.d" in p for p in problems), problems
    assert any(p.startswith("pkg/e.py: not placed") for p in problems), problems
    assert any("pkg/b.py:1 imports pkg.sub.c, which the layers block forbids" in p for p in problems), problems
    assert not any("pkg.b (layer 2)" in p for p in problems), problems   # the logger name is no import


def test_checker_passes_a_clean_tree(fake_tree):
    mods = fake_tree({"pkg/a.py": "", "pkg/sub/c.py": "from .. import a\n", "pkg/b.py": "from . import a\nimport pkg.sub\n"})
    assert check_tree(TABLE, mods) == []
