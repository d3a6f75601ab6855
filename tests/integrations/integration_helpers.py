"""The plain, materialising computation every integration is checked against (full logits from the model)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

# Training arguments shared by the Trainer and TRL tests: CPU, no logging to files, no saving, one log per step.
QUIET_CPU_TRAINING = {
    "use_cpu": True,
    "report_to": [],
    "save_strategy": "no",
    "disable_tqdm": True,
    "logging_steps": 1,
    "learning_rate": 1e-3,
}


def plain_sequence_logprobs(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, temperature: float = 1.0
) -> Tensor:
    """[B] float32: the model's own logits / temperature → log_softmax → gather the shifted labels → sum."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits.float()
    logp = torch.log_softmax(logits[:, :-1] / temperature, dim=-1)
    targets = labels[:, 1:]
    mask = targets != -100
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1)


def plain_sppo_loss(logps: Tensor, ref_logps: Tensor, target_probs: Tensor, eta: float) -> Tensor:
    """Mean over sequences of (logp − ref − eta(P − ½))²."""
    return ((logps - ref_logps - eta * (target_probs - 0.5)) ** 2).mean()


def grads(model: nn.Module) -> dict[str, Tensor]:
    """name → gradient (clone) of every parameter that has one."""
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_close_grads(got: dict[str, Tensor], want: dict[str, Tensor], rtol: float = 1e-4) -> None:
    """Same keys; each gradient within rtol of the largest entry of the expected one."""
    assert got.keys() == want.keys(), sorted(set(got) ^ set(want))
    for name, g in want.items():
        scale = g.abs().max().clamp(min=1e-6)
        err = (got[name].float() - g.float()).abs().max()
        assert err <= rtol * scale, f"{name}: max err {err:.3e} vs scale {scale:.3e}"
