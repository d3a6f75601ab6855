"""``hf.model_sppo_loss`` inside ``torch.autocast("cpu", torch.bfloat16)``.

The model's own layers run under autocast as usual; the SPPO op ignores the region (it computes in its inputs'
dtype). So the loss and every gradient equal those of the same autocast forward with the op called outside
the region, and a training step gives the same weights. It used to raise ``self and mat2 must have the same
dtype`` in 60-80 % of calls; each case is repeated with fresh weights and batches.
"""

from __future__ import annotations

import copy

import pytest
import torch
from integration_helpers import assert_close_grads, grads

import sppo_kernels as sk
from sppo_kernels.integrations import hf
from sppo_kernels.pipeline.demo.tiny_models import tiny_causal_lm, tiny_pair_batch

ETA = 10.0
BF16_STEP = 2.0**-7  # relative spacing of bfloat16 numbers


def _op_outside_autocast(model: torch.nn.Module, batch: dict[str, torch.Tensor], ref: torch.Tensor, backend: str):
    """The body under autocast, the lm-head op outside it: what the op promises to compute inside."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = hf.final_hidden_states(model, batch["input_ids"], batch["attention_mask"])
    weight, bias = hf.lm_head_params(model)
    return sk.sppo_loss(
        hidden, weight, batch["labels"], ref, batch["target_probs"], bias=bias, eta=ETA,
        softcap=hf.logit_softcap(model), backend=backend, return_logps=True,
    )  # fmt: skip


@pytest.mark.parametrize("backend", ["auto", "chunked"])
@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_model_sppo_loss_under_autocast(arch: str, backend: str) -> None:
    for repeat in range(4):
        model = tiny_causal_lm(arch, seed=10 + repeat)
        twin = copy.deepcopy(model)
        batch = tiny_pair_batch(2, seed=repeat)
        ref = -30.0 + torch.randn(4, generator=torch.Generator().manual_seed(repeat))
        inputs = (batch["input_ids"], batch["attention_mask"], batch["labels"], batch["target_probs"])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, logps = hf.model_sppo_loss(model, *inputs, ref_logps=ref, eta=ETA, backend=backend, return_logps=True)
            loss.backward()  # the backward inside the region too
        want, want_logps = _op_outside_autocast(twin, batch, ref, backend)
        want.backward()
        assert loss.dtype == logps.dtype == torch.float32
        torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(logps, want_logps, rtol=1e-6, atol=1e-5)
        # Gradients that pass through the decoder's bf16 layers may differ by a bf16 rounding step between two
        # runs of the same autocast forward (oneDNN's bf16 kernels); the op's own head gradient is exact.
        assert_close_grads(grads(model), grads(twin), rtol=BF16_STEP)
        if not model.config.tie_word_embeddings:
            torch.testing.assert_close(model.lm_head.weight.grad, twin.lm_head.weight.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_training_step_under_autocast(arch: str) -> None:
    """Two optimizer steps on the autocast loss move the weights as the op-outside-autocast steps do.

    The updates are compared like the gradients above: within a bf16 rounding step of the largest update, since
    oneDNN's bf16 decoder kernels may round one way in one run and the other way in the next.
    """
    model = tiny_causal_lm(arch, seed=1)
    twin = copy.deepcopy(model)
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    batch = tiny_pair_batch(2, seed=7)
    ref = torch.full((4,), -30.0)
    for net, step in ((model, "inside"), (twin, "outside")):
        optimizer = torch.optim.SGD(net.parameters(), lr=1e-3)
        for _ in range(2):
            optimizer.zero_grad()
            if step == "inside":
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    inputs = (batch["input_ids"], batch["attention_mask"], batch["labels"], batch["target_probs"])
                    loss = hf.model_sppo_loss(net, *inputs, ref_logps=ref, eta=ETA)
            else:
                loss = _op_outside_autocast(net, batch, ref, "auto")[0]
            loss.backward()
            optimizer.step()

    def updates(net: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {name: p.detach() - start[name] for name, p in net.named_parameters()}

    assert_close_grads(updates(model), updates(twin), rtol=BF16_STEP)
    if not model.config.tie_word_embeddings:  # the op's own head gradient is exact, so is the head's step
        torch.testing.assert_close(model.lm_head.weight, twin.lm_head.weight, rtol=1e-5, atol=1e-6)
