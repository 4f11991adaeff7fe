"""Imports point downward only: the layers below the engine (attacks, models, data, methods) never import the
engine, the config checking, the CLI or the package face, and no module imports one that imports it back."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import REPO

PACKAGE = REPO / "advtrain"
LOWER = ("advtrain.attacks", "advtrain.models", "advtrain.data", "advtrain.methods")
UPPER = ("advtrain.engine", "advtrain.config", "advtrain.cli", "advtrain.hydra_errors")


def _module(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the advtrain modules it imports, anywhere in its code (lazy imports in functions count too)."""
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from .x import y
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                # `from pkg import sub` imports the submodule when there is one
                subs = {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules}
                targets |= subs or {base}
        graph[name] = {t for t in targets if t == "advtrain" or t.startswith("advtrain.")} - {name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_lower_layers_never_import_the_engine_config_cli_or_package_face():
    bad = sorted((m, t) for m, targets in import_graph().items() if m.startswith(LOWER) for t in targets
                 if t == "advtrain" or t.startswith(UPPER))
    assert bad == []


def test_there_are_no_import_cycles():
    assert _cycle(import_graph()) is None


def test_the_graph_sees_lazy_and_relative_imports():
    graph = import_graph()
    assert "advtrain.methods" in graph["advtrain.config"]  # a lazy import inside a function
    assert "advtrain.attacks.geometry" in graph["advtrain.attacks.autoattack"]  # from .geometry import ...
    with pytest.raises(AssertionError):
        assert _cycle({"a": {"b"}, "b": {"a"}}) is None
