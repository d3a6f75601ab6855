"""Forward kernel: per-row log-sum-exp and target logit over one split of the vocabulary.

Rows come gathered: the first ``n_valid`` rows of ``hidden`` are the rows that score a token, contiguous, so a
row tile is a dense [BLOCK_N, BLOCK_K] block (the buffer is padded: row loads need no mask). ``n_valid`` stays
on the device (no host synchronisation), so the grid is persistent: a fixed number of programs walks the
``cdiv(n_valid, BLOCK_N) × num_splits`` work items, counted on the device, in the grouped order of
:func:`grouped_tile` (L2 reuse of W and H). Rows that score nothing cost no program at all.

A work item (row block i, split s) streams its split of the vocabulary in BLOCK_V tiles, keeping an online
max/sum in registers, and writes per row ``lse_part[s, row]`` and ``target_part[s, row]`` (the target's logit if
the target lies in this split, else 0). The host side merges the splits; rows at or past ``n_valid`` are never
written. No atomics.
"""

import triton
import triton.language as tl

from sppo_kernels.kernels.logit_tile import grouped_tile, logit_tile


@triton.jit
def lse_forward_kernel(
    hidden_ptr,  # [N, H] input dtype; the first n_valid rows are the scored ones
    weight_ptr,  # [V, H] input dtype
    bias_ptr,  # [V] input dtype (unused without HAS_BIAS)
    target_ptr,  # [N] int64: vocabulary id of each gathered row
    n_valid_ptr,  # [1] int64: number of scored rows
    lse_part_ptr,  # [num_splits, N] float32
    target_part_ptr,  # [num_splits, N] float32
    N,
    V,
    H,
    stride_hn,
    stride_hh,
    stride_wv,
    stride_wh,
    softcap,
    inv_temperature,
    num_splits,
    v_blocks_per_split,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    GROUP_N: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    n_valid = tl.load(n_valid_ptr).to(tl.int32)
    row_blocks = tl.cdiv(n_valid, BLOCK_N)
    for item in range(tl.program_id(0), row_blocks * num_splits, tl.num_programs(0)):
        pid_n, pid_s = grouped_tile(item, row_blocks, num_splits, GROUP_N)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = offs_n < n_valid
        rows = offs_n.to(tl.int64)
        target = tl.load(target_ptr + offs_n, mask=row_mask, other=-1).to(tl.int32)

        running_max = tl.full((BLOCK_N,), float("-inf"), tl.float32)
        running_sum = tl.zeros((BLOCK_N,), tl.float32)
        target_logit = tl.zeros((BLOCK_N,), tl.float32)
        v_start = pid_s * v_blocks_per_split * BLOCK_V
        for vb in range(0, tl.minimum(v_blocks_per_split, tl.cdiv(V - v_start, BLOCK_V))):
            offs_v = v_start + vb * BLOCK_V + tl.arange(0, BLOCK_V)
            col_mask = offs_v < V
            z, _ = logit_tile(
                hidden_ptr, weight_ptr, bias_ptr, rows, row_mask, offs_v, col_mask, H,
                stride_hn, stride_hh, stride_wv, stride_wh, softcap, inv_temperature,
                HAS_BIAS, HAS_SOFTCAP, UPCAST_DOT, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_K,
                MASK_ROWS=False,
            )  # fmt: skip
            z = tl.where(col_mask[None, :], z, float("-inf"))
            target_logit += tl.sum(tl.where(offs_v[None, :] == target[:, None], z, 0.0), axis=1)
            tile_max = tl.max(z, axis=1)
            new_max = tl.maximum(running_max, tile_max)
            # A split whose tiles are all padding keeps max = -inf; guard the rescale against (-inf) - (-inf).
            safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
            running_sum = running_sum * tl.exp(running_max - safe_max) + tl.sum(tl.exp(z - safe_max[:, None]), axis=1)
            running_max = new_max

        lse = running_max + tl.log(running_sum)
        out = pid_s.to(tl.int64) * N + offs_n
        tl.store(lse_part_ptr + out, lse, mask=row_mask)
        tl.store(target_part_ptr + out, target_logit, mask=row_mask)
