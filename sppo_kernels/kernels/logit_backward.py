"""Backward kernel of the first design (``TritonConfig(backward="atomic")``, kept for the GPU A/B measurement):
recompute a logits tile, form its gradient, and push it into dH, dW and db with float32 atomics.

Grid: (row blocks, vocabulary blocks). Program (i, j) recomputes the [BLOCK_N, BLOCK_V] logits of compacted
rows i and vocabulary block j, turns them into

    dA = g_row · (onehot(target) − exp(z − lse_row)) · dz/da        (float32, a = h·Wᵀ + b)

and accumulates, one BLOCK_K slice of the hidden size at a time, dH[rows] += dA·W[block] and
dW[block] += dAᵀ·H[rows] with float32 atomics, and db[block] += Σ_rows dA. g_row is the upstream gradient of
the row's sequence. Nothing of size N×V is stored: the tile lives in registers. The atomics use the default
``acq_rel`` semantics and their order varies run to run: results are not bitwise reproducible.
"""

import triton
import triton.language as tl

from sppo_kernels.kernels.logit_tile import logit_tile


@triton.jit
def logit_backward_kernel(
    hidden_ptr,  # [N, H] input dtype
    weight_ptr,  # [V, H] input dtype
    bias_ptr,  # [V] input dtype (unused without HAS_BIAS)
    row_index_ptr,  # [N] int64: compacted row -> hidden row
    row_target_ptr,  # [N] int64
    n_valid_ptr,  # [1] int64
    lse_ptr,  # [N] float32, per compacted row
    row_grad_ptr,  # [N] float32, per compacted row: upstream gradient of its sequence
    grad_hidden_ptr,  # [N, H] float32, zero-initialised, indexed by hidden row
    grad_weight_ptr,  # [V, H] float32, zero-initialised
    grad_bias_ptr,  # [V] float32, zero-initialised
    V,
    H,
    stride_hn,
    stride_hh,
    stride_wv,
    stride_wh,
    softcap,
    inv_temperature,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    NEED_GRAD_HIDDEN: tl.constexpr,
    NEED_GRAD_WEIGHT: tl.constexpr,
    NEED_GRAD_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    n_valid = tl.load(n_valid_ptr)
    if pid_n * BLOCK_N < n_valid:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = offs_n < n_valid
        rows = tl.load(row_index_ptr + offs_n, mask=row_mask, other=0).to(tl.int64)
        target = tl.load(row_target_ptr + offs_n, mask=row_mask, other=-1)
        lse = tl.load(lse_ptr + offs_n, mask=row_mask, other=0.0)
        g = tl.load(row_grad_ptr + offs_n, mask=row_mask, other=0.0)
        offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        col_mask = offs_v < V

        z, dz_da = logit_tile(
            hidden_ptr, weight_ptr, bias_ptr, rows, row_mask, offs_v, col_mask, H,
            stride_hn, stride_hh, stride_wv, stride_wh, softcap, inv_temperature,
            HAS_BIAS, HAS_SOFTCAP, UPCAST_DOT, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_K,
        )  # fmt: skip
        probs = tl.exp(z - lse[:, None])
        onehot = (offs_v[None, :] == target[:, None]).to(tl.float32)
        grad_a = g[:, None] * (onehot - probs) * dz_da
        grad_a = tl.where(row_mask[:, None] & col_mask[None, :], grad_a, 0.0)

        if NEED_GRAD_BIAS:
            tl.atomic_add(grad_bias_ptr + offs_v, tl.sum(grad_a, axis=0), mask=col_mask)

        if UPCAST_DOT:
            grad_a_in = grad_a
        else:
            grad_a_in = grad_a.to(hidden_ptr.dtype.element_ty)
        offs_k = tl.arange(0, BLOCK_K)
        for k in range(0, tl.cdiv(H, BLOCK_K)):
            cols_k = k * BLOCK_K + offs_k
            k_mask = cols_k < H
            if NEED_GRAD_HIDDEN:
                w = tl.load(
                    weight_ptr + offs_v[:, None].to(tl.int64) * stride_wv + cols_k[None, :] * stride_wh,
                    mask=col_mask[:, None] & k_mask[None, :],
                    other=0.0,
                )
                if UPCAST_DOT:
                    w = w.to(tl.float32)
                part = tl.dot(grad_a_in, w, input_precision=DOT_PRECISION)
                tl.atomic_add(
                    grad_hidden_ptr + rows[:, None] * H + cols_k[None, :],
                    part,
                    mask=row_mask[:, None] & k_mask[None, :],
                )
            if NEED_GRAD_WEIGHT:
                h = tl.load(
                    hidden_ptr + rows[:, None] * stride_hn + cols_k[None, :] * stride_hh,
                    mask=row_mask[:, None] & k_mask[None, :],
                    other=0.0,
                )
                if UPCAST_DOT:
                    h = h.to(tl.float32)
                part = tl.dot(tl.trans(grad_a_in), h, input_precision=DOT_PRECISION)
                tl.atomic_add(
                    grad_weight_ptr + offs_v[:, None].to(tl.int64) * H + cols_k[None, :],
                    part,
                    mask=col_mask[:, None] & k_mask[None, :],
                )
