"""C++ CPU backend (``csrc/sppo_cpu.cpp``): the autograd Functions around the extension.

- :class:`CpuSequenceLogprobs` (per-sequence log-probs): the forward keeps the per-row log-sum-exp; the backward
  recomputes the logits for any per-sequence upstream gradient. Both sweep the vocabulary tile by tile over all
  kept rows (8NHV FLOPs for forward + backward).
- :class:`CpuSPPOLoss` (the fused SPPO loss path, ``CpuConfig.fused_sppo_loss``): the loss is separable per
  sequence, so the forward also forms the gradient of the reduced loss. float32/float64 weights: chunks of whole
  sequences keep their [rows, V] logits in a block until their seeds are known (6NHV, no recompute); longer
  sequences, and every row of bfloat16/float16 weights (whose dW must be summed in float32 per vocabulary tile and
  rounded once), take the two sweeps with the seeds known in between (8NHV). The backward hands the formed gradient
  out (scaled) when the upstream gradient is a multiple of the one it was formed for, and otherwise recomputes.

Masked rows (target -1) are dropped before any GEMM. Logits and all sums are float32 (float64 for float64 inputs);
bfloat16 inputs run bf16 x bf16 -> float32 GEMMs. Both backwards are first-order only (double backward raises).
See docs/cpu_backend.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sppo_kernels._cpu_extension import extension
from sppo_kernels.autograd.first_order import first_order_backward
from sppo_kernels.autograd.fused_loss import fused_loss_backward
from sppo_kernels.losses import SPPOObjective


@dataclass(frozen=True)
class Tiling:
    """Tile sizes. The seeded block (SPPO loss, float32/float64 weights) packs whole sequences into chunks of at most
    ``workspace_elements // V`` rows and keeps their [rows, V] logits (64 MiB of float32 by default: sequences of up
    to 524 rows at V = 32000, 65 at V = 256000); longer sequences, and the two vocabulary sweeps, cut the rows in
    chunks of ``chunk_rows`` and give each thread a [rows, cols] logits tile. A tile has at most ``tile_elements``
    elements (8 MiB of float32, a share of L3) and ``max_tile_cols`` columns: measured on 2 cores, tall tiles beat
    L2-sized ones (MKL packs both operands on every call; larger tiles pay that less often), and 512 columns are
    as fast as 1024 while halving the per-thread dW tile accumulator of bf16/fp16 weights ([cols, H] float32)."""

    workspace_elements: int = 1 << 24
    chunk_rows: int = 2048
    tile_elements: int = 1 << 21
    max_tile_cols: int = 512

    def block(self, vocab: int) -> tuple[int, int]:
        """(rows, columns) of the SPPO forward's chunks and tiles."""
        rows = max(1, self.workspace_elements // vocab)
        return rows, self._cols(rows, vocab)

    def chunk(self, vocab: int) -> tuple[int, int]:
        """(rows, columns) of the recomputing passes' chunks and tiles."""
        return self.chunk_rows, self._cols(self.chunk_rows, vocab)

    def _cols(self, rows: int, vocab: int) -> int:
        return min(vocab, self.max_tile_cols, max(1, self.tile_elements // rows))


BLAS_CHOICES = ("auto", "aten")
LOW_PRECISION_GRAD_CHOICES = ("corrected", "split")


@dataclass(frozen=True)
class CpuConfig:
    """Options of the ``"cpu"`` backend.

    - ``poison`` NaN-fills every output buffer before the C++ writes it (tests use it to catch unwritten elements);
    - ``fused_sppo_loss`` forms the SPPO loss gradient in the forward;
    - ``blas``: ``"auto"`` runs the GEMMs in the MKL that torch's x86-64 builds carry (bf16 x bf16 -> float32 at
      the CPU's bf16 rate, AMX where present), or ATen where torch has no MKL; ``"aten"`` always ATen (bf16 tiles
      upcast to float32);
    - ``low_precision_grad`` (bfloat16 inputs): how the float32 logit gradient da enters the bf16 gradient GEMMs.
      ``"corrected"``: rounded to bf16, and the few entries that carry most of the gradient (|da| >= |g| / (64 tau):
      at most 65 per row) corrected exactly on the side, so dH and dW stay within ~1% of the float32 path's error at
      the cost of one bf16 GEMM each; ``"split"``: as two bf16 parts hi + lo (da to ~16 bits, twice the GEMMs).
    """

    tiling: Tiling = Tiling()
    poison: bool = False
    fused_sppo_loss: bool = True
    blas: str = "auto"
    low_precision_grad: str = "corrected"

    def __post_init__(self) -> None:
        if self.blas not in BLAS_CHOICES:
            raise ValueError(f"blas must be one of {BLAS_CHOICES}, got {self.blas!r}")
        if self.low_precision_grad not in LOW_PRECISION_GRAD_CHOICES:
            choices, got = LOW_PRECISION_GRAD_CHOICES, self.low_precision_grad
            raise ValueError(f"low_precision_grad must be one of {choices}, got {got!r}")


def workspace_bytes(
    vocab: int, width: int, rows: int, dtype: torch.dtype, seeded: bool, tiling: Tiling = Tiling(), split: bool = False
) -> int:
    """Upper bound on the scratch bytes the C++ allocates besides its outputs (log-probs, lse, dH, dW, db), for
    ``rows`` kept rows, ``torch.get_num_threads()`` threads and ``tiling``. seeded: the SPPO forward with its
    gradient, which for float32/float64 weights may use the seeded block and the two sweeps; else one sweep
    (the plain forward or the recomputing backward). split: ``low_precision_grad="split"``."""
    threads = torch.get_num_threads()
    item = 8 if dtype == torch.float64 else 4
    operand = 2 if dtype == torch.bfloat16 else item  # float16 operands are upcast to float32
    chunk_rows, cols = tiling.chunk(vocab)
    tile_rows = min(chunk_rows, rows)
    per_thread = item * (tile_rows * cols + rows * width)  # logits tile, dH partial
    if dtype in (torch.bfloat16, torch.float16):
        per_thread += 4 * cols * (width + 1)  # dW / db tile accumulators
        per_thread += 4 * cols * width if dtype == torch.float16 else 2 * tile_rows * cols * (2 if split else 1)
    sweeps = operand * rows * width + 2 * item * 32 * rows + threads * per_thread  # kept rows, forward parts
    if not seeded or dtype in (torch.bfloat16, torch.float16):
        return sweeps
    block_rows, block_cols = tiling.block(vocab)
    held = min(block_rows, rows)
    block = item * (held * vocab + held * width + threads * held * width)  # logits, the chunk's rows, dH partials
    return max(sweeps, block + 2 * item * held * (-(-vocab // block_cols)))


@dataclass(frozen=True)
class _Rows:
    """What the C++ calls need besides hidden, weight and bias: the kept rows and the options."""

    rows: Tensor  # [M] int64: the rows of hidden that score a target
    targets: Tensor  # [M] int64
    seq: Tensor  # [M] int64
    num_seqs: int
    softcap: float  # 0.0: no cap
    temperature: float
    block: tuple[int, int]
    chunk: tuple[int, int]
    flags: tuple[str, bool, bool]  # blas, split the bf16 gradient, poison

    @staticmethod
    def of(targets: Tensor, seq_ids: Tensor, num_seqs: int, vocab: int, softcap: float | None, temperature: float,
           config: CpuConfig) -> _Rows:  # fmt: skip
        rows = (targets >= 0).nonzero().squeeze(1)
        cap = 0.0 if softcap is None else float(softcap)
        kept = (rows, targets.index_select(0, rows), seq_ids.index_select(0, rows))
        tiling = config.tiling
        flags = (config.blas, config.low_precision_grad == "split", config.poison)
        return _Rows(*kept, num_seqs, cap, float(temperature), tiling.block(vocab), tiling.chunk(vocab), flags)

    def forward(self, hidden, weight, bias, seeds=None, needs=(False, False, False)) -> list:
        """[logps, lse, dh, dw, db]; gradients for seeds = (slope, offset), where ``needs`` asks for them."""
        slope, offset = (None, None) if seeds is None else seeds
        return extension().forward(
            hidden, weight, bias, self.rows, self.targets, self.seq, self.num_seqs, self.softcap, self.temperature,
            slope, offset, needs[0], needs[1], needs[2] and bias is not None, *self.block, *self.chunk, *self.flags,
        )  # fmt: skip

    def backward(self, hidden, weight, bias, lse, grad_seq, needs) -> tuple:
        """(dh, dw, db) for the per-sequence upstream gradient grad_seq [B], recomputing the logits."""
        return tuple(
            extension().backward(
                hidden, weight, bias, self.rows, self.targets, self.seq, lse, grad_seq, self.softcap,
                self.temperature, needs[0], needs[1], needs[2] and bias is not None, *self.chunk, *self.flags,
            )
        )  # fmt: skip


class CpuSequenceLogprobs(torch.autograd.Function):
    """hidden [N, H], weight [V, H], bias [V] | None → summed log-probs [B] float32 (float64 for float64)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, seq_ids, num_seqs, softcap, temperature, config):
        ctx.rows = _Rows.of(targets, seq_ids, num_seqs, weight.shape[0], softcap, temperature, config)
        logps, lse, *_ = ctx.rows.forward(hidden, weight, bias)
        ctx.save_for_backward(hidden, weight, bias, lse)
        return logps

    @staticmethod
    @first_order_backward
    def backward(ctx, grad_logps):
        grads = ctx.rows.backward(*ctx.saved_tensors, grad_logps, ctx.needs_input_grad[:3])
        return (*grads, None, None, None, None, None, None)


class CpuSPPOLoss(torch.autograd.Function):
    """SPPO loss and log-probs, ``(loss, logps [B])``, with the loss gradient formed in the forward.

    With ``form_grads`` the forward forms d(loss)/d(hidden, weight, bias) for an upstream gradient of 1 on the loss
    (on each element for ``reduction="none"``). The backward returns it, scaled by c, when the upstream gradient
    is c times that one and none reaches ``logps``; any other upstream gradient is handled by recomputation.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, seq_ids, num_seqs, softcap, temperature, config,
                objective: SPPOObjective, form_grads: bool):  # fmt: skip
        ctx.set_materialize_grads(False)
        ctx.rows = _Rows.of(targets, seq_ids, num_seqs, weight.shape[0], softcap, temperature, config)
        ctx.objective = objective
        needs = ctx.needs_input_grad[:3] if form_grads else (False, False, False)
        seeds = objective.grad_coefficients() if any(needs) else None
        logps, lse, *formed = ctx.rows.forward(hidden, weight, bias, seeds, needs)
        ctx.formed = None if seeds is None else formed
        ctx.save_for_backward(hidden, weight, bias, lse, logps)
        return objective(logps), logps

    @staticmethod
    @first_order_backward
    def backward(ctx, grad_loss, grad_logps):
        def recompute(grad_seq):
            hidden, weight, bias, lse, logps = ctx.saved_tensors  # unpacked only here (ZeRO-3 regathers W)
            return ctx.rows.backward(hidden, weight, bias, lse, grad_seq(logps), ctx.needs_input_grad[:3])

        return fused_loss_backward(ctx, grad_loss, grad_logps, recompute)
