"""The GPU configurations compile for an H100 (sm_90) even on a machine without a GPU."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

H100_SHARED_BYTES_PER_BLOCK = 232448


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_kernels_compile_for_sm90_within_shared_memory():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("sm90_compile.py")
    done = subprocess.run(
        [sys.executable, str(script), "--quick"], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    reports = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert {(r["kernel"], r["dtype"]) for r in reports} == {
        (k, d) for k in ("lse_forward_kernel", "logit_backward_kernel") for d in ("fp32", "bf16")
    }
    for report in reports:
        assert 0 < report["shared_bytes"] <= H100_SHARED_BYTES_PER_BLOCK, report
        assert report["registers"] <= 255, report
