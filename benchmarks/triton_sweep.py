"""GPU A/B of the Triton backend's design choices at the benchmark presets (needs a CUDA device; never run here).

For each preset and each variant of ``TritonConfig`` (old atomic vs new chunked backward, fused SPPO loss on/off,
dH accumulation, chunk size, the tile candidates of ``SWEEP_TILES``, a few launch options) it measures, on the same
inputs:

- the forward alone (``sequence_logprobs`` under no_grad) and the SPPO loss forward + backward: median ms of
  ``--repeats`` timed iterations (CUDA events) after ``--warmup`` untimed ones;
- the peak memory above the inputs during one forward + backward;
- bitwise determinism: two forward + backward runs compared element for element (loss, dH, dW);
- the agreement of loss and gradients with the default variant (max relative difference);
- what the JIT really compiled on this device: registers, spills and shared memory per kernel;
- the workspace the code's own memory plans predict, next to the measured peak.

    python benchmarks/triton_sweep.py --out DIR [--presets llama3-8b,gemma2-9b] [--tokens 8192] [--variants ...]

Writes DIR/triton_sweep.jsonl (one line per preset × variant) and prints a Markdown table. ``--device cpu`` with
TRITON_INTERPRET=1 runs the same code on a small preset in the interpreter (a smoke test: its timings mean
nothing).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import sppo_kernels as sk  # noqa: E402
from benchmarks.workload import PRESETS  # noqa: E402
from sppo_kernels.kernels.launch import BlockConfig  # noqa: E402
from sppo_kernels.kernels.logit_grad import resolve_dh_accumulation  # noqa: E402

# Tile candidates of the timing sweep (benchmark-only; the defaults are kernels.launch.SM90_TILES). All compile for
# sm_90 with wgmma and a pipelined K loop at both presets in bfloat16; under Triton 3.6 the 128x128 ones have no
# spills in any kernel, the wide ones spill 8-12 bytes in one kernel each (python tests/sm90_compile.py --sweep;
# table in benchmarks/RESULTS.md).
SWEEP_TILES = {
    "128x128x64-w8-s3": BlockConfig(128, 128, 64, 8, 3, 16),
    "128x128x64-w8-s4": BlockConfig(128, 128, 64, 8, 4, 16),
    "128x256x64-w16-s3": BlockConfig(128, 256, 64, 16, 3, 16),
    "256x128x64-w16-s3": BlockConfig(256, 128, 64, 16, 3, 8),
    "128x256x32-w16-s4": BlockConfig(128, 256, 32, 16, 4, 16),
}


def variants() -> dict[str, dict]:
    """name -> TritonConfig options. Tiles apply to the forward, the chunked backward and the fused loss."""
    out: dict[str, dict] = {
        "default": {},
        "atomic-backward": {"backward": "atomic"},
        "fused-loss": {"fused_sppo_loss": True},
        "dh-rounded": {"dh_accumulation": "rounded"},
        "chunk-256MiB": {"chunk_bytes": 256 << 20},
        "programs-per-sm-2": {"programs_per_sm": 2},
    }
    for label, tiles in SWEEP_TILES.items():
        out[f"tiles-{label}"] = {"forward_block": tiles, "backward_block": tiles, "fused_block": tiles}
        out[f"fused-tiles-{label}"] = {"fused_sppo_loss": True, "fused_block": tiles}
    return out


def make_inputs(preset_name: str, tokens: int, device: str = "cuda", seed: int = 0) -> dict:
    """bf16 inputs of one SPPO step: B sequences of the preset's length, the first quarter of each a masked
    prompt, non-uniform targets. Built directly (no reference pass), identical for every variant."""
    preset = PRESETS[preset_name]
    seq_len = min(preset.seq_len, tokens // 2)
    batch = max(2, tokens // seq_len)
    gen = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(batch, seq_len, preset.hidden, generator=gen, device=device).bfloat16()
    weight = (preset.logit_std / preset.hidden**0.5) * torch.randn(
        preset.vocab, preset.hidden, generator=gen, device=device
    )
    labels = torch.randint(0, preset.vocab, (batch, seq_len), generator=gen, device=device)
    labels[:, : seq_len // 4] = -100
    return {
        "hidden": hidden,
        "weight": weight.bfloat16(),
        "labels": labels,
        "ref_logps": -seq_len * 2.0 + torch.randn(batch, generator=gen, device=device),
        "target_probs": 0.1 + 0.8 * torch.rand(batch, generator=gen, device=device),
        "softcap": preset.softcap,
    }


class CompiledStats:
    """Registers, spills and shared memory of every kernel the JIT compiles while it is active."""

    def __init__(self) -> None:
        from sppo_kernels.kernels import exp_workspace, logit_backward, logit_grad, lse_forward, segment_sum

        self.kernels = [lse_forward.lse_forward_kernel, logit_grad.logit_grad_kernel,
                        logit_backward.logit_backward_kernel, exp_workspace.exp_tile_kernel,
                        exp_workspace.grad_from_exp_kernel, segment_sum.segment_sum_kernel]  # fmt: skip
        self.seen: dict[str, dict] = {}

    def __enter__(self) -> CompiledStats:
        for kernel in self.kernels:
            original = kernel.run

            def run(*args, _original=original, _name=kernel.__name__, **kwargs):
                compiled = _original(*args, **kwargs)
                if compiled is not None and _name not in self.seen:
                    self.seen[_name] = {"registers": getattr(compiled, "n_regs", None),
                                        "spills": getattr(compiled, "n_spills", None),
                                        "shared": compiled.metadata.shared}  # fmt: skip
                return compiled

            kernel.run = run
        return self

    def __exit__(self, *exc) -> None:
        for kernel in self.kernels:
            del kernel.run  # back to the class attribute


def step(inputs: dict, backend, eta: float = 1000.0):
    hidden = inputs["hidden"].detach().requires_grad_(True)
    weight = inputs["weight"].detach().requires_grad_(True)
    loss = sk.sppo_loss(hidden, weight, inputs["labels"], inputs["ref_logps"], inputs["target_probs"], eta=eta,
                        softcap=inputs["softcap"], backend=backend)  # fmt: skip
    loss.backward()
    return loss.detach(), hidden.grad, weight.grad


def forward_only(inputs: dict, backend) -> torch.Tensor:
    with torch.no_grad():
        return sk.sequence_logprobs(inputs["hidden"], inputs["weight"], inputs["labels"], softcap=inputs["softcap"],
                                    backend=backend)  # fmt: skip


def timed(fn, warmup: int, repeats: int, cuda: bool) -> float:
    """Median milliseconds of ``repeats`` calls after ``warmup`` untimed ones (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - begin))
    return statistics.median(times)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def formula_mib(config, rows: int, seq_rows: int, vocab: int, width: int, programs: int) -> dict[str, float]:
    """The workspace the code's memory plans predict (MiB) for ``rows`` scored rows (the largest sequence
    ``seq_rows``), bf16: the forward's, the backward's (chunked or atomic) or the fused forward's, plus row vectors."""
    from sppo_kernels.kernels import exp_workspace, logit_grad, lse_forward
    from sppo_kernels.kernels.launch import plan_bytes
    from sppo_kernels.kernels.rows import ROW_VECTOR_BYTES

    dtype, needs = torch.bfloat16, (True, True, False)
    dh_mode = resolve_dh_accumulation(config.dh_accumulation, torch.device("cuda"), dtype)
    plans = {"forward": lse_forward.forward_plan(rows, vocab, width, dtype, config.block("forward", dtype), programs)}
    if config.fused_sppo_loss:
        chunk = exp_workspace.fused_chunk_rows(vocab, 2, config.fused_workspace_bytes) // seq_rows * seq_rows
        plans["fused"] = exp_workspace.fused_plan(rows, min(rows, max(seq_rows, chunk)), vocab, width, dtype,
                                                  config.block("fused", dtype), False)  # fmt: skip
    elif config.backward == "chunked":
        plans["backward"] = logit_grad.chunked_backward_plan(rows, vocab, width, dtype, config.block("backward", dtype),
                                                             config.chunk_bytes, needs, dh_mode)  # fmt: skip
    else:  # float32 dH and dW buffers
        plans["backward"] = {}
    out = {name: plan_bytes(plan)["total"] / 2**20 for name, plan in plans.items()}
    if config.backward == "atomic" and not config.fused_sppo_loss:
        out["backward"] = 4 * (rows + vocab) * width / 2**20
    return out | {"row vectors": ROW_VECTOR_BYTES * rows / 2**20}


