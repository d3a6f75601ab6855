"""Old import path of :mod:`sppo_kernels.tiny_models` (tiny offline models and batches), kept as an alias."""

from sppo_kernels.tiny_models import *  # noqa: F403
from sppo_kernels.tiny_models import __all__  # noqa: F401
