"""The plain float64 reference that every backend is tested against (tests, benchmarks' error columns).

Written to be obviously right rather than fast, and independent of the op's input handling: it builds the full
[L, V] logits of every sequence, in float64 when the inputs are float64 and in float32 otherwise, and reads the
labels straight from the caller's layout (padded or packed, shifted or not).
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor


def transform_logits(raw: Tensor, softcap: float | None, temperature: float) -> Tensor:
    """``softcap(raw) / temperature`` with ``softcap(a) = c·tanh(a/c)``; any shape, same dtype."""
    if softcap is not None:
        raw = softcap * torch.tanh(raw / softcap)
    return raw / temperature


def reference_sequence_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    temperature: float = 1.0,
    shift: bool = True,
) -> Tensor:
    """Summed target log-probs per sequence, differentiable by autograd.

    hidden [B, T, H] with labels [B, T], or hidden [N, H] with labels [N] and cu_seqlens [B+1].
    Returns [B] in float64 for float64 inputs, float32 otherwise.
    """
    compute = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    if cu_seqlens is None:
        pieces = list(zip(hidden.unbind(0), labels.unbind(0), strict=True))
    else:
        bounds = cu_seqlens.tolist()
        pieces = [(hidden[a:b], labels[a:b]) for a, b in itertools.pairwise(bounds)]
    w = weight.to(compute)
    b = None if bias is None else bias.to(compute)
    out = []
    for h, y in pieces:
        if shift:
            h, y = h[:-1], y[1:]
        logits = transform_logits(torch.nn.functional.linear(h.to(compute), w, b), softcap, temperature)
        logp = torch.log_softmax(logits, dim=-1)
        keep = y != ignore_index
        picked = logp.gather(-1, torch.where(keep, y, 0).long().unsqueeze(-1)).squeeze(-1)
        out.append(torch.where(keep, picked, 0).sum())
    return torch.stack(out)
