"""The package's layout: modules import each other in one direction only (no circle, function-level imports
included), so that each concept can be read, tested and replaced from the bottom up."""

from __future__ import annotations

import ast

from helpers import REPO_ROOT

PACKAGE = REPO_ROOT / "custom"


def _module_name(path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """``module -> modules of the package it imports`` (anywhere in the file), from the source alone."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                # a package's __init__ importing its own modules is how it exports them, not a dependency
                if target and target != name and not (path.name == "__init__.py" and target.startswith(name + ".")):
                    graph[name].add(target)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_cycle_finder_finds_a_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_the_package_imports_without_a_circle():
    graph = import_graph()
    assert graph["custom.data"] >= {"custom.io", "custom.cases"}  # the graph sees what the files import
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_lowest_layers_import_nothing_of_the_package_above_them():
    graph = import_graph()
    assert graph["custom.cases"] == set() and graph["custom.seeding"] == set()
    assert graph["custom.window"] == set()
    # the predictor does not pull in datalists, samplers or the bundle's transforms
    reached, todo = set(), ["custom.predictor"]
    while todo:
        for nxt in graph[todo.pop()] - reached:
            reached.add(nxt)
            todo.append(nxt)
    assert not reached & {
        "custom.data",
        "custom.transforms",
        "custom.engines",
        "custom.evaluation",
        "custom.reports",
    }, reached
