"""SPPODPOTrainer (TRL): the three SPPO losses vs the formulas on materialised logits; TRL's own sppo_hard; training."""

from __future__ import annotations

import copy

import pytest
import torch
from integration_helpers import QUIET_CPU_TRAINING, assert_close_grads, grads, plain_sequence_logprobs

from sppo_kernels.pipeline.demo.tiny_models import tiny_causal_lm, tiny_char_tokenizer, tiny_preference_rows

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
from sppo_kernels.integrations.trl import SPPODPOTrainer  # noqa: E402

BETA = 0.1  # eta = 10


def _dataset(n: int = 4) -> datasets.Dataset:
    return datasets.Dataset.from_list(tiny_preference_rows(n))


def _config(tmp_path, loss_type: str, **overrides) -> trl.DPOConfig:
    options = {
        "output_dir": str(tmp_path),
        "loss_type": [loss_type],
        "beta": BETA,
        "per_device_train_batch_size": 2,
        "max_length": None,
        **QUIET_CPU_TRAINING,
        "dataset_num_proc": None,
        "bf16": False,  # TRL defaults to bf16 autocast, also on CPU
    }
    return trl.DPOConfig(**{**options, **overrides})


def _trainer(cls, tmp_path, loss_type, model, ref_model, **kwargs):
    return cls(
        model=model,
        ref_model=ref_model,
        args=_config(tmp_path, loss_type),
        train_dataset=_dataset(),
        processing_class=tiny_char_tokenizer(),
        **kwargs,
    )


def _first_batch(trainer) -> dict[str, torch.Tensor]:
    examples = list(trainer.train_dataset.select(range(2)))
    return trainer._prepare_inputs(trainer.data_collator(examples))


def _formula(loss_type: str, r_w, r_l, batch) -> torch.Tensor:
    """The pair losses exactly as written in the reference (mean over pairs)."""
    eta = 1.0 / BETA
    if loss_type == "sppo":
        w, lo = batch["chosen_probs_win"], batch["chosen_probs_lose"]
        return (((r_w - eta * (w - 0.5)) ** 2 + (r_l - eta * (lo - 0.5)) ** 2) / 2).mean()
    if loss_type == "sppo_single":
        p = batch["chosen_probs"]
        return (((r_w - eta * (p - 0.5)) ** 2 + (r_l + eta * (p - 0.5)) ** 2) / 2).mean()
    return ((r_w - eta / 2) ** 2 + (r_l + eta / 2) ** 2).mean()


@pytest.mark.parametrize(
    ("loss_type", "arch", "temperature"),
    [("sppo", "llama", 1.0), ("sppo", "gemma2", 0.7), ("sppo_single", "llama", 1.0), ("sppo_hard", "gemma2", 1.0)],
)
def test_sppo_losses_match_formulas(tmp_path, loss_type: str, arch: str, temperature: float) -> None:
    model, ref = tiny_causal_lm(arch, seed=11), tiny_causal_lm(arch, seed=12)
    plain = copy.deepcopy(model)
    trainer = _trainer(SPPODPOTrainer, tmp_path, loss_type, model, ref, temperature=temperature)
    batch = _first_batch(trainer)
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()

    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    inputs = (batch["input_ids"], batch["attention_mask"], labels)
    with torch.no_grad():
        ref_logps = plain_sequence_logprobs(ref, *inputs, temperature=temperature)
    logps = plain_sequence_logprobs(plain, *inputs, temperature=temperature)
    r_w, r_l = (logps - ref_logps).chunk(2)
    want = _formula(loss_type, r_w, r_l, batch)
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-3)
    assert_close_grads(grads(model), grads(plain))


def test_sppo_hard_equals_trl_own(tmp_path) -> None:
    model, ref = tiny_causal_lm("llama", seed=11), tiny_causal_lm("llama", seed=12)
    ours = _trainer(SPPODPOTrainer, tmp_path / "a", "sppo_hard", model, ref)
    theirs = _trainer(trl.DPOTrainer, tmp_path / "b", "sppo_hard", copy.deepcopy(model), copy.deepcopy(ref))
    batch = _first_batch(ours)
    with torch.no_grad():
        torch.testing.assert_close(
            ours.compute_loss(ours.model, batch), theirs.compute_loss(theirs.model, batch), rtol=1e-5, atol=1e-3
        )


def test_train_peft_with_precomputed_reference(tmp_path) -> None:
    peft = pytest.importorskip("peft")
    model = tiny_causal_lm("gemma2", seed=11)
    trainer = SPPODPOTrainer(
        model=model,
        args=_config(tmp_path, "sppo", precompute_ref_log_probs=True, max_steps=2),
        train_dataset=_dataset(),
        processing_class=tiny_char_tokenizer(),
        peft_config=peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
    )
    assert {"ref_chosen_logps", "chosen_probs_win"} <= set(trainer.train_dataset.column_names)
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert any(k.startswith("rewards/") for k in trainer.state.log_history[0])
