"""The import graph of src/kdad: no circles, and no module imports from a layer above its own.

Every `import` counts, also the ones inside functions (they run too, only later); imports under
`if TYPE_CHECKING:` do not (they never run). Read from the source with `ast`, nothing is imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# Lowest first. A module may import from its own layer or any layer below. A module belongs to the layer of the
# longest prefix that names it (kdad.data.factory is "config", the other kdad.data modules are "parts").
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("kdad", "kdad.errors", "kdad.dicts", "kdad.fileio", "kdad.formats", "kdad.seed", "kdad.hardware",
              "kdad.distributed")),
    ("leaves", ("kdad.weights", "kdad.metrics", "kdad.data.transforms", "kdad.visualize", "kdad.augment")),
    ("parts", ("kdad.thresholds", "kdad.blocks", "kdad.synthesis", "kdad.data", "kdad.presets")),
    ("methods", ("kdad.methods", "kdad.gate")),
    ("config", ("kdad.config", "kdad.tiling", "kdad.align", "kdad.data.factory")),
    ("bundle", ("kdad.checkpoint", "kdad.export")),
    ("deploy", ("kdad.deploy",)),
    # applications, and the old homes of moved names (kdad.runner, kdad.infer, kdad.predict re-export kdad.deploy)
    ("apps", ("kdad.evaluate", "kdad.prediction_metrics", "kdad.calibrate", "kdad.feedback", "kdad.report",
              "kdad.speed", "kdad.train", "kdad.demo", "kdad.cli", "kdad.serve", "kdad.runner", "kdad.infer",
              "kdad.predict")),
]


def _modules() -> dict[str, tuple[Path, bool]]:
    """Dotted name -> (file, is a package __init__)."""
    out = {}
    for path in sorted((SRC / "kdad").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return out


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the nodes inside `if TYPE_CHECKING:` blocks."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def import_graph() -> dict[str, set[str]]:
    """Module -> the kdad modules it imports (`from pkg import sub` counts as importing pkg.sub)."""
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for name, (path, is_pkg) in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        skip = _type_checking_nodes(tree)
        deps: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.split(".")[0] == "kdad")
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.split(".")[0] != "kdad":
                    continue
                for a in node.names:
                    sub = f"{target}.{a.name}"
                    deps.add(sub if sub in mods else target)
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


def layer_of(module: str) -> int:
    best, best_len = -1, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            inside = module == p or (p != "kdad" and module.startswith(p + "."))  # "kdad": the package itself
            if inside and len(p) > best_len:
                best, best_len = i, len(p)
    return best


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_module_has_a_layer() -> None:
    missing = [m for m in _modules() if layer_of(m) < 0]
    assert not missing, f"add these modules to a layer in tests/test_imports.py: {missing}"


def test_no_import_circles() -> None:
    assert _cycles(import_graph()) == []


def test_no_upward_imports() -> None:
    graph = import_graph()
    upward = sorted(f"{m} ({LAYERS[layer_of(m)][0]}) imports {d} ({LAYERS[layer_of(d)][0]})"
                    for m, deps in graph.items() for d in deps if layer_of(d) > layer_of(m))
    assert upward == []


def test_config_helpers_import_nothing_but_errors() -> None:
    """Method modules build their nested Configs with kdad.dicts, so it must stay below them."""
    assert import_graph()["kdad.dicts"] <= {"kdad.errors"}


def test_the_checker_sees_a_circle_and_an_upward_import() -> None:
    graph = {"kdad.a": {"kdad.b"}, "kdad.b": {"kdad.a"}, "kdad.c": set()}
    assert _cycles(graph) == [["kdad.a", "kdad.b"]]
    assert layer_of("kdad.train") > layer_of("kdad.methods.rd") > layer_of("kdad.blocks.maps")
    assert layer_of("kdad.data.factory") > layer_of("kdad.data.mvtec")
