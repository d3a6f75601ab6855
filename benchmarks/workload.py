"""The benchmark's workload: model presets, realistic SPPO inputs and the high-precision reference.

Inputs imitate one SPPO step: B = 2P sequences (P chosen, then P rejected, TRL's order) of T positions, each pair
sharing a masked prompt, each response followed by masked padding; per-sequence win-rate targets from simulated
PairRM scores (non-uniform, in [0.1, 0.9]); reference log-probs from a reference head close to the policy's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

import sppo_kernels as sk
from sppo_kernels.losses import sppo_epilogue
from sppo_kernels.reference import reference_sequence_logprobs

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TARGET_KINDS = ("soft", "hard")
IGNORE = -100
# dW reference rows: all of them up to this many V*H elements, else the label rows plus a fixed random sample.
FULL_DW_ELEMENTS = 1 << 26
SAMPLED_DW_ROWS = 8192


@dataclass(frozen=True)
class Preset:
    """An lm-head shape and the token counts swept by default."""

    hidden: int
    vocab: int
    seq_len: int
    tokens: tuple[int, ...]
    softcap: float | None = None
    logit_std: float = 4.0


PRESETS: dict[str, Preset] = {
    "micro": Preset(hidden=64, vocab=1024, seq_len=32, tokens=(64,)),  # smoke runs: the Triton interpreter, dry runs
    "tiny": Preset(hidden=256, vocab=8192, seq_len=128, tokens=(256, 512, 1024)),
    "cpu-medium": Preset(hidden=1024, vocab=32000, seq_len=512, tokens=(512, 1024, 2048)),
    "mistral-7b": Preset(hidden=4096, vocab=32000, seq_len=1024, tokens=(2048, 4096, 8192)),
    "llama3-8b": Preset(hidden=4096, vocab=128256, seq_len=1024, tokens=(2048, 4096, 8192)),
    "gemma2-9b": Preset(
        hidden=3584, vocab=256000, seq_len=1024, tokens=(2048, 4096, 8192), softcap=30.0, logit_std=12.0
    ),
}


@dataclass(frozen=True)
class Problem:
    """One measured configuration: shapes, dtype, device and the SPPO options."""

    preset: str
    batch: int
    seq_len: int
    hidden: int
    vocab: int
    dtype: str = "float32"
    device: str = "cpu"
    softcap: float | None = None
    eta: float = 1000.0
    logit_std: float = 4.0
    seed: int = 0

    @classmethod
    def create(cls, preset: str, tokens: int, *, dtype: str = "float32", device: str = "cpu", seed: int = 0) -> Problem:
        """The problem of ``preset`` at about ``tokens`` positions: an even number of sequences, at most the
        preset's sequence length each."""
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose from {sorted(DTYPES)}")
        if tokens < 8:
            raise ValueError(f"tokens must be >= 8, got {tokens}")
        p = PRESETS[preset]
        seq_len = min(p.seq_len, tokens // 2)
        batch = max(2, (tokens // seq_len) // 2 * 2)
        return cls(preset, batch, seq_len, p.hidden, p.vocab, dtype, device, p.softcap, 1000.0, p.logit_std, seed)

    @property
    def tokens(self) -> int:
        """Positions in the batch, B × T."""
        return self.batch * self.seq_len

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    def key(self) -> str:
        """A file-name-safe identifier of the shapes."""
        return f"{self.preset}-B{self.batch}-T{self.seq_len}-{self.dtype}-{self.device.replace(':', '')}"

    def as_dict(self) -> dict:
        return dataclasses.asdict(self) | {"tokens": self.tokens}


@dataclass
class Inputs:
    """Tensors of one SPPO step. hidden [B, T, H] and weight [V, H] are leaves that require grad."""

    hidden: Tensor
    weight: Tensor
    labels: Tensor
    ref_weight: Tensor
    ref_logps: Tensor
    target_probs: Tensor
    loss_scale: float
    scored_tokens: int

    def clone(self) -> Inputs:
        """An independent copy (fresh leaves), for rotating inputs between timed iterations."""
        return dataclasses.replace(
            self,
            hidden=self.hidden.detach().clone().requires_grad_(),
            weight=self.weight.detach().clone().requires_grad_(),
        )

    def zero_grad(self) -> None:
        self.hidden.grad = None
        self.weight.grad = None


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _win_rates(pairs: int, gen: torch.Generator, device: torch.device, k: int = 5) -> tuple[Tensor, Tensor]:
    """P_win and P_lose of the best and worst of K responses under simulated PairRM scores (sppo.md, step 3)."""
    scores = 2.0 * torch.randn(pairs, k, generator=gen, device=device)
    prefs = torch.sigmoid(scores[:, :, None] - scores[:, None, :])  # P[i][j]; 0.5 on the diagonal
    rows = torch.arange(pairs, device=device)
    p_win = prefs[rows, scores.argmax(1)].mean(1)
    p_lose = prefs[rows, scores.argmin(1)].mean(1)
    return p_win, p_lose


def _labels(problem: Problem, gen: torch.Generator, device: torch.device) -> Tensor:
    """[B, T] ids: each pair shares a masked prompt of T/4..T/2 positions; responses end in masked padding."""
    pairs, length = problem.batch // 2, problem.seq_len
    quarter = max(1, length // 4)
    prompt = torch.randint(quarter, max(quarter + 1, length // 2 + 1), (pairs,), generator=gen, device=device)
    prompt = prompt.repeat(2)
    room = (length - prompt).clamp(min=1)
    response = quarter + (torch.rand(problem.batch, generator=gen, device=device) * (room - quarter + 1)).long()
    response = torch.minimum(response.clamp(min=1), room)
    pos = torch.arange(length, device=device)
    keep = (pos >= prompt[:, None]) & (pos < (prompt + response)[:, None])
    ids = torch.randint(0, problem.vocab, (problem.batch, length), generator=gen, device=device)
    return torch.where(keep, ids, IGNORE)


def make_inputs(problem: Problem, targets: str = "soft") -> Inputs:
    """Deterministic inputs of ``problem`` (same seed and device → same tensors in every process).

    targets: ``"soft"`` (SPPO win rates [P_win…, P_lose…]) or ``"hard"`` (1 for chosen, 0 for rejected: the
    ``sppo_hard`` loss of TRL / Liger).
    """
    if targets not in TARGET_KINDS:
        raise ValueError(f"targets must be one of {TARGET_KINDS}, got {targets!r}")
    device, dtype = problem.torch_device, problem.torch_dtype
    gen = _generator(device, problem.seed)
    b, t, h, v = problem.batch, problem.seq_len, problem.hidden, problem.vocab
    hidden = torch.randn(b, t, h, generator=gen, device=device)
    w_std = problem.logit_std / h**0.5
    weight = w_std * torch.randn(v, h, generator=gen, device=device)
    ref_weight = weight + 0.02 * w_std * torch.randn(v, h, generator=gen, device=device)
    labels = _labels(problem, gen, device)
    p_win, p_lose = _win_rates(b // 2, gen, device)
    if targets == "soft":
        pt = sk.pair_targets("sppo", p_win=p_win, p_lose=p_lose)
    else:
        pt = sk.pair_targets("sppo_hard", num_pairs=b // 2)
    hidden, weight, ref_weight = hidden.to(dtype), weight.to(dtype), ref_weight.to(dtype)
    with torch.no_grad():
        ref_logps = reference_sequence_logprobs(hidden, ref_weight, labels, softcap=problem.softcap).float()
    return Inputs(
        hidden=hidden.requires_grad_(),
        weight=weight.requires_grad_(),
        labels=labels,
        ref_weight=ref_weight,
        ref_logps=ref_logps,
        target_probs=pt.target_probs.to(device),
        loss_scale=pt.loss_scale,
        scored_tokens=int((labels[:, 1:] != IGNORE).sum()),
    )


@dataclass
class Reference:
    """High-precision loss and gradients of one problem; dW possibly on a subset of vocabulary rows."""

    loss: float
    grad_hidden: Tensor
    grad_weight: Tensor
    weight_rows: Tensor | None
    precision: str

    def as_state(self) -> dict:
        return dataclasses.asdict(self)


def weight_rows(inputs: Inputs, seed: int = 0) -> Tensor | None:
    """Vocabulary rows on which dW is compared: all (None) when small, else the label rows plus a fixed sample."""
    vocab, width = inputs.weight.shape
    if vocab * width <= FULL_DW_ELEMENTS:
        return None
    labels = inputs.labels[inputs.labels != IGNORE].cpu()
    sample = torch.randperm(vocab, generator=torch.Generator().manual_seed(seed))[:SAMPLED_DW_ROWS]
    return torch.unique(torch.cat([labels, sample]))


def _groups(problem: Problem, budget_bytes: int, itemsize: int) -> list[slice]:
    """Runs of whole sequences whose logits (and their autograd copies) fit ``budget_bytes``."""
    per_seq = 4 * problem.seq_len * problem.vocab * itemsize
    step = max(1, min(problem.batch, budget_bytes // per_seq))
    return [slice(a, min(a + step, problem.batch)) for a in range(0, problem.batch, step)]


def reference_precision(problem: Problem, free_bytes: int) -> torch.dtype:
    """float64 when W, dW and one sequence's float64 logits fit in ``free_bytes``, else float32."""
    v, h = problem.vocab, problem.hidden
    need = 8 * (3 * v * h + 2 * problem.tokens * h + 4 * problem.seq_len * v)
    return torch.float64 if need < 0.8 * free_bytes else torch.float32


def compute_reference(problem: Problem, inputs: Inputs, precision: torch.dtype, budget_bytes: int) -> Reference:
    """Loss and gradients in ``precision`` from the plain materialising reference, one group of sequences at a time.

    The loss is separable per sequence, so the gradient is Σ_s c_s ∇logp_s with c_s = 2(r_s − target_s)/B: a
    no-grad pass gives the c_s, then each group's logits are rebuilt and back-propagated with its c_s.
    """
    w = inputs.weight.detach().to(precision).requires_grad_()
    hidden = inputs.hidden.detach().to(precision)
    groups = _groups(problem, budget_bytes, torch.finfo(precision).bits // 8)
    options = {"softcap": problem.softcap}
    with torch.no_grad():
        logps = torch.cat([reference_sequence_logprobs(hidden[g], w, inputs.labels[g], **options) for g in groups])
    ref = inputs.ref_logps.to(precision)
    probs = inputs.target_probs.to(precision)
    loss = sppo_epilogue(logps, ref, probs, problem.eta, "mean")
    coef = 2 * (logps - ref - problem.eta * (probs - 0.5)) / problem.batch
    grad_hidden = torch.zeros_like(hidden)
    for g in groups:
        part = hidden[g].clone().requires_grad_()
        reference_sequence_logprobs(part, w, inputs.labels[g], **options).backward(coef[g])
        grad_hidden[g] = part.grad
    rows = weight_rows(inputs, problem.seed)
    grad_w = w.grad if rows is None else w.grad.index_select(0, rows.to(w.device))
    return Reference(
        loss=float(loss),
        grad_hidden=grad_hidden.cpu(),
        grad_weight=grad_w.cpu(),
        weight_rows=rows,
        precision=str(precision).removeprefix("torch."),
    )


def flops(problem: Problem, scored_tokens: int) -> float:
    """The fused op's FLOP count 8·N·H·V over the N tokens that count (sppo.md, FLOP accounting)."""
    return 8.0 * scored_tokens * problem.hidden * problem.vocab