def run_variant(inputs: dict, name: str, options: dict, baseline, warmup: int, repeats: int) -> dict:
    backend = sk.get_backend("triton", **options)
    cuda = inputs["hidden"].is_cuda
    row: dict = {"variant": name, "options": {k: str(v) for k, v in options.items()}}
    try:
        with CompiledStats() as stats:
            first = step(inputs, backend)
        second = step(inputs, backend)
        row["deterministic"] = all(torch.equal(x, y) for x, y in zip(first, second, strict=True))
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step(inputs, backend)
            torch.cuda.synchronize()
            row["peak_extra_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        row["forward_ms"] = timed(lambda: forward_only(inputs, backend), warmup, repeats, cuda)
        row["fwd_bwd_ms"] = timed(lambda: step(inputs, backend), warmup, repeats, cuda)
        row["compiled"] = stats.seen
        config = backend.resolved_config()
        rows, width = int((inputs["labels"] != -100).sum()), inputs["hidden"].shape[-1]
        seq_rows = int((inputs["labels"][0] != -100).sum())
        programs = torch.cuda.get_device_properties(0).multi_processor_count if cuda else 4
        row["dh_accumulation"] = resolve_dh_accumulation(
            config.dh_accumulation, inputs["hidden"].device, torch.bfloat16
        )
        row["formula_mib"] = formula_mib(config, rows, seq_rows, inputs["weight"].shape[0], width, programs)
        row["gradients_mib"] = 2 * (inputs["hidden"].numel() + inputs["weight"].numel()) / 2**20
        if baseline is not None:
            row["diff_vs_default"] = {k: rel_diff(x, y) for k, x, y in zip(("loss", "dH", "dW"), first, baseline,
                                                                            strict=True)}  # fmt: skip
        row["result"] = first
    except Exception as err:  # one failing variant must not hide the others
        row["error"] = f"{type(err).__name__}: {err}"[:2000]
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--presets", default="llama3-8b,gemma2-9b")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--variants", help="comma-separated subset (default: all)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda", help="cuda, or cpu with TRITON_INTERPRET=1 (a smoke test)")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("triton_sweep needs a CUDA device (or --device cpu with TRITON_INTERPRET=1)", file=sys.stderr)
        return 2
    chosen = variants()
    if args.variants:
        chosen = {k: chosen[k] for k in args.variants.split(",")}
    args.out.mkdir(parents=True, exist_ok=True)
    lines = ["| preset | variant | fwd ms | fwd+bwd ms | peak extra MiB | deterministic | max rel diff vs default |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    failed = False
    with (args.out / "triton_sweep.jsonl").open("w") as sink:
        for preset in args.presets.split(","):
            inputs = make_inputs(preset, args.tokens, args.device)
            baseline = None
            for name, options in chosen.items():
                start = time.time()
                row = run_variant(inputs, name, options, baseline, args.warmup, args.repeats)
                result = row.pop("result", None)
                if name == "default" and result is not None:
                    baseline = result
                device = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
                row |= {"preset": preset, "tokens": args.tokens, "device": device, "torch": torch.__version__,
                        "seconds": round(time.time() - start, 1)}  # fmt: skip
                sink.write(json.dumps(row) + "\n")
                sink.flush()
                failed |= "error" in row
                diff = row.get("diff_vs_default")
                diff_text = "—" if diff is None else f"{max(diff.values()):.1e}"
                lines.append(
                    f"| {preset} | {name} | {row.get('forward_ms', float('nan')):.2f} "
                    f"| {row.get('fwd_bwd_ms', float('nan')):.2f} | {row.get('peak_extra_mib', float('nan')):.0f} "
                    f"| {row.get('deterministic', row.get('error', '?'))} | {diff_text} |"
                )
                print(lines[-1], flush=True)
            del inputs
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
    print("\n".join(lines))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
