"""The import-layer contract: the package follows the pipeline and no import runs back up.

load -> progress/parallel -> config -> metrics -> capture -> experiments -> report -> demo/cli/api.
A module may import modules of its own layer or of lower layers, at module level or inside a
function; and no set of modules imports each other in a circle, anywhere in the package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "src" / "sftscope"

LAYERS: dict[str, int] = {
    "errors": 0, "io": 0, "process": 0, "segments": 0, "metric_registry": 0, "tasks": 0,
    "__init__": 0, "version": 0, "__main__": 8, "api": 8,
    "load": 1,
    "progress": 2, "parallel": 2,
    "config": 3, "runs": 3, "chains": 3,
    "metrics": 4,
    "capture": 5,
    "experiments": 6,
    "report": 7,
    "demo": 8, "cli": 8,
}


def _layer(module: str) -> int:
    parts = module.split(".")
    if parts[0] != "sftscope":
        raise ValueError(module)
    head = parts[1] if len(parts) > 1 else "__init__"
    return LAYERS[head]


def _modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        name = ".".join(rel.parts)
        out.append((name.removesuffix(".__init__"), path))
    return out


def _imports(path: Path, module: str) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import
                base = module.split(".")[: -node.level] if path.name != "__init__.py" \
                    else module.split(".")[: len(module.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.append((name, node.lineno))
    return [(n, line) for n, line in found if n.startswith("sftscope")]


def test_every_top_level_module_has_a_layer():
    heads = {p.relative_to(PKG).parts[0].removesuffix(".py") for p in PKG.iterdir()
             if p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists())}
    assert heads <= set(LAYERS), heads - set(LAYERS)


@pytest.mark.parametrize("module,path", _modules(), ids=lambda x: str(x))
def test_no_import_runs_back_up(module, path):
    here = _layer(module)
    bad = [(name, line) for name, line in _imports(path, module)
           if name != "sftscope" and _layer(name) > here]
    assert not bad, f"{module} (layer {here}) imports upwards: {bad}"


def test_no_import_cycle_between_experiments_modules():
    graph: dict[str, set[str]] = {}
    for module, path in _modules():
        if module.startswith("sftscope.experiments."):
            graph[module] = {n for n, _ in _imports(path, module)
                             if n.startswith("sftscope.experiments.") and n != module}

    def reach(start: str, seen: set[str]) -> set[str]:
        for nxt in graph.get(start, ()):
            if nxt not in seen:
                seen.add(nxt)
                reach(nxt, seen)
        return seen

    cycles = [m for m in graph if m in reach(m, set())]
    assert not cycles, cycles


def _edges(path: Path, module: str, known: set[str]) -> set[str]:
    """The package modules ``module`` imports (anywhere in it): ``from pkg import sub`` counts
    as importing ``pkg.sub`` (not the package's ``__init__``), a name inside a module as its
    module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")
                parts = parts if path.name == "__init__.py" else parts[:-1]
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
            names = subs if len(subs) == len(node.names) else [base, *subs]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                out.add(name)
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), each a cycle's members."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_anywhere():
    mods = dict(_modules())
    graph = {m: _edges(p, m, set(mods)) for m, p in mods.items()}
    assert not _cycles(graph), _cycles(graph)
    # the test sees cycles: function-level imports count, and a made-up circle is found
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_load_imports_neither_progress_nor_parallel():
    for module, path in _modules():
        if module.startswith("sftscope.load"):
            bad = [n for n, _ in _imports(path, module)
                   if n.startswith(("sftscope.progress", "sftscope.parallel"))]
            assert not bad, (module, bad)
