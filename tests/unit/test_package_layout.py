"""The package's shape, checked from its source: no import cycles, Prefect only in the entry points, short
functions. Lazy and TYPE_CHECKING imports count: they are how a cycle hides."""

from __future__ import annotations

import ast
import pickle
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "flywheel"
ENTRY_POINTS = "flywheel.app"  # the command line and the webhook app: the only library code that may use Prefect
PREFECT = {"prefect", "prefect_dask", "flows"}  # flows/ is the Prefect layer
MAX_FUNCTION_LINES = 60
GENERATED = ("catalog/migrations/versions/",)  # alembic revisions: the schema as data, written once


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _imported_names(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every module an import statement anywhere in the file refers to: `from a import b` is a.b when that is a
    module, else a."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            names.update(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names)
    return names


def import_graph() -> dict[str, set[str]]:
    """flywheel module -> the flywheel modules it imports."""
    modules = _modules()

    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        targets = {owner(n) for n in _imported_names(module, path, modules) if n.startswith("flywheel")}
        graph[module] = {t for t in targets if t is not None and t != module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while (top := stack.pop()) != node:
                component.append(top)
            if component:
                found.append(sorted([node, *component]))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_the_library_has_no_import_cycle() -> None:
    graph = import_graph()
    assert {"flywheel.catalog", "flywheel.insight.after_round"} <= graph["flywheel.loop.round"]  # the walk sees imports
    assert cycles(graph) == []


def test_the_cycle_finder_finds_one() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_only_the_entry_points_import_prefect() -> None:
    modules = _modules()
    offenders = {
        module: sorted(n for n in _imported_names(module, path, modules) if n.split(".")[0] in PREFECT)
        for module, path in modules.items()
        if not (module == ENTRY_POINTS or module.startswith(ENTRY_POINTS + "."))
    }
    assert {module: names for module, names in offenders.items() if names} == {}


def test_no_function_is_longer_than_a_screen() -> None:
    long = []
    for path in PACKAGE.rglob("*.py"):
        if any(part in path.as_posix() for part in GENERATED):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                first = node.decorator_list[0].lineno if node.decorator_list else node.lineno
                if (lines := (node.end_lineno or first) - first + 1) > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({lines} lines)")
    assert long == []


def test_models_pickled_under_the_old_module_names_still_load() -> None:
    """Versions registered before the package was split pickled their classes as flywheel.backbones.*: a pickle
    names a class by module and name, and protocol 0 writes both as plain text."""
    from flywheel.features.backbones import Classifier
    from flywheel.registry import tracking

    blob = pickle.dumps(Classifier, protocol=0)
    old = blob.replace(b"flywheel.features.backbones", b"flywheel.backbones")
    assert old != blob
    sys.modules.pop("flywheel.backbones", None)
    with pytest.raises(ModuleNotFoundError):
        pickle.loads(old)
    tracking._alias_moved_modules()
    assert pickle.loads(old) is Classifier
