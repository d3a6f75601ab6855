"""Triton backend: the autograd Functions around the kernels (design and accounting: docs/triton_design.md).

- Rows that score a token are compacted on the device, grouped by sequence (one stable argsort, no host
  synchronisation in the forward), and gathered into a contiguous buffer padded to whole row tiles.
- Forward (``lse_forward.py``): per-row log-sum-exp and target logit on a persistent grid that walks only the
  scored rows' work items; per-sequence sums by ``segment_sum.py`` (fixed order: deterministic, unlike a CUDA
  ``index_add_`` or ``cumsum``).
- Backward, ``TritonConfig(backward="chunked")`` (default, atomic-free, deterministic): the vocabulary in chunks
  sized by ``chunk_bytes``; per chunk a Triton kernel recomputes the logits and writes dA (input dtype) for the
  scored rows, then ``dW[chunk] = dAᵀ·H`` (one GEMM, float32 accumulation, written once in the weight dtype) and
  ``dH += dA·W[chunk]`` (float32 accumulator) run through torch (cuBLAS on a GPU). 8NHV FLOPs.
- Backward, ``backward="atomic"``: the first design (float32 atomics into dH, dW, db), kept for measurement.
- :class:`TritonSPPOLoss` with ``fused_sppo_loss=True``: logits computed once per chunk of whole sequences and kept
  as an ``exp(z − m)`` workspace until the chunk's loss gradients are known, so the gradient needs no recompute
  (6NHV FLOPs); one host synchronisation reads the sequences' row counts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
from torch import Tensor

from sppo_kernels.autograd.first_order import first_order_backward
from sppo_kernels.autograd.fused_loss import fused_loss_backward
from sppo_kernels.kernels.exp_workspace import exp_tile_kernel, grad_from_exp_kernel
from sppo_kernels.kernels.logit_backward import logit_backward_kernel
from sppo_kernels.kernels.logit_grad import logit_grad_kernel
from sppo_kernels.kernels.lse_forward import lse_forward_kernel
from sppo_kernels.kernels.segment_sum import segment_sum_kernel
from sppo_kernels.losses import SPPOObjective

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
KERNELS = ("forward", "backward", "atomic", "fused")


@dataclass(frozen=True)
class BlockConfig:
    """Tile sizes and launch options of one kernel. Blocks are powers of two >= 16 (a GPU ``tl.dot`` limit).
    ``group_n``: row blocks per group in the grouped tile order (L2 reuse)."""

    block_n: int
    block_v: int
    block_k: int
    num_warps: int = 8
    num_stages: int = 3
    group_n: int = 8

    def __post_init__(self) -> None:
        for name in ("block_n", "block_v", "block_k"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {value}")
        if self.num_warps not in (1, 2, 4, 8, 16) or self.num_stages < 1 or self.group_n < 1:
            raise ValueError(f"invalid launch options in {self}")


# Interpreter tiles are small so that tests exercise several blocks in every dimension at small sizes.
INTERPRETER_CONFIGS = {kind: BlockConfig(16, 64, 32, 4, 1, 2) for kind in KERNELS}
# sm_90 configurations, keyed by (kernel, input element size). Chosen from faithful sm_90 compiles
# (tests/sm90_compile.py: wgmma, a pipelined K loop, no spills, shared memory within the limit), not from
# timings: none has run on a GPU yet. The timing sweep in benchmarks/gpu_check.sh is to confirm or replace them.
GPU_CONFIGS = {
    ("forward", 2): BlockConfig(128, 128, 64, 8, 3, 16),
    ("backward", 2): BlockConfig(128, 128, 64, 8, 3, 16),
    ("atomic", 2): BlockConfig(64, 128, 64, 8, 2, 8),
    ("fused", 2): BlockConfig(128, 128, 64, 8, 3, 16),
    ("forward", 4): BlockConfig(128, 64, 32, 8, 3, 16),
    ("backward", 4): BlockConfig(128, 64, 32, 8, 3, 16),
    ("atomic", 4): BlockConfig(64, 128, 32, 8, 2, 8),
    ("fused", 4): BlockConfig(128, 64, 32, 8, 3, 16),
}
# Tile candidates for the GPU timing sweep (benchmarks/triton_sweep.py): each compiles for sm_90 with wgmma, a
# pipelined K loop and no spills at both benchmark presets in bfloat16 (python tests/sm90_compile.py --sweep).
SWEEP_TILES = {
    "128x128x64-s3-g4": BlockConfig(128, 128, 64, 8, 3, 4),
    "128x128x64-s4": BlockConfig(128, 128, 64, 8, 4, 16),
    "128x128x128-s2": BlockConfig(128, 128, 128, 8, 2, 16),
    "64x256x64-s3": BlockConfig(64, 256, 64, 8, 3, 32),
}
ELEMENTWISE_ROWS = {True: 16, False: 32}  # grad_from_exp_kernel rows per program (interpreting, GPU)
SEGMENT_BLOCK = 256  # segment_sum_kernel rows per step


@dataclass(frozen=True)
class TritonConfig:
    """Options of the Triton backend.

    backward: ``"chunked"`` (default: atomic-free and deterministic) or ``"atomic"`` (the first design: float32
        atomics, a [V, H] float32 dW buffer; kept for the GPU A/B measurement).
    fused_sppo_loss: for :class:`TritonSPPOLoss`, form the gradient in the forward from a workspace of whole
        sequences' logits (6NHV FLOPs) instead of recomputing them (8NHV). Off until a GPU measurement says.
    fp32_precision: float32 inputs only: ``"ieee"`` (exact float32 dot, no tensor cores) or ``"tf32x3"`` (three
        TF32 tensor-core passes, ~fp32 accuracy) for the Triton kernels; torch's GEMMs follow torch's settings.
    forward_block / backward_block / atomic_block / fused_block: tile overrides (default: the tables above).
    chunk_bytes: chunked backward: bytes of one dA chunk, [scored rows, chunk columns] in the input dtype.
    fused_workspace_bytes: fused loss: bytes of the ``exp(z − m)`` workspace, [chunk rows, V] in the input dtype;
        a sequence with more scored rows than fit falls back to the recompute path.
    programs_per_sm: persistent forward grid = SMs × this.
    poison: NaN-fill every buffer before the kernels write it (tests: an unwritten element shows).
    """

    backward: str = "chunked"
    fused_sppo_loss: bool = False
    fp32_precision: str = "ieee"
    forward_block: BlockConfig | None = None
    backward_block: BlockConfig | None = None
    atomic_block: BlockConfig | None = None
    fused_block: BlockConfig | None = None
    chunk_bytes: int = 256 << 20
    fused_workspace_bytes: int = 1 << 30
    programs_per_sm: int = 1
    poison: bool = False

    def __post_init__(self) -> None:
        if self.backward not in ("chunked", "atomic"):
            raise ValueError(f"backward must be 'chunked' or 'atomic', got {self.backward!r}")
        if self.fp32_precision not in ("ieee", "tf32x3"):
            raise ValueError(f"fp32_precision must be 'ieee' or 'tf32x3', got {self.fp32_precision!r}")
        if self.chunk_bytes <= 0 or self.fused_workspace_bytes <= 0 or self.programs_per_sm < 1:
            raise ValueError("chunk_bytes, fused_workspace_bytes and programs_per_sm must be positive")
        for kind in KERNELS:
            block = getattr(self, f"{kind}_block")
            if block is not None and not isinstance(block, BlockConfig):
                raise TypeError(f"{kind}_block must be a BlockConfig, got {type(block).__name__}")


DEFAULT_CONFIG = TritonConfig()


def block_config(kernel: str, dtype: torch.dtype, config: TritonConfig = DEFAULT_CONFIG) -> BlockConfig:
    """The tiles of ``kernel`` (one of KERNELS) for inputs of ``dtype``: the config's override, else the table."""
    override = getattr(config, f"{kernel}_block")
    if override is not None:
        return override
    if INTERPRETING:
        return INTERPRETER_CONFIGS.get(kernel, INTERPRETER_CONFIGS["forward"])
    return GPU_CONFIGS[(kernel, 4 if dtype == torch.float32 else 2)]


