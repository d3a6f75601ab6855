"""A ``transformers.Trainer`` that trains with the fused SPPO loss (no TRL needed).

Rows are single sequences, each with its own win-rate target (pairs are two rows; the paper's all-K form is K
rows). Dataset columns: ``input_ids`` (prompt + response token ids), ``labels`` (the same ids with -100 on the
prompt), ``target_probs`` (float P̂), optional ``ref_logps`` (float, precomputed reference log-prob). Without
``ref_logps`` the reference pass runs each step on ``ref_model`` (or the PEFT policy with adapters off).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import Trainer

from sppo_kernels.integrations import hf
from sppo_kernels.integrations.batching import IGNORE_INDEX, right_pad

__all__ = ["SPPODataCollator", "SPPOTrainer"]

SEQUENCE_COLUMNS = ("input_ids", "attention_mask", "labels", "target_probs", "ref_logps")


@dataclass
class SPPODataCollator:
    """Right-pads per-sequence rows into input_ids/attention_mask/labels [B, T] long, target_probs/ref_logps [B] f32."""

    pad_token_id: int = 0
    ignore_index: int = IGNORE_INDEX
    pad_to_multiple_of: int | None = None

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Tensor]:
        batch = right_pad(
            [row["input_ids"] for row in rows],
            [row["labels"] for row in rows],
            pad_token_id=self.pad_token_id,
            ignore_index=self.ignore_index,
            pad_to_multiple_of=self.pad_to_multiple_of,
        )
        for key in ("target_probs", "ref_logps"):
            if key in rows[0]:
                batch[key] = torch.tensor([float(row[key]) for row in rows], dtype=torch.float32)
        return batch


class SPPOTrainer(Trainer):
    """``Trainer`` whose ``compute_loss`` is :func:`hf.model_sppo_loss` (mean over the batch's sequences).

    Extra arguments: ``ref_model`` (frozen π_t; not needed when the data has ``ref_logps`` or the model is a
    PEFT model), ``eta`` (1/β, default 1000), ``temperature`` (divides the logits), ``backend``
    (``sppo_kernels`` backend). The default collator is
    :class:`SPPODataCollator`. Gradient accumulation averages the per-micro-batch means, as the reference SPPO
    trainer does.
    """

    def __init__(
        self,
        *args: Any,
        ref_model: nn.Module | None = None,
        eta: float = 1000.0,
        temperature: float = 1.0,
        backend: str = "auto",
        **kwargs: Any,
    ) -> None:
        if kwargs.get("data_collator") is None:
            model = kwargs.get("model", args[0] if args else None)
            pad = getattr(getattr(model, "config", None), "pad_token_id", None)
            kwargs["data_collator"] = SPPODataCollator(pad_token_id=pad or 0)
        super().__init__(*args, **kwargs)
        self.eta, self.temperature, self.backend = eta, temperature, backend
        self.loss_is_scaled_for_ga = False  # a per-micro-batch mean: let Trainer divide by the accumulation steps
        self.ref_model = None
        if ref_model is not None:
            if self.is_deepspeed_enabled:
                raise ValueError(
                    "with DeepSpeed, precompute the reference log-probs (hf.model_reference_logprobs) into a "
                    "`ref_logps` column instead of passing ref_model"
                )
            ref_model.requires_grad_(False)
            self.ref_model = self.accelerator.prepare_model(ref_model.eval(), evaluation_mode=True)

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            self._signature_columns = list(SEQUENCE_COLUMNS)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Tensor],
        return_outputs: bool = False,
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """Float32 SPPO loss of the batch; with ``return_outputs`` also ``{"logps": policy log-probs [B]}``."""
        loss, logps = hf.model_sppo_loss(
            model,
            inputs["input_ids"],
            inputs.get("attention_mask"),
            inputs["labels"],
            inputs["target_probs"],
            ref_logps=inputs.get("ref_logps"),
            ref_model=self.ref_model,
            eta=self.eta,
            temperature=self.temperature,
            backend=self.backend,
            return_logps=True,
        )
        return (loss, {"logps": logps.detach()}) if return_outputs else loss
