"""The import-layer contract: the package follows the pipeline and no import runs back up.

load -> config -> metrics -> capture -> experiments -> report -> demo/cli. A module may import
modules of its own layer or of lower layers, at module level or inside a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "src" / "sftscope"

LAYERS: dict[str, int] = {
    "errors": 0, "io": 0, "process": 0, "segments": 0, "metric_registry": 0, "tasks": 0,
    "__init__": 0, "__main__": 7,
    "load": 1, "progress": 1, "parallel": 1,
    "config": 2, "runs": 2, "chains": 2,
    "metrics": 3,
    "capture": 4,
    "experiments": 5,
    "report": 6,
    "demo": 7, "cli": 7, "api": 7,
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
