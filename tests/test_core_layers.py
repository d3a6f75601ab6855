"""The import structure of the op: ``api`` → ``registry`` → one backend module → kernels / the C++ extension, with
``inputs`` and ``losses`` at the bottom. No module imports one of a higher layer; lazy imports inside functions
count (the registry reaches the backends only through ``importlib`` at call time)."""

from __future__ import annotations

import ast
from pathlib import Path

import sppo_kernels

PACKAGE = Path(sppo_kernels.__file__).parent
BOTTOM = {
    "inputs",
    "losses",
    "reference",
    "_cpu_extension",
    "autograd.first_order",
    "autograd.fused_loss",
}
LAYERS = {"registry": 2, "api": 3, "__init__": 4}  # backends (autograd.*) are layer 1, kernels.* and BOTTOM layer 0


def _layer(module: str) -> int:
    if module in BOTTOM or module.startswith("kernels."):
        return 0
    if module.startswith("autograd."):
        return 1
    return LAYERS[module]


def _core_modules() -> dict[str, Path]:
    files = [*PACKAGE.glob("*.py"), *(PACKAGE / "autograd").glob("*.py"), *(PACKAGE / "kernels").glob("*.py")]
    modules = {}
    for path in files:
        name = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        if name.endswith(".__init__"):  # package docstrings
            continue
        modules[name] = path
    return modules


def _imports(path: Path, known: set[str]) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sppo_kernels"):
            base = node.module.removeprefix("sppo_kernels").lstrip(".")
            candidates = [f"{base}.{a.name}".lstrip(".") for a in node.names] + [base]
            found |= {c for c in candidates if c in known}
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("sppo_kernels.") for a in node.names if a.name.startswith("sppo_kernels.")}
    return found & known


def test_no_module_imports_a_higher_layer() -> None:
    modules = _core_modules()
    assert {"api", "registry", "inputs", "losses", "autograd.fused_cpu", "kernels.lse_forward"} <= set(modules)
    for name, path in modules.items():
        for imported in _imports(path, set(modules)):
            assert _layer(imported) <= _layer(name), f"{name} (layer {_layer(name)}) imports {imported}"


def test_backends_do_not_import_each_other() -> None:
    modules = _core_modules()
    backends = {m for m in modules if _layer(m) == 1}
    assert {"autograd.chunked", "autograd.fused_cpu", "autograd.fused_triton", "autograd.materialized"} <= backends
    for name in backends:
        assert not _imports(modules[name], backends), name
