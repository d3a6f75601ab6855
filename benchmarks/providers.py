"""Every implementation of the SPPO loss the benchmark compares, behind one interface.

A provider turns a :class:`~benchmarks.workload.Problem` into a loss function ``Inputs -> scalar``: the SPPO loss
averaged over the B sequences, differentiable with respect to ``inputs.hidden`` and ``inputs.weight``. Peers that
only give per-token cross-entropy share one epilogue (sum per sequence, then :func:`sppo_epilogue`). A provider
that cannot run says why through ``unavailable``; it is never imported until it runs.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

import sppo_kernels as sk
from benchmarks.workload import IGNORE, Inputs, Problem
from sppo_kernels.losses import sppo_epilogue
from sppo_kernels.registry import resolve

LossFn = Callable[[Inputs], Tensor]
TokenNll = Callable[[Inputs, Problem], Tensor]  # -> [B, T-1] float, 0 where the label is ignored
INTERPRETER_NOTE = "Triton interpreter: timings not meaningful"


@dataclass(frozen=True)
class Provider:
    """One implementation. ``family`` is ``"naive"``, ``"peer"`` or ``"ours"``; ``targets`` the target kind it
    supports (``"hard"``: sppo_hard's 1/0); ``exact=False`` marks an approximation (its error is reported, not
    checked)."""

    name: str
    family: str
    description: str
    build: Callable[[Problem], LossFn]
    requirements: tuple[Callable[[Problem], str | None], ...] = ()
    notes: Callable[[Problem], list[str]] = field(default=lambda problem: [])
    targets: str = "soft"
    exact: bool = True

    def unavailable(self, problem: Problem) -> str | None:
        """Why this provider cannot run ``problem``, or None."""
        for requirement in self.requirements:
            reason = requirement(problem)
            if reason is not None:
                return reason
        return None

    def interpreted(self, problem: Problem) -> bool:
        """True when it would run Triton kernels in the CPU interpreter: correct, but its timings mean nothing."""
        return INTERPRETER_NOTE in self.notes(problem)


# ---------------------------------------------------------------- requirements


def needs_module(module: str, package: str) -> Callable[[Problem], str | None]:
    def check(problem: Problem) -> str | None:
        if importlib.util.find_spec(module) is None:
            return f"{package} is not installed (pip install 'sppo-kernels[bench]')"
        return None

    return check


def no_softcap(what: str) -> Callable[[Problem], str | None]:
    def check(problem: Problem) -> str | None:
        if problem.softcap is not None:
            return f"{what} has no logit soft-cap; the preset needs softcap={problem.softcap:g}"
        return None

    return check


def torch_lce_exists(problem: Problem) -> str | None:
    if not hasattr(torch.nn.functional, "linear_cross_entropy") or not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        return f"torch {torch.__version__} has no F.linear_cross_entropy with LinearCrossEntropyOptions (torch >= 2.13)"
    return None


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_kernels(problem: Problem) -> str | None:
    """Peers' Triton kernels run on CUDA, or on CPU tensors only under the interpreter."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if problem.device.startswith("cuda") or _triton_interpreting():
        return None
    return "Triton kernels need a CUDA device (TRITON_INTERPRET=1 interprets them on the CPU: correctness only)"


def interpreter_note(problem: Problem) -> list[str]:
    if problem.device.startswith("cpu") and _triton_interpreting():
        return [INTERPRETER_NOTE]
    return []


# ---------------------------------------------------------------- per-token peers


def _shifted(inputs: Inputs) -> tuple[Tensor, Tensor]:
    """Flat [B·(T−1), H] hidden rows and their next-token labels."""
    width = inputs.hidden.shape[-1]
    return inputs.hidden[:, :-1].reshape(-1, width), inputs.labels[:, 1:].reshape(-1)


def per_token(nll: TokenNll) -> Callable[[Problem], LossFn]:
    """A provider built from a per-token NLL: sequence log-prob = −Σ NLL, then the shared SPPO epilogue."""

    def build(problem: Problem) -> LossFn:
        def loss(inputs: Inputs) -> Tensor:
            logps = -nll(inputs, problem).float().sum(dim=1)
            return sppo_epilogue(logps, inputs.ref_logps, inputs.target_probs, problem.eta, "mean")

        return loss

    return build


