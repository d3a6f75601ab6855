"""The C++ CPU backend against its peers in one process: time ratios, its variants, and the GEMM rates behind them.

Workload: ``loss_bench``'s (``benchmarks.workload``): SPPO loss forward + backward on a preset (default
``cpu-medium``: H = 1024, V = 32000) at one token count, in float32 and/or bfloat16.

- ``ratios``: every provider (default: ``cce``, ``ours-cpu``, ``ours-chunked``, and the backend's options
  ``cpu-split`` / ``cpu-aten``) runs in this process, one warm-up each, then interleaved rounds (A, B, C, A, B, C,
  ...) so that the other tenants of a shared machine hit all alike; medians, and each one's median over ours-cpu's.
- ``gemm``: the rate of the backend's own single-threaded GEMM (``gemm_rate`` in csrc/) on a logits tile, run by
  every thread at once (the kernels' schedule: OpenMP over tiles) and as one GEMM on torch's thread count
  (intra-op threads inside the GEMM); beside it torch's own GEMM of the lm-head's shape (the peak loss_bench quotes).

Peak memory needs a fresh process per provider: run loss_bench for it. Record ``uptime`` with the numbers.

    python benchmarks/cpu_backend_bench.py [--dtypes float32,bfloat16] [--tokens 2048] [--rounds 7] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sppo_kernels as sk
from benchmarks import measure
from benchmarks.providers import PROVIDERS, ours_build
from benchmarks.workload import Inputs, Problem, make_inputs

Step = Callable[[Inputs], torch.Tensor]
VARIANTS = {"cpu-split": {"low_precision_grad": "split"}, "cpu-aten": {"blas": "aten"}}
DEFAULT_PROVIDERS = "cce,ours-cpu,ours-chunked,cpu-split,cpu-aten"


def build(name: str, problem: Problem) -> Step:
    """A loss_bench provider by name, or a variant of the "cpu" backend (``VARIANTS``)."""
    if name in VARIANTS:
        return ours_build(sk.get_backend("cpu", **VARIANTS[name]))(problem)
    return PROVIDERS[name].build(problem)


def timed(fn: Step, inputs: Inputs) -> float:
    """Milliseconds of one forward + backward from cleared grads."""
    inputs.zero_grad()
    start = time.perf_counter()
    fn(inputs).backward()
    return (time.perf_counter() - start) * 1e3


def ratios(problem: Problem, names: list[str], rounds: int) -> dict:
    """Interleaved timing of ``names`` on ``problem``: samples, medians, and median / ours-cpu's median."""
    inputs = make_inputs(problem)
    steps = {name: build(name, problem) for name in names}
    for fn in steps.values():
        timed(fn, inputs)  # warm-up: extension load, torch.compile, thread pools
    samples: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(rounds):
        for name, fn in steps.items():
            samples[name].append(timed(fn, inputs))
    median = {name: statistics.median(ms) for name, ms in samples.items()}
    ours = median.get("ours-cpu")
    return {
        "problem": problem.as_dict(),
        "scored_tokens": inputs.scored_tokens,
        "samples_ms": samples,
        "median_ms": median,
        "over_ours_cpu": {name: ms / ours for name, ms in median.items()} if ours else None,
    }


def gemm_rates(problem: Problem, rows: int, cols: int) -> dict:
    """GFLOP/s of a [rows, H] x [H, cols] logits tile in the backend's GEMM, both ways of threading, and torch's
    GEMM peak of the lm-head's shape (``measure.matmul_peak``)."""
    from sppo_kernels._cpu_extension import extension

    threads = torch.get_num_threads()
    dtype = problem.torch_dtype if problem.torch_dtype == torch.bfloat16 else torch.float32
    rate = lambda workers, blas_threads: extension().gemm_rate(
        dtype, rows, cols, problem.hidden, workers, blas_threads, 10, 5, "auto"
    )
    return {
        "tile": [rows, problem.hidden, cols],
        "threads": threads,
        "tiles_in_parallel_gflops": rate(threads, 1),
        "one_intra_op_threaded_gemm_gflops": rate(1, threads),
        "one_thread_gflops": rate(1, 1),
        "torch_matmul_peak": measure.matmul_peak(problem),
    }


def print_report(report: dict) -> None:
    for dtype, part in report["dtypes"].items():
        print(f"{dtype}: {part['ratios']['scored_tokens']} scored tokens")
        over = part["ratios"]["over_ours_cpu"] or {}
        for name, ms in part["ratios"]["median_ms"].items():
            print(f"  {name:14s} {ms:8.1f} ms   {over.get(name, float('nan')):5.2f}x ours-cpu")
        g = part["gemm"]
        print(f"  GEMM {g['tile']}: tiles in parallel {g['tiles_in_parallel_gflops']:.0f} GFLOP/s, one intra-op "
              f"threaded GEMM {g['one_intra_op_threaded_gemm_gflops']:.0f}, one thread {g['one_thread_gflops']:.0f}; "
              f"torch matmul peak {1e3 * g['torch_matmul_peak']['tflops']:.0f}")  # fmt: skip
    print("load (1 min) before / after:", report["load_before"], report["load_after"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cpu-medium")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--providers", default=DEFAULT_PROVIDERS)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--tile", default="2048,1024", help="rows,cols of the GEMM tile to rate")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    rows, cols = (int(x) for x in args.tile.split(","))
    report: dict = {"machine": measure.machine_info(torch.device("cpu")), "load_before": os.getloadavg()[0]}
    report["dtypes"] = {}
    for dtype in args.dtypes.split(","):
        problem = Problem.create(args.preset, args.tokens, dtype=dtype)
        report["dtypes"][dtype] = {
            "ratios": ratios(problem, args.providers.split(","), args.rounds),
            "gemm": gemm_rates(problem, rows, cols),
        }
    report["load_after"] = os.getloadavg()[0]
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
