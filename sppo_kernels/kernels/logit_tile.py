"""Shared device functions: one [BLOCK_N, BLOCK_V] tile of transformed logits recomputed from H and W, and the
grouped order in which programs visit (row block, column block) tiles."""

import triton
import triton.language as tl


@triton.jit
def tanh(x):
    """tanh(x) = 1 − 2 / (1 + e^{2x}): one exp and one division, no sign handling (no libdevice, so it also runs in
    the interpreter). The limits are exact (e^{2x} overflows to inf: 1; underflows to 0: −1); the absolute error is
    about one float32 ulp of 1 (6e-8) everywhere."""
    return 1.0 - 2.0 / (1.0 + tl.exp(2.0 * x))


@triton.jit
def grouped_tile(tile, num_row_blocks, num_col_blocks, GROUP_N: tl.constexpr):
    """(row block, column block) of linear tile id ``tile``, visiting GROUP_N row blocks × every column block per
    group, row blocks fastest: tiles that run at the same time share their W columns (consecutive ids read the
    same W tile) and their H rows stay within GROUP_N row blocks, so both are served from L2."""
    per_group = GROUP_N * num_col_blocks
    first = (tile // per_group) * GROUP_N
    rows_in_group = tl.minimum(num_row_blocks - first, GROUP_N)
    local = tile % per_group
    return first + local % rows_in_group, local // rows_in_group


@triton.jit
def logit_tile(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    rows,
    row_mask,
    offs_v,
    col_mask,
    H,
    stride_hn,
    stride_hh,
    stride_wv,
    stride_wh,
    inv_softcap,
    cap_scale,
    inv_temperature,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    MASK_ROWS: tl.constexpr = True,
):
    """Logits z = softcap(h·Wᵀ + b)·inv_temperature of a tile, float32 [BLOCK_N, BLOCK_V]. The soft-cap epilogue
    is c·tanh(a/c)/T = tanh(a·inv_softcap)·cap_scale: a multiply, one exp, one division, a multiply.

    rows: [BLOCK_N] int64 hidden-row indices; offs_v: [BLOCK_V] vocabulary ids. Also returns dz/da, the factor
    that carries a logit gradient back through the soft-cap and temperature (a = h·Wᵀ + b); callers that do not
    use it pay nothing (dead code). MASK_ROWS=False when every row of the tile is addressable (a padded buffer):
    the row loads then need no mask, which the faithful sm_90 compile shows saves registers in the forward.
    (Dropping the column or K masks where the sizes allow was measured the same way and costs registers.)
    """
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    h_ptrs = hidden_ptr + rows[:, None] * stride_hn + offs_k[None, :] * stride_hh
    w_ptrs = weight_ptr + offs_v[None, :].to(tl.int64) * stride_wv + offs_k[:, None] * stride_wh
    for k in range(0, tl.cdiv(H, BLOCK_K)):
        k_mask = offs_k < H - k * BLOCK_K
        if MASK_ROWS:
            h = tl.load(h_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        else:
            h = tl.load(h_ptrs, mask=k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        if UPCAST_DOT:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, w, acc, input_precision=DOT_PRECISION)
        h_ptrs += BLOCK_K * stride_hh
        w_ptrs += BLOCK_K * stride_wh
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_v, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_SOFTCAP:
        t = tanh(acc * inv_softcap)
        z = t * cap_scale
        dz_da = (1.0 - t * t) * inv_temperature
    else:
        z = acc * inv_temperature
        dz_da = tl.full((BLOCK_N, BLOCK_V), inv_temperature, tl.float32)
    return z, dz_da
