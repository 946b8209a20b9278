"""The package's layers: the core (attention contract, dispatch, backends, kernels' Python side)
imports nothing from the applications built on it, and its import graph -- imports inside
functions included -- has no cycle."""
import ast
from pathlib import Path

import hybrid_kernels

PKG = Path(hybrid_kernels.__file__).resolve().parent
CORE = {"api", "pattern", "score_mods", "backend_base", "dispatch", "ops", "reference", "quant",
        "backends", "triton_kernels", "validation", "fast_path"}
APPLICATIONS = {"nn", "integrations", "models", "streaming", "retrieval", "rag", "training",
                "distributed", "domains", "service", "diffusion", "cascade", "bench", "cli",
                "int8_cache", "rag_plots", "reader_cascade", "__main__"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path):
    """Modules (relative to the package) that ``path`` imports, at any depth of the file."""
    name = _module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            base = package[: len(package) - (node.level - 1)]
            target = base + (node.module.split(".") if node.module else [])
            if node.module:
                yield ".".join(target)
            else:  # from . import x
                for alias in node.names:
                    yield ".".join(target + [alias.name])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hybrid_kernels."):
            yield node.module[len("hybrid_kernels."):]


def _top(module: str) -> str:
    return module.split(".")[0]


def _core_graph():
    graph = {}
    for path in PKG.rglob("*.py"):
        name = _module_name(path)
        if name and _top(name) in CORE:
            graph[name] = {m for m in _imports(path) if not m.startswith("_C_")}
    return graph


def test_every_module_has_a_layer():
    """A new top-level module or package says which layer it belongs to (this file's sets)."""
    tops = {_top(_module_name(p)) for p in PKG.rglob("*.py") if _module_name(p)}
    assert not tops - CORE - APPLICATIONS, f"modules in no layer: {sorted(tops - CORE - APPLICATIONS)}"


def test_core_never_imports_the_applications():
    bad = {(name, m) for name, deps in _core_graph().items() for m in deps if _top(m) in APPLICATIONS}
    assert not bad, f"core modules importing application modules: {sorted(bad)}"


def test_core_import_graph_has_no_cycle():
    graph = _core_graph()
    modules = set(graph)

    def resolve(m):  # "backends.cpu" or a name imported from a package ("backends" -> itself)
        while m and m not in modules:
            m = m.rpartition(".")[0]
        return m or None

    edges = {n: {r for r in map(resolve, deps) if r and r != n} for n, deps in graph.items()}
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(edges[n]):
            if state.get(m) == "open":
                cycle = stack[stack.index(m):] + [m]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if m not in state:
                visit(m)
        stack.pop()
        state[n] = "done"

    for n in sorted(edges):
        if n not in state:
            visit(n)
