"""The backends of the op and the one place that dispatches to them.

A backend is a module under :mod:`sppo_kernels.autograd` that provides, with the common signature
``(hidden [N, H], weight [V, H], bias [V] | None, targets [N], seq_ids [N], num_seqs, softcap, temperature, config)``:

- a per-sequence log-prob callable returning ``[B]`` float32 (float64 for float64 inputs), usually a
  ``torch.autograd.Function``'s ``apply``;
- optionally a fused SPPO loss callable taking two more arguments, ``objective``
  (:class:`~sppo_kernels.losses.SPPOObjective`) and ``form_grads`` (bool), and returning ``(loss, logps)``;
  it is used when the backend's config has ``fused_sppo_loss`` set.

``config`` is the backend's own frozen dataclass of options (tile sizes, test poisoning, ...), or None.
Adding a backend = that module plus one :func:`register` call at the bottom of this file. ``"auto"`` takes the
first registered backend that lists the tensors' device type in ``auto_on`` and can run there.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from sppo_kernels.inputs import LmHead, TokenRows
from sppo_kernels.losses import SPPOObjective

ALL_FLOAT = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@dataclass(frozen=True)
class Backend:
    """One registered backend. ``module`` is imported at first use, so optional dependencies (triton, a C++
    compiler) are only needed by the backend that uses them."""

    name: str
    summary: str
    module: str
    logprobs: str  # attribute of ``module``: a Function class (its ``apply`` is used) or a function
    unavailable: Callable[[torch.device], str | None]  # why it cannot run on a device, or None
    dtypes: tuple[torch.dtype, ...] = ALL_FLOAT
    sppo_loss: str | None = None  # attribute of ``module``: the fused loss path, if the backend has one
    options: str | None = None  # attribute of ``module``: the frozen dataclass of its options, if it has any
    auto_on: tuple[str, ...] = ()  # device types on which "auto" may pick it ("any": all), in registration order
    config: Any = None  # an instance of ``options``; None: its defaults

    def resolved_config(self) -> Any:
        """The options this backend runs with (None for a backend without options)."""
        if self.config is not None or self.options is None:
            return self.config
        return getattr(importlib.import_module(self.module), self.options)()

    def with_options(self, **options: Any) -> Backend:
        """A copy whose config has ``options`` replaced, e.g. ``get_backend("cpu").with_options(poison=True)``."""
        config = self.resolved_config()
        if config is None:
            raise TypeError(f"backend {self.name!r} takes no options, got {sorted(options)}")
        try:
            config = dataclasses.replace(config, **options)
        except TypeError as e:
            fields = [f.name for f in dataclasses.fields(config)]
            raise TypeError(f"backend {self.name!r} options are {fields}; got {sorted(options)}") from e
        return dataclasses.replace(self, config=config)

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> str | None:
        """Why this backend cannot run on tensors of ``dtype`` on ``device``, or None when it can."""
        if dtype not in self.dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in self.dtypes)
            return f"backend={self.name!r} takes {names} inputs, not {str(dtype).removeprefix('torch.')}"
        return self.unavailable(device)

    def _callable(self, attribute: str) -> Callable[..., Any]:
        found = getattr(importlib.import_module(self.module), attribute)
        return found.apply if isinstance(found, type) and issubclass(found, torch.autograd.Function) else found

    def _args(self, rows: TokenRows, head: LmHead) -> tuple:
        return (rows.hidden, head.weight, head.bias, rows.targets, rows.seq_ids, rows.num_seqs, head.softcap,
                head.temperature, self.resolved_config())  # fmt: skip

    def sequence_logprobs(self, rows: TokenRows, head: LmHead) -> Tensor:
        """Per-sequence summed log-probs [B] (NaN for ``rows.invalid_seqs``)."""
        with _autocast_off(rows.hidden.device):
            logps = self._callable(self.logprobs)(*self._args(rows, head))
        return _poison(logps, rows)

    def loss_and_logprobs(self, rows: TokenRows, head: LmHead, objective: SPPOObjective) -> tuple[Tensor, Tensor]:
        """``(loss, logps [B])`` of the SPPO objective, through the fused path when the backend has one."""
        nan_ref = objective.ref_logps.masked_fill(rows.invalid_seqs, float("nan"))
        objective = dataclasses.replace(objective, ref_logps=nan_ref)
        if self.sppo_loss is None or not getattr(self.resolved_config(), "fused_sppo_loss", False):
            logps = self.sequence_logprobs(rows, head)
            return objective(logps), logps
        params = [t for t in (rows.hidden, head.weight, head.bias) if t is not None]
        form_grads = torch.is_grad_enabled() and any(p.requires_grad for p in params)
        with _autocast_off(rows.hidden.device):
            loss, logps = self._callable(self.sppo_loss)(*self._args(rows, head), objective, form_grads)
        return loss, _poison(logps, rows)


def _autocast_off(device: torch.device) -> torch.autocast:
    """The op runs in its inputs' dtype (float32 accumulation) whatever autocast region it is called from."""
    return torch.autocast(device_type=device.type, enabled=False)


