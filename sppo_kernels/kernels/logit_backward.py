"""Backward kernel of the first design (``TritonConfig(backward="atomic")``, kept for the GPU A/B measurement):
recompute a logits tile, form its gradient, and push it into dH, dW and db with float32 atomics.

Grid: (row blocks, vocabulary blocks). Program (i, j) recomputes the [BLOCK_N, BLOCK_V] logits of compacted
rows i and vocabulary block j, turns them into

    dA = g_row · (onehot(target) − exp(z − lse_row)) · dz/da        (float32, a = h·Wᵀ + b)

and accumulates, one BLOCK_K slice of the hidden size at a time, dH[rows] += dA·W[block] and
dW[block] += dAᵀ·H[rows] with float32 atomics, and db[block] += Σ_rows dA. g_row is the upstream gradient of
the row's sequence. Nothing of size N×V is stored: the tile lives in registers. The atomics use the default
``acq_rel`` semantics and their order varies run to run: results are not bitwise reproducible. Host launch:
:func:`atomic_backward`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from sppo_kernels.kernels.launch import BlockConfig, LogitTransform
from sppo_kernels.kernels.logit_tile import logit_tile
from sppo_kernels.kernels.rows import ScoredRows


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
    inv_softcap,
    cap_scale,
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
            stride_hn, stride_hh, stride_wv, stride_wh, inv_softcap, cap_scale, inv_temperature,
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


def atomic_backward(hidden: Tensor, weight: Tensor, bias: Tensor | None, rows: ScoredRows, lse: Tensor,
                    row_grad: Tensor, needs: tuple[bool, bool, bool], transform: LogitTransform,
                    block: BlockConfig) -> tuple:  # fmt: skip
    """(dH, dW, db; None where not needed) by the first design: every tile adds its share to float32 buffers
    (dH [N, H], dW [V, H], db [V]) with atomics, then one cast each (nondeterministic summation order)."""
    need_h, need_w, need_b = needs[0], needs[1], needs[2] and bias is not None
    (n_rows, width), vocab = hidden.shape, weight.shape[0]
    f32 = {"dtype": torch.float32, "device": hidden.device}
    grad_h = torch.zeros(n_rows, width, **f32) if need_h else torch.empty(1, **f32)
    grad_w = torch.zeros(vocab, width, **f32) if need_w else torch.empty(1, **f32)
    grad_b = torch.zeros(vocab, **f32) if need_b else torch.empty(1, **f32)
    n = rows.count()
    if n > 0 and (need_h or need_w or need_b):
        logit_backward_kernel[(triton.cdiv(n, block.block_n), triton.cdiv(vocab, block.block_v))](
            hidden, weight, hidden if bias is None else bias, rows.order, rows.targets, rows.n_valid, lse, row_grad,
            grad_h, grad_w, grad_b, vocab, width,
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            NEED_GRAD_HIDDEN=need_h, NEED_GRAD_WEIGHT=need_w, NEED_GRAD_BIAS=need_b,
            BLOCK_N=block.block_n, BLOCK_V=block.block_v, BLOCK_K=block.block_k,
            num_warps=block.num_warps, num_stages=block.num_stages, **transform.kernel_args(),
        )  # fmt: skip
    return (
        grad_h.to(hidden.dtype) if need_h else None,
        grad_w.to(weight.dtype) if need_w else None,
        grad_b.to(bias.dtype) if need_b else None,
    )
