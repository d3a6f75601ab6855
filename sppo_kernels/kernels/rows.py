"""The rows that score a token, compacted on the device and grouped by sequence (host side, no Triton kernel).

key [N]: the row's sequence id, or B for a row that scores nothing; ``order`` [N] sorts key stably, so the first
n_valid gathered rows are the scored ones, sequence by sequence. ``starts`` [B+1]: sequence b owns gathered rows
starts[b]..starts[b+1]; starts[B] = n_valid. Nothing here reads a value on the host except :meth:`count` and
:meth:`host_starts`, which say so.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sppo_kernels.kernels.segment_sum import segment_sums

# Row vectors a call keeps, as (int64 or bool or float32 elements per row): order, key, targets (int64);
# in_range (bool); lse, row log-prob or row gradient, the forward's merged target logit (float32).
ROW_VECTOR_BYTES = 3 * 8 + 1 + 3 * 4


class ScoredRows:
    """targets [N] int64 (−1: scores nothing), seq_ids [N] int64, num_seqs B."""

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
        """Float32 sums of per-gathered-row values [>= n_valid] over sequences first..last (default: all): a fixed
        summation order (deterministic, unlike a scatter-add or a CUDA cumsum), float64 accumulation."""
        last = self.num_seqs if last is None else last
        return segment_sums(row_values, self.starts[first : last + 1])

    def row_grads(self, grad_seq: Tensor) -> Tensor:
        """[N] float32: each gathered row's sequence gradient, 0 past n_valid."""
        seq = self.key.clamp(max=max(self.num_seqs - 1, 0))
        return torch.where(self.in_range, grad_seq.float().index_select(0, seq), 0.0)
