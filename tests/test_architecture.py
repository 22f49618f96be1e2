"""The package's layers: no import cycles, and no module imports one above its layer.

Read from the source (function-local imports included), so the picture in
docs/architecture.md stays true. A new module needs a place in ``LAYERS``.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "hpcstain"

# layer → module-name prefixes (the longest matching prefix decides); lower imports nothing above
LAYERS: dict[int, tuple[str, ...]] = {
    0: ("hpcstain", "hpcstain.errors", "hpcstain.atomic", "hpcstain.config", "hpcstain.geometry",
        "hpcstain.scratch", "hpcstain.device"),
    1: ("hpcstain.ct", "hpcstain.tiles", "hpcstain.checkpoint", "hpcstain.phantom",
        "hpcstain.data.readers", "hpcstain.data.augment", "hpcstain.data.toy",
        "hpcstain.metrics"),
    2: ("hpcstain.data", "hpcstain.models", "hpcstain.metrics.volume", "hpcstain.metrics.tissue"),
    3: ("hpcstain.inference",),
    4: ("hpcstain.train", "hpcstain.predict", "hpcstain.volume"),
    5: ("hpcstain.evaluate", "hpcstain.score", "hpcstain.morph", "hpcstain.status",
        "hpcstain.info", "hpcstain.view"),
    6: ("hpcstain.executors", "hpcstain.launch", "hpcstain.demo"),
    7: ("hpcstain.cli",),
}


def module_names() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module → the package's modules it imports (a ``from pkg import submodule`` counts as
    the submodule; names from a package's ``__init__`` count as the package)."""
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            found: list[str] = []
            if isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                subs = [f"{node.module}.{a.name}" for a in node.names]
                found = [s for s in subs if s in modules]
                if len(found) < len(subs):
                    found.append(node.module)
            edges[name] |= {m for m in found if m in modules and m != name}
    return edges


def layer_of(module: str) -> int:
    best, layer = -1, -1
    for n, prefixes in LAYERS.items():
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, layer = len(p), n
    return layer


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    return out


def test_every_module_has_a_layer():
    missing = [m for m in module_names() if layer_of(m) < 0]
    assert not missing, f"modules without a layer in LAYERS: {missing}"


def test_no_import_cycles():
    assert cycles(imports(module_names())) == []


def test_no_module_imports_a_layer_above_its_own():
    edges = imports(module_names())
    upward = sorted(f"{a} ({layer_of(a)}) -> {b} ({layer_of(b)})"
                    for a, targets in edges.items() for b in targets
                    if layer_of(b) > layer_of(a))
    assert upward == []


def test_the_checker_sees_cycles_and_upward_imports():
    edges = {"hpcstain.ct.levels": {"hpcstain.volume.io"},
             "hpcstain.volume.io": {"hpcstain.ct.levels"}}
    assert cycles(edges) == [["hpcstain.ct.levels", "hpcstain.volume.io"]]
    assert layer_of("hpcstain.volume.io") > layer_of("hpcstain.ct.levels")
    assert layer_of("hpcstain.metrics.volume") == 2 and layer_of("hpcstain.metrics.frc") == 1