def naive_nll(inputs: Inputs, problem: Problem) -> Tensor:
    """Full logits → float32 → soft-cap → log_softmax → gather, as a training script writes it."""
    logits = (inputs.hidden[:, :-1] @ inputs.weight.T).float()
    if problem.softcap is not None:
        logits = problem.softcap * torch.tanh(logits / problem.softcap)
    labels = inputs.labels[:, 1:]
    keep = labels != IGNORE
    picked = logits.log_softmax(-1).gather(-1, torch.where(keep, labels, 0).unsqueeze(-1)).squeeze(-1)
    return -torch.where(keep, picked, 0.0)


def torch_lce_nll(inputs: Inputs, problem: Problem) -> Tensor:
    hidden, labels = _shifted(inputs)
    nll = torch.nn.functional.linear_cross_entropy(
        hidden,
        inputs.weight,
        labels,
        reduction="none",
        ignore_index=IGNORE,
        options=torch.nn.LinearCrossEntropyOptions(),
    )
    return nll.view(problem.batch, -1)


def liger_flce_nll(inputs: Inputs, problem: Problem) -> Tensor:
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    hidden, labels = _shifted(inputs)
    nll = liger_fused_linear_cross_entropy(
        hidden.contiguous(),
        inputs.weight,
        labels.contiguous(),
        ignore_index=IGNORE,
        reduction="none",
        softcap=problem.softcap,
        accum_dtype=torch.float32,
    )
    return nll.view(problem.batch, -1)


def _cce_impl(problem: Problem) -> str:
    return "cce" if problem.device.startswith("cuda") else "torch_compile"


def cce_nll(filter_eps: str | None) -> TokenNll:
    def nll(inputs: Inputs, problem: Problem) -> Tensor:
        from cut_cross_entropy import linear_cross_entropy

        return linear_cross_entropy(
            inputs.hidden,
            inputs.weight,
            inputs.labels,
            ignore_index=IGNORE,
            softcap=problem.softcap,
            reduction="none",
            shift=True,
            filter_eps=filter_eps,
            impl=_cce_impl(problem),
        )

    return nll


def cce_dtype(problem: Problem) -> str | None:
    if problem.device.startswith("cuda") and problem.dtype == "float32":
        return "CCE's CUDA backward needs bfloat16/float16 inputs (run with --dtype bfloat16)"
    return None


def cce_filtering(problem: Problem) -> str | None:
    if not problem.device.startswith("cuda"):
        return "gradient filtering (filter_eps) exists only in impl='cce', which needs CUDA"
    return None


def cce_notes(problem: Problem) -> list[str]:
    if _cce_impl(problem) == "torch_compile":
        return ["impl='torch_compile' (materialises logits)"]
    return ["dW accumulated in the input dtype (CCE 25.1 has no fp32 option)"]


# ---------------------------------------------------------------- Liger's DPO-family loss


def liger_dpo_build(problem: Problem) -> LossFn:
    """``LigerFusedLinearDPOLoss(loss_type="sppo_hard")``: hard targets, ref log-probs recomputed from the ref head."""
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    module = LigerFusedLinearDPOLoss(
        beta=1.0 / problem.eta,
        loss_type="sppo_hard",
        use_ref_model=True,
        compiled=problem.device.startswith("cuda"),
    )
    scale = sk.pair_targets("sppo_hard", num_pairs=1).loss_scale  # Liger sums pairs: twice the per-sequence mean

    def loss(inputs: Inputs) -> Tensor:
        hidden, labels = inputs.hidden[:, :-1], inputs.labels[:, 1:]
        out = module(inputs.weight, hidden, labels, ref_input=hidden.detach(), ref_weight=inputs.ref_weight)
        return out[0] / scale

    return loss


# ---------------------------------------------------------------- Liger's CuTe DSL FLCE (Hopper)

