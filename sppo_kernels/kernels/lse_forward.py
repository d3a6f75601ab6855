"""Forward kernel: per-row log-sum-exp and target logit over one split of the vocabulary, and its host launch.

Rows come gathered: the first ``n_valid`` rows of ``hidden`` are the rows that score a token, contiguous, so a
row tile is a dense [BLOCK_N, BLOCK_K] block (the buffer is padded: row loads need no mask). ``n_valid`` stays
on the device (no host synchronisation), so the grid is persistent: a fixed number of programs walks the
``row_blocks × splits`` work items, counted on the device, in the grouped order of :func:`grouped_tile` (L2 reuse
of W and H). Rows that score nothing cost no program at all.

The split count is read on the device from a table indexed by ``row_blocks = cdiv(n_valid, BLOCK_N)``, built on
the host by :func:`wave_splits` so that the work items fill whole waves of the persistent grid; split s covers
``⌊v_blocks/S⌋`` or one more vocabulary blocks (balanced).

A work item (row block i, split s) streams its split of the vocabulary in BLOCK_V tiles, keeping an online
max/sum in registers, and writes per row ``lse_part[s, row]`` and ``target_part[s, row]`` (the target's logit if
the target lies in this split, else 0). The host merges the splits; rows at or past ``n_valid`` are never
written. No atomics.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from sppo_kernels.kernels.launch import BlockConfig, Buffer, LogitTransform, allocate, gather, gathered_rows
from sppo_kernels.kernels.logit_tile import grouped_tile, logit_tile
from sppo_kernels.kernels.rows import ScoredRows


@triton.jit
def lse_forward_kernel(
    hidden_ptr,  # [N + BLOCK_N, H] input dtype; the first n_valid rows are the scored ones
    weight_ptr,  # [V, H] input dtype
    bias_ptr,  # [V] input dtype (unused without HAS_BIAS)
    target_ptr,  # [N] int64: vocabulary id of each gathered row
    n_valid_ptr,  # [1] int64: number of scored rows
    split_table_ptr,  # [cdiv(N, BLOCK_N)] int32: split count for 1, 2, ... row blocks
    lse_part_ptr,  # [max splits, N] float32
    target_part_ptr,  # [max splits, N] float32
    N,
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
    GROUP_N: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    n_valid = tl.load(n_valid_ptr).to(tl.int32)
    row_blocks = tl.cdiv(n_valid, BLOCK_N)
    num_splits = tl.load(split_table_ptr + tl.maximum(row_blocks - 1, 0))
    v_blocks = tl.cdiv(V, BLOCK_V)
    per_split = v_blocks // num_splits
    longer = v_blocks % num_splits  # the first `longer` splits hold one more block
    for item in range(tl.program_id(0), row_blocks * num_splits, tl.num_programs(0)):
        pid_n, pid_s = grouped_tile(item, row_blocks, num_splits, GROUP_N)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = offs_n < n_valid
        rows = offs_n.to(tl.int64)
        target = tl.load(target_ptr + offs_n, mask=row_mask, other=-1).to(tl.int32)

        running_max = tl.full((BLOCK_N,), float("-inf"), tl.float32)
        running_sum = tl.zeros((BLOCK_N,), tl.float32)
        target_logit = tl.zeros((BLOCK_N,), tl.float32)
        v_start = (pid_s * per_split + tl.minimum(pid_s, longer)) * BLOCK_V
        for vb in range(0, per_split + (pid_s < longer).to(tl.int32)):
            offs_v = v_start + vb * BLOCK_V + tl.arange(0, BLOCK_V)
            col_mask = offs_v < V
            z, _ = logit_tile(
                hidden_ptr, weight_ptr, bias_ptr, rows, row_mask, offs_v, col_mask, H,
                stride_hn, stride_hh, stride_wv, stride_wh, inv_softcap, cap_scale, inv_temperature,
                HAS_BIAS, HAS_SOFTCAP, UPCAST_DOT, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_K,
                MASK_ROWS=False,
            )  # fmt: skip
            z = tl.where(col_mask[None, :], z, float("-inf"))
            target_logit += tl.sum(tl.where(offs_v[None, :] == target[:, None], z, 0.0), axis=1)
            tile_max = tl.max(z, axis=1)
            new_max = tl.maximum(running_max, tile_max)
            # A split whose tiles are all padding keeps max = -inf; guard the rescale against (-inf) - (-inf).
            safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
            running_sum = running_sum * tl.exp(running_max - safe_max) + tl.sum(tl.exp(z - safe_max[:, None]), axis=1)
            running_max = new_max

        lse = running_max + tl.log(running_sum)
        out = pid_s.to(tl.int64) * N + offs_n
        tl.store(lse_part_ptr + out, lse, mask=row_mask)
        tl.store(target_part_ptr + out, target_logit, mask=row_mask)


def wave_splits(row_blocks: int, v_blocks: int, programs: int, group_n: int) -> int:
    """The vocabulary split count S for ``row_blocks`` row blocks on a persistent grid of ``programs``.

    At least enough items that one group (``min(group_n, row_blocks)`` row blocks × S splits) keeps every program
    busy, at most 8 times that (and ``v_blocks``); within that range the fewest splits whose ``row_blocks × S`` work
    items are a whole number of waves, else the best wave efficiency ``items / (programs · ⌈items / programs⌉)``.
    """
    smallest = max(1, min(v_blocks, triton.cdiv(programs, min(row_blocks, group_n))))
    largest = max(smallest, min(v_blocks, 8 * smallest))

    def efficiency(splits: int) -> float:
        items = row_blocks * splits
        return items / (programs * triton.cdiv(items, programs))

    return max(range(smallest, largest + 1), key=lambda s: (efficiency(s), -s))


@functools.lru_cache(maxsize=64)
def split_counts(max_row_blocks: int, v_blocks: int, programs: int, group_n: int) -> tuple[int, ...]:
    """:func:`wave_splits` for 1, 2, ... ``max_row_blocks`` row blocks."""
    return tuple(wave_splits(r, v_blocks, programs, group_n) for r in range(1, max_row_blocks + 1))


@functools.lru_cache(maxsize=64)
def split_table(device: torch.device, max_row_blocks: int, v_blocks: int, programs: int, group_n: int) -> Tensor:
    """:func:`split_counts` as an int32 tensor on ``device``, built once per shape (the forward then reads no value
    on the host)."""
    return torch.tensor(split_counts(max_row_blocks, v_blocks, programs, group_n), dtype=torch.int32, device=device)


def forward_plan(rows: int, vocab: int, width: int, dtype: torch.dtype, block: BlockConfig,
                 programs: int) -> dict[str, Buffer]:  # fmt: skip
    """The forward's workspace for ``rows`` rows (all may score): the gathered rows and the split partials."""
    row_blocks, v_blocks = triton.cdiv(rows, block.block_n), triton.cdiv(vocab, block.block_v)
    splits = max(split_counts(row_blocks, v_blocks, programs, block.group_n))
    return {
        "gathered rows": gathered_rows(rows, width, dtype, block.block_n),
        "lse partials": Buffer((splits, rows), torch.float32),
        "target partials": Buffer((splits, rows), torch.float32),
    }


