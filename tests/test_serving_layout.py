"""The serving package's layers: the core knows no frontend, the frontends know the core but
not each other or the module that composes them, and no module imports in a circle.

Read from the source (every import statement, at module level or inside functions);
imports under `if TYPE_CHECKING:` are for annotations only and are not followed.
"""

from __future__ import annotations

import ast
import pathlib

SERVING = pathlib.Path(__file__).resolve().parent.parent / "serving"
FRONTENDS = {"grpc_service", "rest", "rest_json", "lazy_json", "http_server"}
COMPOSERS = {"server", "cli", "bench", "demo", "client"}  # build on core and frontends


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(path: pathlib.Path) -> set[str]:
    """Sibling modules of the serving package that `path` imports at run time."""
    names: set[str] = set()
    modules = {p.stem for p in SERVING.glob("*.py")}

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level == 1 and not base:
                    names.update(a.name for a in child.names if a.name in modules)
                elif child.level == 1:
                    names.add(base.split(".")[0])
                elif base.startswith("keras_hps.serving."):
                    names.add(base.split(".")[2])
                elif base == "keras_hps.serving":
                    names.update(a.name for a in child.names if a.name in modules)
            elif isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.startswith("keras_hps.serving."):
                        names.add(alias.name.split(".")[2])
            visit(child)

    visit(ast.parse(path.read_text()))
    return names & modules - {path.stem}


def _graph() -> dict[str, set[str]]:
    return {p.stem: _imports(p) for p in SERVING.glob("*.py") if p.stem != "__init__"}


def test_the_core_imports_no_frontend():
    graph = _graph()
    core = set(graph) - FRONTENDS - COMPOSERS
    assert "core" in core and "manager" in core and "inference" in core
    for module in sorted(core):
        assert not graph[module] & (FRONTENDS | COMPOSERS), (module, graph[module])


def test_frontends_know_the_core_only():
    graph = _graph()
    for frontend in FRONTENDS:
        assert not graph[frontend] & COMPOSERS, (frontend, graph[frontend])
    assert not graph["grpc_service"] & {"rest", "rest_json"}
    assert {"grpc_service", "rest", "core"} <= graph["server"]  # the one place they meet


def test_no_import_circle():
    graph = _graph()
    state: dict[str, int] = {}

    def walk(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError(" -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                walk(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            walk(module, [module])
