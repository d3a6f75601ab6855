"""Session setup shared by every test: interpret the Triton kernels when there is no GPU.

TRITON_INTERPRET must be set before any ``@triton.jit`` function is decorated, i.e. before sppo_kernels'
kernel modules are imported; conftest.py is imported before every test module, so this is the place.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
