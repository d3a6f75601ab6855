"""Per-sequence sums of per-row values, deterministic (torch's ``index_add_`` and CUDA ``cumsum`` are not).

Grid: one program per sequence. Program b sums ``values[starts[b] : starts[b + 1]]`` in a fixed order (BLOCK rows
at a time into a float64 vector, then one tree reduction) and writes ``out[b]`` in float32. Every output element
has exactly one writer; an empty sequence writes 0. Host launch: :func:`segment_sums`.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from sppo_kernels.kernels.launch import SEGMENT_BLOCK


@triton.jit
def segment_sum_kernel(
    values_ptr,  # [>= starts[B]] float32, indexed by row
    starts_ptr,  # [B + 1] int64: sequence b owns rows starts[b] .. starts[b + 1]
    out_ptr,  # [B] float32
    BLOCK: tl.constexpr,
):
    seq = tl.program_id(0)
    first = tl.load(starts_ptr + seq)
    end = tl.load(starts_ptr + seq + 1)
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), tl.float64)
    for start in range(first, end, BLOCK):
        rows = start + offs
        acc += tl.load(values_ptr + rows, mask=rows < end, other=0.0).to(tl.float64)
    tl.store(out_ptr + seq, tl.sum(acc, axis=0).to(tl.float32))


def segment_sums(values: Tensor, starts: Tensor, block: int = SEGMENT_BLOCK) -> Tensor:
    """[len(starts) − 1] float32: the sums of ``values`` [>= starts[-1]] float32 over the segments of ``starts``
    (int64, non-decreasing), one program per segment."""
    out = torch.empty(starts.shape[0] - 1, dtype=torch.float32, device=values.device)
    if out.numel() > 0:
        segment_sum_kernel[(out.numel(),)](values, starts, out, BLOCK=block)
    return out
