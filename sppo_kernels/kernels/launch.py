"""What every host launch of the kernels shares: tile configurations (per Triton release), the logits' transform as
kernel arguments, the size of the persistent grid, and the buffers a path allocates (its memory plan).

Nothing here is a Triton kernel. Whether kernels are interpreted is decided when they are decorated, i.e. by
``TRITON_INTERPRET`` at import time; :data:`INTERPRETING` reads the same variable.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
from torch import Tensor

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
KERNELS = ("forward", "backward", "atomic", "fused")  # lse_forward, logit_grad, logit_backward, exp_tile


@dataclass(frozen=True)
class BlockConfig:
    """Tile sizes and launch options of one kernel. Blocks are powers of two >= 16 (a GPU ``tl.dot`` limit).
    ``group_n``: row blocks per group in the grouped tile order (L2 reuse)."""

    block_n: int
    block_v: int
    block_k: int
    num_warps: int = 8
    num_stages: int = 3
    group_n: int = 8

    def __post_init__(self) -> None:
        for name in ("block_n", "block_v", "block_k"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {value}")
        if self.num_warps not in (1, 2, 4, 8, 16) or self.num_stages < 1 or self.group_n < 1:
            raise ValueError(f"invalid launch options in {self}")

    def label(self) -> str:
        """``BNxBVxBK-wW-sS-gG``, e.g. ``128x256x64-w16-s3-g16``."""
        return f"{self.block_n}x{self.block_v}x{self.block_k}-w{self.num_warps}-s{self.num_stages}-g{self.group_n}"


# Interpreter tiles are small so that tests exercise several blocks in every dimension at small sizes.
INTERPRETER_TILES = BlockConfig(16, 64, 32, 4, 1, 2)
# sm_90 tiles per Triton release, keyed by (kernel, input element size). Chosen from faithful sm_90 compiles of the
# benchmark presets (tests/sm90_compile.py: wgmma, a pipelined K loop, no spills, shared memory within the limit),
# not from timings: none has run on a GPU yet. Triton 3.6 (the GPU image's) compiles the forward at 128x256 with
# 16 warps without spills; Triton 3.9 spills 8-40 bytes there, so its forward keeps 128x128. The dA and exp kernels
# compile clean at 256x128 with 16 warps under both (benchmarks/RESULTS.md has both tables).
_FP32 = {
    ("forward", 4): BlockConfig(128, 64, 32, 8, 3, 16),
    ("backward", 4): BlockConfig(128, 64, 32, 8, 3, 16),
    ("atomic", 4): BlockConfig(64, 128, 32, 8, 2, 8),
    ("fused", 4): BlockConfig(128, 64, 32, 8, 3, 16),
}
_WIDE = {
    ("backward", 2): BlockConfig(256, 128, 64, 16, 3, 8),
    ("atomic", 2): BlockConfig(64, 128, 64, 8, 2, 8),
    ("fused", 2): BlockConfig(256, 128, 64, 16, 3, 8),
}
SM90_TILES = {
    "3.6": {("forward", 2): BlockConfig(128, 256, 64, 16, 3, 16), **_WIDE, **_FP32},
    "3.9": {("forward", 2): BlockConfig(128, 128, 64, 8, 3, 16), **_WIDE, **_FP32},
}
SEGMENT_BLOCK = 256  # segment_sum_kernel rows per step
ELEMENTWISE_ROWS = 16 if INTERPRETING else 32  # grad_from_exp_kernel rows per program


def tile_release(version: str = triton.__version__) -> str:
    """The key of :data:`SM90_TILES` for a Triton version: "3.9" from 3.9 on, "3.6" before (compiled for 3.6.0)."""
    major, minor = (int(part) for part in version.split(".")[:2])
    return "3.9" if (major, minor) >= (3, 9) else "3.6"


def default_tiles(kernel: str, dtype: torch.dtype, release: str | None = None) -> BlockConfig:
    """The tiles of ``kernel`` (one of :data:`KERNELS`) for inputs of ``dtype``: small ones when interpreting, else
    this Triton release's sm_90 table."""
    if INTERPRETING:
        return INTERPRETER_TILES
    return SM90_TILES[release or tile_release()][(kernel, 4 if dtype == torch.float32 else 2)]


