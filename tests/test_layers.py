"""The import graph, read from every import statement (module level, inside functions, under
TYPE_CHECKING): layers import one way, data_contracts < models < tasks < flows, and no module
reaches itself through its imports."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("data_contracts", "models", "tasks", "flows")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in LAYERS:
        for f in sorted((REPO / pkg).rglob("*.py")):
            parts = f.relative_to(REPO).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> dict[str, int]:
    """Our modules `name` imports (each with the line of one statement that does)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            targets = [base, *(f"{base}.{a.name}" for a in node.names)]
        else:
            continue
        for t in targets:
            # `import tasks.faces.crop` names tasks and tasks.faces too: the longest known wins.
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.setdefault(t, node.lineno)
    return found


def _graph() -> dict[str, dict[str, int]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_layers_import_downward_only():
    layer = {pkg: i for i, pkg in enumerate(LAYERS)}
    upward = [
        f"{a} (line {line}) imports {b}"
        for a, deps in _graph().items()
        for b, line in deps.items()
        if layer[b.split(".")[0]] > layer[a.split(".")[0]]
    ]
    assert upward == [], "imports against the layers:\n" + "\n".join(upward)


def test_the_import_graph_has_no_cycle():
    graph = _graph()
    cycles, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join([*stack[stack.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert cycles == [], "import cycles:\n" + "\n".join(cycles)


def test_the_checker_sees_imports_inside_functions(tmp_path):
    """The guard reads function bodies and TYPE_CHECKING blocks, not only module-level lines."""
    f = tmp_path / "probe.py"
    f.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from flows.plan import ExtractionPlan\n"
        "def f():\n    from flows.extract import extract_flow\n    import flows.config\n"
    )
    modules = {"tasks.probe": f, "flows.plan": f, "flows.extract": f, "flows.config": f}
    assert set(_imports("tasks.probe", f, modules)) == {
        "flows.plan",
        "flows.extract",
        "flows.config",
    }
