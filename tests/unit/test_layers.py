"""The package's import graph: no cycles, and every import runs down the layers.

Layers, bottom to top (DESIGN.md, "Layers"): errors and the version; runtime helpers (devices,
progress, specs, the Dask cluster); config; data (items, hashes, views, sequences); the store
(format, codecs, location, writer); the losses; the stages (builder, trainer, tools), which never
import each other; and the face (the package root, the CLI). A module may import modules of its own
package or of a lower layer. Imports inside functions and under TYPE_CHECKING count too: a lazy
import that runs upward is still a cycle waiting to happen.

Run as a script (`python tests/unit/test_layers.py`) it prints the module and edge counts.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "softcache"

LAYERS = {
    "softcache._version": 0,
    "softcache.errors": 0,
    "softcache.runtime": 1,
    "softcache.config": 2,
    "softcache.data": 3,
    "softcache.store": 4,
    "softcache.losses": 5,
    "softcache.builder": 6,
    "softcache.trainer": 6,
    "softcache.tools": 6,
    "softcache.cli": 7,
    "softcache": 7,  # the package root: the names users import
}


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports(path: Path, known: set[str]) -> set[str]:
    """The package modules a file imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from softcache.x import y`: y may be a submodule or a name in x.
            names = [
                f"{node.module}.{alias.name}"
                if f"{node.module}.{alias.name}" in known
                else node.module
                for alias in node.names
            ]
        else:
            continue
        found.update(n for n in names if n in known)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports(path, known) - {name} for name, path in mods.items()}


def layer_of(module: str) -> tuple[str, int]:
    """The layer a module sits in, by its longest matching prefix."""
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return best, LAYERS[best]


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_every_module_has_a_layer() -> None:
    for module in modules():
        assert any(module == p or module.startswith(p + ".") for p in LAYERS), module


def test_the_import_graph_has_no_cycles() -> None:
    assert cycles(graph()) == []


def test_imports_run_down_the_layers() -> None:
    wrong = []
    for module, targets in graph().items():
        package, level = layer_of(module)
        for target in targets:
            target_package, target_level = layer_of(target)
            if target_package == package and package != "softcache":
                continue  # inside one package (acyclic, by the test above)
            if target_level >= level:
                wrong.append(f"{module} (layer {level}) imports {target} (layer {target_level})")
    assert wrong == []


def test_the_checker_sees_an_upward_import(tmp_path: Path) -> None:
    """The checks above can fail: a store module importing the trainer is caught."""
    edges = {"softcache.store.format": {"softcache.trainer.loop"}, "softcache.trainer.loop": set()}
    assert layer_of("softcache.store.format")[1] < layer_of("softcache.trainer.loop")[1]
    edges["softcache.trainer.loop"] = {"softcache.store.format"}
    assert cycles(edges) == [["softcache.store.format", "softcache.trainer.loop"]]


if __name__ == "__main__":
    g = graph()
    print(f"{len(g)} modules, {sum(len(t) for t in g.values())} import edges, cycles: {cycles(g)}")
