"""Triton backend: its options and its autograd Functions. Kernels and their host launches live in
``sppo_kernels/kernels/`` (one kernel per file); design and accounting: docs/triton_design.md.

- :class:`TritonSequenceLogprobs`: the forward (``lse_forward.forward``: compacted scored rows, a persistent grid
  of whole waves, per-sequence sums in a fixed order) and a recomputing backward, chunked (default: atomic-free,
  deterministic, 8NHV FLOPs) or atomic (the first design, kept for measurement).
- :class:`TritonSPPOLoss`: a separable sequence loss and the log-probs; with ``fused_sppo_loss`` the gradient is
  formed in the forward from an ``exp(z − m)`` workspace of whole sequences (6NHV FLOPs, no recompute).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sppo_kernels.autograd.first_order import first_order_backward
from sppo_kernels.autograd.fused_loss import fused_loss_backward
from sppo_kernels.kernels import launch
from sppo_kernels.kernels.exp_workspace import fused_forward
from sppo_kernels.kernels.launch import BlockConfig, LogitTransform
from sppo_kernels.kernels.logit_backward import atomic_backward
from sppo_kernels.kernels.logit_grad import DH_ACCUMULATION, chunked_backward
from sppo_kernels.kernels.lse_forward import forward
from sppo_kernels.kernels.rows import ScoredRows


@dataclass(frozen=True)
class TritonConfig:
    """Options of the Triton backend.

    backward: ``"chunked"`` (default: atomic-free and deterministic) or ``"atomic"`` (the first design: float32
        atomics, a [V, H] float32 dW buffer; kept for the GPU A/B measurement).
    fused_sppo_loss: for :class:`TritonSPPOLoss`, form the gradient in the forward from a workspace of whole
        sequences' logits (6NHV FLOPs) instead of recomputing them (8NHV). The switch that makes it ``sppo_loss``'s
        default once a GPU measurement says it is faster (benchmarks/gpu_check.sh prints that verdict).
    fp32_precision: float32 inputs only: ``"ieee"`` (exact float32 dot, no tensor cores) or ``"tf32x3"`` (three
        TF32 tensor-core passes, ~fp32 accuracy) for the Triton kernels; torch's GEMMs follow torch's settings.
    dh_accumulation: chunked backward, 16-bit inputs: ``"float32"`` (each chunk's dA·W accumulated into the float32
        dH by one GEMM with a float32 output and beta = 1: CUDA with torch >= 2.10), ``"rounded"`` (each chunk's
        product rounded to 16 bits once, then a float32 add: any torch) or ``"auto"`` (float32 where available).
    forward_block / backward_block / atomic_block / fused_block: tile overrides (default: the table of the installed
        Triton release, ``kernels.launch.SM90_TILES``).
    chunk_bytes: chunked backward: bytes of one dA chunk, [scored rows, chunk columns] in the input dtype.
    fused_workspace_bytes: fused loss: bytes of the ``exp(z − m)`` workspace, [chunk rows, V] in the input dtype;
        a sequence with more scored rows than fit falls back to the recompute path.
    programs_per_sm: persistent forward grid = SMs × this.
    poison: NaN-fill every buffer before the kernels write it (tests: an unwritten element shows).
    """

    backward: str = "chunked"
    fused_sppo_loss: bool = False
    fp32_precision: str = "ieee"
    dh_accumulation: str = "auto"
    forward_block: BlockConfig | None = None
    backward_block: BlockConfig | None = None
    atomic_block: BlockConfig | None = None
    fused_block: BlockConfig | None = None
    chunk_bytes: int = 64 << 20
    fused_workspace_bytes: int = 1 << 30
    programs_per_sm: int = 1
    poison: bool = False

    def __post_init__(self) -> None:
        if self.backward not in ("chunked", "atomic"):
            raise ValueError(f"backward must be 'chunked' or 'atomic', got {self.backward!r}")
        if self.fp32_precision not in ("ieee", "tf32x3"):
            raise ValueError(f"fp32_precision must be 'ieee' or 'tf32x3', got {self.fp32_precision!r}")
        if self.dh_accumulation not in DH_ACCUMULATION:
            raise ValueError(f"dh_accumulation must be one of {DH_ACCUMULATION}, got {self.dh_accumulation!r}")
        if self.chunk_bytes <= 0 or self.fused_workspace_bytes <= 0 or self.programs_per_sm < 1:
            raise ValueError("chunk_bytes, fused_workspace_bytes and programs_per_sm must be positive")
        for kind in launch.KERNELS:
            block = getattr(self, f"{kind}_block")
            if block is not None and not isinstance(block, BlockConfig):
                raise TypeError(f"{kind}_block must be a BlockConfig, got {type(block).__name__}")

    def block(self, kernel: str, dtype: torch.dtype) -> BlockConfig:
        """The tiles of ``kernel`` (one of ``kernels.launch.KERNELS``): the override, else the default table."""
        return getattr(self, f"{kernel}_block") or launch.default_tiles(kernel, dtype)

    def transform(self, hidden: Tensor, bias: Tensor | None, softcap: float | None, temperature: float):
        """The logits' transform and dot precision the kernels take."""
        precision = self.fp32_precision if hidden.dtype == torch.float32 else "tf32"
        return LogitTransform(softcap, temperature, bias is not None, precision)

    def programs(self, device: torch.device) -> int:
        """Programs of the persistent forward grid."""
        return launch.num_programs(device, self.programs_per_sm)


