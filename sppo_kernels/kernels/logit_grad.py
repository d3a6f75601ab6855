"""Backward kernel (default, atomic-free): the logit gradient of one vocabulary chunk, for the scored rows only.

Grid: one program per (row block, column block) tile of the [n_rows, chunk_cols] chunk, in the grouped order of
:func:`grouped_tile`. Program (i, j) recomputes its [BLOCK_N, BLOCK_V] logits from the gathered rows of H and
the chunk's columns of W and writes

    dA = g_row · (onehot(target) − exp(z − lse_row)) · dz/da        (computed in float32, stored in dA's dtype)

to its own tile of ``grad`` (every element written by exactly one program: no atomics, deterministic). g_row is
the upstream gradient of the row's sequence. The host then forms dW[chunk] = dAᵀ·H and dH += dA·W[chunk] with
two GEMMs (cuBLAS through torch).
"""

import triton
import triton.language as tl

from sppo_kernels.kernels.logit_tile import grouped_tile, logit_tile


@triton.jit
def logit_grad_kernel(
    hidden_ptr,  # [>= n_rows rounded up to BLOCK_N, H] input dtype: the gathered scored rows (padded)
    weight_ptr,  # [V, H] input dtype
    bias_ptr,  # [V] input dtype (unused without HAS_BIAS)
    target_ptr,  # [n_rows] int64
    lse_ptr,  # [n_rows] float32
    row_grad_ptr,  # [n_rows] float32: upstream gradient of the row's sequence
    grad_ptr,  # [n_rows, >= chunk_cols] dA, input dtype; column j is vocabulary id v_start + j
    n_rows,
    V,
    H,
    v_start,
    chunk_cols,
    stride_hn,
    stride_hh,
    stride_wv,
    stride_wh,
    stride_gn,
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
    pid_n, pid_v = grouped_tile(tl.program_id(0), tl.cdiv(n_rows, BLOCK_N), tl.cdiv(chunk_cols, BLOCK_V), GROUP_N)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = offs_n < n_rows
    rows = offs_n.to(tl.int64)
    target = tl.load(target_ptr + offs_n, mask=row_mask, other=-1).to(tl.int32)
    lse = tl.load(lse_ptr + offs_n, mask=row_mask, other=0.0)
    g = tl.load(row_grad_ptr + offs_n, mask=row_mask, other=0.0)
    offs_c = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = (offs_c < chunk_cols) & (v_start + offs_c < V)
    offs_v = v_start + offs_c

    z, dz_da = logit_tile(
        hidden_ptr, weight_ptr, bias_ptr, rows, row_mask, offs_v, col_mask, H,
        stride_hn, stride_hh, stride_wv, stride_wh, softcap, inv_temperature,
        HAS_BIAS, HAS_SOFTCAP, UPCAST_DOT, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_K,
        MASK_ROWS=False,
    )  # fmt: skip
    probs = tl.exp(z - lse[:, None])
    grad_z = tl.where(offs_v[None, :] == target[:, None], 1.0 - probs, -probs)
    grad_a = (g[:, None] * grad_z) * dz_da
    out = grad_ptr + rows[:, None] * stride_gn + offs_c[None, :]
    tl.store(out, grad_a.to(grad_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])
