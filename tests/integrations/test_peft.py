"""PEFT-wrapped policies: adapters inside the decoder, on the lm_head, modules_to_save, adapters-off reference."""

from __future__ import annotations

import copy

import pytest
import torch
from integration_helpers import assert_close_grads, grads, plain_sequence_logprobs, plain_sppo_loss

from sppo_kernels.integrations import hf
from sppo_kernels.pipeline.demo.tiny_models import tiny_causal_lm

peft = pytest.importorskip("peft")


def _lora(arch: str, **options) -> torch.nn.Module:
    config = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **options)
    return peft.get_peft_model(tiny_causal_lm(arch, seed=4), config)


@pytest.mark.parametrize(
    "options",
    [
        {"target_modules": ["q_proj", "v_proj", "lm_head"], "lora_dropout": 0.0},
        {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]},
    ],
    ids=["lora-head", "saved-head"],
)
def test_peft_sppo_loss_matches_materialised(arch: str, batch, options) -> None:
    model = _lora(arch, **options)
    plain = copy.deepcopy(model)
    inputs = (batch["input_ids"], batch["attention_mask"], batch["labels"])
    loss = hf.model_sppo_loss(model, *inputs, batch["target_probs"], eta=20.0, temperature=0.9)

    with torch.no_grad(), plain.disable_adapter():
        ref_logps = plain_sequence_logprobs(plain, *inputs, temperature=0.9)
    want_logps = plain_sequence_logprobs(plain, *inputs, temperature=0.9)
    want = plain_sppo_loss(want_logps, ref_logps, batch["target_probs"], 20.0)
    assert not torch.allclose(ref_logps, want_logps), "the adapters should change the log-probs"
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-3)
    loss.backward()
    want.backward()
    got = grads(model)
    assert any("lora_B" in name for name in got) and got.keys() == grads(plain).keys()
    assert_close_grads(got, grads(plain))


def test_lora_head_dropout_in_training_is_refused(batch) -> None:
    model = _lora("llama", target_modules=["lm_head"], lora_dropout=0.1)
    with pytest.raises(NotImplementedError, match="lora_dropout"):
        hf.lm_head_params(model)
    model.eval()
    weight, _ = hf.lm_head_params(model)
    assert weight.shape == (128, 32)