class TritonSequenceLogprobs(torch.autograd.Function):
    """hidden [N, H], weight [V, H], bias [V] | None (fp32/bf16/fp16) → summed log-probs [B] float32."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, seq_ids, num_seqs, softcap, temperature, config):
        config = TritonConfig() if config is None else config
        launch.check_inputs(hidden, weight, bias)
        bias = None if bias is None else bias.contiguous()
        rows = ScoredRows(targets, seq_ids, num_seqs)
        transform = config.transform(hidden, bias, softcap, temperature)
        logps, lse = forward(hidden, weight, bias, rows, transform, config.block("forward", hidden.dtype),
                             config.programs(hidden.device), config.poison)  # fmt: skip
        if any(ctx.needs_input_grad[:3]):
            rows.prefetch_count()
        ctx.rows, ctx.transform, ctx.config = rows, transform, config
        ctx.save_for_backward(hidden, weight, bias, lse)
        return logps

    @staticmethod
    @first_order_backward
    def backward(ctx, grad_logps):
        hidden, weight, bias, lse = ctx.saved_tensors
        grads = TritonSequenceLogprobs.recompute(ctx, hidden, weight, bias, lse, grad_logps)
        return (*grads, None, None, None, None, None, None)

    @staticmethod
    def recompute(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, lse: Tensor, grad_seq: Tensor) -> tuple:
        """(dH, dW, db) for a per-sequence upstream gradient [B], recomputing the logits (the backward of both
        Functions); None where ``ctx.needs_input_grad`` says none is needed."""
        needs, rows, config = tuple(ctx.needs_input_grad[:3]), ctx.rows, ctx.config
        if rows.num_rows == 0:
            zero_bias = None if bias is None else torch.zeros_like(bias)
            zeros = (torch.zeros_like(hidden), torch.zeros_like(weight), zero_bias)
            return tuple(z if need else None for z, need in zip(zeros, needs, strict=True))
        row_grad = rows.row_grads(grad_seq)
        if config.backward == "atomic":
            block = config.block("atomic", hidden.dtype)
            return atomic_backward(hidden, weight, bias, rows, lse, row_grad, needs, ctx.transform, block)
        return chunked_backward(hidden, weight, bias, rows, lse, row_grad, needs, ctx.transform,
                                config.block("backward", hidden.dtype), config.chunk_bytes, config.dh_accumulation,
                                config.poison)  # fmt: skip


class TritonSPPOLoss(torch.autograd.Function):
    """A separable sequence loss and the log-probs, ``(loss, logps [B])``, with the loss gradient formed in the
    forward when ``config.fused_sppo_loss`` (6NHV, no recompute) and ``form_grads``.

    The backward hands that gradient out, scaled by c, when the loss's upstream gradient is c (uniform) and none
    reaches ``logps``; any other upstream gradient is handled exactly by the recomputing backward.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, seq_ids, num_seqs, softcap, temperature, config, objective,
                form_grads):  # fmt: skip
        config = TritonConfig() if config is None else config
        launch.check_inputs(hidden, weight, bias)
        bias = None if bias is None else bias.contiguous()
        ctx.set_materialize_grads(False)
        rows = ScoredRows(targets, seq_ids, num_seqs)
        transform = config.transform(hidden, bias, softcap, temperature)
        needs = tuple(ctx.needs_input_grad[:3]) if form_grads else (False, False, False)
        fused = None
        if config.fused_sppo_loss and any(needs) and rows.num_rows > 0:
            slope, offset = (c.to(device=hidden.device, dtype=torch.float64) for c in objective.grad_coefficients())
            block = config.block("fused", hidden.dtype)
            fused = fused_forward(hidden, weight, bias, rows, slope, offset, needs, transform, block,
                                  config.fused_workspace_bytes, config.poison)  # fmt: skip
        if fused is None:
            logps, lse = forward(hidden, weight, bias, rows, transform, config.block("forward", hidden.dtype),
                                 config.programs(hidden.device), config.poison)  # fmt: skip
            ctx.formed = None
        else:
            logps, lse, ctx.formed = fused
        if any(ctx.needs_input_grad[:3]):
            rows.prefetch_count()
        ctx.rows, ctx.transform, ctx.config, ctx.objective = rows, transform, config, objective
        ctx.save_for_backward(hidden, weight, bias, lse, logps)
        return objective(logps), logps

    @staticmethod
    @first_order_backward
    def backward(ctx, grad_loss, grad_logps):
        def recompute(grad_seq):
            hidden, weight, bias, lse, logps = ctx.saved_tensors  # unpacked only here (ZeRO-3 regathers W)
            return TritonSequenceLogprobs.recompute(ctx, hidden, weight, bias, lse, grad_seq(logps))

        return fused_loss_backward(ctx, grad_loss, grad_logps, recompute)
