"""Compile the Triton kernels for an H100/H200 (sm_90) exactly as the JIT would at the benchmark presets, on a
machine with no GPU, and report what the hardware would run.

Faithful, not hand-typed: the kernels' own host launches run on ``meta`` tensors of the preset's real shapes
(no memory, no device) with every kernel launch captured instead of executed, so each kernel gets the real
launch arguments, block configuration, grid and options. Each captured call then goes through the JIT's own
binder (``triton.runtime.jit`` specialisation: integers equal to 1 become constexprs, pointers and integers
divisible by 16 get ``tt.divisibility = 16``), ``triton.compile`` for ``GPUTarget("cuda", 90, 32)`` and the
bundled ptxas. No driver is needed. Tiles: the installed Triton release's table (``kernels.launch.SM90_TILES``).

Reported per kernel: shared memory, registers, spill bytes, wgmma count, whether the K loop is software-pipelined
(async copies or TMA in the TTGIR) and how many shared-memory buffers it cycles through, and the atomics left in
the PTX with their semantics.

    python tests/sm90_compile.py [--quick] [--sweep] [--markdown]     (TRITON_INTERPRET must be unset)

``--quick``: bfloat16 at both presets (the suite's check); default: bfloat16, float16, float32 (ieee) and float32
with ``fp32_precision="tf32x3"``; ``--sweep``: the matmul kernels in bfloat16 with each tile candidate of the GPU
timing sweep (``benchmarks/triton_sweep.py``). One JSON line per compiled kernel; ``--markdown`` also prints the
table for benchmarks/RESULTS.md. Run it under another Triton from a venv that has it, e.g.
``PYTHONPATH=. .venv-triton36/bin/python tests/sm90_compile.py --markdown`` (Triton 3.6.0, the GPU image's).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; 1 = its (and 3.6's) default

import torch
import triton
from triton.backends.compiler import GPUTarget

try:  # JIT internals of Triton 3.6 to 3.9; another Triton may lack them: main() then says so
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature
except ImportError as err:  # pragma: no cover - depends on the installed Triton
    MISSING_API: ImportError | None = err
else:
    MISSING_API = None

from sppo_kernels.kernels import exp_workspace, launch, logit_backward, logit_grad, lse_forward, rows, segment_sum
from sppo_kernels.kernels.launch import BlockConfig, LogitTransform

TARGET = GPUTarget("cuda", 90, 32)
SMS = 132  # H100 SXM and H200
SHARED_LIMIT = 232448  # bytes of shared memory one block may use on sm_90 (227 KB)
KERNELS = {
    "lse_forward_kernel": lse_forward.lse_forward_kernel,
    "logit_grad_kernel": logit_grad.logit_grad_kernel,
    "logit_backward_kernel": logit_backward.logit_backward_kernel,
    "exp_tile_kernel": exp_workspace.exp_tile_kernel,
    "grad_from_exp_kernel": exp_workspace.grad_from_exp_kernel,
    "segment_sum_kernel": segment_sum.segment_sum_kernel,
}
# Kernels on a path that must keep tensor cores, a pipelined K loop and no spills for 16-bit inputs. The atomic
# backward is the old design kept for the A/B measurement: reported, only held to the shared-memory limit.
MATMUL_KERNELS = ("lse_forward_kernel", "logit_grad_kernel", "exp_tile_kernel")


@dataclass(frozen=True)
class Preset:
    name: str
    hidden: int
    vocab: int
    softcap: float | None
    tokens: int = 8192
    seq_len: int = 1024


PRESETS = (Preset("llama3-8b", 4096, 128256, None), Preset("gemma2-9b", 3584, 256000, 30.0))
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp32-tf32x3": torch.float32}


@contextlib.contextmanager
def captured_launches(n_scored: int, seq_len: int):
    """Record every kernel launch instead of running it; the host reads of the scored-row count and sequence
    starts (the only host synchronisations) return ``n_scored`` rows in sequences of ``seq_len``."""
    calls: list[tuple[str, tuple, dict, tuple]] = []
    saved = {name: kernel.run for name, kernel in KERNELS.items()}
    count, host_starts = rows.ScoredRows.count, rows.ScoredRows.host_starts

    def recorder(name):
        def run(*args, grid, warmup, **kwargs):
            calls.append((name, args, kwargs, tuple(grid)))

        return run

    for name, kernel in KERNELS.items():
        kernel.run = recorder(name)
    rows.ScoredRows.count = lambda self: n_scored
    rows.ScoredRows.host_starts = lambda self: [min(b * seq_len, n_scored) for b in range(self.num_seqs + 1)]
    try:
        yield calls
    finally:
        for name, kernel in KERNELS.items():
            kernel.run = saved[name]
        rows.ScoredRows.count, rows.ScoredRows.host_starts = count, host_starts


def preset_launches(preset: Preset, dtype: torch.dtype, tiles: dict[str, BlockConfig | None],
                    precision: str = "ieee") -> list[tuple[str, tuple, dict, tuple]]:  # fmt: skip
    """Every kernel launch of one forward, one chunked backward, one atomic backward and one fused SPPO forward
    at ``preset`` (all rows scored, sequences of seq_len rows), captured from the kernels' own host launches.
    ``tiles``: kernel kind -> tiles (None: the installed release's default)."""
    meta = {"device": "meta"}
    n, seqs = preset.tokens, preset.tokens // preset.seq_len
    hidden = torch.empty(n, preset.hidden, dtype=dtype, **meta)
    weight = torch.empty(preset.vocab, preset.hidden, dtype=dtype, **meta)
    targets, seq_ids = torch.zeros(n, dtype=torch.long, **meta), torch.zeros(n, dtype=torch.long, **meta)
    transform = LogitTransform(preset.softcap, 1.0, False, precision if dtype == torch.float32 else "tf32")
    block = {kind: tiles.get(kind) or launch.default_tiles(kind, dtype) for kind in launch.KERNELS}
    needs = (True, True, False)
    zeros = torch.zeros(seqs, dtype=torch.float64, **meta)
    with captured_launches(n, preset.seq_len) as calls:
        scored = rows.ScoredRows(targets, seq_ids, seqs)
        _, lse = lse_forward.forward(hidden, weight, None, scored, transform, block["forward"], SMS, False)
        row_grad = torch.zeros(n, **meta)
        logit_grad.chunked_backward(hidden, weight, None, scored, lse, row_grad, needs, transform, block["backward"],
                                    64 << 20, "auto", False)  # fmt: skip
        logit_backward.atomic_backward(hidden, weight, None, scored, lse, row_grad, needs, transform, block["atomic"])
        fused = exp_workspace.fused_forward(hidden, weight, None, scored, zeros, zeros, needs, transform,
                                            block["fused"], 1 << 30, False)  # fmt: skip
        assert fused is not None, "the fused path fell back: a preset sequence does not fit its workspace"
    return calls


def compile_call(name: str, args: tuple, kwargs: dict):
    """triton.compile of one captured launch, specialised by the JIT's own binder for sm_90."""
    kernel = KERNELS[name]
    backend = make_backend(TARGET)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = dict(kwargs, debug=False)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=TARGET, options=options.__dict__)


