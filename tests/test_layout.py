"""The house rules a newcomer relies on: no import cycle in pipeline/, small modules, thin stages,
and an ARCHITECTURE.md that names every module there is."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    mods = {}
    for p in sorted((REPO / "pipeline").rglob("*.py")):
        name = ".".join(p.relative_to(REPO).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = p
    return mods


def _imported(path: Path, mods: dict[str, Path]) -> set[str]:
    """The pipeline modules `path` imports, lazy imports inside functions included."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                full = f"{node.module}.{a.name}"
                out.add(full if full in mods else node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return {m for m in out if m in mods and m != "pipeline"}


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), or self-imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in edges.get(v, ()):
                cycles.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return cycles


def test_find_cycles_sees_a_cycle_and_no_false_one():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_pipeline_has_no_import_cycle():
    mods = _modules()
    edges = {m: _imported(p, mods) - {m} for m, p in mods.items()}
    assert not find_cycles(edges)


def test_no_module_over_500_lines():
    long = {str(p.relative_to(REPO)): n for p in [*(REPO / "pipeline").rglob("*.py"),
                                                 *(REPO / "stages").glob("*.py")]
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these modules (> {MAX_LINES} lines): {long}"


def test_stages_are_thin_entry_points():
    for path in sorted((REPO / "stages").glob("*.py")):
        if path.stem in ("__init__", "cli"):
            continue
        tree = ast.parse(path.read_text())
        defs = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
        assert defs == ["run"], f"{path.name} defines {defs}: a stage only builds on run(cfg)"
        body = next(n for n in tree.body if isinstance(n, ast.FunctionDef)).body
        calls = [n for n in ast.walk(ast.Module(body=body, type_ignores=[]))
                 if isinstance(n, ast.Call)]
        assert len(calls) == 1, f"{path.name}: run(cfg) should call one library function"


def test_architecture_names_every_module_and_only_those():
    text = (REPO / "ARCHITECTURE.md").read_text()
    named = set(re.findall(r"`((?:pipeline|stages)/[\w/]+\.py)`", text))
    actual = {str(p.relative_to(REPO)) for d in ("pipeline", "stages")
              for p in (REPO / d).rglob("*.py") if p.name != "__init__.py"}
    assert actual - named == set(), f"ARCHITECTURE.md does not describe {sorted(actual - named)}"
    assert named - actual == set(), f"ARCHITECTURE.md names missing modules {sorted(named - actual)}"
