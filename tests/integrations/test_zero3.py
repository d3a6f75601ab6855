"""zero3.gathered_lm_head: a no-op without ZeRO-3; with 2 ZeRO-3 ranks the gradients equal the unpartitioned run."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from sppo_kernels.integrations import hf
from sppo_kernels.integrations.zero3 import gathered_lm_head, partitioned_head_params
from sppo_kernels.pipeline.demo.tiny_models import tiny_causal_lm

HERE = Path(__file__).parent


def test_noop_without_zero3() -> None:
    model = tiny_causal_lm("llama")
    assert partitioned_head_params(model) == []
    with gathered_lm_head(model) as (weight, bias):
        assert weight is model.lm_head.weight and bias is None
    assert hf.lm_head_params(model)[0] is weight


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_ranks(script: Path, *args: str) -> str:
    """Run ``script`` on 2 CPU ranks with torchrun; return its output, failing the test on a non-zero exit."""
    pytest.importorskip("deepspeed")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1"]
    command += [f"--master_port={_free_port()}", str(HERE / "no_shm_launch.py"), str(script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE), *sys.path])}
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env, cwd=HERE)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-6000:]
    return log


@pytest.mark.slow
def test_two_rank_zero3_gradients_equal_unpartitioned() -> None:
    log = run_two_ranks(HERE / "zero3_worker.py", "llama", "gemma2")
    for arch in ("llama", "gemma2"):
        assert log.count(f"ZERO3-OK {arch}") == 2, log[-6000:]