def specialization_key(name: str, args: tuple, kwargs: dict) -> tuple:
    kernel = KERNELS[name]
    binder = create_function_from_signature(kernel.signature, kernel.params, make_backend(TARGET))
    _, specialization, _ = binder(*args, **dict(kwargs, debug=False))
    return name, repr(specialization), repr(sorted((k, str(v)) for k, v in kwargs.items()))


def ptxas_usage(ptx: str, name: str) -> tuple[int, int]:
    """(registers per thread, spill-store bytes) reported by Triton's bundled ptxas for sm_90a."""
    ptxas = get_ptxas(90).path
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / f"{name}.ptx"
        source.write_text(ptx)
        report = subprocess.run(
            [str(ptxas), "-v", "--gpu-name", "sm_90a", str(source), "-o", str(Path(tmp) / "out.cubin")],
            capture_output=True, text=True, check=True,
        ).stderr  # fmt: skip
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    spills = int(re.search(r"(\d+) bytes spill stores", report).group(1))
    return registers, spills


def pipelining(ttgir: str) -> tuple[int, int, int]:
    """(async copies, TMA loads, buffers) of the TTGIR: buffers = the depth of the deepest multi-buffered shared
    allocation the K loop's loads cycle through (num_stages for wgmma kernels, num_stages − 1 for FMA dots)."""
    async_copies = len(re.findall(r"ttg\.async_copy_global_to_local", ttgir))
    tma = len(re.findall(r"async_tma_copy_global_to_local|tt\.descriptor_load|async_tma_gather", ttgir))
    depths = [int(d) for d in re.findall(r"ttg\.local_alloc\s*:\s*\(\)\s*->\s*!ttg\.memdesc<(\d+)x\d+x\d+x", ttgir)]
    return async_copies, tma, max(depths, default=1 if async_copies or tma else 0)


