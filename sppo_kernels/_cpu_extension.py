"""Find or build the C++ extension behind the ``"cpu"`` backend (``csrc/sppo_cpu.cpp``).

Order: the module built ahead of time by ``setup.py`` (``pip install --no-build-isolation -e .``), unless its
source hash says the source has changed since; else a first-use build with ``torch.utils.cpp_extension.load``
(ninja + a C++ compiler, about a minute on 2 cores). Without a toolchain the backend is reported unavailable after
one warning; nothing here raises.

The first-use build is cached in a folder of ``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``) named
by the source hash, the torch version and installation, the Python ABI and the source's location, so environments and
checkouts on one machine (venvs, torch builds, worktrees) never evict each other's build. Builds are serialised by an
OS file lock, which the kernel releases when a builder dies; a lock file left in the folder by an interrupted build
is removed under it.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import importlib
import os
import shutil
import sys
import sysconfig
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

CSRC = Path(__file__).resolve().parent.parent / "csrc"
SOURCE = CSRC / "sppo_cpu.cpp"  # the translation unit; it includes the headers of CSRC
AOT_MODULE = "sppo_kernels._cpu_ops"
JIT_NAME = "sppo_kernels_cpu"
CFLAGS = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
LDFLAGS = ["-fopenmp", "-ldl"]


def source_hash(folder: Path = CSRC) -> str:
    """First 16 hex digits of the sha256 of the C++ sources (the .cpp and its headers, by name); setup.py bakes
    the same value into its build."""
    digest = hashlib.sha256()
    for path in sorted([*folder.glob("*.cpp"), *folder.glob("*.h")]):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _ahead_of_time() -> ModuleType | None:
    """The setup.py build, when installed and built from the source that is here (if the source is here)."""
    try:
        module = importlib.import_module(AOT_MODULE)
    except ImportError:
        return None
    if SOURCE.exists() and module.source_hash() != source_hash():
        return None  # built from an older source: rebuild at first use instead
    return module


def _toolchain_missing() -> str | None:
    """Why a first-use build cannot run, or None."""
    from torch.utils import cpp_extension

    if not SOURCE.exists():
        return f"no ahead-of-time build is installed and the source {SOURCE} is missing"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler: {compiler!r} not found (install g++, or set CXX)"
    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (pip install 'sppo-kernels[cpu]')"
    return None


def build_directory() -> Path:
    """The cache folder of this source built against this torch installation and Python ABI."""
    import torch

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "torch_extensions")
    soabi = sysconfig.get_config_var("SOABI") or sys.implementation.cache_tag
    torch_dir = Path(torch.__file__).resolve().parent
    where = hashlib.sha256(f"{torch.__version__}|{torch_dir}|{soabi}|{SOURCE}".encode())
    return Path(root) / f"{JIT_NAME}-{source_hash()}-{where.hexdigest()[:12]}"


@contextmanager
def build_lock(folder: Path) -> Iterator[None]:
    """Hold the OS file lock of the build ``folder`` (every builder takes it; the kernel releases it if the holder
    dies), so torch's own lock file inside the folder can only have been left by a killed build."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder.with_name(folder.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _build() -> ModuleType:
    """Compile (or load the cached build of) the extension with torch's JIT loader, under :func:`build_lock`."""
    from torch.utils import cpp_extension

    folder = build_directory()
    with build_lock(folder):
        (folder / "lock").unlink(missing_ok=True)  # left by a killed build
        return cpp_extension.load(
            name=JIT_NAME,
            sources=[str(SOURCE)],
            extra_cflags=[*CFLAGS, f"-DSPPO_SOURCE_HASH={source_hash()}"],
            extra_ldflags=LDFLAGS,
            build_directory=str(folder),
            verbose=False,
        )


def _find_or_build() -> tuple[ModuleType | None, str | None]:
    module = _ahead_of_time()
    if module is not None:
        return module, None
    reason = _toolchain_missing()
    if reason is None:
        try:
            return _build(), None
        except Exception as exc:  # a failed compile must not break the package: report and fall back
            lines = str(exc).strip().splitlines() or [type(exc).__name__]
            reason = f"building {SOURCE.name} failed: {lines[-1]}"
    warnings.warn(
        f"sppo_kernels: the C++ CPU backend is unavailable ({reason}); backend='auto' uses 'chunked' on the CPU",
        RuntimeWarning,
        stacklevel=3,
    )
    return None, reason


@functools.cache
def load() -> tuple[ModuleType | None, str | None]:
    """``(module, None)``, or ``(None, why)`` after a single warning. Runs once per process."""
    return _find_or_build()


def extension() -> ModuleType:
    """The loaded extension module; raises RuntimeError with the reason when it is unavailable."""
    module, reason = load()
    if module is None:
        raise RuntimeError(f"the C++ CPU backend is unavailable: {reason}")
    return module


def unavailable_reason() -> str | None:
    """Why the extension cannot be used, or None when it can (builds it on first call)."""
    return load()[1]
