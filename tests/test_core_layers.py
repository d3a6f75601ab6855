"""The import structure of the op: ``api`` → ``registry`` → one backend module → kernels / the C++ extension, with
``inputs`` and ``losses`` at the bottom. No module imports one of a higher layer; lazy imports inside functions
count (the registry reaches the backends only through ``importlib`` at call time).

Inside ``kernels/`` (a library of its own: it imports nothing else of the package): the shared launch module, the
device functions and the segment sums at the bottom, the scored rows above them, then one module per kernel that
holds its host launch (CCE's layout); kernel modules do not import each other, and a kernel is launched only from
its own file. The Triton backend's autograd module holds only ``TritonConfig`` and the Functions.
"""

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
KERNEL_BASE = {"kernels.launch": 0, "kernels.logit_tile": 0, "kernels.segment_sum": 0, "kernels.rows": 1}
LAYERS = {"registry": 4, "api": 5, "__init__": 6}  # kernel modules 2, backends (autograd.*) 3, BOTTOM 0


def _layer(module: str) -> int:
    if module in BOTTOM:
        return 0
    if module.startswith("kernels."):
        return KERNEL_BASE.get(module, 2)
    if module.startswith("autograd."):
        return 3
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
    backends = {m for m in modules if _layer(m) == 3}
    assert {"autograd.chunked", "autograd.fused_cpu", "autograd.fused_triton", "autograd.materialized"} <= backends
    for name in backends:
        assert not _imports(modules[name], backends), name


def test_kernels_are_a_library_of_their_own() -> None:
    modules = _core_modules()
    kernels = {m for m in modules if m.startswith("kernels.")}
    assert {"kernels.launch", "kernels.rows", "kernels.lse_forward", "kernels.logit_grad"} <= kernels
    for name in kernels:
        assert _imports(modules[name], set(modules)) <= kernels, name
    paths = {m for m in kernels if _layer(m) == 2}
    assert {"kernels.lse_forward", "kernels.logit_grad", "kernels.logit_backward", "kernels.exp_workspace"} <= paths
    for name in paths:
        assert not _imports(modules[name], paths), name


def test_every_kernel_is_launched_from_its_own_file() -> None:
    """``k_kernel[grid](...)`` appears only in the module that defines ``k_kernel``, and every kernel has a launch."""
    modules = _core_modules()
    defined, launched = {}, {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name.endswith("_kernel"):
                defined[node.name] = name
            target = node.value if isinstance(node, ast.Subscript) else None
            if isinstance(target, ast.Name) and target.id.endswith("_kernel"):
                launched.setdefault(target.id, set()).add(name)
    assert len(defined) >= 6 and set(launched) == set(defined), (defined, launched)
    for kernel, launchers in launched.items():
        assert launchers == {defined[kernel]}, (kernel, launchers)


def test_triton_autograd_module_holds_only_its_config_and_functions() -> None:
    tree = ast.parse((PACKAGE / "autograd" / "fused_triton.py").read_text(encoding="utf-8"))
    body = [node for node in tree.body if not isinstance(node, (ast.Import, ast.ImportFrom))]
    assert isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)  # the module docstring
    assert all(isinstance(node, ast.ClassDef) for node in body[1:]), [ast.dump(n)[:80] for n in body[1:]]
    assert [node.name for node in body[1:]] == ["TritonConfig", "TritonSequenceLogprobs", "TritonSPPOLoss"]