def atomics(ptx: str) -> dict[str, int]:
    """PTX atomic/reduction instructions by full opcode (semantics included), e.g. atom.global.gpu.acq_rel.add.f32."""
    found: dict[str, int] = {}
    for op in re.findall(r"^\s*(?:@%p\d+\s+)?((?:atom|red)\.[\w.]+)", ptx, flags=re.M):
        found[op] = found.get(op, 0) + 1
    return found


def special_functions(ptx: str, kwargs: dict) -> float | None:
    """Special-function (MUFU) instructions per tile element of a tiled kernel's PTX: ``ex2``, ``lg2``, ``rcp``,
    ``sqrt``, ``tanh``, and each float division (``div.full``/``div.approx``/``div.rn``: one reciprocal). The PTX of
    a tile is unrolled per thread, so the count divided by the elements a thread holds is per logit."""
    rows = kwargs.get("BLOCK_N", kwargs.get("BLOCK_R"))
    if rows is None or "BLOCK_V" not in kwargs:
        return None
    ops = re.findall(r"^\s*(?:@%p\d+\s+)?(ex2|lg2|rcp|sqrt|rsqrt|tanh|div)\.(\w+)", ptx, flags=re.M)
    count = sum(1 for op, kind in ops if op != "div" or kind in ("full", "approx", "rn"))
    per_thread = rows * kwargs["BLOCK_V"] / (32 * kwargs.get("num_warps", 4))
    return round(count / per_thread, 2)


def report(preset: Preset, dtype_name: str, name: str, args: tuple, kwargs: dict, grid: tuple) -> dict:
    start = time.time()
    compiled = compile_call(name, args, kwargs)
    ttgir, ptx = compiled.asm["ttgir"], compiled.asm["ptx"]
    registers, spills = ptxas_usage(ptx, compiled.metadata.name)
    async_copies, tma, stages = pipelining(ttgir)
    tiles = "×".join(str(kwargs[k]) for k in ("BLOCK_N", "BLOCK_R", "BLOCK_V", "BLOCK_K", "BLOCK") if k in kwargs)
    return {
        "preset": preset.name,
        "dtype": dtype_name,
        "kernel": name,
        "tiles": tiles,
        "num_warps": kwargs.get("num_warps", 4),  # the JIT defaults
        "num_stages": kwargs.get("num_stages", 3),
        "grid": list(grid),
        "shared_bytes": compiled.metadata.shared,
        "registers": registers,
        "spill_bytes": spills,
        "wgmma": ttgir.count("ttng.warp_group_dot "),
        "async_copies": async_copies,
        "tma_loads": tma,
        "buffers": stages,
        "atomics": atomics(ptx),
        "sfu_per_logit": special_functions(ptx, kwargs),
        "compile_s": round(time.time() - start, 1),
    }


