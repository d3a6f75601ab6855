"""The SPPO loss on per-sequence log-probs, and the named pairwise forms built on it.

Per sequence s with log-prob ``logp_s`` (summed over its target tokens):

    loss_s = (logp_s − ref_s − eta·(P_s − ½))²,        d loss_s / d logp_s = 2·(logp_s − ref_s − eta·(P_s − ½))

then reduced (``"mean"`` over sequences, ``"sum"`` or ``"none"``). The loss is separable per sequence, so a
backend that holds a whole sequence's logits can form the gradient during its forward pass: it only needs the
affine coefficients of :meth:`SPPOObjective.grad_coefficients`.

The pairwise losses of the reference trainer, TRL and Liger are this loss on a chosen/rejected layout with
particular targets (:func:`pair_targets`):

===============  ==========================================================  ==============  ==========
name             pair loss (mean over pairs)                                 targets         loss_scale
===============  ==========================================================  ==============  ==========
``sppo``         ((r_w − η(P_win − ½))² + (r_l − η(P_lose − ½))²) / 2        [P_win, P_lose]  1
``sppo_single``  ((r_w − η(p − ½))² + (r_l + η(p − ½))²) / 2                 [p, 1 − p]       1
``sppo_hard``    (r_w − η/2)² + (r_l + η/2)²    (TRL / Liger)                [1, 0]           2
===============  ==========================================================  ==============  ==========

Pairs are laid out ``[chosen_0 … chosen_{P−1}, rejected_0 … rejected_{P−1}]`` (TRL's concatenated order) and the
``reduction="mean"`` loss is multiplied by ``loss_scale``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

REDUCTIONS = ("mean", "sum", "none")
PAIR_LOSS_TYPES = ("sppo", "sppo_single", "sppo_hard")


def sppo_epilogue(logps: Tensor, ref_logps: Tensor, target_probs: Tensor, eta: float, reduction: str) -> Tensor:
    """``(logps − ref_logps − eta·(target_probs − ½))²`` per sequence, then reduced; all [B], same dtype."""
    losses = (logps - ref_logps - eta * (target_probs - 0.5)).square()
    if reduction == "mean":
        return losses.mean()
    if reduction == "sum":
        return losses.sum()
    return losses


@dataclass(frozen=True)
class SPPOObjective:
    """The SPPO loss of one batch, given everything but the policy's log-probs.

    ref_logps, target_probs: [B] floating, detached, on the policy's device. eta > 0. reduction: one of
    :data:`REDUCTIONS`.
    """

    ref_logps: Tensor
    target_probs: Tensor
    eta: float
    reduction: str

    @property
    def num_seqs(self) -> int:
        return self.ref_logps.shape[0]

    def __call__(self, logps: Tensor) -> Tensor:
        """The reduced loss (``[B]`` for ``"none"``) in the dtype of ``logps`` [B]."""
        ref, probs = self.ref_logps.to(logps.dtype), self.target_probs.to(logps.dtype)
        return sppo_epilogue(logps, ref, probs, self.eta, self.reduction)

    def grad_coefficients(self) -> tuple[Tensor, Tensor]:
        """(slope, offset), [B] float64 each: for an upstream gradient of 1 on the reduced loss (on every element
        for ``"none"``), d loss / d logp_s = slope_s · logp_s + offset_s."""
        shift = self.ref_logps.double() + self.eta * (self.target_probs.double() - 0.5)
        weight = 1.0 / self.num_seqs if self.reduction == "mean" else 1.0
        slope = torch.full_like(shift, 2.0 * weight)
        return slope, -slope * shift

    def logps_grad(self, logps: Tensor, grad_loss: Tensor) -> Tensor:
        """d loss / d logps [B] (dtype of ``logps``) for the upstream gradient ``grad_loss`` of the reduced loss
        (a scalar, or [B] for ``"none"``)."""
        slope, offset = self.grad_coefficients()
        return (grad_loss.double() * (slope * logps.double() + offset)).to(logps.dtype)


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
    """Targets for P chosen/rejected pairs (see the module table).

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
