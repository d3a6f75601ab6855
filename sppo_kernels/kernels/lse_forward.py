"""Forward kernel: per-row log-sum-exp and target logit over one split of the vocabulary.

Grid: (row blocks, vocabulary splits). Program (i, s) takes BLOCK_N compacted rows (only rows that score a
token; the first ``n_valid`` rows of ``row_index``) and streams its split of the vocabulary in BLOCK_V tiles,
keeping an online max/sum in registers. It writes, per row, ``lse_part[s, row]`` and ``target_part[s, row]``
(the target's logit if the target lies in this split, else 0); the host side combines the splits.
Rows at or past ``n_valid`` are neither computed nor written.
"""

import triton
import triton.language as tl

from sppo_kernels.kernels.logit_tile import logit_tile


@triton.jit
def lse_forward_kernel(
    hidden_ptr,  # [N, H] input dtype
    weight_ptr,  # [V, H] input dtype
    bias_ptr,  # [V] input dtype (unused without HAS_BIAS)
    row_index_ptr,  # [N] int32: compacted row -> hidden row
    row_target_ptr,  # [N] int32: compacted row -> vocabulary id
    n_valid_ptr,  # [1] int32: number of compacted rows
    lse_part_ptr,  # [SPLITS, N] float32
    target_part_ptr,  # [SPLITS, N] float32
    N,
    V,
    H,
    stride_hn,
    stride_hh,
    stride_wv,
    stride_wh,
    softcap,
    inv_temperature,
    v_blocks_per_split,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_valid = tl.load(n_valid_ptr)
    if pid_n * BLOCK_N < n_valid:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = offs_n < n_valid
        rows = tl.load(row_index_ptr + offs_n, mask=row_mask, other=0).to(tl.int64)
        target = tl.load(row_target_ptr + offs_n, mask=row_mask, other=-1)

        running_max = tl.full((BLOCK_N,), float("-inf"), tl.float32)
        running_sum = tl.zeros((BLOCK_N,), tl.float32)
        target_logit = tl.zeros((BLOCK_N,), tl.float32)
        v_start = pid_s * v_blocks_per_split * BLOCK_V
        for vb in range(0, v_blocks_per_split):
            offs_v = v_start + vb * BLOCK_V + tl.arange(0, BLOCK_V)
            col_mask = offs_v < V
            z, _ = logit_tile(
                hidden_ptr, weight_ptr, bias_ptr, rows, row_mask, offs_v, col_mask, H,
                stride_hn, stride_hh, stride_wv, stride_wh, softcap, inv_temperature,
                HAS_BIAS, HAS_SOFTCAP, UPCAST_DOT, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_K,
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
