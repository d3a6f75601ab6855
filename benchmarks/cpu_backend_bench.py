"""The C++ CPU backend's performance goal, measured: SPPO loss forward + backward, float32,
N = 2048 tokens (B = 8 sequences x T = 256, shift: 255 scored rows each), H = 1024, V = 32000.

Providers: ``naive`` (full logits → log_softmax → gather → per-sequence sum), ``native`` (torch's chunked
``F.linear_cross_entropy(reduction="none", options=LinearCrossEntropyOptions())``, summed per sequence), ``cpu``
(``sk.sppo_loss(backend="cpu")``: gradient formed in the forward), and for information ``cpu-lean`` (the same
with an 8 MiB logits block, too small for a sequence: recompute), ``cpu-logprobs``
(``sk.sequence_logprobs(backend="cpu")`` + the loss in torch: backward by recompute) and ``chunked``.

Time: all providers in this process, after one warm-up each, in interleaved rounds (naive, native, cpu, naive, ...)
so that drifting machine load hits all alike; the median per provider is reported.
Memory: each provider in its own fresh subprocess. Large blocks are made to go back to the OS when freed
(M_MMAP_THRESHOLD = 1 MiB), one warm-up iteration runs and is freed, then ``measure.PeakMemory`` resets the RSS
high-water mark (/proc/self/clear_refs) around one forward + backward (grads start as None); growth = VmHWM −
VmRSS before it.

    python benchmarks/cpu_backend_bench.py [--rounds 5] [--providers naive,native,cpu] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sppo_kernels as sk
from benchmarks import measure
from sppo_kernels.autograd import fused_cpu
from sppo_kernels.losses import sppo_epilogue

B, T, H, V = 8, 256, 1024, 32000
ETA = 1000.0
Inputs = tuple[Tensor, Tensor, Tensor, Tensor, Tensor]


def make_inputs(seed: int = 0) -> Inputs:
    """hidden [B, T, H] and weight [V, H] (leaves requiring grad), labels [B, T], ref_logps [B], target_probs [B]."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=gen).requires_grad_(True)
    weight = (torch.randn(V, H, generator=gen) * 0.02).requires_grad_(True)
    labels = torch.randint(0, V, (B, T), generator=gen)
    ref_logps = -(T - 1) * torch.log(torch.tensor(float(V))) + torch.randn(B, generator=gen)
    target_probs = torch.rand(B, generator=gen) * 0.8 + 0.1
    return hidden, weight, labels, ref_logps, target_probs


def naive(hidden, weight, labels, ref, probs) -> Tensor:
    logits = F.linear(hidden[:, :-1], weight)  # [B, T-1, V]
    logp = torch.log_softmax(logits, dim=-1).gather(-1, labels[:, 1:, None]).squeeze(-1)
    return sppo_epilogue(logp.sum(-1), ref, probs, ETA, "mean")


def native(hidden, weight, labels, ref, probs) -> Tensor:
    nll = F.linear_cross_entropy(
        hidden[:, :-1].reshape(-1, H),
        weight,
        labels[:, 1:].reshape(-1),
        reduction="none",
        options=torch.nn.LinearCrossEntropyOptions(),
    )
    return sppo_epilogue(-nll.view(B, T - 1).sum(-1), ref, probs, ETA, "mean")


def cpu(hidden, weight, labels, ref, probs) -> Tensor:
    return sk.sppo_loss(hidden, weight, labels, ref, probs, eta=ETA, backend="cpu")


def cpu_lean(hidden, weight, labels, ref, probs) -> Tensor:
    """The same with an 8 MiB block: a 255-row sequence no longer fits, so its logits are recomputed."""
    lean = sk.get_backend("cpu", tiling=fused_cpu.Tiling(workspace_elements=1 << 21))
    return sk.sppo_loss(hidden, weight, labels, ref, probs, eta=ETA, backend=lean)


def cpu_logprobs(hidden, weight, labels, ref, probs) -> Tensor:
    return sppo_epilogue(sk.sequence_logprobs(hidden, weight, labels, backend="cpu"), ref, probs, ETA, "mean")


def chunked(hidden, weight, labels, ref, probs) -> Tensor:
    return sk.sppo_loss(hidden, weight, labels, ref, probs, eta=ETA, backend="chunked")


