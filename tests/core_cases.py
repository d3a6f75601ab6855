"""Input builders and error measures shared by the core test modules."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sppo_kernels import registry

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def runnable_backends() -> list[str]:
    """Every registered backend that can run float32 on this machine's test device (new backends join here)."""
    backends = [registry.get_backend(name) for name in registry.names()]
    return [b.name for b in backends if b.unavailable_reason(DEVICE, torch.float32) is None]


def nonzero_randn(*shape: int, generator: torch.Generator, scale: float = 1.0) -> Tensor:
    """Normal samples pushed away from zero (|x| >= 0.1·scale), float64 on the CPU."""
    x = torch.randn(*shape, generator=generator, dtype=torch.float64)
    return (x + 0.1 * torch.where(x >= 0, 1.0, -1.0)) * scale


@dataclass
class Case:
    """A full set of op inputs in float64 on the CPU, plus options; ``to`` casts/moves it for a backend."""

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None
    labels: Tensor
    cu_seqlens: Tensor | None
    ref_logps: Tensor
    target_probs: Tensor
    softcap: float | None
    temperature: float
    shift: bool

    @property
    def num_seqs(self) -> int:
        return self.ref_logps.shape[0]

    def params(self, dtype: torch.dtype, device: torch.device = DEVICE) -> dict[str, Tensor | None]:
        """Fresh leaf copies of hidden/weight/bias in ``dtype`` on ``device``, requiring grad."""
        out: dict[str, Tensor | None] = {}
        for name in ("hidden", "weight", "bias"):
            value = getattr(self, name)
            out[name] = None if value is None else value.detach().to(device, dtype, copy=True).requires_grad_(True)
        return out

    def options(self, device: torch.device = DEVICE) -> dict:
        return {
            "labels": self.labels.to(device),
            "cu_seqlens": None if self.cu_seqlens is None else self.cu_seqlens.to(device),
            "softcap": self.softcap,
            "temperature": self.temperature,
            "shift": self.shift,
        }


def make_case(
    *,
    batch: int = 3,
    length: int = 21,
    width: int = 40,
    vocab: int = 150,
    softcap: float | None = 4.0,
    temperature: float = 0.7,
    shift: bool = True,
    bias: bool = True,
    packed: bool = False,
    fully_masked: bool = True,
    seed: int = 0,
) -> Case:
    """Random SPPO inputs: prompts masked with -100, right padding, one fully masked sequence when asked,
    non-uniform target_probs. ``packed`` lays the same sequences out as [N, H] with cu_seqlens."""
    gen = torch.Generator().manual_seed(seed)
    hidden = nonzero_randn(batch, length, width, generator=gen, scale=0.5)
    weight = nonzero_randn(vocab, width, generator=gen, scale=0.5)
    labels = torch.randint(0, vocab, (batch, length), generator=gen)
    lengths = torch.randint(length // 2, length + 1, (batch,), generator=gen)
    lengths[0] = length
    for b in range(batch):
        prompt = int(torch.randint(1, max(2, length // 3), (1,), generator=gen))
        labels[b, :prompt] = -100
        labels[b, lengths[b] :] = -100
    if fully_masked and batch > 1:
        labels[batch - 1] = -100
    cu_seqlens = None
    if packed:
        hidden = torch.cat([hidden[b, : lengths[b]] for b in range(batch)])
        labels = torch.cat([labels[b, : lengths[b]] for b in range(batch)])
        cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    return Case(
        hidden=hidden,
        weight=weight,
        bias=nonzero_randn(vocab, generator=gen, scale=0.3) if bias else None,
        labels=labels,
        cu_seqlens=cu_seqlens,
        ref_logps=-float(length) * 3 + nonzero_randn(batch, generator=gen, scale=5.0),
        target_probs=torch.rand(batch, generator=gen, dtype=torch.float64) * 0.8 + 0.1,
        softcap=softcap,
        temperature=temperature,
        shift=shift,
    )


def rel_err(actual: Tensor, expected: Tensor) -> float:
    """max |actual − expected| / max |expected|, in float64."""
    expected = expected.detach().double().cpu()
    diff = (actual.detach().double().cpu() - expected).abs().max()
    return float(diff / expected.abs().max().clamp_min(1e-30))


def plain_low_precision_logps(case: Case, dtype: torch.dtype) -> tuple[Tensor, dict[str, Tensor | None]]:
    """What a training script gets from plain torch in ``dtype`` (logits in ``dtype``, log-softmax in float32):
    the per-sequence log-probs [B] float32 and the leaf parameters they were computed from (CPU)."""
    params = case.params(dtype, torch.device("cpu"))
    opts = case.options(torch.device("cpu"))
    y = opts["labels"]
    logits = torch.nn.functional.linear(params["hidden"], params["weight"], params["bias"]).float()
    if case.softcap is not None:
        logits = case.softcap * torch.tanh(logits / case.softcap)
    logits = logits / case.temperature
    if case.shift:
        logits, y = logits[:, :-1], y[:, 1:]
    keep = y != -100
    picked = torch.log_softmax(logits, -1).gather(-1, torch.where(keep, y, 0)[..., None]).squeeze(-1)
    return torch.where(keep, picked, 0).sum(-1), params