def _poison(logps: Tensor, rows: TokenRows) -> Tensor:
    """NaN for the sequences of ``rows.invalid_seqs`` (no gradient flows through those entries)."""
    return logps.masked_fill(rows.invalid_seqs, float("nan"))


_REGISTRY: dict[str, Backend] = {}


def register(backend: Backend) -> None:
    """Add ``backend`` (its name must be new and not ``"auto"``)."""
    if backend.name == "auto" or backend.name in _REGISTRY:
        raise ValueError(f"backend name {backend.name!r} is taken")
    _REGISTRY[backend.name] = backend


def names() -> tuple[str, ...]:
    """The registered backend names, in registration order (``"auto"`` not included)."""
    return tuple(_REGISTRY)


def get_backend(name: str, **options: Any) -> Backend:
    """The registered backend ``name``, with its config ``options`` replaced (see :meth:`Backend.with_options`)."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"backend must be one of {('auto', *_REGISTRY)} (or a Backend), got {name!r}")
    backend = _REGISTRY[name]
    return backend.with_options(**options) if options else backend


def resolve(backend: str | Backend, device: torch.device, dtype: torch.dtype) -> Backend:
    """The backend that will run on tensors of ``dtype`` on ``device``; ``"auto"`` picks the fastest that can.

    Raises ValueError (TypeError for an unsupported dtype) naming the reason when the requested one cannot run.
    """
    if isinstance(backend, Backend):
        chosen = backend
    elif backend == "auto":
        candidates = (b for b in _REGISTRY.values() if device.type in b.auto_on or "any" in b.auto_on)
        return next(b for b in candidates if b.unavailable_reason(device, dtype) is None)
    else:
        chosen = get_backend(backend)
    reason = chosen.unavailable_reason(device, dtype)
    if reason is None:
        return chosen
    if dtype not in chosen.dtypes:
        raise TypeError(reason)
    raise ValueError(f"backend={chosen.name!r} cannot run: {reason}")


# --------------------------------------------------------------------------- availability


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


def _anywhere(_device: torch.device) -> None:
    return None


# --------------------------------------------------------------------------- the backends


register(Backend(
    "triton", "fused Triton kernels: CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before import",
    "sppo_kernels.autograd.fused_triton", "TritonSequenceLogprobs", triton_unavailable_reason,
    dtypes=(torch.float32, torch.bfloat16, torch.float16), sppo_loss="TritonSPPOLoss", options="TritonConfig",
    auto_on=("cuda",),
))  # fmt: skip
register(Backend(
    "cpu", "the fused C++ backend in csrc/ (CPU tensors)",
    "sppo_kernels.autograd.fused_cpu", "CpuSequenceLogprobs", cpu_unavailable_reason, sppo_loss="CpuSPPOLoss",
    options="CpuConfig", auto_on=("cpu",),
))  # fmt: skip
register(Backend(
    "chunked", "plain torch over row chunks, no N×V buffer; recomputes logits in the backward",
    "sppo_kernels.autograd.chunked", "ChunkedSequenceLogprobs", _anywhere, auto_on=("any",),
))  # fmt: skip
register(Backend(
    "torch", "plain materialising torch (full logits, torch autograd); for tests and debugging",
    "sppo_kernels.autograd.materialized", "materialized_sequence_logprobs", _anywhere,
))  # fmt: skip