def problems(entry: dict) -> list[str]:
    """Why a compiled kernel fails the suite's check (empty when it passes): every kernel within the shared-memory
    limit; every 16-bit kernel of a default path (all but the first design's atomic backward) free of spills; the
    matmul ones with wgmma, a pipelined K loop and no atomics."""
    out = []
    if entry["shared_bytes"] > SHARED_LIMIT:
        out.append(f"shared memory {entry['shared_bytes']} > {SHARED_LIMIT}")
    if entry["dtype"].startswith("fp32") or entry["kernel"] == "logit_backward_kernel":
        return out
    if entry["spill_bytes"] > 0:
        out.append(f"{entry['spill_bytes']} bytes of register spills")
    if entry["kernel"] in MATMUL_KERNELS:
        if entry["wgmma"] == 0:
            out.append("no wgmma (ttng.warp_group_dot)")
        if entry["async_copies"] + entry["tma_loads"] == 0 or entry["buffers"] < 2:
            out.append("K loop not software-pipelined")
        if entry["atomics"]:
            out.append(f"atomics on the default path: {entry['atomics']}")
    return out


def markdown(entries: list[dict]) -> str:
    lines = [
        "| preset | dtype | kernel | tiles, warps, stages | grid | shared B | regs | spills B | wgmma "
        "| pipelined K loop | atomics | SFU ops per logit |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in entries:
        piped = f"{e['buffers']} buffers, cp.async" if e["async_copies"] else "—"
        if e["tma_loads"]:
            piped = f"{e['buffers']} buffers, TMA"
        atoms = ", ".join(f"{k} ×{v}" for k, v in e["atomics"].items()) or "none"
        lines.append(
            f"| {e['preset']} | {e['dtype']} | `{e['kernel']}` | {e['tiles']}, {e['num_warps']}, {e['num_stages']} "
            f"| {'×'.join(map(str, e['grid']))} | {e['shared_bytes']} | {e['registers']} | {e['spill_bytes']} "
            f"| {e['wgmma']} | {piped} | {atoms} | {'—' if e['sfu_per_logit'] is None else e['sfu_per_logit']} |"
        )
    return "\n".join(lines)


API_MISMATCH = 3  # exit status when this Triton's JIT internals are not the ones the faithful build relies on


def sweep_tiles() -> dict[str, BlockConfig]:
    """The tile candidates of the GPU timing sweep (benchmarks/triton_sweep.py, a benchmark-only table)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.triton_sweep import SWEEP_TILES

    return SWEEP_TILES


def main(argv: list[str]) -> int:
    assert os.environ.get("TRITON_INTERPRET") != "1", "compile with the interpreter off"
    assert not launch.INTERPRETING
    needed = [hasattr(lse_forward.lse_forward_kernel, name) for name in ("_pack_args", "signature", "params")]
    if MISSING_API is not None or not all(needed):
        print(f"triton {triton.__version__}: JITFunction internals differ from 3.6-3.9's; cannot build faithfully")
        return API_MISMATCH
    dtypes = ("bf16",) if "--quick" in argv or "--sweep" in argv else tuple(DTYPES)
    configs: dict[str, dict] = {"default": {}}
    if "--sweep" in argv:
        configs = {label: dict.fromkeys(("forward", "backward", "fused"), t) for label, t in sweep_tiles().items()}
    entries, failures = [], []
    print(json.dumps({"triton": triton.__version__, "tiles": launch.tile_release()}), flush=True)
    for (label, tiles), dtype_name, preset in itertools.product(configs.items(), dtypes, PRESETS):
        seen = set()
        precision = "tf32x3" if dtype_name == "fp32-tf32x3" else "ieee"
        for name, args, kwargs, grid in preset_launches(preset, DTYPES[dtype_name], tiles, precision):
            if label != "default" and name not in MATMUL_KERNELS:
                continue
            key = specialization_key(name, args, kwargs)
            if key in seen:
                continue
            seen.add(key)
            entry = report(preset, dtype_name, name, args, kwargs, grid)
            entry["problems"] = problems(entry)
            failures += entry["problems"] if label == "default" else []
            entries.append(entry)
            print(json.dumps(entry), flush=True)
    if "--markdown" in argv:
        print(markdown(entries))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
