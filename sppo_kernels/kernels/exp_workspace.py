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

Host side (:func:`fused_forward`): the scored rows cut into chunks of whole sequences that fit the workspace; per
chunk the two kernels around the merge of the log-sum-exp and the sequences' loss gradients, then torch's GEMMs
``dH[chunk rows] = dA·W`` and ``dW += dAᵀ·H[chunk rows]``. Every workspace buffer comes from :func:`fused_plan`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from sppo_kernels.kernels.launch import (
    ELEMENTWISE_ROWS,
    BlockConfig,
    Buffer,
    LogitTransform,
    allocate,
    gather,
    gathered_rows,
)
from sppo_kernels.kernels.logit_tile import grouped_tile, logit_tile
from sppo_kernels.kernels.rows import ScoredRows


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
    inv_softcap,
    cap_scale,
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
        stride_hn, stride_hh, stride_wv, stride_wh, inv_softcap, cap_scale, inv_temperature,
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
    inv_cap_scale,
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
        # t = tanh(a / softcap) = z / cap_scale; z = m + log(e), exact at the target.
        target_logit = tl.load(target_logit_ptr + rows, mask=row_mask, other=0.0)
        z = tl.where(is_target, target_logit[:, None], tile_max[:, None] + tl.log(tl.maximum(e, 1e-38)))
        t = z * inv_cap_scale
        dz_da = (1.0 - t * t) * inv_temperature
        grad_z = tl.where(is_target | (e > 0.0), grad_z * dz_da, 0.0)
    else:
        grad_z = grad_z * inv_temperature
    tl.store(ptrs, (g[:, None] * grad_z).to(exp_ptr.dtype.element_ty), mask=mask)


