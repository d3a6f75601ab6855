"""SPPOTrainer (transformers.Trainer): loss and gradients vs materialised logits, training and evaluation."""

from __future__ import annotations

import copy

import pytest
import torch
from integration_helpers import QUIET_CPU_TRAINING, assert_close_grads, grads, plain_sequence_logprobs, plain_sppo_loss

from sppo_kernels.pipeline.demo.tiny_models import tiny_causal_lm, tiny_pair_batch

datasets = pytest.importorskip("datasets")
from transformers import TrainingArguments  # noqa: E402

from sppo_kernels.integrations.trainer import SPPODataCollator, SPPOTrainer  # noqa: E402

ETA, TEMPERATURE = 30.0, 0.7


def _rows(batch: dict[str, torch.Tensor], ref_logps: torch.Tensor | None) -> list[dict]:
    rows = []
    for i, n in enumerate(batch["attention_mask"].sum(1).tolist()):
        row = {
            "input_ids": batch["input_ids"][i, :n].tolist(),
            "labels": batch["labels"][i, :n].tolist(),
            "target_probs": float(batch["target_probs"][i]),
        }
        if ref_logps is not None:
            row["ref_logps"] = float(ref_logps[i])
        rows.append(row)
    return rows


def _args(tmp_path, **overrides) -> TrainingArguments:
    options = {
        "output_dir": str(tmp_path),
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 4,
        **QUIET_CPU_TRAINING,
    }
    return TrainingArguments(**{**options, **overrides})


def test_collator_pads_right() -> None:
    rows = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "target_probs": 0.7},
        {"input_ids": [8], "labels": [8], "target_probs": 0.2},
    ]
    out = SPPODataCollator(pad_token_id=0)(rows)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    torch.testing.assert_close(out["target_probs"], torch.tensor([0.7, 0.2]))
    padded = SPPODataCollator(pad_token_id=9, pad_to_multiple_of=4)(rows)
    assert padded["input_ids"].tolist() == [[5, 6, 7, 9], [8, 9, 9, 9]] and padded["labels"].shape == (2, 4)
    with pytest.raises(ValueError, match="3 input_ids but 2 labels"):
        SPPODataCollator()([{"input_ids": [1, 2, 3], "labels": [2, 3], "target_probs": 0.5}])


def test_training_step_matches_materialised(arch: str, tmp_path) -> None:
    model = tiny_causal_lm(arch, seed=6)
    plain = copy.deepcopy(model)
    batch = tiny_pair_batch(2, seed=7)
    ref_logps = torch.tensor([-40.0, -35.0, -42.0, -38.0])
    data = datasets.Dataset.from_list(_rows(batch, ref_logps))
    trainer = SPPOTrainer(model=model, args=_args(tmp_path), train_dataset=data, eta=ETA, temperature=TEMPERATURE)
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop
    loss = trainer.training_step(trainer.model, trainer.data_collator(list(data)))

    plain_inputs = (batch["input_ids"], batch["attention_mask"], batch["labels"])
    logps = plain_sequence_logprobs(plain, *plain_inputs, temperature=TEMPERATURE)
    want = plain_sppo_loss(logps, ref_logps, batch["target_probs"], ETA)
    want.backward()
    torch.testing.assert_close(loss, want.detach(), rtol=1e-5, atol=1e-3)
    assert_close_grads(grads(model), grads(plain))


def test_train_and_evaluate_with_ref_model(tmp_path) -> None:
    model = tiny_causal_lm("llama", seed=6)
    before = model.lm_head.weight.detach().clone()
    data = datasets.Dataset.from_list(_rows(tiny_pair_batch(4, seed=8), None))
    trainer = SPPOTrainer(
        model=model,
        ref_model=tiny_causal_lm("llama", seed=6),
        args=_args(tmp_path, max_steps=2, gradient_accumulation_steps=2, per_device_train_batch_size=2),
        train_dataset=data,
        eval_dataset=data,
        eta=ETA,
    )
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert not torch.equal(before, model.lm_head.weight.detach())
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] > 0
