"""No function in src/ is over 80 lines (project rule). The functions still waiting to be split
are listed by name; the list may only shrink: a listed function that is now short (or gone)
fails too, so that its entry is removed."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "sftscope"
LIMIT = 80
PENDING: set[tuple[str, str]] = set()  # (file under src/sftscope, function): none left


def long_functions(root: Path = SRC, limit: int = LIMIT) -> dict[tuple[str, str], int]:
    """(file, function) -> lines, for every function or method longer than ``limit``."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    out[(path.relative_to(root).as_posix(), node.name)] = n
    return out


def test_no_function_over_80_lines():
    found = long_functions()
    new = {k: v for k, v in found.items() if k not in PENDING}
    assert not new, f"functions over {LIMIT} lines (split them): {new}"


def test_pending_list_only_shrinks():
    found = long_functions()
    done = sorted(k for k in PENDING if k not in found)
    assert not done, f"now within {LIMIT} lines or gone, remove from PENDING: {done}"


def test_the_check_sees_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(LIMIT))
    (tmp_path / "m.py").write_text(f"def f():\n{body}\n\n\ndef g():\n    return 1\n")
    assert long_functions(tmp_path) == {("m.py", "f"): LIMIT + 1}
