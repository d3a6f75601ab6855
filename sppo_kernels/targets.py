"""Per-sequence win-rate targets that reproduce the named pairwise SPPO losses with :func:`sppo_loss`.

Lay a batch of P pairs out as ``[chosen_0 … chosen_{P-1}, rejected_0 … rejected_{P-1}]`` (TRL's concatenated
order), pass ``target_probs`` from :func:`pair_targets` and multiply the ``reduction="mean"`` loss by
``loss_scale``:

===============  ==========================================================  ==============  ==========
name             pair loss (mean over pairs)                                 targets         loss_scale
===============  ==========================================================  ==============  ==========
``sppo``         ((r_w − η(P_win − ½))² + (r_l − η(P_lose − ½))²) / 2        [P_win, P_lose]  1
``sppo_single``  ((r_w − η(p − ½))² + (r_l + η(p − ½))²) / 2                 [p, 1 − p]       1
``sppo_hard``    (r_w − η/2)² + (r_l + η/2)²    (TRL / Liger)                [1, 0]           2
===============  ==========================================================  ==============  ==========
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

PAIR_LOSS_TYPES = ("sppo", "sppo_single", "sppo_hard")


class PairTargets(NamedTuple):
    """target_probs [2P] (dtype of the inputs) in chosen-then-rejected order, and the factor for the mean loss."""

    target_probs: Tensor
    loss_scale: float


def pair_targets(
    loss_type: str,
    *,
    p_win: Tensor | None = None,
    p_lose: Tensor | None = None,
    p_chosen_beats_rejected: Tensor | None = None,
    num_pairs: int | None = None,
) -> PairTargets:
    """Targets for P chosen/rejected pairs.

    ``sppo`` needs p_win and p_lose ([P]); ``sppo_single`` needs p_chosen_beats_rejected ([P], P(y_w > y_l));
    ``sppo_hard`` needs only num_pairs (or any of the tensors, for its length and device).
    """
    if loss_type == "sppo":
        if p_win is None or p_lose is None:
            raise ValueError("loss_type='sppo' needs p_win and p_lose")
        if p_win.shape != p_lose.shape or p_win.dim() != 1:
            raise ValueError(f"p_win and p_lose must both be [P], got {tuple(p_win.shape)} and {tuple(p_lose.shape)}")
        return PairTargets(torch.cat([p_win, p_lose]), 1.0)
    if loss_type == "sppo_single":
        if p_chosen_beats_rejected is None or p_chosen_beats_rejected.dim() != 1:
            raise ValueError("loss_type='sppo_single' needs p_chosen_beats_rejected of shape [P]")
        p = p_chosen_beats_rejected
        return PairTargets(torch.cat([p, 1 - p]), 1.0)
    if loss_type == "sppo_hard":
        like = next((t for t in (p_win, p_lose, p_chosen_beats_rejected) if t is not None), None)
        pairs = num_pairs if num_pairs is not None else (None if like is None else like.shape[0])
        if pairs is None or pairs < 1:
            raise ValueError("loss_type='sppo_hard' needs num_pairs >= 1 (or a [P] tensor for its length)")
        device = None if like is None else like.device
        ones = torch.ones(pairs, device=device)
        return PairTargets(torch.cat([ones, torch.zeros_like(ones)]), 2.0)
    raise ValueError(f"loss_type must be one of {PAIR_LOSS_TYPES}, got {loss_type!r}")
