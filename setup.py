"""Optional ahead-of-time build of the C++ CPU backend (csrc/sppo_cpu.cpp → sppo_kernels._cpu_ops).

The extension is built only when torch is importable in the build environment, i.e. with
``pip install --no-build-isolation -e .``, so that it is compiled against the torch it will run with. In pip's
isolated build environment (plain ``pip install .``) torch is absent and nothing is compiled here: sppo_kernels
then builds the extension at first use (see sppo_kernels/_cpu_extension.py). All metadata lives in pyproject.toml.
"""

import importlib.util
from pathlib import Path

from setuptools import setup


def _loader_module():
    """sppo_kernels/_cpu_extension.py on its own (stdlib imports only), for its flags and source hash."""
    path = Path(__file__).resolve().parent / "sppo_kernels" / "_cpu_extension.py"
    spec = importlib.util.spec_from_file_location("_sppo_cpu_extension", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:  # isolated build env: never compile against a torch other than the one installed
    setup()
else:
    loader = _loader_module()
    setup(
        ext_modules=[
            CppExtension(
                loader.AOT_MODULE,
                [str(loader.SOURCE.relative_to(Path(__file__).resolve().parent))],
                extra_compile_args=[*loader.CFLAGS, f"-DSPPO_SOURCE_HASH={loader.source_hash()}"],
                extra_link_args=loader.LDFLAGS,
            )
        ],
        cmdclass={"build_ext": BuildExtension},
    )
