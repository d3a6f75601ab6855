"""The two rooms and their one rule: the kernel library (``api``, ``registry``, ``inputs``, ``losses``,
``autograd``, ``kernels``, ``integrations``, …) never imports the trainer (``sppo_kernels.pipeline``); the trainer
imports only the public ``sppo_kernels`` API (the package itself) and ``sppo_kernels.integrations``. Inside the
trainer, rooms are layered (core < models < stages, evaluation < table < run < demo < cli: a module imports only
its own room and those below), a stage imports no other stage, and there are no import circles. Lazy imports
inside functions count; there are no exemptions."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import sppo_kernels

PACKAGE = Path(sppo_kernels.__file__).parent
TRAINER = "sppo_kernels.pipeline"
ROOMS = ("core", "models", "stages", "evaluation", "table", "run", "demo", "cli")  # lowest first
PEERS = {"stages": 2, "evaluation": 2}  # same level: neither imports the other


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The ``sppo_kernels`` modules that ``path`` imports, lazily or not (``from package import module`` names
    the module, ``from module import name`` the module)."""
    known, found = _modules(), set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module for a in node.names
            }
    return {name for name in found if name == "sppo_kernels" or name.startswith("sppo_kernels.")}


@functools.cache
def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def _room(module: str) -> str:
    return module.removeprefix(TRAINER + ".").split(".")[0]


def _level(module: str) -> int:
    room = _room(module)
    return PEERS.get(room, ROOMS.index(room))


def test_the_kernel_library_never_imports_the_trainer() -> None:
    library = {m: p for m, p in _modules().items() if not m.startswith(TRAINER)}
    assert {"sppo_kernels.api", "sppo_kernels.integrations.hf", "sppo_kernels.kernels.lse_forward"} <= set(library)
    for module, path in library.items():
        assert not any(name.startswith(TRAINER) for name in _imports(path)), module


def test_the_trainer_uses_only_the_public_api_and_the_integrations() -> None:
    trainer = {m: p for m, p in _modules().items() if m.startswith(TRAINER + ".")}
    assert len(trainer) > 30
    for module, path in trainer.items():
        for name in _imports(path):
            allowed = name in ("sppo_kernels", TRAINER) or name.startswith((TRAINER + ".", "sppo_kernels.integrations"))
            assert allowed, f"{module} imports {name}: the trainer uses `import sppo_kernels as sk` and integrations"


def test_rooms_are_layered_and_stages_independent() -> None:
    modules = _modules()
    trainer = {m for m in modules if m.startswith(TRAINER + ".")}
    assert {_room(m) for m in trainer} == set(ROOMS)
    for module in trainer:
        for name in _imports(modules[module]):
            imported = next((m for m in trainer if name == m or name.startswith(m + ".")), None)
            if imported is None or _room(imported) == _room(module):
                continue
            assert _level(imported) < _level(module), f"{module} imports {imported} (a room above or beside it)"
    stages = {m for m in trainer if _room(m) == "stages" and not m.endswith(".stages")}
    assert len(stages) == 5
    for module in stages:
        assert not {n for n in _imports(modules[module]) if any(n.startswith(s) for s in stages - {module})}, module


def test_no_import_circles() -> None:
    modules = _modules()
    graph = {
        module: {m for m in modules if m != module and any(n == m for n in _imports(path))}
        for module, path in modules.items()
    }
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
