"""The public functions and module: per-sequence log-probs and the SPPO loss."""

from __future__ import annotations

import torch
from torch import Tensor

from sppo_kernels.backends import BACKENDS, fused_sequence_logprobs, resolve_backend
from sppo_kernels.inputs import TokenRows, check_options, check_sequence_values, prepare_rows
from sppo_kernels.reference import reference_sequence_logprobs, sppo_epilogue

REDUCTIONS = ("mean", "sum", "none")


def _prepare(hidden: Tensor, weight: Tensor, labels: Tensor, backend: str, options: dict) -> tuple[TokenRows, str]:
    """Validated token rows and the backend that will run on them. options: the lm-head keyword arguments."""
    check_options(softcap=options["softcap"], temperature=options["temperature"])
    rows = prepare_rows(
        hidden, weight, labels, bias=options["bias"], cu_seqlens=options["cu_seqlens"],
        ignore_index=options["ignore_index"], shift=options["shift"],
    )  # fmt: skip
    return rows, resolve_backend(backend, hidden.device)


def _logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, rows: TokenRows, backend: str, options: dict) -> Tensor:
    """Per-sequence log-probs [B] on a resolved backend."""
    if backend == "torch":
        return reference_sequence_logprobs(hidden, weight, labels, **options)
    return fused_sequence_logprobs(backend, rows, weight, options["bias"], options["softcap"], options["temperature"])


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
    backend: str = "auto",
) -> Tensor:
    """Summed log-probability of each sequence's target tokens under the lm-head, never building N×V logits.

    hidden: [B, T, H] (padded, labels [B, T]) or [N, H] (packed, labels [N], cu_seqlens [B+1]);
    float32/bfloat16/float16. weight: [V, H], bias: [V], same dtype. Logits are
    ``softcap(h·Wᵀ + b) / temperature``. Returns [B] float32 (float64 for float64 inputs), differentiable with
    respect to hidden, weight and bias.
    """
    options = {"bias": bias, "cu_seqlens": cu_seqlens, "ignore_index": ignore_index, "softcap": softcap,
               "temperature": temperature, "shift": shift}  # fmt: skip
    rows, chosen = _prepare(hidden, weight, labels, backend, options)
    return _logprobs(hidden, weight, labels, rows, chosen, options)


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
    backend: str = "auto",
    return_logps: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """SPPO loss ``(logp_s − ref_logps_s − eta·(target_probs_s − ½))²`` per sequence, then reduced.

    ref_logps: [B] (no gradient), target_probs: [B] in [0, 1] (no gradient). Other arguments as in
    :func:`sequence_logprobs`. reduction: ``"mean"`` over sequences, ``"sum"`` or ``"none"`` ([B]).
    Returns the float32 loss, or ``(loss, policy_logps [B])`` with ``return_logps=True``.
    """
    check_options(softcap=softcap, temperature=temperature, eta=eta)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    options = {"bias": bias, "cu_seqlens": cu_seqlens, "ignore_index": ignore_index, "softcap": softcap,
               "temperature": temperature, "shift": shift}  # fmt: skip
    rows, chosen = _prepare(hidden, weight, labels, backend, options)
    ref = check_sequence_values("ref_logps", ref_logps, rows, probability=False)
    probs = check_sequence_values("target_probs", target_probs, rows, probability=True)
    if chosen == "cpu":  # separable loss: the C++ backend forms its gradient in the forward, no logits recompute
        from sppo_kernels.autograd.fused_cpu import cpu_sppo_loss

        loss, logps = cpu_sppo_loss(rows, weight, bias, softcap, temperature, ref, probs, float(eta), reduction)
    else:
        logps = _logprobs(hidden, weight, labels, rows, chosen, options)
        loss = sppo_epilogue(logps, ref.to(logps.dtype), probs.to(logps.dtype), float(eta), reduction)
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
        backend: str = "auto",
    ) -> None:
        super().__init__()
        check_options(softcap=softcap, temperature=temperature, eta=eta)
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
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
        return (
            f"eta={self.eta}, softcap={self.softcap}, temperature={self.temperature}, shift={self.shift}, "
            f"reduction={self.reduction!r}, backend={self.backend!r}"
        )
