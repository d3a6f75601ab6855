"""The public functions and module: per-sequence log-probs and the SPPO loss.

Each call validates its arguments once (:mod:`~sppo_kernels.inputs`), asks the registry once for the backend
(:mod:`~sppo_kernels.registry`), and hands it the token rows, the lm-head and, for the loss, the objective
(:mod:`~sppo_kernels.losses`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from sppo_kernels import registry
from sppo_kernels.inputs import check_eta, check_options, check_sequence_values, prepare
from sppo_kernels.losses import REDUCTIONS, SPPOObjective


def sequence_logprobs(
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
    backend: str | registry.Backend = "auto",
) -> Tensor:
    """Summed log-probability of each sequence's target tokens under the lm-head, never building N×V logits.

    hidden: [B, T, H] (padded, labels [B, T]) or [N, H] (packed, labels [N], cu_seqlens [B+1]);
    float32/bfloat16/float16. weight: [V, H], bias: [V], same dtype. Logits are
    ``softcap(h·Wᵀ + b) / temperature``. Returns [B] float32 (float64 for float64 inputs), differentiable with
    respect to hidden, weight and bias. ``backend``: a name of :data:`BACKENDS` or a configured
    :func:`get_backend`.
    """
    rows, head = prepare(hidden, weight, labels, bias=bias, cu_seqlens=cu_seqlens, ignore_index=ignore_index,
                         softcap=softcap, temperature=temperature, shift=shift)  # fmt: skip
    return registry.resolve(backend, hidden.device, hidden.dtype).sequence_logprobs(rows, head)


def sppo_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    ref_logps: Tensor,
    target_probs: Tensor,
    *,
    eta: float = 1000.0,
    bias: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    temperature: float = 1.0,
    shift: bool = True,
    reduction: str = "mean",
    backend: str | registry.Backend = "auto",
    return_logps: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """SPPO loss ``(logp_s − ref_logps_s − eta·(target_probs_s − ½))²`` per sequence, then reduced.

    ref_logps: [B] (no gradient), target_probs: [B] in [0, 1] (no gradient). Other arguments as in
    :func:`sequence_logprobs`. reduction: ``"mean"`` over sequences, ``"sum"`` or ``"none"`` ([B]).
    Returns the float32 loss, or ``(loss, policy_logps [B])`` with ``return_logps=True``.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    rows, head = prepare(hidden, weight, labels, bias=bias, cu_seqlens=cu_seqlens, ignore_index=ignore_index,
                         softcap=softcap, temperature=temperature, shift=shift)  # fmt: skip
    chosen = registry.resolve(backend, hidden.device, hidden.dtype)
    eta = check_eta(eta, rows.num_seqs)
    ref = check_sequence_values("ref_logps", ref_logps, rows, probability=False)
    probs = check_sequence_values("target_probs", target_probs, rows, probability=True)
    loss, logps = chosen.loss_and_logprobs(rows, head, SPPOObjective(ref, probs, eta, reduction))
    return (loss, logps) if return_logps else loss


class SPPOLoss(torch.nn.Module):
    """:func:`sppo_loss` as a module: options at construction, tensors at call."""

    def __init__(
        self,
        eta: float = 1000.0,
        ignore_index: int = -100,
        softcap: float | None = None,
        temperature: float = 1.0,
        shift: bool = True,
        reduction: str = "mean",
        backend: str | registry.Backend = "auto",
    ) -> None:
        super().__init__()
        check_options(softcap=softcap, temperature=temperature, eta=eta)
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if not isinstance(backend, registry.Backend) and backend != "auto":
            registry.get_backend(backend)  # raises for an unknown name
        self.eta, self.ignore_index, self.softcap = eta, ignore_index, softcap
        self.temperature, self.shift, self.reduction, self.backend = temperature, shift, reduction, backend

    def forward(
        self,
        hidden: Tensor,
        weight: Tensor,
        labels: Tensor,
        ref_logps: Tensor,
        target_probs: Tensor,
        bias: Tensor | None = None,
        cu_seqlens: Tensor | None = None,
    ) -> Tensor:
        """See :func:`sppo_loss`; returns the reduced loss."""
        return sppo_loss(
            hidden,
            weight,
            labels,
            ref_logps,
            target_probs,
            eta=self.eta,
            bias=bias,
            cu_seqlens=cu_seqlens,
            ignore_index=self.ignore_index,
            softcap=self.softcap,
            temperature=self.temperature,
            shift=self.shift,
            reduction=self.reduction,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        backend = self.backend if isinstance(self.backend, str) else self.backend.name
        return (
            f"eta={self.eta}, softcap={self.softcap}, temperature={self.temperature}, shift={self.shift}, "
            f"reduction={self.reduction!r}, backend={backend!r}"
        )
