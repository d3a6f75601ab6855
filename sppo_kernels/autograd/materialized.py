"""The ``"torch"`` backend: full [N, V] logits and torch's own autograd, for tests and debugging.

It materialises every row's logits (float64 for float64 inputs, float32 otherwise), so it needs N·V floats of
memory, but it is differentiable any number of times (double backward works here and nowhere else).
"""

from __future__ import annotations

import torch
from torch import Tensor

from sppo_kernels.reference import transform_logits


def materialized_sequence_logprobs(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    seq_ids: Tensor,
    num_seqs: int,
    softcap: float | None,
    temperature: float,
    config: None,
) -> Tensor:
    """hidden [N, H], weight [V, H], bias [V] | None, targets/seq_ids [N] → summed log-probs [B]."""
    compute = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    b = None if bias is None else bias.to(compute)
    raw = torch.nn.functional.linear(hidden.to(compute), weight.to(compute), b)
    logp = torch.log_softmax(transform_logits(raw, softcap, temperature), dim=-1)
    keep = targets >= 0
    picked = logp.gather(1, targets.clamp_min(0).unsqueeze(1)).squeeze(1)
    per_row = torch.where(keep, picked, 0)
    return torch.zeros(num_seqs, dtype=compute, device=hidden.device).index_add(0, seq_ids, per_row)