PROVIDERS: dict[str, Callable[..., Tensor]] = {
    "naive": naive,
    "native": native,
    "cpu": cpu,
    "cpu-lean": cpu_lean,
    "cpu-logprobs": cpu_logprobs,
    "chunked": chunked,
}


def step(fn: Callable[..., Tensor], inputs: Inputs) -> Tensor:
    """One forward + backward from cleared grads; returns the detached loss."""
    hidden, weight = inputs[:2]
    hidden.grad = weight.grad = None
    loss = fn(*inputs)
    loss.backward()
    return loss.detach()


# ------------------------------------------------------------------ memory (one subprocess per provider)


def memory_worker(name: str) -> dict:
    """Peak RSS growth of one forward + backward of ``name``, in this (fresh) process."""
    measure.trim_heap()  # the first call also makes blocks >= 1 MiB mmapped, so that freeing them returns memory
    inputs = make_inputs()
    fn = PROVIDERS[name]
    step(fn, inputs)  # warm-up: extension load, thread pools, MKL buffers
    inputs[0].grad = inputs[1].grad = None
    with measure.PeakMemory(torch.device("cpu")) as peak:
        step(fn, inputs)
    if peak.growth is None:
        raise RuntimeError("no peak-memory probe works on this machine")
    return {"rss_growth_mib": peak.growth / 2**20}


def measure_memory(names: list[str]) -> dict[str, float]:
    out = {}
    for name in names:
        proc = subprocess.run(
            [sys.executable, __file__, "--memory-worker", name], capture_output=True, text=True, check=True
        )
        out[name] = json.loads(proc.stdout.strip().splitlines()[-1])["rss_growth_mib"]
    return out


# ------------------------------------------------------------------ time (this process, interleaved)


def measure_time(names: list[str], rounds: int) -> tuple[dict[str, list[float]], dict[str, dict[str, float]]]:
    """Seconds per forward + backward for each provider, and each provider's loss/grad differences from naive."""
    inputs = make_inputs()
    results = {}
    for name in names:  # warm-up, and the values to cross-check
        loss = step(PROVIDERS[name], inputs)
        results[name] = (loss, inputs[0].grad.clone(), inputs[1].grad.clone())
    base = results.get("naive", results[names[0]])
    agreement = {
        name: {
            "loss": float((r[0] - base[0]).abs() / base[0].abs()),
            "grad_hidden": float((r[1] - base[1]).norm() / base[1].norm()),
            "grad_weight": float((r[2] - base[2]).norm() / base[2].norm()),
        }
        for name, r in results.items()
    }
    del results, base
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(rounds):
        for name in names:
            start = time.perf_counter()
            step(PROVIDERS[name], inputs)
            times[name].append(time.perf_counter() - start)
    return times, agreement


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--providers", default="naive,native,cpu,cpu-lean,cpu-logprobs")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_worker:
        print(json.dumps(memory_worker(args.memory_worker)))
        return
    names = args.providers.split(",")
    report = {
        "machine_before": measure.machine_info(torch.device("cpu")),
        "shape": {"B": B, "T": T, "H": H, "V": V, "dtype": "float32"},
    }
    report["rss_growth_mib"] = measure_memory(names)
    times, agreement = measure_time(names, args.rounds)
    report["seconds"] = times
    report["median_s"] = {k: statistics.median(v) for k, v in times.items()}
    report["agreement_vs_first"] = agreement
    report["machine_after"] = measure.machine_info(torch.device("cpu"))
    med, mem = report["median_s"], report["rss_growth_mib"]
    print(f"{'provider':14s} {'median s':>9s} {'rss MiB':>9s}   times")
    for name in names:
        print(f"{name:14s} {med[name]:9.3f} {mem[name]:9.1f}   {' '.join(f'{t:.2f}' for t in times[name])}")
    if {"naive", "native", "cpu"} <= set(names):
        ratios = {
            "time_cpu_over_naive": med["cpu"] / med["naive"],
            "time_cpu_over_native": med["cpu"] / med["native"],
            "rss_cpu_over_native": mem["cpu"] / mem["native"],
            "rss_cpu_over_naive": mem["cpu"] / mem["naive"],
        }
        report["ratios"] = ratios
        print("  ".join(f"{k} = {v:.2f}" for k, v in ratios.items()))
    print("agreement with", names[0] if "naive" not in names else "naive", json.dumps(agreement))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
