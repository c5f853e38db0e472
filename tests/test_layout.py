"""The package's shape (docs/design.md): no import cycle (counting imports inside functions too), the layering
rules that keep the data and model layers independent, and no module over ~400 lines."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "jaxtl"


def _module(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """jaxtl module -> the jaxtl modules it imports anywhere in its file (``from jaxtl import x`` counts as
    ``jaxtl.x`` when that is a module); a submodule import also depends on its package's ``__init__``."""
    modules = {_module(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jaxtl"):
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.startswith("jaxtl")]
            for name in names:
                while name and name not in modules:
                    name = name.rpartition(".")[0]
                if name and name not in (mod, "jaxtl") and not mod.startswith(name + "."):  # not its own package
                    graph[mod].add(name)
                    package = name.rpartition(".")[0]
                    if package in modules and package not in ("jaxtl", mod) and not mod.startswith(package + "."):
                        graph[mod].add(package)
    return graph


def test_no_import_cycle():
    graph, state, stack = import_graph(), {}, []

    def visit(m: str) -> None:
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)


SHARED_LEAF = "jaxtl.device_augment"  # the batch-transform contract between the pipeline and the step: pure JAX


def test_layers():
    graph = import_graph()
    assert not graph[SHARED_LEAF], f"{SHARED_LEAF} must import nothing of jaxtl (data and train both use it)"
    for mod, deps in graph.items():
        if mod.startswith(("jaxtl.data", "jaxtl.models")):
            outside = {d for d in deps if not d.startswith(mod.split(".")[0] + "." + mod.split(".")[1])}
            outside.discard(SHARED_LEAF)
            assert not outside, f"{mod} imports {outside}: the data and model layers import nothing else of jaxtl"
        if mod not in ("jaxtl.ablation", "jaxtl.main", "jaxtl.learner"):
            assert "jaxtl.learner" not in deps, f"{mod} imports the Learner facade"
    assert graph["jaxtl.loop"] <= {"jaxtl.metrics", "jaxtl.progress"}
    assert graph["jaxtl.train"] <= {"jaxtl.metrics", "jaxtl.mix", "jaxtl.ema", SHARED_LEAF}
    assert not graph["jaxtl.ema"], "jaxtl.ema (the weights' moving average) is pure JAX + optax"
    assert not graph["jaxtl.mix"], "jaxtl.mix (the step's regularisation) is pure JAX + optax"


def test_no_module_over_about_400_lines():
    long = {str(p.relative_to(PKG.parent)): n for p in PKG.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 410}
    assert not long, long