def num_programs(device: torch.device, programs_per_sm: int = 1) -> int:
    """Programs of a persistent grid: SMs × programs_per_sm on a GPU, 4 when interpreting (so that tests see work
    items spread over several programs)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count * programs_per_sm
    return 4


@dataclass(frozen=True)
class LogitTransform:
    """Logits ``z = softcap(h·Wᵀ + b) / temperature`` (``softcap(a) = c·tanh(a/c)``) and the dot's precision, as
    the kernels take them: reciprocals precomputed on the host, so the epilogue only multiplies."""

    softcap: float | None
    temperature: float
    has_bias: bool
    dot_precision: str  # "ieee" / "tf32x3" for float32 inputs; 16-bit inputs ignore it

    def kernel_args(self) -> dict:
        cap = 1.0 if self.softcap is None else float(self.softcap)
        inv_temperature = 1.0 / float(self.temperature)
        return {
            "inv_softcap": 1.0 / cap,
            "cap_scale": cap * inv_temperature,  # z = tanh(a/c) · cap_scale
            "inv_temperature": inv_temperature,
            "HAS_BIAS": self.has_bias,
            "HAS_SOFTCAP": self.softcap is not None,
            "UPCAST_DOT": INTERPRETING,  # the interpreter's 16-bit dot is wrong: upcast tiles there, never on a GPU
            "DOT_PRECISION": self.dot_precision,
        }


@dataclass(frozen=True)
class Buffer:
    """One buffer of a path's memory plan. ``fill``: "zero", or None for a buffer every element of which a kernel or
    GEMM writes (NaN-filled when poisoning, so an unwritten element shows)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    fill: str | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty(0, dtype=self.dtype).element_size()


def plan_bytes(plan: dict[str, Buffer]) -> dict[str, int]:
    """Bytes of every buffer of a memory plan, with their sum under "total"."""
    sizes = {name: buffer.nbytes for name, buffer in plan.items()}
    return sizes | {"total": sum(sizes.values())}


def allocate(plan: dict[str, Buffer], device: torch.device, poison: bool) -> dict[str, Tensor]:
    """The tensors of a memory plan: the only workspace a path allocates besides its outputs and the row vectors."""
    out = {}
    for name, buffer in plan.items():
        if buffer.fill == "zero":
            out[name] = torch.zeros(buffer.shape, dtype=buffer.dtype, device=device)
        elif poison and buffer.dtype.is_floating_point:
            out[name] = torch.full(buffer.shape, float("nan"), dtype=buffer.dtype, device=device)
        else:
            out[name] = torch.empty(buffer.shape, dtype=buffer.dtype, device=device)
    return out


def gathered_rows(rows: int, width: int, dtype: torch.dtype, pad_rows: int) -> Buffer:
    """The scored rows of H, contiguous, followed by ``pad_rows`` zero rows (one row tile): every row tile a kernel
    addresses lies inside the buffer, so row loads need no mask."""
    return Buffer((rows + pad_rows, width), dtype)


def gather(hidden: Tensor, index: Tensor, out: Tensor) -> Tensor:
    """Fill ``out`` (:func:`gathered_rows`) with hidden's rows ``index`` and zero padding."""
    torch.index_select(hidden, 0, index, out=out[: index.shape[0]])
    out[index.shape[0] :].zero_()
    return out


def check_inputs(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    """The dtypes the kernels take (float32, bfloat16, float16; one dtype for all)."""
    if hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        dtype = str(hidden.dtype).removeprefix("torch.")
        raise TypeError(f"backend='triton' takes float32, bfloat16 or float16 inputs, not {dtype}")
    if weight.dtype != hidden.dtype or (bias is not None and bias.dtype != hidden.dtype):
        raise TypeError("backend='triton' needs hidden, weight and bias of one dtype")