CUTE_FLCE_MODULE = "liger_kernel.ops.cutedsl.ops.fused_linear_cross_entropy_sm90"


def cute_flce_runs(problem: Problem) -> str | None:
    """Liger's CuTe DSL fused linear cross-entropy: sm_90, bf16, no soft-cap, sequences of a multiple of 128 tokens
    (its M; V must be a multiple of 256), nvidia-cutlass-dsl and a liger-kernel that has it."""
    if importlib.util.find_spec("cutlass") is None:
        return "nvidia-cutlass-dsl is not installed (its CUDA 13 libraries wheel alone is ~88 MiB)"
    try:
        found = importlib.util.find_spec(CUTE_FLCE_MODULE) is not None
    except ImportError:
        found = False
    if not found:
        return f"{CUTE_FLCE_MODULE} is not importable (liger-kernel >= 0.8.5 has it)"
    if not problem.device.startswith("cuda") or torch.cuda.get_device_capability(problem.torch_device) != (9, 0):
        return "Liger's CuTe FLCE runs on Hopper (sm_90) only"
    if problem.dtype != "bfloat16" or problem.softcap is not None:
        return "Liger's CuTe FLCE takes bfloat16 without a logit soft-cap"
    if problem.seq_len % 128 or problem.vocab % 256:
        return f"Liger's CuTe FLCE needs 128 | T and 256 | V, got T={problem.seq_len}, V={problem.vocab}"
    return None


def cute_flce_build(problem: Problem) -> LossFn:
    """One call per sequence (its only reductions are "mean" and "sum" over all rows): the sequence's summed NLL
    is −log-prob, then the shared SPPO epilogue; position T−1 scores nothing, so each call has T rows."""
    module = importlib.import_module(CUTE_FLCE_MODULE)
    flce = module.LigerFusedLinearCrossEntropySM90Function

    def loss(inputs: Inputs) -> Tensor:
        targets = torch.cat([inputs.labels[:, 1:], torch.full_like(inputs.labels[:, :1], IGNORE)], dim=1)
        logps = torch.stack(
            [-flce.apply(inputs.hidden[s], inputs.weight, targets[s], IGNORE, "sum") for s in range(problem.batch)]
        )
        return sppo_epilogue(logps.float(), inputs.ref_logps, inputs.target_probs, problem.eta, "mean")

    return loss


def even_batch(problem: Problem) -> str | None:
    if problem.batch % 2:
        return f"needs chosen/rejected pairs (an even batch), got B={problem.batch}"
    return None


# ---------------------------------------------------------------- ours


def ours_build(backend: str) -> Callable[[Problem], LossFn]:
    def build(problem: Problem) -> LossFn:
        def loss(inputs: Inputs) -> Tensor:
            return sk.sppo_loss(
                inputs.hidden,
                inputs.weight,
                inputs.labels,
                inputs.ref_logps,
                inputs.target_probs,
                eta=problem.eta,
                softcap=problem.softcap,
                ignore_index=IGNORE,
                backend=backend,
            )

        return loss

    return build


def ours_runs(backend: str) -> Callable[[Problem], str | None]:
    def check(problem: Problem) -> str | None:
        try:
            resolve(backend, problem.torch_device, problem.torch_dtype)
        except (ValueError, TypeError) as err:
            return str(err)
        return None

    return check


def ours_notes(backend: str) -> Callable[[Problem], list[str]]:
    def notes(problem: Problem) -> list[str]:
        try:
            chosen = resolve(backend, problem.torch_device, problem.torch_dtype).name
        except (ValueError, TypeError):
            return []
        out = [f"auto → {chosen}"] if backend == "auto" else []
        return out + (interpreter_note(problem) if chosen == "triton" else [])

    return notes


def triton_variant(options: dict) -> Callable[[Problem], LossFn]:
    """``ours_build`` for the "triton" backend with config ``options`` (resolved at build time: importing this
    module must not need triton)."""

    def build(problem: Problem) -> LossFn:
        return ours_build(sk.get_backend("triton", **options))(problem)

    return build


