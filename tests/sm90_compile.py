"""Compile every Triton kernel, in every GPU configuration, for an H100 (sm_90) on a machine with no GPU.

Triton lowers to PTX and runs its bundled ptxas without a driver, so this catches what the interpreter never
does: ``tl.dot`` shape limits, unsupported ops, shared memory over the per-block limit, register spills.
Run as a script (TRITON_INTERPRET must be unset); prints one JSON line per compiled kernel.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

from sppo_kernels.autograd import fused_triton
from sppo_kernels.kernels.logit_backward import logit_backward_kernel
from sppo_kernels.kernels.lse_forward import lse_forward_kernel

TRITON_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
INPUT_POINTERS = ("hidden_ptr", "weight_ptr", "bias_ptr")
FLOAT_SCALARS = ("softcap", "inv_temperature")


def compile_for_sm90(kernel, dtype: torch.dtype, constexprs: dict) -> dict:
    names = kernel.arg_names
    signature = {}
    for name in names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in INPUT_POINTERS:
            signature[name] = "*" + TRITON_TYPES[dtype]
        elif name.endswith("index_ptr") or name.endswith("target_ptr") or name == "n_valid_ptr":
            signature[name] = "*i32"
        elif name.endswith("_ptr"):
            signature[name] = "*fp32"
        else:
            signature[name] = "fp32" if name in FLOAT_SCALARS else "i32"
    source = ASTSource(kernel, signature, constexprs={(names.index(k),): v for k, v in constexprs.items()})
    cfg = fused_triton.block_config("forward" if kernel is lse_forward_kernel else "backward", dtype)
    compiled = triton.compile(
        source,
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages},
    )
    registers, spill_bytes = ptxas_usage(compiled.asm["ptx"], compiled.metadata.name)
    return {
        "kernel": kernel.__name__,
        "dtype": TRITON_TYPES[dtype],
        "shared_bytes": compiled.metadata.shared,
        "registers": registers,
        "spill_bytes": spill_bytes,
        **{k: v for k, v in constexprs.items() if k.startswith("HAS") or k.startswith("NEED")},
    }


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


def main() -> None:
    """All dtypes × bias × soft-cap; ``--quick``: float32 and bfloat16 with bias and soft-cap only."""
    assert os.environ.get("TRITON_INTERPRET") != "1", "compile with the interpreter off"
    quick = "--quick" in sys.argv[1:]
    flags = ((True, True),) if quick else tuple(itertools.product((False, True), (False, True)))
    dtypes = (torch.float32, torch.bfloat16) if quick else tuple(TRITON_TYPES)
    for dtype, (has_bias, has_softcap) in itertools.product(dtypes, flags):
        options = fused_triton._kernel_options(torch.empty(0, dtype=dtype), None, None, 1.0)
        common = {
            "HAS_BIAS": has_bias,
            "HAS_SOFTCAP": has_softcap,
            "UPCAST_DOT": False,
            "DOT_PRECISION": options["DOT_PRECISION"],
        }
        for kernel, kind in ((lse_forward_kernel, "forward"), (logit_backward_kernel, "backward")):
            cfg = fused_triton.block_config(kind, dtype)
            constexprs = common | {"BLOCK_N": cfg.block_n, "BLOCK_V": cfg.block_v, "BLOCK_K": cfg.block_k}
            if kernel is logit_backward_kernel:
                constexprs |= {"NEED_GRAD_HIDDEN": True, "NEED_GRAD_WEIGHT": True, "NEED_GRAD_BIAS": has_bias}
            print(json.dumps(compile_for_sm90(kernel, dtype, constexprs)), flush=True)


if __name__ == "__main__":
    main()
