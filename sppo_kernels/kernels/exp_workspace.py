"""Kernels of the fused SPPO loss (6NHV): logits computed once per chunk of whole sequences, kept as a
``exp(z − m_tile)`` workspace in the input dtype, and turned into the logit gradient once the chunk's per-sequence
loss gradients are known.

``exp_tile_kernel`` — grid: one program per (row block, vocabulary tile) of the chunk, grouped order. It writes
the tile's ``e = exp(z − m)`` (m = the tile's row max, float32, so every stored value lies in (0, 1]), m and the
tile's row sum of e (float32, before rounding) into [rows, tiles] arrays, and the target logit (exact, float32)
from the one tile that holds the target. The host merges ``m + log(sum)`` over tiles into the log-sum-exp.

``grad_from_exp_kernel`` — grid: (row blocks, vocabulary tiles), elementwise and in place: reads e, writes
``dA = g_row · (onehot − e·exp(m − lse)) · dz/da`` over it. dz/da needs the logit under a soft-cap; it is
``m + log(e)`` (exact for the target column, which uses the stored target logit). No atomics anywhere.
"""

import triton
import triton.language as tl

from sppo_kernels.kernels.logit_tile import grouped_tile, logit_tile


@triton.jit
def exp_tile_kernel(
    hidden_ptr,  # [>= n + BLOCK_N, H] input dtype: gathered scored rows (padded)
    weight_ptr,  # [V, H]
    bias_ptr,  # [V]
    target_ptr,  # [n] int64
    exp_ptr,  # [chunk_rows, V] input dtype: row r of the chunk is hidden row row_start + r
    tile_max_ptr,  # [chunk_rows, num_tiles] float32
    tile_sum_ptr,  # [chunk_rows, num_tiles] float32
    target_logit_ptr,  # [n] float32, indexed by hidden row
    row_start,
    chunk_rows,
    V,
    H,
    stride_hn,
    stride_hh,
    stride_wv,
    stride_wh,
    stride_en,
    stride_tn,
    softcap,
    inv_temperature,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    GROUP_N: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n, pid_v = grouped_tile(tl.program_id(0), tl.cdiv(chunk_rows, BLOCK_N), tl.cdiv(V, BLOCK_V), GROUP_N)
    local = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = local < chunk_rows
    rows = row_start + local.to(tl.int64)
    target = tl.load(target_ptr + rows, mask=row_mask, other=-1).to(tl.int32)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = offs_v < V

    z, _ = logit_tile(
        hidden_ptr, weight_ptr, bias_ptr, rows, row_mask, offs_v, col_mask, H,
        stride_hn, stride_hh, stride_wv, stride_wh, softcap, inv_temperature,
        HAS_BIAS, HAS_SOFTCAP, UPCAST_DOT, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_K,
        MASK_ROWS=False,
    )  # fmt: skip
    z = tl.where(col_mask[None, :], z, float("-inf"))
    tile_max = tl.max(z, axis=1)  # finite: every tile holds at least one real column
    e = tl.exp(z - tile_max[:, None])
    local64 = local.to(tl.int64)
    tl.store(
        exp_ptr + local64[:, None] * stride_en + offs_v[None, :],
        e.to(exp_ptr.dtype.element_ty),
        mask=row_mask[:, None] & col_mask[None, :],
    )
    tl.store(tile_max_ptr + local64 * stride_tn + pid_v, tile_max, mask=row_mask)
    tl.store(tile_sum_ptr + local64 * stride_tn + pid_v, tl.sum(e, axis=1), mask=row_mask)
    is_target = offs_v[None, :] == target[:, None]
    holds_target = (target >= pid_v * BLOCK_V) & (target < pid_v * BLOCK_V + BLOCK_V)
    target_logit = tl.sum(tl.where(is_target, z, 0.0), axis=1)
    tl.store(target_logit_ptr + rows, target_logit, mask=row_mask & holds_target)


@triton.jit
def grad_from_exp_kernel(
    exp_ptr,  # [chunk_rows, V] input dtype: e on entry, dA on exit
    tile_max_ptr,  # [chunk_rows, num_tiles] float32
    lse_ptr,  # [n] float32, by hidden row
    row_grad_ptr,  # [n] float32, by hidden row
    target_ptr,  # [n] int64, by hidden row
    target_logit_ptr,  # [n] float32, by hidden row
    row_start,
    chunk_rows,
    V,
    stride_en,
    stride_tn,
    softcap,
    inv_temperature,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    local = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    pid_v = tl.program_id(1)
    row_mask = local < chunk_rows
    rows = row_start + local.to(tl.int64)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = row_mask[:, None] & (offs_v < V)[None, :]
    local64 = local.to(tl.int64)
    ptrs = exp_ptr + local64[:, None] * stride_en + offs_v[None, :]
    e = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    tile_max = tl.load(tile_max_ptr + local64 * stride_tn + pid_v, mask=row_mask, other=0.0)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    g = tl.load(row_grad_ptr + rows, mask=row_mask, other=0.0)
    target = tl.load(target_ptr + rows, mask=row_mask, other=-1).to(tl.int32)
    is_target = offs_v[None, :] == target[:, None]

    probs = e * tl.exp(tile_max - lse)[:, None]
    grad_z = tl.where(is_target, 1.0 - probs, -probs)
    if HAS_SOFTCAP:
        # t = tanh(a / softcap) = z / (softcap · inv_temperature); z = m + log(e), exact at the target.
        target_logit = tl.load(target_logit_ptr + rows, mask=row_mask, other=0.0)
        z = tl.where(is_target, target_logit[:, None], tile_max[:, None] + tl.log(tl.maximum(e, 1e-38)))
        t = z / (softcap * inv_temperature)
        dz_da = (1.0 - t * t) * inv_temperature
        grad_z = tl.where(is_target | (e > 0.0), grad_z * dz_da, 0.0)
    else:
        grad_z = grad_z * inv_temperature
    tl.store(ptrs, (g[:, None] * grad_z).to(exp_ptr.dtype.element_ty), mask=mask)