# Variants of the Triton backend for the GPU A/B (benchmarks/gpu_check.sh); the tile sweep is
# benchmarks/triton_sweep.py.
TRITON_VARIANTS = {
    "ours-triton-atomic": ({"backward": "atomic"}, "the first design's backward: float32 atomics, [V, H] fp32 dW"),
    "ours-triton-fused": ({"fused_sppo_loss": True}, "SPPO gradient formed in the forward (6NHV, exp workspace)"),
}


# ---------------------------------------------------------------- registry


def _ours(backend: str) -> Provider:
    return Provider(
        name=f"ours-{backend}",
        family="ours",
        description=f"sppo_kernels.sppo_loss(backend={backend!r})",
        build=ours_build(backend),
        requirements=(ours_runs(backend),),
        notes=ours_notes(backend),
    )


def _triton_variant(name: str, options: dict, text: str) -> Provider:
    return Provider(
        name=name,
        family="ours",
        description=f"sppo_kernels.sppo_loss(backend=get_backend('triton', **{options})): {text}",
        build=triton_variant(options),
        requirements=(ours_runs("triton"),),
        notes=ours_notes("triton"),
    )


PROVIDERS: dict[str, Provider] = {
    p.name: p
    for p in [
        Provider("naive", "naive", "torch: full logits, log_softmax, gather", per_token(naive_nll)),
        Provider(
            "torch-lce",
            "peer",
            "torch F.linear_cross_entropy(reduction='none', options=LinearCrossEntropyOptions())",
            per_token(torch_lce_nll),
            requirements=(torch_lce_exists, no_softcap("torch linear_cross_entropy")),
        ),
        Provider(
            "liger-flce",
            "peer",
            "Liger fused linear cross-entropy, per token (accum_dtype=float32)",
            per_token(liger_flce_nll),
            requirements=(needs_module("liger_kernel", "liger-kernel"), triton_kernels),
            notes=interpreter_note,
        ),
        Provider(
            "liger-dpo",
            "peer",
            "Liger LigerFusedLinearDPOLoss(loss_type='sppo_hard'), ref head recomputed in the loss",
            liger_dpo_build,
            requirements=(needs_module("liger_kernel", "liger-kernel"), no_softcap("Liger's DPO loss"), even_batch),
            notes=lambda problem: ["hard 1/0 targets (sppo_hard)", "includes the ref-head forward"],
            targets="hard",
        ),
        Provider(
            "liger-cute-flce",
            "peer",
            "Liger's CuTe DSL fused linear cross-entropy for Hopper, one call per sequence (reduction='sum')",
            cute_flce_build,
            requirements=(cute_flce_runs,),
            notes=lambda problem: ["one call per sequence: it has no per-token or per-sequence reduction"],
        ),
        Provider(
            "cce",
            "peer",
            "Cut Cross-Entropy linear_cross_entropy(reduction='none'), exact (filter_eps=None)",
            per_token(cce_nll(None)),
            requirements=(needs_module("cut_cross_entropy", "cut-cross-entropy"), cce_dtype),
            notes=cce_notes,
        ),
        Provider(
            "cce-filtered",
            "peer",
            "Cut Cross-Entropy with its default gradient filtering (filter_eps='high')",
            per_token(cce_nll("high")),
            requirements=(needs_module("cut_cross_entropy", "cut-cross-entropy"), cce_filtering, cce_dtype),
            notes=lambda problem: ["approximate gradients by design (softmax entries < eps/32 dropped)"],
            exact=False,
        ),
        *[_ours(backend) for backend in sk.BACKENDS if backend != "auto"],
        *[_triton_variant(name, options, text) for name, (options, text) in TRITON_VARIANTS.items()],
        _ours("auto"),
    ]
}


def select(names: list[str] | None) -> list[Provider]:
    """Providers by name (all when None), in registry order; unknown names raise ValueError."""
    if not names:
        return list(PROVIDERS.values())
    unknown = [n for n in names if n not in PROVIDERS]
    if unknown:
        raise ValueError(f"unknown provider(s) {unknown}; choose from {list(PROVIDERS)}")
    return [p for p in PROVIDERS.values() if p.name in names]
