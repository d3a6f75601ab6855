"""Triton backend: the autograd Function around the forward and backward kernels.

Design (8NHV FLOPs, no N×V buffer):
- rows that score no token are compacted away on the device (stable argsort of the mask; the count stays on the
  device, so there is no host synchronisation) and never enter a matmul;
- forward: per-row log-sum-exp and target logit, the vocabulary split across programs for parallelism; the
  splits are merged in torch ([splits, N] float32 partials) and rows are summed into sequences;
- backward: each (row block, vocabulary block) tile recomputes its logits and adds its share of dH, dW and db
  with float32 atomics. Workspace: float32 dH [N, H], dW [V, H] and db [V] accumulators (4·(N + V)·H bytes),
  cast to the input dtypes at the end.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
from torch import Tensor

from sppo_kernels.autograd.first_order import first_order_backward
from sppo_kernels.kernels.logit_backward import logit_backward_kernel
from sppo_kernels.kernels.lse_forward import lse_forward_kernel

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class BlockConfig:
    """Tile sizes and launch options of one kernel. Blocks are powers of two >= 16 (a GPU ``tl.dot`` limit)."""

    block_n: int
    block_v: int
    block_k: int
    num_warps: int = 8
    num_stages: int = 3


@dataclass(frozen=True)
class TritonConfig:
    """Options of the ``"triton"`` backend (none yet besides the unused fused-loss switch)."""

    fused_sppo_loss: bool = False


# Interpreter tiles are small so that tests exercise several blocks in every dimension at small sizes.
INTERPRETER_CONFIGS = {"forward": BlockConfig(16, 64, 32, 4, 1), "backward": BlockConfig(16, 64, 32, 4, 1)}
# Chosen on the CPU from sm_90 compiles (tests/sm90_compile.py): the fewest ptxas spill bytes among a few
# candidates, not from GPU timings.
GPU_CONFIGS = {
    ("forward", 2): BlockConfig(128, 64, 64, 8, 3),
    ("backward", 2): BlockConfig(64, 128, 64, 8, 2),
    ("forward", 4): BlockConfig(128, 64, 32, 8, 3),
    ("backward", 4): BlockConfig(64, 128, 32, 8, 2),
}


def block_config(kernel: str, dtype: torch.dtype) -> BlockConfig:
    """The tiles of ``kernel`` ("forward" or "backward") for inputs of ``dtype``."""
    if INTERPRETING:
        return INTERPRETER_CONFIGS[kernel]
    return GPU_CONFIGS[(kernel, 4 if dtype == torch.float32 else 2)]


def vocab_splits(row_blocks: int, v_blocks: int, device: torch.device) -> tuple[int, int]:
    """(splits, vocabulary blocks per split) so the forward grid has a few programs per SM and no empty split."""
    on_gpu = device.type == "cuda"
    programs_wanted = 4 * torch.cuda.get_device_properties(device).multi_processor_count if on_gpu else 2
    splits = max(1, min(v_blocks, triton.cdiv(programs_wanted, row_blocks)))
    per_split = triton.cdiv(v_blocks, splits)
    return triton.cdiv(v_blocks, per_split), per_split


def _kernel_options(hidden: Tensor, bias: Tensor | None, softcap: float | None, temperature: float) -> dict:
    return {
        "softcap": 1.0 if softcap is None else float(softcap),
        "inv_temperature": 1.0 / float(temperature),
        "HAS_BIAS": bias is not None,
        "HAS_SOFTCAP": softcap is not None,
        "UPCAST_DOT": INTERPRETING,
        "DOT_PRECISION": "ieee" if hidden.dtype == torch.float32 else "tf32",
    }


class TritonSequenceLogprobs(torch.autograd.Function):
    """hidden [N, H], weight [V, H], bias [V] | None (fp32/bf16/fp16) → summed log-probs [B] float32."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, seq_ids, num_seqs, softcap, temperature, config):
        bias = None if bias is None else bias.contiguous()
        n_rows, width = hidden.shape
        vocab = weight.shape[0]
        valid = targets >= 0
        order = torch.argsort((~valid).to(torch.int8), stable=True)
        n_valid = valid.sum(dtype=torch.int32).reshape(1)
        row_index = order.to(torch.int32)
        row_target = targets.index_select(0, order).to(torch.int32)
        row_seq = seq_ids.index_select(0, order)
        in_range = torch.arange(n_rows, device=hidden.device) < n_valid

        cfg = block_config("forward", hidden.dtype)
        row_blocks = triton.cdiv(n_rows, cfg.block_n)
        splits, per_split = vocab_splits(row_blocks, triton.cdiv(vocab, cfg.block_v), hidden.device)
        lse_part = torch.full((splits, n_rows), float("nan"), dtype=torch.float32, device=hidden.device)
        target_part = torch.full_like(lse_part, float("nan"))
        options = _kernel_options(hidden, bias, softcap, temperature)
        lse_forward_kernel[(row_blocks, splits)](
            hidden, weight, hidden if bias is None else bias, row_index, row_target, n_valid,
            lse_part, target_part, n_rows, vocab, width,
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            v_blocks_per_split=per_split, BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_K=cfg.block_k,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **options,
        )  # fmt: skip
        lse = torch.logsumexp(lse_part, dim=0)
        row_logps = torch.where(in_range, target_part.sum(0) - lse, 0.0)
        logps = torch.zeros(num_seqs, dtype=torch.float32, device=hidden.device).index_add_(0, row_seq, row_logps)

        ctx.save_for_backward(hidden, weight, bias, row_index, row_target, n_valid, row_seq, in_range, lse)
        ctx.options = options
        return logps

    @staticmethod
    @first_order_backward
    def backward(ctx, grad_logps):
        hidden, weight, bias, row_index, row_target, n_valid, row_seq, in_range, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n_rows, width = hidden.shape
        vocab = weight.shape[0]
        row_grad = torch.where(in_range, grad_logps.float().index_select(0, row_seq), 0.0)
        f32 = {"dtype": torch.float32, "device": hidden.device}
        grad_h = torch.zeros(n_rows, width, **f32) if need_h else torch.empty(1, **f32)
        grad_w = torch.zeros(vocab, width, **f32) if need_w else torch.empty(1, **f32)
        grad_b = torch.zeros(vocab, **f32) if need_b else torch.empty(1, **f32)

        cfg = block_config("backward", hidden.dtype)
        grid = (triton.cdiv(n_rows, cfg.block_n), triton.cdiv(vocab, cfg.block_v))
        logit_backward_kernel[grid](
            hidden, weight, hidden if bias is None else bias, row_index, row_target, n_valid, lse, row_grad,
            grad_h, grad_w, grad_b, vocab, width,
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            NEED_GRAD_HIDDEN=need_h, NEED_GRAD_WEIGHT=need_w, NEED_GRAD_BIAS=need_b,
            BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_K=cfg.block_k,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **ctx.options,
        )  # fmt: skip
        return (
            grad_h.to(hidden.dtype) if need_h else None,
            grad_w.to(weight.dtype) if need_w else None,
            grad_b.to(bias.dtype) if need_b else None,
            None,
            None,
            None,
            None,
            None,
            None,
        )
