"""Session setup shared by every test.

- Interpret the Triton kernels when there is no GPU. TRITON_INTERPRET must be set before any ``@triton.jit``
  function is decorated, i.e. before sppo_kernels' kernel modules are imported; conftest.py is imported before
  every test module, so this is the place.
- With ``-m gpu`` (benchmarks/gpu_check.sh on a lent GPU) the Triton backend's own tests run first, so a step
  stopped at its time limit has the results that matter most.
- Optional packages (the extras in pyproject.toml) are skipped, not failed: a test module, fixture or test that
  needs one that is not installed (the GPU image has no datasets, deepspeed, trl, llm-blender, liger-kernel,
  cut-cross-entropy) is reported as skipped, naming the package, as ``pytest.importorskip`` would, at collection or
  when it runs. Anything else that fails to import still fails.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Top-level modules of the optional dependencies (pyproject.toml extras) and of the peers the benchmark compares.
OPTIONAL_PACKAGES = frozenset({
    "accelerate", "cut_cross_entropy", "cutlass", "datasets", "deepspeed", "flash_attn", "liger_kernel",
    "llm_blender", "matplotlib", "ninja", "peft", "psutil", "pytest_benchmark", "safetensors", "sklearn",
    "tokenizers", "tqdm", "transformers", "trl", "vllm",
})  # fmt: skip


def missing_optional_package(error: BaseException | None) -> str | None:
    """The optional package whose absence caused ``error`` (through its causes and contexts), or None."""
    while error is not None:
        if isinstance(error, ModuleNotFoundError) and error.name:
            top = error.name.partition(".")[0]
            if top in OPTIONAL_PACKAGES:
                return top
        error = error.__cause__ or error.__context__
    return None


class OptionalDependencyModule(pytest.Module):
    """A test module that is skipped when importing it needs a missing optional package."""

    def collect(self):
        try:
            return super().collect()
        except self.CollectError as error:
            package = missing_optional_package(error)
            if package is None:
                raise
            raise pytest.skip.Exception(f"{package} is not installed", allow_module_level=True) from error


def pytest_collection_modifyitems(config, items):
    if "gpu" in (config.getoption("markexpr") or ""):
        items.sort(key=lambda item: not item.path.name.startswith("test_triton_"))  # stable: file order otherwise


def pytest_pycollect_makemodule(module_path, parent):
    return OptionalDependencyModule.from_parent(parent, path=module_path)


@contextlib.contextmanager
def skipping_missing_optional_packages():
    """Turn a ModuleNotFoundError of an optional package into a skip naming it."""
    try:
        yield
    except ModuleNotFoundError as error:
        package = missing_optional_package(error)
        if package is None:
            raise
        pytest.skip(f"{package} is not installed")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    with skipping_missing_optional_packages():
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    with skipping_missing_optional_packages():
        return (yield)