def num_programs(device: torch.device, programs_per_sm: int = 1) -> int:
    """Programs of the persistent forward grid: SMs × programs_per_sm on a GPU, 4 when interpreting (so that
    tests see a vocabulary split across programs)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count * programs_per_sm
    return 4


def vocab_splits(
    row_blocks: int, v_blocks: int, device: torch.device, programs_per_sm: int = 1, group_n: int | None = None
) -> tuple[int, int]:
    """(splits, vocabulary blocks per split) of the forward: enough work items that a group of
    ``min(group_n, row_blocks)`` row blocks × all splits keeps every program of the persistent grid busy."""
    rows_per_group = max(1, min(row_blocks, group_n or row_blocks))
    splits = max(1, min(v_blocks, triton.cdiv(num_programs(device, programs_per_sm), rows_per_group)))
    per_split = triton.cdiv(v_blocks, splits)
    return triton.cdiv(v_blocks, per_split), per_split


def chunk_columns(rows: int, vocab: int, item_size: int, budget: int, align: int) -> int:
    """Columns of one chunked-backward dA chunk: ``budget`` bytes of [rows, columns] elements, a multiple of
    ``align`` (at least one), at most the vocabulary."""
    cols = max(align, budget // max(1, rows * item_size) // align * align)
    return vocab if cols >= vocab else cols


def fused_chunk_rows(vocab: int, item_size: int, budget: int) -> int:
    """Rows of the fused loss's workspace: ``budget`` bytes of [rows, V] elements (at least one row)."""
    return max(1, budget // (vocab * item_size))


def workspace_bytes(kind: str, rows: int, vocab: int, width: int, item_size: int,
                    config: TritonConfig = DEFAULT_CONFIG, *, sms: int = 132, seq_rows: int | None = None,
                    bias: bool = False) -> dict[str, int]:  # fmt: skip
    """Bytes the GPU path allocates besides its inputs and its outputs (log-probs, dH, dW, db), by buffer, with
    the sum under "total"; the formulas of the code above, for ``rows`` scored rows (all rows scored), ``vocab``,
    ``width`` (H) and 16-bit (item_size 2) or float32 (4) inputs. kind: "forward", "chunked" (the default
    backward), "atomic" (the first backward) or "fused" (the fused loss's forward, whole sequences of
    ``seq_rows`` rows; its gradients are outputs)."""
    gpu = dict(GPU_CONFIGS)

    def tiles(name: str) -> BlockConfig:
        return getattr(config, f"{name}_block") or gpu[(name, item_size)]

    f32 = 4
    if kind == "forward":
        cfg = tiles("forward")
        row_blocks = -(-rows // cfg.block_n)
        groups = max(1, min(row_blocks, cfg.group_n))
        splits = max(1, min(-(-vocab // cfg.block_v), -(-sms * config.programs_per_sm // groups)))
        parts = {"gathered rows": (rows + cfg.block_n) * width * item_size, "split partials": 2 * splits * rows * f32}
    elif kind == "chunked":
        cfg = tiles("backward")
        cols = chunk_columns(rows, vocab, item_size, config.chunk_bytes, cfg.block_v)
        parts = {
            "gathered rows": (rows + cfg.block_n) * width * item_size,
            "dA chunk": rows * cols * item_size,
            "dH float32 accumulator": rows * width * f32,
            "dH float32 GEMM output": rows * width * f32 if item_size != f32 else 0,
            "dH cast": rows * width * item_size,
            "db float32": vocab * f32 if bias else 0,
        }
    elif kind == "atomic":
        parts = {"dH float32": rows * width * f32, "dW float32": vocab * width * f32, "db float32": vocab * f32}
    elif kind == "fused":
        cfg = tiles("fused")
        limit = fused_chunk_rows(vocab, item_size, config.fused_workspace_bytes)
        seq_rows = rows if seq_rows is None else seq_rows
        chunk = min(rows, max(seq_rows, limit // seq_rows * seq_rows))
        tiles_v = -(-vocab // cfg.block_v)
        parts = {
            "gathered rows": (rows + cfg.block_n) * width * item_size,
            "exp workspace": chunk * vocab * item_size,
            "tile max and sum": 2 * chunk * tiles_v * f32,
            "chunk dH GEMM output": chunk * width * item_size,
            "db float32": vocab * f32 if bias else 0,
        }
    else:
        raise ValueError(f"kind must be forward, chunked, atomic or fused, got {kind!r}")
    parts["row vectors"] = 8 * rows * 8  # order, key, targets, lse, row grads, ... (int64/float32 per row)
    return parts | {"total": sum(parts.values())}


def _kernel_options(hidden: Tensor, bias: Tensor | None, softcap: float | None, temperature: float,
                    config: TritonConfig = DEFAULT_CONFIG) -> dict:  # fmt: skip
    return {
        "softcap": 1.0 if softcap is None else float(softcap),
        "inv_temperature": 1.0 / float(temperature),
        "HAS_BIAS": bias is not None,
        "HAS_SOFTCAP": softcap is not None,
        "UPCAST_DOT": INTERPRETING,
        "DOT_PRECISION": config.fp32_precision if hidden.dtype == torch.float32 else "tf32",
    }


def _new(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, poison: bool) -> Tensor:
    """An output buffer every element of which a kernel or GEMM writes: NaN-filled when poisoning."""
    if poison:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _gather(hidden: Tensor, index: Tensor, pad_rows: int) -> Tensor:
    """hidden's rows ``index``, contiguous, followed by ``pad_rows`` zero rows: every row tile a kernel addresses
    lies inside the buffer, so its row loads need no mask (and stay dense for the copy engine)."""
    gathered = torch.empty(index.shape[0] + pad_rows, hidden.shape[1], dtype=hidden.dtype, device=hidden.device)
    torch.index_select(hidden, 0, index, out=gathered[: index.shape[0]])
    gathered[index.shape[0] :].zero_()
    return gathered


def _check_dtypes(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    if hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        dtype = str(hidden.dtype).removeprefix("torch.")
        raise TypeError(f"backend='triton' takes float32, bfloat16 or float16 inputs, not {dtype}")
    if weight.dtype != hidden.dtype or (bias is not None and bias.dtype != hidden.dtype):
        raise TypeError("backend='triton' needs hidden, weight and bias of one dtype")


class _Rows:
    """The scored rows, compacted on the device and grouped by sequence.

    key [N]: the row's sequence id, or B for a row that scores nothing; ``order`` [N] sorts key stably, so the
    first n_valid gathered rows are the scored ones, sequence by sequence. ``starts`` [B+1]: sequence b owns
    gathered rows starts[b]..starts[b+1]; starts[B] = n_valid. Nothing here reads a value on the host.
    """

    def __init__(self, targets: Tensor, seq_ids: Tensor, num_seqs: int) -> None:
        device = targets.device
        valid = targets >= 0
        key = torch.where(valid, seq_ids, num_seqs)
        self.order = torch.argsort(key, stable=True)
        self.key = key.index_select(0, self.order)
        self.targets = targets.index_select(0, self.order)
        self.starts = torch.searchsorted(self.key, torch.arange(num_seqs + 1, device=device, dtype=key.dtype))
        self.n_valid = self.starts[num_seqs:]  # [1] int64, on the device
        self.num_rows = targets.shape[0]
        self.num_seqs = num_seqs
        self.in_range = torch.arange(self.num_rows, device=device) < self.n_valid
        self._host_count: Tensor | None = None
        self._event = None

    def prefetch_count(self) -> None:
        """Start copying n_valid to the host without waiting (read by :meth:`count` in the backward)."""
        if self.order.device.type == "cuda":
            self._host_count = self.n_valid.to("cpu", non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()

    def count(self) -> int:
        """n_valid on the host. One synchronisation, which the forward's prefetch usually makes free."""
        if self._event is not None:
            self._event.synchronize()
            return int(self._host_count)
        return int(self.n_valid)

    def host_starts(self) -> list[int]:
        """``starts`` on the host (one synchronisation)."""
        return self.starts.tolist()

    def sequence_sums(self, row_values: Tensor, first: int = 0, last: int | None = None) -> Tensor:
        """Float32 sums of per-gathered-row values [>= n_valid] over sequences first..last (default: all):
        one program per sequence, a fixed summation order (deterministic, unlike a scatter-add or a CUDA
        cumsum), float64 accumulation."""
        last = self.num_seqs if last is None else last
        out = torch.empty(last - first, dtype=torch.float32, device=row_values.device)
        if last > first:
            segment_sum_kernel[(last - first,)](row_values, self.starts[first:], out, BLOCK=SEGMENT_BLOCK)
        return out

    def row_grads(self, grad_seq: Tensor) -> Tensor:
        """[N] float32: each gathered row's sequence gradient, 0 past n_valid."""
        seq = self.key.clamp(max=max(self.num_seqs - 1, 0))
        return torch.where(self.in_range, grad_seq.float().index_select(0, seq), 0.0)


def _forward_rows(gathered: Tensor, weight: Tensor, bias: Tensor | None, rows: _Rows, options: dict,
                  config: TritonConfig) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(lse [N], row log-prob [N], 0 past n_valid) of the gathered rows: one persistent forward launch."""
    n_rows, width = rows.num_rows, gathered.shape[1]
    vocab = weight.shape[0]
    device = gathered.device
    cfg = block_config("forward", gathered.dtype, config)
    row_blocks = triton.cdiv(n_rows, cfg.block_n)
    splits, per_split = vocab_splits(
        row_blocks, triton.cdiv(vocab, cfg.block_v), device, config.programs_per_sm, cfg.group_n
    )
    lse_part = _new((splits, n_rows), torch.float32, device, config.poison)
    target_part = _new((splits, n_rows), torch.float32, device, config.poison)
    grid = (min(num_programs(device, config.programs_per_sm), row_blocks * splits),)
    lse_forward_kernel[grid](
        gathered, weight, gathered if bias is None else bias, rows.targets, rows.n_valid, lse_part, target_part,
        n_rows, vocab, width, gathered.stride(0), gathered.stride(1), weight.stride(0), weight.stride(1),
        num_splits=splits, v_blocks_per_split=per_split, GROUP_N=cfg.group_n,
        BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **options,
    )  # fmt: skip
    lse = torch.logsumexp(lse_part, dim=0)
    return lse, torch.where(rows.in_range, target_part.sum(0) - lse, 0.0)


def _forward(hidden, weight, bias, rows: _Rows, options: dict, config: TritonConfig) -> tuple[Tensor, Tensor]:
    """(logps [B] float32, lse [N] per gathered row)."""
    if rows.num_rows == 0:
        return torch.zeros(rows.num_seqs, dtype=torch.float32, device=hidden.device), hidden.new_zeros(0).float()
    gathered = _gather(hidden, rows.order, block_config("forward", hidden.dtype, config).block_n)
    lse, row_logps = _forward_rows(gathered, weight, bias, rows, options, config)
    return rows.sequence_sums(row_logps), lse


_MM_FLOAT32_OUT = hasattr(torch.ops.aten.mm, "dtype")  # torch.mm(out_dtype=float32) for 16-bit CUDA inputs


def _accumulate_mm(acc: Tensor, a: Tensor, b: Tensor, scratch: list) -> None:
    """acc (float32) += a·b, the product accumulated in float32: in place for float32 inputs; for 16-bit inputs
    on a GPU one GEMM with a float32 output (``torch.mm(out_dtype=float32)``, into a reused scratch buffer) then an
    add; on the CPU (interpreter tests) an upcast GEMM. A torch without that GPU kernel falls back, once and for
    good, to rounding the chunk's product to 16 bits before the float32 add."""
    global _MM_FLOAT32_OUT
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif not acc.is_cuda:
        acc.addmm_(a.float(), b.float())
    else:
        if _MM_FLOAT32_OUT:
            if not scratch:
                scratch.append(torch.empty_like(acc))
            try:
                acc.add_(torch.mm(a, b, out_dtype=torch.float32, out=scratch[0]))
                return
            except (RuntimeError, NotImplementedError, TypeError):
                _MM_FLOAT32_OUT = False
        acc.add_(torch.mm(a, b))


def _chunked_backward(hidden, weight, bias, rows: _Rows, lse: Tensor, row_grad: Tensor, needs, options: dict,
                      config: TritonConfig) -> tuple:  # fmt: skip
    """(dH, dW, db) for per-gathered-row upstream gradients, atomic-free: vocabulary chunks of dA, two GEMMs."""
    need_h, need_w, need_b = needs[0], needs[1], needs[2] and bias is not None
    n_rows, width = hidden.shape
    vocab = weight.shape[0]
    device, dtype = hidden.device, hidden.dtype
    n = rows.count()
    grad_h = torch.zeros(n_rows, width, dtype=dtype, device=device) if need_h else None
    grad_w = _new((vocab, width), weight.dtype, device, config.poison) if need_w else None
    grad_b = torch.zeros(vocab, dtype=torch.float32, device=device) if need_b else None
    if n == 0 or not (need_h or need_w or need_b):
        if grad_w is not None:
            grad_w.zero_()
        return grad_h, grad_w, None if grad_b is None else grad_b.to(bias.dtype)

    index = rows.order[:n]
    cfg = block_config("backward", dtype, config)
    gathered = _gather(hidden, index, cfg.block_n)
    targets, lse, row_grad = rows.targets[:n], lse[:n].contiguous(), row_grad[:n].contiguous()
    cols = chunk_columns(n, vocab, hidden.element_size(), config.chunk_bytes, cfg.block_v)
    grad_a = _new((n, cols), dtype, device, config.poison)
    grad_h_acc = torch.zeros(n, width, dtype=torch.float32, device=device) if need_h else None
    if need_b:
        grad_b = _new((vocab,), torch.float32, device, config.poison)
    scratch: list = []
    for v_start in range(0, vocab, cols):
        width_v = min(cols, vocab - v_start)
        grid = (triton.cdiv(n, cfg.block_n) * triton.cdiv(width_v, cfg.block_v),)
        logit_grad_kernel[grid](
            gathered, weight, gathered if bias is None else bias, targets, lse, row_grad, grad_a,
            n, vocab, width, v_start, width_v,
            gathered.stride(0), gathered.stride(1), weight.stride(0), weight.stride(1), grad_a.stride(0),
            GROUP_N=cfg.group_n, BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_K=cfg.block_k,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **options,
        )  # fmt: skip
        chunk = grad_a[:, :width_v]
        if need_w:
            torch.mm(chunk.t(), gathered[:n], out=grad_w[v_start : v_start + width_v])
        if need_h:
            _accumulate_mm(grad_h_acc, chunk, weight[v_start : v_start + width_v], scratch)
        if need_b:
            torch.sum(chunk, 0, dtype=torch.float32, out=grad_b[v_start : v_start + width_v])
    if need_h:
        grad_h.index_copy_(0, index, grad_h_acc.to(dtype))
    return grad_h, grad_w, None if grad_b is None else grad_b.to(bias.dtype)


def _atomic_backward(hidden, weight, bias, rows: _Rows, lse: Tensor, row_grad: Tensor, needs, options: dict,
                     config: TritonConfig) -> tuple:  # fmt: skip
    """(dH, dW, db) by the first design: every tile adds its share with float32 atomics (nondeterministic)."""
    need_h, need_w, need_b = needs[0], needs[1], needs[2] and bias is not None
    n_rows, width = hidden.shape
    vocab = weight.shape[0]
    f32 = {"dtype": torch.float32, "device": hidden.device}
    grad_h = torch.zeros(n_rows, width, **f32) if need_h else torch.empty(1, **f32)
    grad_w = torch.zeros(vocab, width, **f32) if need_w else torch.empty(1, **f32)
    grad_b = torch.zeros(vocab, **f32) if need_b else torch.empty(1, **f32)
    n = rows.count()
    cfg = block_config("atomic", hidden.dtype, config)
    if n > 0 and (need_h or need_w or need_b):
        logit_backward_kernel[(triton.cdiv(n, cfg.block_n), triton.cdiv(vocab, cfg.block_v))](
            hidden, weight, hidden if bias is None else bias, rows.order, rows.targets, rows.n_valid, lse, row_grad,
            grad_h, grad_w, grad_b, vocab, width,
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            NEED_GRAD_HIDDEN=need_h, NEED_GRAD_WEIGHT=need_w, NEED_GRAD_BIAS=need_b,
            BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_K=cfg.block_k,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **options,
        )  # fmt: skip
    return (
        grad_h.to(hidden.dtype) if need_h else None,
        grad_w.to(weight.dtype) if need_w else None,
        grad_b.to(bias.dtype) if need_b else None,
    )


def _backward(hidden, weight, bias, rows: _Rows, lse: Tensor, grad_seq: Tensor, needs, options: dict,
              config: TritonConfig) -> tuple:  # fmt: skip
    """(dH, dW, db) for a per-sequence upstream gradient [B], recomputing the logits."""
    if rows.num_rows == 0:
        zeros = (torch.zeros_like(hidden), torch.zeros_like(weight), None if bias is None else torch.zeros_like(bias))
        return tuple(z if need else None for z, need in zip(zeros, needs, strict=True))
    run = _chunked_backward if config.backward == "chunked" else _atomic_backward
    return run(hidden, weight, bias, rows, lse, rows.row_grads(grad_seq), needs, options, config)


class TritonSequenceLogprobs(torch.autograd.Function):
    """hidden [N, H], weight [V, H], bias [V] | None (fp32/bf16/fp16) → summed log-probs [B] float32."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, seq_ids, num_seqs, softcap, temperature, config):
        config = DEFAULT_CONFIG if config is None else config
        _check_dtypes(hidden, weight, bias)
        bias = None if bias is None else bias.contiguous()
        rows = _Rows(targets, seq_ids, num_seqs)
        options = _kernel_options(hidden, bias, softcap, temperature, config)
        logps, lse = _forward(hidden, weight, bias, rows, options, config)
        if any(ctx.needs_input_grad[:3]):
            rows.prefetch_count()
        ctx.rows, ctx.options, ctx.config = rows, options, config
        ctx.save_for_backward(hidden, weight, bias, lse)
        return logps

    @staticmethod
    @first_order_backward
    def backward(ctx, grad_logps):
        hidden, weight, bias, lse = ctx.saved_tensors
        grads = _backward(hidden, weight, bias, ctx.rows, lse, grad_logps, ctx.needs_input_grad[:3], ctx.options,
                          ctx.config)  # fmt: skip
        return (*grads, None, None, None, None, None, None)


def _sequence_chunks(starts: list[int], max_rows: int) -> list[tuple[int, int]] | None:
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


def _fused_forward(hidden, weight, bias, rows: _Rows, objective: SPPOObjective, needs, options: dict,
                   config: TritonConfig) -> tuple[Tensor, Tensor, tuple] | None:  # fmt: skip
    """(logps [B], lse [N], (dH, dW, db) of the loss for an upstream gradient of 1) by the 6NHV design, or None
    when a sequence is longer than the workspace. One host synchronisation (the sequences' row counts)."""
    n_rows, width = hidden.shape
    vocab = weight.shape[0]
    device, dtype = hidden.device, hidden.dtype
    need_h, need_w, need_b = needs[0], needs[1], needs[2] and bias is not None
    starts_host = rows.host_starts()
    n = starts_host[-1]
    max_rows = fused_chunk_rows(vocab, hidden.element_size(), config.fused_workspace_bytes)
    plan = _sequence_chunks(starts_host, max_rows)
    if plan is None:
        return None

    cfg = block_config("fused", dtype, config)
    tiles = triton.cdiv(vocab, cfg.block_v)
    block_r = ELEMENTWISE_ROWS[INTERPRETING]
    ws_rows = max([starts_host[b1] - starts_host[b0] for b0, b1 in plan], default=1)
    workspace = _new((ws_rows, vocab), dtype, device, config.poison)
    tile_max = _new((ws_rows, tiles), torch.float32, device, config.poison)
    tile_sum = _new((ws_rows, tiles), torch.float32, device, config.poison)
    target_logit = _new((max(n, 1),), torch.float32, device, config.poison)
    lse = torch.zeros(max(n_rows, 1), dtype=torch.float32, device=device)
    row_grad = torch.zeros(max(n, 1), dtype=torch.float32, device=device)
    row_logps = torch.zeros(max(n, 1), dtype=torch.float32, device=device)
    logps = torch.zeros(rows.num_seqs, dtype=torch.float32, device=device)
    slope, offset = (c.to(device=device, dtype=torch.float64) for c in objective.grad_coefficients())

    index = rows.order[:n]
    gathered = _gather(hidden, index, cfg.block_n)
    targets = rows.targets[:n].contiguous()
    grad_h = torch.zeros(n_rows, width, dtype=dtype, device=device) if need_h else None
    grad_w = torch.zeros(vocab, width, dtype=weight.dtype, device=device) if need_w else None
    grad_b = torch.zeros(vocab, dtype=torch.float32, device=device) if need_b else None
    for b0, b1 in plan:
        r0, r1 = starts_host[b0], starts_host[b1]
        m = r1 - r0
        exp_tile_kernel[(triton.cdiv(m, cfg.block_n) * tiles,)](
            gathered, weight, gathered if bias is None else bias, targets, workspace, tile_max, tile_sum,
            target_logit, r0, m, vocab, width,
            gathered.stride(0), gathered.stride(1), weight.stride(0), weight.stride(1),
            workspace.stride(0), tile_max.stride(0),
            GROUP_N=cfg.group_n, BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_K=cfg.block_k,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **options,
        )  # fmt: skip
        chunk_lse = torch.logsumexp(tile_max[:m] + tile_sum[:m].log(), dim=1)
        lse[r0:r1] = chunk_lse
        row_logps[r0:r1] = target_logit[r0:r1] - chunk_lse
        logps[b0:b1] = rows.sequence_sums(row_logps, b0, b1)
        seq_grad = slope[b0:b1] * logps[b0:b1].double() + offset[b0:b1]
        row_grad[r0:r1] = seq_grad.float().index_select(0, rows.key[r0:r1] - b0)
        grad_from_exp_kernel[(triton.cdiv(m, block_r), tiles)](
            workspace, tile_max, lse, row_grad, targets, target_logit, r0, m, vocab,
            workspace.stride(0), tile_max.stride(0), options["softcap"], options["inv_temperature"],
            HAS_SOFTCAP=options["HAS_SOFTCAP"], BLOCK_R=block_r, BLOCK_V=cfg.block_v, num_warps=4,
        )  # fmt: skip
        grad_a = workspace[:m]
        if need_h:
            grad_h.index_copy_(0, index[r0:r1], torch.mm(grad_a, weight))
        if need_w:
            if len(plan) == 1:
                torch.mm(grad_a.t(), gathered[r0:r1], out=grad_w)
            else:  # accumulated across row chunks in the weight dtype: one rounding per chunk
                grad_w.addmm_(grad_a.t(), gathered[r0:r1])
        if need_b:
            grad_b += grad_a.sum(0, dtype=torch.float32)
    return logps, lse[:n_rows], (grad_h, grad_w, None if grad_b is None else grad_b.to(bias.dtype))


class TritonSPPOLoss(torch.autograd.Function):
    """A separable sequence loss and the log-probs, ``(loss, logps [B])``, with the loss gradient formed in the
    forward when ``config.fused_sppo_loss`` (6NHV, no recompute) and ``form_grads``.

    The backward hands that gradient out, scaled by c, when the loss's upstream gradient is c (uniform) and none
    reaches ``logps``; any other upstream gradient is handled exactly by the recomputing backward.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, seq_ids, num_seqs, softcap, temperature, config, objective,
                form_grads):  # fmt: skip
        config = DEFAULT_CONFIG if config is None else config
        _check_dtypes(hidden, weight, bias)
        bias = None if bias is None else bias.contiguous()
        ctx.set_materialize_grads(False)
        rows = _Rows(targets, seq_ids, num_seqs)
        options = _kernel_options(hidden, bias, softcap, temperature, config)
        needs = tuple(ctx.needs_input_grad[:3]) if form_grads else (False, False, False)
        fused = None
        if config.fused_sppo_loss and any(needs) and rows.num_rows > 0:
            fused = _fused_forward(hidden, weight, bias, rows, objective, needs, options, config)
        if fused is None:
            logps, lse = _forward(hidden, weight, bias, rows, options, config)
            ctx.formed = None
        else:
            logps, lse, ctx.formed = fused
        if any(ctx.needs_input_grad[:3]):
            rows.prefetch_count()
        ctx.rows, ctx.options, ctx.config, ctx.objective = rows, options, config, objective
        ctx.save_for_backward(hidden, weight, bias, lse, logps)
        return objective(logps), logps

    @staticmethod
    @first_order_backward
    def backward(ctx, grad_loss, grad_logps):
        def recompute(grad_seq):
            hidden, weight, bias, lse, logps = ctx.saved_tensors  # unpacked only here (ZeRO-3 regathers W)
            return _backward(hidden, weight, bias, ctx.rows, lse, grad_seq(logps), ctx.needs_input_grad[:3],
                             ctx.options, ctx.config)  # fmt: skip

        return fused_loss_backward(ctx, grad_loss, grad_logps, recompute)
