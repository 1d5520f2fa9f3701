"""The import graph of `harness` and `analysis` has no cycles, and the analysis imports of the harness only
its run contract and hypothesis model.

Nodes are modules (a package is its `__init__`). An edge A -> B is an import A makes anywhere in its file, at
module level or inside a function; only an `if TYPE_CHECKING:` block is left out, as it never runs. `import B`
gives A -> B; `from B import x` gives A -> B.x when B.x is a module, else A -> B. Parent packages that Python
imports first are not edges of their own: a package's `__init__` importing its submodules is then a cycle only
when one of those submodules leads back to it by explicit imports. Relative imports are resolved.
"""
from __future__ import annotations

import ast
from collections.abc import Collection
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("harness", "analysis")
# What the analysis may import of the harness: the shared run contract and the hypothesis model, no more.
ANALYSIS_MAY_IMPORT = {"harness.contract", "harness.hypothesis"}


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Every Import / ImportFrom node that can run, skipping the bodies of `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _known(name: str, modules: Collection[str]) -> str | None:
    """The longest prefix of a dotted name that is one of our modules."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in modules:
            return ".".join(parts[:n])
    return None


def _targets(module: str, is_package: bool, code: str, modules: Collection[str]) -> set[str]:
    """The modules among `modules` that the source `code` of `module` imports."""
    package = module if is_package else module.rpartition(".")[0]
    found: set[str | None] = set()
    for node in _imports(ast.parse(code)):
        if isinstance(node, ast.Import):
            found.update(_known(alias.name, modules) for alias in node.names)
            continue
        source = node.module or ""
        if node.level:
            parts = package.split(".")
            source = ".".join(parts[:len(parts) - (node.level - 1)] + ([node.module] if node.module else []))
        found.update(f"{source}.{a.name}" if f"{source}.{a.name}" in modules else _known(source, modules)
                     for a in node.names)
    return {t for t in found if t is not None and t != module}


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _targets(m, path.name == "__init__.py", path.read_text(), modules) for m, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def _path_within(graph: dict[str, set[str]], component: list[str]) -> str:
    """One concrete cycle inside a component, for the failure message: a -> b -> ... -> a."""
    members = set(component)
    start = component[0]
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for child in sorted(graph[node] & members):
                if child == start:
                    chain = [node]
                    while chain[-1] != start:
                        chain.append(parents[chain[-1]])
                    return " -> ".join([start, *reversed(chain[:-1]), start])
                if child not in parents:
                    parents[child] = node
                    nxt.append(child)
        frontier = nxt
    return " -> ".join(component)


def test_edges_cover_function_level_relative_and_submodule_imports():
    modules = {"pkg", "pkg.a", "pkg.b", "pkg.sub", "pkg.sub.c", "pkg.sub.d", "pkg.typed"}
    code = """
import json
import pkg.sub.c
from .. import b
from ..sub import d
from pkg.sub import name_in_init
if TYPE_CHECKING:
    from pkg import typed
def f():
    from pkg.a import thing
"""
    assert _targets("pkg.sub.e", False, code, modules) == {"pkg.sub.c", "pkg.b", "pkg.sub.d", "pkg.sub", "pkg.a"}
    assert _targets("pkg.sub", True, "from . import c", modules) == {"pkg.sub.c"}
    graph = import_graph()
    assert "harness.tracking" in graph["harness.job"]  # imported inside run_job only
    assert "harness.objectives.registry" in graph["harness.objectives"]


def test_cycle_detector_names_the_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _path_within(graph, ["a", "b", "c"]) == "a -> b -> c -> a"


def test_no_import_cycles():
    graph = import_graph()
    cycles = _cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(
        f"  {_path_within(graph, c)}  (component: {', '.join(c)})" for c in cycles)


def test_analysis_imports_only_the_contract_of_the_harness():
    graph = import_graph()
    used = {(m, t) for m, targets in graph.items() if m.split(".")[0] == "analysis"
            for t in targets if t.split(".")[0] == "harness"}
    extra = sorted(f"{m} -> {t}" for m, t in used if t not in ANALYSIS_MAY_IMPORT)
    assert not extra, f"analysis may import only {sorted(ANALYSIS_MAY_IMPORT)} of the harness: {extra}"
    # What those modules import in turn comes along too: they must stay free of the rest of the harness.
    for allowed in ANALYSIS_MAY_IMPORT:
        assert {t for t in graph[allowed] if t.split(".")[0] == "harness"} <= ANALYSIS_MAY_IMPORT, allowed
