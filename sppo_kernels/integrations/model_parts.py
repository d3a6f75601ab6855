"""What a Hugging Face causal LM is made of, as the fused op needs it: the final hidden states (computed without
logits), the lm_head parameters (tied, PEFT-adapted), the logit scale and the final-logit soft-cap.

Works on any ``*ForCausalLM`` of transformers (Llama, Mistral, Gemma-2, Qwen2, Cohere, Granite, ...) and on the
same model wrapped by PEFT, DDP / FSDP(1), a DeepSpeed engine or ``torch.compile``. These are the building
blocks of the model-level recipe in :mod:`sppo_kernels.integrations.hf` (which re-exports them) and of
:mod:`sppo_kernels.integrations.zero3`.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "final_hidden_states",
    "find_peft_model",
    "lm_head_module",
    "lm_head_params",
    "logit_scale",
    "logit_softcap",
    "unwrap_model",
]


def _is_peft_model(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and callable(getattr(model, "get_base_model", None))


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model under any DDP/FSDP/DeepSpeed (``.module``), ``torch.compile`` or PEFT wrapper."""
    while True:
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        elif _is_peft_model(model):
            model = model.get_base_model()
        else:
            return model


def _text_config(model: nn.Module) -> Any:
    config = unwrap_model(model).config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def logit_softcap(model: nn.Module) -> float | None:
    """The final-logit soft-cap ``c`` of ``z = c·tanh(a/c)`` (Gemma-2: 30.0), or None when the model has none."""
    cap = getattr(_text_config(model), "final_logit_softcapping", None)
    return float(cap) if cap else None


def logit_scale(model: nn.Module) -> float:
    """The multiplier the model applies to ``h·Wᵀ`` before any soft-cap (1.0 for most models).

    Cohere's ``logit_scale`` multiplies, Granite's ``logits_scaling`` divides. Multiplying the hidden states by
    it before the op reproduces the model's logits exactly.
    """
    config = _text_config(model)
    scale = getattr(config, "logit_scale", None)
    if scale is not None:
        return float(scale)
    divisor = getattr(config, "logits_scaling", None)
    return 1.0 / float(divisor) if divisor is not None else 1.0


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(unwrap_model(model).forward).parameters
    except (TypeError, ValueError):
        return False


def final_hidden_states(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None, **forward_kwargs: Any
) -> Tensor:
    """The normed last hidden state [B, T, H] (model dtype) that the lm_head would see; no logits are built.

    input_ids, attention_mask: [B, T] (packed rows: pass ``position_ids`` in ``forward_kwargs``).
    The call goes through ``model`` itself, so DDP, DeepSpeed and PEFT wrappers see a normal forward; a hook on
    the decoder captures its output and ``logits_to_keep`` selects zero positions, so the lm_head multiplies
    an empty tensor. Models whose forward lacks ``logits_to_keep`` get their decoder called directly.
    """
    decoder = unwrap_model(model).get_decoder()
    kwargs: dict[str, Any] = {"attention_mask": attention_mask, "use_cache": False, **forward_kwargs}
    if not _accepts_logits_to_keep(model):
        return decoder(input_ids=input_ids, **kwargs).last_hidden_state
    captured: list[Any] = []
    handle = decoder.register_forward_hook(lambda _module, _args, output: captured.append(output))
    try:
        no_positions = torch.empty(0, dtype=torch.long, device=input_ids.device)
        model(input_ids=input_ids, logits_to_keep=no_positions, **kwargs)
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"{type(decoder).__name__} was not called by the forward of {type(model).__name__}")
    output = captured[-1]
    return output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]


def _active_lora_delta(head: nn.Module) -> Tensor | None:
    """Sum of the active LoRA deltas [V, H] of a PEFT-wrapped lm_head (None when no adapter is active)."""
    if getattr(head, "disable_adapters", False) or getattr(head, "merged", False):
        return None
    delta = None
    for name in head.active_adapters:
        if name not in head.lora_A:
            continue
        if name in getattr(head, "lora_variant", {}):
            raise NotImplementedError(f"lm_head adapter {name!r} is a LoRA variant (e.g. DoRA); only plain LoRA")
        dropout = head.lora_dropout[name]
        if head.training and isinstance(dropout, nn.Dropout) and dropout.p > 0:
            raise NotImplementedError(
                f"lm_head adapter {name!r} has lora_dropout={dropout.p} in training mode; the fused op needs one "
                "weight matrix. Use lora_dropout=0 for the lm_head adapter."
            )
        step = head.get_delta_weight(name)
        delta = step if delta is None else delta + step
    return delta


def lm_head_module(model: nn.Module) -> nn.Module | None:
    """The module that produces the logits (``get_output_embeddings()`` of the unwrapped model), or None."""
    return unwrap_model(model).get_output_embeddings()


def lm_head_params(model: nn.Module) -> tuple[Tensor, Tensor | None]:
    """The lm_head weight [V, H] and bias [V] (or None) that produce the model's logits.

    Tied embeddings share one Parameter, returned as is. PEFT: ``modules_to_save`` copies are followed, and an
    active LoRA adapter on the lm_head is folded in (``W + ΔW``, differentiable in the adapter weights).
    Plain (unadapted) heads return the Parameter objects themselves.
    """
    head = lm_head_module(model)
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (lm_head)")
    if hasattr(head, "modules_to_save") and hasattr(head, "original_module"):  # PEFT ModulesToSaveWrapper
        active = [] if head.disable_adapters else head.active_adapters
        head = head.modules_to_save[active[0]] if active else head.original_module
    delta = _active_lora_delta(head) if hasattr(head, "lora_A") else None
    if hasattr(head, "get_base_layer"):
        head = head.get_base_layer()
    weight, bias = head.weight, getattr(head, "bias", None)
    if delta is not None:
        weight = weight + delta.to(weight.dtype)
    return weight, bias


def find_peft_model(model: nn.Module) -> nn.Module | None:
    """The PEFT model (``model`` itself or inside DDP/DeepSpeed/compile wrappers), or None."""
    while not _is_peft_model(model):
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return None
        model = inner
    return model
