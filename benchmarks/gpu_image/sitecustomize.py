"""Imitate the GPU image's missing packages on this machine (``benchmarks/gpu_check.sh --dry-run``).

On ``PYTHONPATH`` this file runs at interpreter start (Python imports ``sitecustomize`` when it finds one), in every
subprocess too: the top-level packages named in ``SPPO_HIDE_MODULES`` (comma-separated) then fail to import with
``ModuleNotFoundError`` and ``importlib.util.find_spec`` reports them absent, as on a machine without them.
"""

import importlib.abc
import importlib.util
import os
import sys

HIDDEN = frozenset(name.strip() for name in os.environ.get("SPPO_HIDE_MODULES", "").split(",") if name.strip())


class HiddenPackages(importlib.abc.MetaPathFinder):
    """Refuses the hidden packages before any other finder sees them."""

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {name!r} (hidden: SPPO_HIDE_MODULES)", name=name)
        return None


def _find_spec(name, package=None, _find=importlib.util.find_spec):
    """importlib.util.find_spec, None for the hidden packages."""
    absolute = importlib.util.resolve_name(name, package) if name.startswith(".") else name
    return None if absolute.partition(".")[0] in HIDDEN else _find(name, package)


if HIDDEN:
    sys.meta_path.insert(0, HiddenPackages())
    importlib.util.find_spec = _find_spec