def fused_chunk_rows(vocab: int, item_size: int, budget: int) -> int:
    """Rows of the workspace: ``budget`` bytes of [rows, V] elements (at least one row)."""
    return max(1, budget // (vocab * item_size))


def sequence_chunks(starts: list[int], max_rows: int) -> list[tuple[int, int]] | None:
    """Consecutive runs of whole sequences [b0, b1) of at most ``max_rows`` scored rows each (empty sequences
    included, rows-free chunks dropped), or None when one sequence alone has more rows than that."""
    chunks, first = [], 0
    for b in range(len(starts) - 1):
        if starts[b + 1] - starts[b] > max_rows:
            return None
        if starts[b + 1] - starts[first] > max_rows:
            chunks.append((first, b))
            first = b
    chunks.append((first, len(starts) - 1))
    return [(b0, b1) for b0, b1 in chunks if starts[b1] > starts[b0]]


def fused_plan(rows: int, chunk_rows: int, vocab: int, width: int, dtype: torch.dtype, block: BlockConfig,
               need_b: bool) -> dict[str, Buffer]:  # fmt: skip
    """Every buffer the fused forward allocates besides its outputs (dH, dW, db, log-probs) for ``rows`` scored
    rows in chunks of at most ``chunk_rows`` rows."""
    tiles = triton.cdiv(vocab, block.block_v)
    f32 = torch.float32
    plan = {
        "gathered rows": gathered_rows(rows, width, dtype, block.block_n),
        "exp workspace": Buffer((chunk_rows, vocab), dtype),
        "tile max": Buffer((chunk_rows, tiles), f32),
        "tile sum": Buffer((chunk_rows, tiles), f32),
        "chunk dH": Buffer((chunk_rows, width), dtype),
        "target logit": Buffer((rows,), f32),
        "row gradient": Buffer((rows,), f32, "zero"),
        "row log-prob": Buffer((rows,), f32, "zero"),
    }
    if need_b:
        plan["db float32"] = Buffer((vocab,), f32, "zero")
    return plan


def fused_forward(hidden: Tensor, weight: Tensor, bias: Tensor | None, rows: ScoredRows, slope: Tensor,
                  offset: Tensor, needs: tuple[bool, bool, bool], transform: LogitTransform, block: BlockConfig,
                  workspace_bytes: int, poison: bool) -> tuple[Tensor, Tensor, tuple] | None:  # fmt: skip
    """(logps [B], lse [N], (dH, dW, db) for an upstream gradient of 1) of a separable loss whose gradient with
    respect to sequence s's log-prob is ``slope[s]·logp_s + offset[s]`` (float64 [B]), or None when a sequence is
    longer than the workspace. One host synchronisation (the sequences' row counts)."""
    (n_rows, width), vocab, device, dtype = hidden.shape, weight.shape[0], hidden.device, hidden.dtype
    need_h, need_w, need_b = needs[0], needs[1], needs[2] and bias is not None
    starts = rows.host_starts()
    plan = sequence_chunks(starts, fused_chunk_rows(vocab, hidden.element_size(), workspace_bytes))
    if plan is None:
        return None
    n = starts[-1]
    chunk_rows = max([starts[b1] - starts[b0] for b0, b1 in plan], default=1)
    buffers = allocate(fused_plan(max(n, 1), chunk_rows, vocab, width, dtype, block, need_b), device, poison)
    index = rows.order[:n]
    gathered = gather(hidden, index, buffers["gathered rows"])
    targets = rows.targets[:n].contiguous()
    lse = torch.zeros(max(n_rows, 1), dtype=torch.float32, device=device)
    logps = torch.zeros(rows.num_seqs, dtype=torch.float32, device=device)
    grad_h = torch.zeros(n_rows, width, dtype=dtype, device=device) if need_h else None
    grad_w = torch.zeros(vocab, width, dtype=weight.dtype, device=device) if need_w else None
    for b0, b1 in plan:
        r0, r1 = starts[b0], starts[b1]
        grad_a = _chunk_logit_grads(gathered, weight, bias, rows, targets, buffers, lse, logps, (b0, b1, r0, r1),
                                    slope, offset, transform, block)  # fmt: skip
        if need_h:
            torch.mm(grad_a, weight, out=buffers["chunk dH"][: r1 - r0])
            grad_h.index_copy_(0, index[r0:r1], buffers["chunk dH"][: r1 - r0])
        if need_w:
            if len(plan) == 1:
                torch.mm(grad_a.t(), gathered[r0:r1], out=grad_w)
            else:  # accumulated across row chunks in the weight dtype: one rounding per chunk
                grad_w.addmm_(grad_a.t(), gathered[r0:r1])
        if need_b:
            buffers["db float32"].add_(grad_a.sum(0, dtype=torch.float32))
    grad_b = buffers["db float32"].to(bias.dtype) if need_b else None
    return logps, lse[:n_rows], (grad_h, grad_w, grad_b)


def _chunk_logit_grads(gathered: Tensor, weight: Tensor, bias: Tensor | None, rows: ScoredRows, targets: Tensor,
                       buffers: dict[str, Tensor], lse: Tensor, logps: Tensor, bounds: tuple[int, int, int, int],
                       slope: Tensor, offset: Tensor, transform: LogitTransform,
                       block: BlockConfig) -> Tensor:  # fmt: skip
    """dA [m, V] (a view of the workspace) of the chunk of sequences b0..b1 (gathered rows r0..r1); writes the
    chunk's lse and log-probs."""
    b0, b1, r0, r1 = bounds
    m, vocab, width = r1 - r0, weight.shape[0], weight.shape[1]
    workspace, tile_max, tile_sum = buffers["exp workspace"], buffers["tile max"], buffers["tile sum"]
    target_logit, row_grad, row_logps = buffers["target logit"], buffers["row gradient"], buffers["row log-prob"]
    args = transform.kernel_args()
    tiles = tile_max.shape[1]
    exp_tile_kernel[(triton.cdiv(m, block.block_n) * tiles,)](
        gathered, weight, gathered if bias is None else bias, targets, workspace, tile_max, tile_sum,
        target_logit, r0, m, vocab, width,
        gathered.stride(0), gathered.stride(1), weight.stride(0), weight.stride(1),
        workspace.stride(0), tile_max.stride(0),
        GROUP_N=block.group_n, BLOCK_N=block.block_n, BLOCK_V=block.block_v, BLOCK_K=block.block_k,
        num_warps=block.num_warps, num_stages=block.num_stages, **args,
    )  # fmt: skip
    chunk_lse = torch.logsumexp(tile_max[:m] + tile_sum[:m].log(), dim=1)
    lse[r0:r1] = chunk_lse
    row_logps[r0:r1] = target_logit[r0:r1] - chunk_lse
    logps[b0:b1] = rows.sequence_sums(row_logps, b0, b1)
    seq_grad = slope[b0:b1] * logps[b0:b1].double() + offset[b0:b1]
    row_grad[r0:r1] = seq_grad.float().index_select(0, rows.key[r0:r1] - b0)
    grad_from_exp_kernel[(triton.cdiv(m, ELEMENTWISE_ROWS), tiles)](
        workspace, tile_max, lse, row_grad, targets, target_logit, r0, m, vocab,
        workspace.stride(0), tile_max.stride(0), 1.0 / args["cap_scale"], args["inv_temperature"],
        HAS_SOFTCAP=args["HAS_SOFTCAP"], BLOCK_R=ELEMENTWISE_ROWS, BLOCK_V=block.block_v,
        num_warps=max(4, min(16, ELEMENTWISE_ROWS * block.block_v // 1024)),  # ~32 elements per thread
    )  # fmt: skip
    return workspace[:m]
