"""Per-sequence sums of per-row values, deterministic (torch's ``index_add_`` and CUDA ``cumsum`` are not).

Grid: one program per sequence. Program b sums ``values[starts[b] : starts[b + 1]]`` in a fixed order (BLOCK rows
at a time into a float64 vector, then one tree reduction) and writes ``out[b]`` in float32. Every output element
has exactly one writer; an empty sequence writes 0.
"""

import triton
import triton.language as tl


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
