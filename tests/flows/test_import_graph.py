"""flows/ has no import circle: every import statement of flows/*.py (at module level, inside
functions, under TYPE_CHECKING) is read; the command modules (flows/*_cli.py) import
flows/cli_common.py and lower layers, never flows/cli.py; tasks/corpus/ imports no flows."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _imports(path: Path, package: str) -> set[str]:
    """Every module name an import statement of the file names (`from a import b`: a and a.b)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([base] if base else [])])
            out |= {base} | {f"{base}.{a.name}" for a in node.names}
    return out


def _flows_graph() -> dict[str, set[str]]:
    modules = {f"flows.{p.stem}": p for p in (ROOT / "flows").glob("*.py")}
    return {m: (_imports(p, "flows") & modules.keys()) - {m} for m, p in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    state: dict[str, int] = {}
    found: list[list[str]] = []

    def visit(v: str, path: list[str]) -> None:
        state[v] = 1
        path.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                found.append([*path[path.index(w) :], w])
            elif w not in state:
                visit(w, path)
        path.pop()
        state[v] = 2

    for v in sorted(graph):
        if v not in state:
            visit(v, [])
    return found


def test_flows_has_no_import_circle():
    graph = _flows_graph()
    assert graph.get("flows.cli")  # the graph was read
    assert _cycles(graph) == []


def test_command_modules_never_import_the_command_line():
    graph = _flows_graph()
    commands = [m for m in graph if m.endswith("_cli") or m == "flows.cli_common"]
    assert [m for m in commands if "flows.cli" in graph[m]] == []


def test_the_corpus_tasks_import_no_flows():
    for path in (ROOT / "tasks" / "corpus").glob("*.py"):
        names = _imports(path, "tasks.corpus")
        assert not [n for n in names if n == "flows" or n.startswith("flows.")], path
