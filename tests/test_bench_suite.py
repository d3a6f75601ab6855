"""pytest-benchmark suite: forward+backward of every provider that runs natively here, for trend tracking.

CI runs these once each as plain tests (pytest is configured with ``--benchmark-disable``). To record timings:

    python -m pytest tests/test_bench_suite.py --benchmark-enable --benchmark-json=bench.json

On a GPU the problem is the ``tiny`` preset at 2048 tokens in bfloat16; on the CPU 256 tokens in float32.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # `benchmarks` is a folder, not an installed package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.providers import PROVIDERS
from benchmarks.workload import Inputs, Problem, make_inputs

CUDA = torch.cuda.is_available()
PROBLEM = Problem.create(
    "tiny", 2048 if CUDA else 256, dtype="bfloat16" if CUDA else "float32", device="cuda" if CUDA else "cpu"
)


@pytest.fixture(scope="module")
def inputs() -> dict[str, Inputs]:
    return {kind: make_inputs(PROBLEM, kind) for kind in ("soft", "hard")}


@pytest.mark.parametrize("name", list(PROVIDERS))
def test_forward_backward(benchmark, name: str, inputs: dict[str, Inputs]) -> None:
    provider = PROVIDERS[name]
    reason = provider.unavailable(PROBLEM)
    if reason is not None:
        pytest.skip(reason)
    if provider.interpreted(PROBLEM):
        pytest.skip("runs in the Triton interpreter here: a timing would mean nothing")
    loss_fn, data = provider.build(PROBLEM), inputs[provider.targets]

    def step() -> torch.Tensor:
        data.zero_grad()
        loss = loss_fn(data)
        loss.backward()
        if CUDA:
            torch.cuda.synchronize()
        return loss.detach()

    benchmark.extra_info.update(provider=name, tokens=PROBLEM.tokens, dtype=PROBLEM.dtype, device=PROBLEM.device)
    loss = benchmark(step)
    assert torch.isfinite(loss) and data.weight.grad is not None and torch.isfinite(data.weight.grad).all()
