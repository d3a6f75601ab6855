"""Backend names, availability and the ``"auto"`` choice."""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import Tensor

from sppo_kernels.inputs import TokenRows

BACKENDS = ("auto", "triton", "cpu", "chunked", "torch")


def triton_unavailable_reason(device: torch.device) -> str | None:
    """Why the Triton backend cannot run on ``device``, or None when it can."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'sppo-kernels[triton]')"
    if device.type == "cuda":
        return None
    if os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return f"tensors are on {device}; Triton needs CUDA tensors, or TRITON_INTERPRET=1 to interpret on the CPU"


def cpu_unavailable_reason(device: torch.device) -> str | None:
    """Why the csrc CPU backend cannot run on ``device``, or None when it can (builds it on first call)."""
    if device.type != "cpu":
        return f"tensors are on {device}; the cpu backend needs CPU tensors"
    from sppo_kernels._cpu_extension import unavailable_reason

    return unavailable_reason()


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map a requested backend name to the one that will run, raising a clear error when it cannot."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda" and triton_unavailable_reason(device) is None:
            return "triton"
        if device.type == "cpu" and cpu_unavailable_reason(device) is None:
            return "cpu"
        return "chunked"
    reason = {"triton": triton_unavailable_reason, "cpu": cpu_unavailable_reason}.get(backend, lambda _: None)(device)
    if reason is not None:
        raise ValueError(f"backend={backend!r} cannot run: {reason}")
    return backend


def fused_sequence_logprobs(
    backend: str, rows: TokenRows, weight: Tensor, bias: Tensor | None, softcap: float | None, temperature: float
) -> Tensor:
    """Per-sequence log-probs [B] from token rows on a resolved, non-reference backend."""
    if backend == "triton":
        from sppo_kernels.autograd.fused_triton import triton_sequence_logprobs

        return triton_sequence_logprobs(rows, weight, bias, softcap, temperature)
    if backend == "cpu":
        from sppo_kernels.autograd.fused_cpu import cpu_sequence_logprobs

        return cpu_sequence_logprobs(rows, weight, bias, softcap, temperature)
    from sppo_kernels.autograd.chunked import chunked_sequence_logprobs

    return chunked_sequence_logprobs(rows, weight, bias, softcap, temperature)