def forward(hidden: Tensor, weight: Tensor, bias: Tensor | None, rows: ScoredRows, transform: LogitTransform,
            block: BlockConfig, programs: int, poison: bool) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(logps [B] float32, lse [N] float32 per gathered row, meaningful for the first n_valid) of hidden [N, H],
    weight [V, H], bias [V] | None: one persistent launch, then the split merge and the per-sequence sums."""
    n_rows, width = hidden.shape
    vocab, device = weight.shape[0], hidden.device
    if n_rows == 0:
        return torch.zeros(rows.num_seqs, dtype=torch.float32, device=device), hidden.new_zeros(0).float()
    buffers = allocate(forward_plan(n_rows, vocab, width, hidden.dtype, block, programs), device, poison)
    gathered = gather(hidden, rows.order, buffers["gathered rows"])
    lse_part, target_part = buffers["lse partials"], buffers["target partials"]
    row_blocks = triton.cdiv(n_rows, block.block_n)
    table = split_table(device, row_blocks, triton.cdiv(vocab, block.block_v), programs, block.group_n)
    lse_forward_kernel[(min(programs, row_blocks * lse_part.shape[0]),)](
        gathered, weight, gathered if bias is None else bias, rows.targets, rows.n_valid, table, lse_part,
        target_part, n_rows, vocab, width, gathered.stride(0), gathered.stride(1), weight.stride(0),
        weight.stride(1), GROUP_N=block.group_n, BLOCK_N=block.block_n, BLOCK_V=block.block_v,
        BLOCK_K=block.block_k, num_warps=block.num_warps, num_stages=block.num_stages, **transform.kernel_args(),
    )  # fmt: skip
    used = (triton.cdiv(rows.n_valid, block.block_n) - 1).clamp(min=0)  # device-side: no host read
    in_use = torch.arange(lse_part.shape[0], device=device)[:, None] < table.index_select(0, used)
    lse = torch.logsumexp(torch.where(in_use, lse_part, float("-inf")), dim=0)
    target_logit = torch.where(in_use, target_part, 0.0).sum(0)
    return rows.sequence_sums(torch.where(rows.in_range, target_logit - lse, 0.0)), lse
