"""hf: hidden states, lm_head, logit transform, and the model-level log-probs / SPPO loss vs materialised logits."""

from __future__ import annotations

import copy

import pytest
import torch
from integration_helpers import assert_close_grads, grads, plain_sequence_logprobs, plain_sppo_loss

from sppo_kernels.integrations import hf
from sppo_kernels.pipeline.demo.tiny_models import tiny_causal_lm, tiny_pair_batch


def _logits_from_parts(model: torch.nn.Module, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    hidden = hf.final_hidden_states(model, input_ids, mask) * hf.logit_scale(model)
    weight, bias = hf.lm_head_params(model)
    logits = torch.nn.functional.linear(hidden, weight, bias)
    cap = hf.logit_softcap(model)
    return logits if cap is None else cap * torch.tanh(logits / cap)


@pytest.mark.parametrize("name", ["llama", "gemma2", "qwen2", "mistral"])
def test_parts_reproduce_model_logits(name: str) -> None:
    model = tiny_causal_lm(name).eval()
    b = tiny_pair_batch(1)
    want = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    torch.testing.assert_close(_logits_from_parts(model, b["input_ids"], b["attention_mask"]), want)
    assert hf.logit_softcap(model) == (30.0 if name == "gemma2" else None)


def test_scaled_logits_granite_and_cohere() -> None:
    import transformers

    common = {"vocab_size": 64, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1}
    common.update(num_attention_heads=2, num_key_value_heads=1, eos_token_id=1, bos_token_id=2, pad_token_id=0)
    models = [
        transformers.GraniteForCausalLM(transformers.GraniteConfig(**common, logits_scaling=4.0)),
        transformers.CohereForCausalLM(transformers.CohereConfig(**common, logit_scale=0.25)),
    ]
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    for model in models:
        assert hf.logit_scale(model) == 0.25
        torch.testing.assert_close(_logits_from_parts(model.eval(), ids, torch.ones_like(ids)), model(ids).logits)


def test_no_logits_are_built(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> None:
    seen: list[torch.Size] = []
    model.get_output_embeddings().register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape))
    hidden = hf.final_hidden_states(model, batch["input_ids"], batch["attention_mask"])
    assert hidden.shape == (4, 12, 32)
    assert seen == [torch.Size([4, 0, 32])]


def test_tied_head_is_the_embedding_parameter() -> None:
    model = tiny_causal_lm("gemma2")
    weight, bias = hf.lm_head_params(model)
    assert weight is model.get_input_embeddings().weight and bias is None


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sequence_logprobs_match_materialised(model, batch, temperature: float) -> None:
    plain = copy.deepcopy(model)
    inputs = (batch["input_ids"], batch["attention_mask"], batch["labels"])
    got = hf.model_sequence_logprobs(model, *inputs, temperature=temperature)
    want = plain_sequence_logprobs(plain, *inputs, temperature=temperature)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    (got * torch.tensor([1.0, -2.0, 0.5, 3.0])).sum().backward()
    (want * torch.tensor([1.0, -2.0, 0.5, 3.0])).sum().backward()
    assert_close_grads(grads(model), grads(plain))


def test_sppo_loss_with_ref_model_matches_materialised(model, batch) -> None:
    plain, ref = copy.deepcopy(model), tiny_causal_lm(model.config.model_type, seed=9)
    inputs = (batch["input_ids"], batch["attention_mask"], batch["labels"])
    loss, logps = hf.model_sppo_loss(
        model, *inputs, batch["target_probs"], ref_model=ref, eta=50.0, temperature=0.8, return_logps=True
    )
    with torch.no_grad():
        ref_logps = plain_sequence_logprobs(ref, *inputs, temperature=0.8)
    want_logps = plain_sequence_logprobs(plain, *inputs, temperature=0.8)
    want = plain_sppo_loss(want_logps, ref_logps, batch["target_probs"], 50.0)
    torch.testing.assert_close(logps, want_logps, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-3)
    loss.backward()
    want.backward()
    assert_close_grads(grads(model), grads(plain))
    assert not grads(ref), "the reference pass must not build a graph"


def test_sppo_loss_needs_a_reference(model, batch) -> None:
    with pytest.raises(ValueError, match="ref_logps or ref_model"):
        hf.model_sppo_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"], batch["target_probs"])


def test_packed_rows_match_separate_sequences() -> None:
    model = tiny_causal_lm("llama").eval()
    b = tiny_pair_batch(1, seed=2)
    lengths = b["attention_mask"].sum(1)
    ids = torch.cat([row[:n] for row, n in zip(b["input_ids"], lengths, strict=True)])[None]
    labels = torch.cat([row[:n] for row, n in zip(b["labels"], lengths, strict=True)])[None]
    position_ids = torch.cat([torch.arange(n) for n in lengths.tolist()])[None]
    cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    got = hf.model_sequence_logprobs(model, ids, None, labels, cu_seqlens=cu_seqlens, position_ids=position_ids)
    want = plain_sequence_logprobs(model, b["input_ids"], b["attention_mask"], b["labels"])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_gradient_checkpointing_gives_the_same_gradients(batch) -> None:
    model = tiny_causal_lm("gemma2", seed=2)
    plain = copy.deepcopy(model)
    model.gradient_checkpointing_enable()
    inputs = (batch["input_ids"], batch["attention_mask"], batch["labels"])
    hf.model_sequence_logprobs(model, *inputs, temperature=1.3).sum().backward()
    plain_sequence_logprobs(plain, *inputs, temperature=1.3).sum().backward()
    assert_close_grads(grads(model), grads(plain))


def test_wrapped_model_goes_through_the_wrapper(batch) -> None:
    model = tiny_causal_lm("llama").eval()
    wrapped = torch.nn.DataParallel(model)  # on CPU it calls the module: stands for DDP / a DeepSpeed engine
    calls: list[int] = []
    wrapped.register_forward_pre_hook(lambda _m, _args: calls.append(1))
    inputs = (batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert hf.unwrap_model(wrapped) is model
    torch.testing.assert_close(hf.model_sequence_logprobs(wrapped, *inputs), hf.model_sequence_logprobs(model, *inputs))
    assert calls == [1]
