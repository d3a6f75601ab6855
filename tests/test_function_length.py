"""No Python function outside ``sppo_kernels/kernels/`` (Triton kernels, read top to bottom) is longer than 80
lines: in the package, the benchmarks, the examples and the tests' helpers alike."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 80


def _functions(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [
        (node.name, node.end_lineno - node.lineno + 1)
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    ]


def test_no_function_is_longer_than_80_lines() -> None:
    files = [p for folder in ("sppo_kernels", "benchmarks", "examples", "tests") for p in (ROOT / folder).rglob("*.py")]
    files = [p for p in files if (ROOT / "sppo_kernels" / "kernels") not in p.parents]
    assert len(files) > 100
    long = [f"{p.relative_to(ROOT)}:{name} ({n} lines)" for p in files for name, n in _functions(p) if n > LIMIT]
    assert not long, long
