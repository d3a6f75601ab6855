"""Run a script (``python no_shm_launch.py SCRIPT ARGS…``, under torchrun) without DeepSpeed's CPU shm op.

DeepSpeed JIT-compiles a shared-memory all-reduce op for CPU runs on first use (about 2 minutes, then cached);
tests skip it and use plain gloo collectives.
"""

from __future__ import annotations

import runpy
import sys

import deepspeed.comm.torch

deepspeed.comm.torch.build_shm_op = lambda: None

if __name__ == "__main__":
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
