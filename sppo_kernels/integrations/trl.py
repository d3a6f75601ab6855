"""TRL: a ``DPOTrainer`` whose ``sppo`` / ``sppo_single`` / ``sppo_hard`` losses run on the fused op.

``loss_type`` (in ``DPOConfig``) selects the variant, ``eta = 1 / beta`` (SPPO: beta = 0.001). The soft targets
come from dataset columns, named as in the reference SPPO data: ``chosen_probs_win`` (P_win) and
``chosen_probs_lose`` (P_lose) for ``sppo``, ``chosen_probs`` (P(chosen > rejected)) for ``sppo_single``;
``sppo_hard`` needs none and equals TRL's own ``sppo_hard``. The reference log-probs (each step, or once with
``precompute_ref_log_probs``) also run on the fused op, for every loss type.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor, nn
from trl import DPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import use_adapter

from sppo_kernels import PAIR_LOSS_TYPES, pair_targets
from sppo_kernels.integrations import hf

__all__ = ["DEFAULT_PROB_COLUMNS", "SPPODPOTrainer"]

DEFAULT_PROB_COLUMNS = {"p_win": "chosen_probs_win", "p_lose": "chosen_probs_lose", "p_pair": "chosen_probs"}
_NEEDED = {"sppo": ("p_win", "p_lose"), "sppo_single": ("p_pair",), "sppo_hard": ()}


class _WithProbColumns:
    """Wraps TRL's preference collator and adds the probability columns as [P] float32 tensors."""

    def __init__(self, collator: Any, columns: tuple[str, ...]) -> None:
        self.collator, self.columns = collator, columns

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collator(examples)
        for column in self.columns:
            batch[column] = torch.tensor([float(e[column]) for e in examples], dtype=torch.float32)
        return batch


class SPPODPOTrainer(DPOTrainer):
    """``trl.DPOTrainer`` with the SPPO losses on ``sppo_kernels`` (no logits are built).

    Extra arguments: ``prob_columns`` (overrides of :data:`DEFAULT_PROB_COLUMNS`), ``temperature`` (divides the
    logits of policy and reference), ``backend`` (``sppo_kernels`` backend).
    Gemma-2's soft-cap is read from the config. Other loss types train as in TRL, with the fused
    reference log-probs.
    """

    def __init__(
        self,
        *args: Any,
        prob_columns: dict[str, str] | None = None,
        temperature: float = 1.0,
        backend: str = "auto",
        **kwargs: Any,
    ) -> None:
        self.prob_columns = {**DEFAULT_PROB_COLUMNS, **(prob_columns or {})}
        self.sppo_temperature, self.backend = temperature, backend
        super().__init__(*args, **kwargs)
        sppo_types = [t for t in self.loss_types if t in PAIR_LOSS_TYPES]
        self.sppo_type = sppo_types[0] if sppo_types else None
        if self.sppo_type is None:
            return
        if len(self.loss_types) != 1:
            raise ValueError(f"SPPO loss types cannot be combined with others: {self.loss_types}")
        if self.ld_alpha is not None or self.use_weighting or self.aux_loss_enabled:
            raise ValueError("ld_alpha, use_weighting and MoE aux losses are not supported with the SPPO losses")
        columns = tuple(self.prob_columns[key] for key in _NEEDED[self.sppo_type])
        self.data_collator = _WithProbColumns(self.data_collator, columns)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        extra = [c for c in self.prob_columns.values() if c not in self._signature_columns]
        self._signature_columns = [*self._signature_columns, *extra]

    def _fused_logps(self, model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
        """Per-sequence log-probs [2P] of the completions (chosen rows, then rejected rows)."""
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        return hf.model_sequence_logprobs(
            model,
            inputs["input_ids"],
            inputs["attention_mask"],
            labels,
            temperature=self.sppo_temperature,
            backend=self.backend,
        )

    def compute_ref_log_probs(self, model: nn.Module, inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Reference log-probs ([P] chosen, [P] rejected) on the fused op, without gradient."""
        adapter = contextlib.nullcontext()
        if self.ref_model is None and hf.find_peft_model(self.model) is not None:
            peft_model = self.accelerator.unwrap_model(self.model)
            adapter = use_adapter(peft_model, adapter_name="ref" if "ref" in peft_model.peft_config else None)
        with (
            torch.no_grad(),
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            adapter,
            self.accelerator.autocast(),
        ):
            return self._fused_logps(model, inputs).chunk(2)

    def _compute_loss(self, model: nn.Module, inputs: dict[str, Tensor], return_outputs: bool) -> Any:
        if self.sppo_type is None:
            return super()._compute_loss(model, inputs, return_outputs)
        mode = "train" if self.model.training else "eval"
        if self.precompute_ref_logps:
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            ref_chosen, ref_rejected = self.compute_ref_log_probs(self.ref_model or model, inputs)
        probs = {key: inputs.get(column) for key, column in self.prob_columns.items()}
        targets = pair_targets(
            self.sppo_type,
            p_win=probs["p_win"],
            p_lose=probs["p_lose"],
            p_chosen_beats_rejected=probs["p_pair"],
            num_pairs=inputs["input_ids"].shape[0] // 2,
        )
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        loss, logps = hf.model_sppo_loss(
            model,
            inputs["input_ids"],
            inputs["attention_mask"],
            labels,
            targets.target_probs.to(labels.device),
            ref_logps=torch.cat([ref_chosen, ref_rejected]).to(labels.device),
            eta=1.0 / self.beta,
            temperature=self.sppo_temperature,
            backend=self.backend,
            return_logps=True,
        )
        loss = loss * targets.loss_scale
        self._log_pair_metrics(mode, logps.detach(), ref_chosen, ref_rejected)
        if return_outputs:
            with torch.no_grad():
                outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
            return loss, outputs
        return loss

    def _log_pair_metrics(self, mode: str, logps: Tensor, ref_chosen: Tensor, ref_rejected: Tensor) -> None:
        """TRL's reward/log-prob metrics from policy log-probs [2P] and reference log-probs [P] each."""
        chosen, rejected = logps.chunk(2)
        chosen_rewards = self.beta * (chosen - ref_chosen.to(chosen.device))
        rejected_rewards = self.beta * (rejected - ref_rejected.to(rejected.device))
        gather = self.accelerator.gather
        metrics = self._metrics[mode]
        metrics["rewards/chosen"].append(gather(chosen_rewards).mean().item())
        metrics["rewards/rejected"].append(gather(rejected_rewards).mean().item())
        metrics["rewards/accuracies"].append(gather((chosen_rewards > rejected_rewards).float()).mean().item())
        metrics["rewards/margins"].append(gather(chosen_rewards - rejected_rewards).mean().item())
        metrics["logps/chosen"].append(gather(chosen).mean().item())
        metrics["logps/rejected"].append(gather(rejected).mean().item())
