"""The import structure of ``sppo_kernels.pipeline`` and ``sppo_kernels.integrations``: no circles; a stage imports
no other stage (only the schema, the store and the helpers); only the stage table, ``run``, the run-level
``evaluate`` (it reuses the generation engine and the judge), ``demo`` and ``cli`` import stages; the integrations
import nothing of the pipeline. Lazy imports inside functions count."""

from __future__ import annotations

import ast
from pathlib import Path

import sppo_kernels
from sppo_kernels.pipeline.stages import STAGE_NAMES

PACKAGE = Path(sppo_kernels.__file__).parent
ABOVE_STAGES = {"stages", "run", "evaluate", "demo", "cli"}  # the modules that may import stages


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The ``sppo_kernels`` modules that ``path`` imports (``from package import module`` names the module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name.startswith("sppo_kernels.")}


def _graph() -> dict[str, set[str]]:
    files = [*(PACKAGE / "pipeline").glob("*.py"), *(PACKAGE / "integrations").glob("*.py"), PACKAGE / "tiny_models.py"]
    modules = {_module_name(f): f for f in files}
    return {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}


def test_no_import_circles() -> None:
    graph = _graph()
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError("import circle: " + " -> ".join([*path[path.index(module) :], module]))
        if module in done:
            return
        for imported in sorted(graph[module]):
            visit(imported, [*path, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])


def test_stages_import_helpers_only() -> None:
    graph = _graph()
    short = {m: m.rsplit(".", 1)[-1] for m in graph if m.startswith("sppo_kernels.pipeline.")}
    for module, name in short.items():
        if name not in ABOVE_STAGES:  # a stage or a helper
            imported = {short[m] for m in graph[module] if m in short}
            assert not imported & {*STAGE_NAMES, *ABOVE_STAGES}, f"{name} imports {imported}"
    for module, imported in graph.items():
        if module.startswith("sppo_kernels.integrations"):
            assert not any(m.startswith("sppo_kernels.pipeline") for m in imported), (module, imported)
