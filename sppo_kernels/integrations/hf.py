"""Hugging Face causal LMs on the fused op: the one model-level recipe.

model → final hidden states (no logits), times the model's logit scale → lm_head weight and bias (gathered
under ZeRO-3) → the config's final-logit soft-cap → ``sk.sequence_logprobs`` / ``sk.sppo_loss``. The Trainer
and TRL integrations, the pipeline's reflogps and train stages and the examples all call the functions here.

Works on any ``*ForCausalLM`` of transformers (Llama, Mistral, Gemma-2, Qwen2, ...) and on the same model
wrapped by PEFT, DDP / FSDP(1), a DeepSpeed engine or ``torch.compile``. The building blocks
(:func:`final_hidden_states`, :func:`lm_head_params`, :func:`logit_scale`, :func:`logit_softcap`,
:func:`unwrap_model`, :func:`find_peft_model`) are defined in :mod:`.model_parts` and re-exported here.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn

import sppo_kernels as sk
from sppo_kernels.integrations.model_parts import (
    final_hidden_states,
    find_peft_model,
    lm_head_params,
    logit_scale,
    logit_softcap,
    unwrap_model,
)
from sppo_kernels.integrations.zero3 import gathered_lm_head

__all__ = [
    "final_hidden_states",
    "find_peft_model",
    "lm_head_params",
    "logit_scale",
    "logit_softcap",
    "model_reference_logprobs",
    "model_sequence_logprobs",
    "model_sppo_loss",
    "unwrap_model",
]


def _run_on_model(
    op: Callable[..., Any],
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    labels: Tensor,
    cu_seqlens: Tensor | None,
    forward_kwargs: dict[str, Any],
    *op_args: Tensor,
    **op_options: Any,
) -> Any:
    """``op(hidden, weight, labels, *op_args, bias=, cu_seqlens=, softcap=, **op_options)`` on ``model``'s own
    hidden states (scaled by :func:`logit_scale`; flattened to [N, H] for packed rows), lm_head and soft-cap."""
    hidden = final_hidden_states(model, input_ids, attention_mask, **forward_kwargs)
    scale = logit_scale(model)
    if scale != 1.0:
        hidden = hidden * scale
    if cu_seqlens is not None:
        hidden, labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    with gathered_lm_head(model) as (weight, bias):
        return op(
            hidden,
            weight,
            labels,
            *op_args,
            bias=bias,
            cu_seqlens=cu_seqlens,
            softcap=logit_softcap(model),
            **op_options,
        )


def model_sequence_logprobs(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    labels: Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    cu_seqlens: Tensor | None = None,
    backend: str = "auto",
    **forward_kwargs: Any,
) -> Tensor:
    """Summed log-prob [B] float32 of each sequence's labelled tokens under ``model``, logits never built.

    input_ids, attention_mask, labels: [B, T] (HF convention: labels aligned with input_ids, ``ignore_index``
    on prompt and padding). Packed rows: input_ids/labels [1, N], ``cu_seqlens`` [B+1] and ``position_ids`` in
    ``forward_kwargs``. The soft-cap and logit scale come from the model's config; ``temperature`` divides the
    (soft-capped) logits. ZeRO-3 partitioned heads are handled (:func:`.zero3.gathered_lm_head`).
    Differentiable; wrap in ``torch.no_grad()`` for a reference pass (see :func:`model_reference_logprobs`).
    """
    options = {"ignore_index": ignore_index, "temperature": temperature, "backend": backend}
    return _run_on_model(
        sk.sequence_logprobs, model, input_ids, attention_mask, labels, cu_seqlens, forward_kwargs, **options
    )


def model_reference_logprobs(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    labels: Tensor,
    *,
    disable_adapters: bool = False,
    **kwargs: Any,
) -> Tensor:
    """:func:`model_sequence_logprobs` [B] float32 under ``torch.no_grad()``: the reference model's log-probs.

    ``disable_adapters=True`` evaluates a PEFT policy with its adapters off (the base model as reference).
    """
    peft_model = find_peft_model(model) if disable_adapters else None
    if disable_adapters and peft_model is None:
        raise ValueError("disable_adapters=True needs a PEFT model")
    with torch.no_grad(), peft_model.disable_adapter() if peft_model is not None else nullcontext():
        return model_sequence_logprobs(model, input_ids, attention_mask, labels, **kwargs)


def model_sppo_loss(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    labels: Tensor,
    target_probs: Tensor,
    *,
    ref_logps: Tensor | None = None,
    ref_model: nn.Module | None = None,
    eta: float = 1000.0,
    temperature: float = 1.0,
    ignore_index: int = -100,
    cu_seqlens: Tensor | None = None,
    reduction: str = "mean",
    backend: str = "auto",
    return_logps: bool = False,
    **forward_kwargs: Any,
) -> Tensor | tuple[Tensor, Tensor]:
    """SPPO loss of ``model`` on a batch: ``(logp_s − ref_s − eta·(target_probs_s − ½))²`` reduced over sequences.

    target_probs: [B] win-rate targets. The reference log-probs [B] are ``ref_logps`` if given, else computed
    without gradient from ``ref_model``, else (PEFT policies) from ``model`` with its adapters disabled.
    Other arguments as in :func:`model_sequence_logprobs`; returns the float32 loss or
    ``(loss, policy_logps [B])``.
    """
    options: dict[str, Any] = {"temperature": temperature, "ignore_index": ignore_index, "backend": backend}
    if ref_logps is None:
        if ref_model is None and find_peft_model(model) is None:
            raise ValueError("pass ref_logps or ref_model (or a PEFT model, whose adapters are then disabled)")
        ref_logps = model_reference_logprobs(
            ref_model if ref_model is not None else model,
            input_ids,
            attention_mask,
            labels,
            disable_adapters=ref_model is None,
            cu_seqlens=cu_seqlens,
            **options,
            **forward_kwargs,
        )
    return _run_on_model(
        sk.sppo_loss,
        model,
        input_ids,
        attention_mask,
        labels,
        cu_seqlens,
        forward_kwargs,
        ref_logps,
        target_probs,
        eta=eta,
        reduction=reduction,
        return_logps=return_logps,
        **options,
    )
