"""suites/ in layers: every import between its modules (at the top of a file or inside a function) goes down,
never up, and no two modules import each other, however indirectly.

    core      plumbing: cli, files, dtypes, patching, records, registry, profiles, selection
    train     model, data and training building blocks                 (imports core)
    measure   meters, memory estimates, dispatch counts, timing       (imports core, train)
    evaluate  the suites' tasks and the code sandbox                   (imports core, train, measure)
    launch    one training run (recipe), its process, sweeps           (imports all of the above)
    entry     the `python -m suites.X` modules at the top of suites/   (import anything, imported by none
              of the layers) """

from __future__ import annotations

import ast
from pathlib import Path

SUITES = Path(__file__).resolve().parent.parent / "suites"
LAYERS = ("core", "train", "measure", "evaluate", "launch")
ENTRY = len(LAYERS)


def modules(root: Path = SUITES) -> dict[str, Path]:
    """Dotted name -> file of every module under suites/ (a package is its __init__.py)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = ("suites", *path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _known(name: str, mods: dict) -> str | None:
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def imports(name: str, path: Path, mods: dict) -> set[str]:
    """The modules of suites/ that `name` imports anywhere in its file (functions included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(_known(a.name, mods) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package
                for _ in range(node.level - 1):
                    anchor = anchor.rpartition(".")[0]
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in mods else _known(base, mods))
    found.discard(None)
    found.discard(name)
    return found


def graph(root: Path = SUITES) -> dict[str, set[str]]:
    mods = modules(root)
    return {name: imports(name, path, mods) for name, path in mods.items()}


def layer(name: str) -> int | None:
    """The rank of a module's layer: 0 (core) .. 4 (launch), 5 for an entry point; None for suites itself."""
    parts = name.split(".")
    if len(parts) == 1:
        return None
    if parts[1] in LAYERS:
        return LAYERS.index(parts[1])
    return ENTRY


def cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def violations(edges: dict[str, set[str]]) -> list[str]:
    """Imports that go up the layers, or from a layer into an entry point."""
    bad = []
    for src, targets in edges.items():
        for dst in targets:
            a, b = layer(src), layer(dst)
            if a is None or b is None or a == ENTRY:
                continue
            if b > a:
                what = "an entry point" if b == ENTRY else f"layer {LAYERS[b]}"
                bad.append(f"{src} ({LAYERS[a]}) imports {dst}, {what}")
    return sorted(bad)


def test_every_module_is_in_a_layer():
    names = [n for n in modules() if n != "suites"]
    assert names
    for name in names:
        parts = name.split(".")
        assert len(parts) == 2 or parts[1] in LAYERS, f"{name}: a package of suites/ that is no layer"


def test_the_graph_sees_imports_inside_functions():
    edges = graph()
    assert "suites.launch.runs" in edges["suites.launch.launchers"]  # a lazy import inside a method


def test_no_import_circle():
    assert cycle(graph()) is None, " -> ".join(cycle(graph()))


def test_imports_go_down_the_layers():
    assert violations(graph()) == []


def test_the_checks_catch_a_circle_and_an_upward_import():
    edges = graph()
    edges["suites.core.files"] = edges["suites.core.files"] | {"suites.core.records"}  # records imports files
    assert cycle(edges) is not None
    edges = graph()
    edges["suites.train.models"] = edges["suites.train.models"] | {"suites.measure.meters", "suites.run"}
    assert violations(edges) == ["suites.train.models (train) imports suites.measure.meters, layer measure",
                                 "suites.train.models (train) imports suites.run, an entry point"]
