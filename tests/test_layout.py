"""The package's import graph, read from the source (AST), function-level imports included.

The layout is the pipeline: each subpackage sits on a floor and imports only its own modules and
floors below it, so a reader finds a stage by its folder and nothing low depends on anything high.
"""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "streamfold"

# floor of each top-level part of the package; "" is the face (cli, convert, inspect, demo, __main__)
FLOORS = {"core": 0, "quant": 1, "rules": 1, "planning": 2, "check": 3, "hub": 3, "card": 4, "run": 5, "": 6, "derive": 6}
MAX_LINES = 400
RUNTIME_THIRD_PARTY = {"numpy", "ml_dtypes", "safetensors", "huggingface_hub", "tqdm", "ray", "tomllib"}


def _modules() -> dict[str, Path]:
    mods = {}
    for p in sorted(PKG.rglob("*.py")):
        parts = p.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = p
    return mods


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES.get(name, Path()).name == "__init__.py"


def _imports(name: str, path: Path) -> list[tuple[str, int]]:
    """The streamfold modules ``name`` imports, with line numbers (a name imported from a package's
    ``__init__`` counts as importing that ``__init__``)."""
    here = name if _is_package(name) else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "streamfold"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "streamfold":
                continue
            for a in node.names:
                sub = f"{mod}.{a.name}"
                out.append((sub if sub in MODULES else mod, node.lineno))
    return out


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _part(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and _is_package(name)) else ""


def test_every_import_names_a_module_that_exists():
    missing = [(m, t, ln) for m, imps in GRAPH.items() for t, ln in imps if t not in MODULES]
    assert not missing, missing


def test_no_module_imports_a_package_init():
    """``from . import x`` of a submodule is fine; names taken from an ``__init__`` are not (the
    top-level one imports the whole pipeline)."""
    bad = [(m, t, ln) for m, imps in GRAPH.items() for t, ln in imps if _is_package(t)]
    assert not bad, bad


def test_imports_only_go_down_the_floors():
    bad = []
    for m, imps in GRAPH.items():
        for t, ln in imps:
            a, b = _part(m), _part(t)
            if a != b and FLOORS[b] >= FLOORS[a] and not (a in ("", "derive") and b in ("", "derive")):
                bad.append(f"{MODULES[m].relative_to(PKG.parent)}:{ln} ({a or 'face'}) imports {t} ({b or 'face'})")
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    """Tarjan's strongly connected components over the module graph."""
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w, _ in GRAPH.get(v, []):
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
                cycles.append(sorted(comp))

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_every_floor_part_is_a_known_subpackage():
    parts = {_part(m) for m in MODULES}
    assert parts <= set(FLOORS), parts - set(FLOORS)


def test_core_imports_no_third_party_beyond_the_runtime_dependencies():
    """The package never imports torch or transformers (derive, the development tool, may)."""
    bad = []
    for m, path in MODULES.items():
        if _part(m) == "derive":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and not node.level and node.module else []
            bad += [(m, n) for n in names if n.split(".")[0] in ("torch", "transformers")]
    assert not bad, bad


def test_no_module_is_over_the_size_limit():
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_the_checker_sees_a_cycle_and_an_upward_import():
    """The checks above can fail: fed a graph with a cycle and a core module importing run, they do."""
    fake = {"streamfold.core.a": [("streamfold.run.b", 1)], "streamfold.run.b": [("streamfold.core.a", 2)]}
    globals_backup = dict(GRAPH)
    GRAPH.clear()
    GRAPH.update(fake)
    mods_backup = dict(MODULES)
    MODULES.update({"streamfold.core.a": PKG / "core" / "a.py", "streamfold.run.b": PKG / "run" / "b.py"})
    try:
        for check in (test_no_import_cycles, test_imports_only_go_down_the_floors):
            try:
                check()
            except AssertionError:
                continue
            raise AssertionError(f"{check.__name__} accepted a bad graph")
    finally:
        GRAPH.clear()
        GRAPH.update(globals_backup)
        MODULES.clear()
        MODULES.update(mods_backup)
