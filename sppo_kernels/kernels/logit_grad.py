"""Backward kernel (default, atomic-free): the logit gradient of one vocabulary chunk for the scored rows, and the
chunked backward around it (its host side).

Grid: one program per (row block, column block) tile of the [n_rows, chunk_cols] chunk, in the grouped order of
:func:`grouped_tile`. Program (i, j) recomputes its [BLOCK_N, BLOCK_V] logits from the gathered rows of H and
the chunk's columns of W and writes

    dA = g_row · (onehot(target) − exp(z − lse_row)) · dz/da        (computed in float32, stored in dA's dtype)

to its own tile of ``grad`` (every element written by exactly one program: no atomics, deterministic). g_row is
the upstream gradient of the row's sequence.

Host side (:func:`chunked_backward`): the vocabulary in chunks of ``chunk_bytes`` of dA; per chunk this kernel, then
two GEMMs through torch (cuBLAS on a GPU): ``dW[chunk] = dAᵀ·H`` written once in the weight dtype, and
``dH = dH + dA·W[chunk]`` accumulated in float32 by one GEMM with a float32 output and beta = 1 (beta = 0 for the
first chunk, so the accumulator needs no zero fill). Every buffer comes from :func:`chunked_backward_plan`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from sppo_kernels.kernels.launch import BlockConfig, Buffer, LogitTransform, allocate, gather, gathered_rows
from sppo_kernels.kernels.logit_tile import grouped_tile, logit_tile
from sppo_kernels.kernels.rows import ScoredRows

CAST_SLICE_BYTES = 8 << 20  # the float32 dH accumulator is cast back to the input dtype this many bytes at a time
DH_ACCUMULATION = ("auto", "float32", "rounded")


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
        stride_hn, stride_hh, stride_wv, stride_wh, inv_softcap, cap_scale, inv_temperature,
        HAS_BIAS, HAS_SOFTCAP, UPCAST_DOT, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_K,
        MASK_ROWS=False,
    )  # fmt: skip
    probs = tl.exp(z - lse[:, None])
    grad_z = tl.where(offs_v[None, :] == target[:, None], 1.0 - probs, -probs)
    grad_a = (g[:, None] * grad_z) * dz_da
    out = grad_ptr + rows[:, None] * stride_gn + offs_c[None, :]
    tl.store(out, grad_a.to(grad_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


def float32_gemm_available(device: torch.device, version: str = torch.__version__) -> bool:
    """Whether torch has a GEMM of 16-bit inputs into a float32 tensor with beta = 1 on ``device``:
    ``torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)`` with a float32 ``acc`` runs on CUDA from torch 2.10
    (pytorch/pytorch#167931); the CPU emulates it with an upcast GEMM (same accumulation, not the same kernel)."""
    major, minor = (int(part) for part in version.split("+")[0].split(".")[:2])
    return device.type != "cuda" or (major, minor) >= (2, 10)


def resolve_dh_accumulation(mode: str, device: torch.device, dtype: torch.dtype) -> str:
    """The dH accumulation, "float32" or "rounded", for ``mode`` (one of :data:`DH_ACCUMULATION`): "auto" is
    "float32" where :func:`float32_gemm_available`, else "rounded"; float32 inputs always accumulate in float32."""
    if dtype == torch.float32:
        return "float32"
    if mode == "auto":
        return "float32" if float32_gemm_available(device) else "rounded"
    if mode == "float32" and not float32_gemm_available(device):
        raise RuntimeError(
            f"dh_accumulation='float32' needs torch >= 2.10 on CUDA (torch.addmm with out_dtype into a float32 "
            f"tensor); this is torch {torch.__version__}: use TritonConfig(dh_accumulation='rounded')"
        )
    return mode


def accumulate_product(acc: Tensor, a: Tensor, b: Tensor, first: bool, mode: str, product: Tensor | None) -> None:
    """acc [M, N] float32 = (acc if not first) + a [M, K] · b [K, N] for inputs of one dtype.

    mode "float32": the product accumulated in float32 by one GEMM with beta = 1 (beta = 0 when ``first``): on CUDA
    ``torch.addmm(out_dtype=float32, out=acc)``, no scratch buffer and no separate add; on a CPU the same through an
    upcast GEMM (the interpreter tests). mode "rounded": the product in the input dtype into ``product`` (rounded
    once per call), then a float32 add.
    """
    beta = 0.0 if first else 1.0
    if a.dtype == torch.float32:
        torch.addmm(acc, a, b, beta=beta, out=acc)
    elif mode == "rounded":
        torch.mm(a, b, out=product)
        acc.copy_(product) if first else acc.add_(product)
    elif acc.device.type == "cpu":
        torch.addmm(acc, a.float(), b.float(), beta=beta, out=acc)
    else:
        torch.addmm(acc, a, b, beta=beta, out_dtype=torch.float32, out=acc)


def chunk_columns(rows: int, vocab: int, item_size: int, budget: int, align: int) -> int:
    """Columns of one dA chunk: ``budget`` bytes of [rows, columns] elements, a multiple of ``align`` (at least
    one), at most the vocabulary."""
    cols = max(align, budget // max(1, rows * item_size) // align * align)
    return vocab if cols >= vocab else cols


def chunked_backward_plan(rows: int, vocab: int, width: int, dtype: torch.dtype, block: BlockConfig,
                          chunk_bytes: int, needs: tuple[bool, bool, bool],
                          dh_mode: str) -> dict[str, Buffer]:  # fmt: skip
    """Every buffer the chunked backward allocates besides its outputs, for ``rows`` scored rows: needs = which of
    (dH, dW, db) are wanted; dh_mode = the resolved dH accumulation."""
    item_size = torch.empty(0, dtype=dtype).element_size()
    cols = chunk_columns(rows, vocab, item_size, chunk_bytes, block.block_v)
    plan = {"gathered rows": gathered_rows(rows, width, dtype, block.block_n), "dA chunk": Buffer((rows, cols), dtype)}
    if needs[0]:
        plan["dH float32 accumulator"] = Buffer((rows, width), torch.float32)
        if dtype != torch.float32:
            cast_rows = max(1, min(rows, CAST_SLICE_BYTES // (width * item_size)))
            plan["dH cast slice"] = Buffer((cast_rows, width), dtype)
        if dh_mode == "rounded" and dtype != torch.float32:
            plan["dH 16-bit chunk product"] = Buffer((rows, width), dtype)
    if needs[2]:
        plan["db float32"] = Buffer((vocab,), torch.float32)
    return plan


def logit_grad(gathered: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, lse: Tensor, row_grad: Tensor,
               grad_a: Tensor, v_start: int, transform: LogitTransform, block: BlockConfig) -> None:  # fmt: skip
    """One launch: dA of the vocabulary columns v_start .. v_start + grad_a.shape[1] for the rows of ``targets``."""
    n, cols = grad_a.shape
    grid = (triton.cdiv(n, block.block_n) * triton.cdiv(cols, block.block_v),)
    logit_grad_kernel[grid](
        gathered, weight, gathered if bias is None else bias, targets, lse, row_grad, grad_a,
        n, weight.shape[0], weight.shape[1], v_start, cols,
        gathered.stride(0), gathered.stride(1), weight.stride(0), weight.stride(1), grad_a.stride(0),
        GROUP_N=block.group_n, BLOCK_N=block.block_n, BLOCK_V=block.block_v, BLOCK_K=block.block_k,
        num_warps=block.num_warps, num_stages=block.num_stages, **transform.kernel_args(),
    )  # fmt: skip


def chunked_backward(hidden: Tensor, weight: Tensor, bias: Tensor | None, rows: ScoredRows, lse: Tensor,
                     row_grad: Tensor, needs: tuple[bool, bool, bool], transform: LogitTransform, block: BlockConfig,
                     chunk_bytes: int, dh_accumulation: str, poison: bool) -> tuple:  # fmt: skip
    """(dH [N, H], dW [V, H], db [V]; None where not needed) for per-gathered-row upstream gradients ``row_grad``
    [N] float32, atomic-free and bitwise deterministic."""
    need_h, need_w, need_b = needs[0], needs[1], needs[2] and bias is not None
    (n_rows, width), vocab, device, dtype = hidden.shape, weight.shape[0], hidden.device, hidden.dtype
    n = rows.count()
    grad_h = torch.zeros(n_rows, width, dtype=dtype, device=device) if need_h else None
    grad_w = allocate({"dW": Buffer((vocab, width), weight.dtype)}, device, poison)["dW"] if need_w else None
    if n == 0 or not (need_h or need_w or need_b):
        grad_b = torch.zeros_like(bias) if need_b else None
        return grad_h, None if grad_w is None else grad_w.zero_(), grad_b
    dh_mode = resolve_dh_accumulation(dh_accumulation, device, dtype)
    plan = chunked_backward_plan(n, vocab, width, dtype, block, chunk_bytes, (need_h, need_w, need_b), dh_mode)
    buffers = allocate(plan, device, poison)
    index = rows.order[:n]
    gathered = gather(hidden, index, buffers["gathered rows"])
    targets, lse, row_grad = rows.targets[:n], lse[:n].contiguous(), row_grad[:n].contiguous()
    grad_a_buffer = buffers["dA chunk"]
    for v_start in range(0, vocab, grad_a_buffer.shape[1]):
        grad_a = grad_a_buffer[:, : min(grad_a_buffer.shape[1], vocab - v_start)]
        v_end = v_start + grad_a.shape[1]
        logit_grad(gathered, weight, bias, targets, lse, row_grad, grad_a, v_start, transform, block)
        if need_w:
            torch.mm(grad_a.t(), gathered[:n], out=grad_w[v_start:v_end])
        if need_h:
            accumulate_product(buffers["dH float32 accumulator"], grad_a, weight[v_start:v_end], v_start == 0,
                               dh_mode, buffers.get("dH 16-bit chunk product"))  # fmt: skip
        if need_b:
            torch.sum(grad_a, 0, dtype=torch.float32, out=buffers["db float32"][v_start:v_end])
    if need_h:
        _scatter_rows(grad_h, index, buffers["dH float32 accumulator"], buffers.get("dH cast slice"))
    return grad_h, grad_w, buffers["db float32"].to(bias.dtype) if need_b else None


def _scatter_rows(out: Tensor, index: Tensor, values: Tensor, cast_slice: Tensor | None) -> None:
    """out[index] = values (float32), cast to out's dtype through ``cast_slice`` a slice of rows at a time."""
    if cast_slice is None:
        out.index_copy_(0, index, values)
        return
    step = cast_slice.shape[0]
    for r0 in range(0, index.shape[0], step):
        part = cast_slice[: min(step, index.shape[0] - r0)]
        part.copy_(values[r0 : r0 + part.shape[0]])
        out.index_copy_(0, index[r0 : r0 + part.shape[0]], part)
