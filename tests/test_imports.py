"""The import graph of app/, worker/ and cli/, read with `ast`: no module imports itself
back at import time, and app/ imports nothing from worker/ but the Celery handle."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("app", "worker", "cli")
# The light handle the API sends tasks with; everything else of worker/ may import torch.
APP_MAY_IMPORT_FROM_WORKER = {"worker.celery_app"}


def module_names() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imports(tree: ast.Module, modules: dict[str, Path], *, top_level_only: bool) -> set[str]:
    """The project's modules that `tree` imports: `from a.b import c` is `a.b.c` when c is
    a module, else `a.b`. With `top_level_only`, not the imports inside functions, which
    run when called (to keep torch out of a process), not when the module is imported."""
    nodes = _import_time_nodes(tree) if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in modules else node.module)
    return {name for name in found if name.split(".")[0] in PACKAGES}


def _import_time_nodes(node: ast.AST) -> Iterator[ast.AST]:
    """The nodes that run when the module is imported: all but the bodies of functions."""
    yield node
    for child in ast.iter_child_nodes(node):
        if not isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            yield from _import_time_nodes(child)


def graph(*, top_level_only: bool) -> dict[str, set[str]]:
    modules = module_names()
    return {
        name: imports(ast.parse(path.read_text()), modules, top_level_only=top_level_only)
        for name, path in modules.items()
    }


def cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph, as a path that starts and ends at the same module."""
    done: set[str] = set()
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        if module in path:
            return [*path[path.index(module) :], module]
        if module in done:
            return None
        path.append(module)
        for imported in sorted(edges.get(module, ())):
            if found := visit(imported):
                return found
        path.pop()
        done.add(module)
        return None

    for module in sorted(edges):
        if found := visit(module):
            return found
    return None


def test_no_module_imports_itself_back_at_import_time() -> None:
    edges = graph(top_level_only=True)
    assert len(edges) > 100  # the walk found the packages
    assert cycle(edges) is None


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_app_imports_nothing_from_worker_but_the_celery_handle() -> None:
    edges = graph(top_level_only=False)  # an import inside a function counts too
    from_worker = {
        (module, imported)
        for module, imported_modules in edges.items()
        if module.split(".")[0] == "app"
        for imported in imported_modules
        if imported.split(".")[0] == "worker" and imported not in APP_MAY_IMPORT_FROM_WORKER
    }
    assert from_worker == set()
