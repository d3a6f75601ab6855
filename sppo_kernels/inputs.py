"""Validation of the public arguments and their normalisation into token rows and an lm-head.

Every public entry point goes through :func:`prepare`, so bad input gets one clear error here and the
backends only ever see well-formed, flat token rows with in-range targets.
"""

from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
FLOAT32_MAX = torch.finfo(torch.float32).max
OUT_OF_RANGE = -2  # row target of a label outside [0, V) while the value checks are off

_value_checks = True


def set_value_checks(enabled: bool) -> None:
    """Turn the data-dependent checks (label range, target range, ``cu_seqlens`` contents) on or off.

    They read tensor values, which costs one host synchronisation per call on CUDA. They are on by default;
    a training loop that has validated its data may turn them off to keep the op fully asynchronous. With them
    off, a sequence holding a label outside ``[0, V)`` (other than ``ignore_index``) gets a NaN log-prob and
    loss, and malformed ``cu_seqlens`` make every sequence NaN: never a plausible finite value.
    """
    global _value_checks
    _value_checks = bool(enabled)


def value_checks_enabled() -> bool:
    """Whether the data-dependent checks run (see :func:`set_value_checks`)."""
    return _value_checks


@dataclass(frozen=True)
class TokenRows:
    """The op's input, flattened to one row per token position.

    hidden:   [N, H] float, the hidden state of every position (a view of the caller's tensor where possible).
    targets:  [N] int64, the vocabulary id in [0, V) the row's logits score, or -1 where the row scores nothing
              (ignored label, last position of a sequence under ``shift=True``).
    seq_ids:  [N] int64, the sequence (0..B-1) each row belongs to.
    num_seqs: B.
    invalid_seqs: [B] bool, sequences whose result must be NaN whatever a backend's arithmetic gives: a scored
              row or the lm-head holds NaN/Inf, or (value checks off) a label outside [0, V) or malformed
              ``cu_seqlens``. Computed on the device, without host synchronisation.
    """

    hidden: Tensor
    targets: Tensor
    seq_ids: Tensor
    num_seqs: int
    invalid_seqs: Tensor


@dataclass(frozen=True)
class LmHead:
    """The logits ``softcap(h·Wᵀ + b) / temperature``: weight [V, H], bias [V] | None (hidden's dtype and device),
    softcap ``c`` of ``c·tanh(a/c)`` or None, temperature > 0."""

    weight: Tensor
    bias: Tensor | None
    softcap: float | None
    temperature: float


def _real(name: str, value: object) -> float:
    """``value`` as a float; Python and NumPy reals are accepted, bools and other types are not."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def check_options(*, softcap: object, temperature: object, eta: object = None) -> tuple[float | None, float]:
    """Reject non-positive or non-finite scalar options, and a temperature that makes the logits overflow float32.

    Returns (softcap, temperature) as Python floats (softcap None when absent).
    """
    named = {"temperature": temperature, "softcap": softcap, "eta": eta}
    values = {name: None if value is None else _real(name, value) for name, value in named.items()}
    for name, value in values.items():
        if value is not None and (not math.isfinite(value) or value <= 0):
            raise ValueError(f"{name} must be finite and > 0, got {value}")
    cap, temp = values["softcap"], values["temperature"]
    if 1.0 / temp > FLOAT32_MAX or (cap is not None and cap / temp > FLOAT32_MAX):
        raise ValueError(f"temperature={temp} is so small that the logits overflow float32")
    return cap, temp


def check_eta(eta: object, num_seqs: int) -> float:
    """``eta`` as a float: finite, > 0, and small enough that the loss of ``num_seqs`` sequences whose log-ratio
    is within ``eta/2`` of its target cannot overflow float32 (each term is at most eta², their sum B·eta²)."""
    check_options(softcap=None, temperature=1.0, eta=eta)
    eta = float(eta)
    if num_seqs * eta**2 > FLOAT32_MAX:
        limit = math.sqrt(FLOAT32_MAX / num_seqs)
        raise ValueError(f"eta={eta} is so large that the SPPO loss of {num_seqs} sequences overflows float32 "
                         f"(eta must be <= {limit:.3g})")  # fmt: skip
    return eta


def _check_tensor(name: str, value: object) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.device.type == "meta":
        raise ValueError(f"{name} is a meta tensor (shape only, no data); the op needs real tensors")
    return value


def prepare(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None,
    cu_seqlens: Tensor | None,
    ignore_index: int,
    softcap: object,
    temperature: object,
    shift: bool,
) -> tuple[TokenRows, LmHead]:
    """Validate the op's inputs; return them as :class:`TokenRows` and an :class:`LmHead`.

    Padded layout: hidden [B, T, H], labels [B, T]. Packed layout: hidden [N, H], labels [N], cu_seqlens [B+1].
    """
    softcap, temperature = check_options(softcap=softcap, temperature=temperature)
    hidden = _check_tensor("hidden", hidden)
    weight = _check_tensor("weight", weight)
    labels = _check_tensor("labels", labels)
    if not hidden.is_floating_point():
        raise TypeError(f"hidden must be a floating-point tensor, got {hidden.dtype}")
    if hidden.dtype not in FLOAT_DTYPES:
        raise TypeError(f"hidden dtype {hidden.dtype} is not supported; use one of {FLOAT_DTYPES}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be [V, H], got shape {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    vocab, width = weight.shape
    if vocab == 0 or width == 0:
        raise ValueError(f"weight must be non-empty, got shape {tuple(weight.shape)}")
    if hidden.shape[-1] != width:
        raise ValueError(f"hidden size {hidden.shape[-1]} does not match weight's {width} (weight is [V, H])")
    if bias is not None:
        bias = _check_tensor("bias", bias)
        if bias.shape != (vocab,):
            raise ValueError(f"bias must be [V] = [{vocab}], got shape {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias dtype {bias.dtype} differs from hidden dtype {hidden.dtype}")
        if bias.device != hidden.device:
            raise ValueError(f"bias is on {bias.device} but hidden is on {hidden.device}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be int64 (or int32), got {labels.dtype}")
    if labels.device != hidden.device:
        raise ValueError(f"labels are on {labels.device} but hidden is on {hidden.device}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    ignore_index = operator.index(ignore_index)
    labels = labels.long()

    if cu_seqlens is None:
        rows = _padded_rows(hidden, labels, ignore_index=ignore_index, shift=shift, vocab=vocab)
    else:
        rows = _packed_rows(hidden, labels, cu_seqlens, ignore_index=ignore_index, shift=shift, vocab=vocab)
    if value_checks_enabled():
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
        if bool(bad.any()):
            found = int(labels[bad].reshape(-1)[0])
            raise ValueError(f"labels must lie in [0, {vocab}) or equal ignore_index={ignore_index}; found {found}")
    # Out-of-range rows (value checks off) score nothing; they and non-finite scored rows poison their sequence.
    out_of_range = rows.targets == OUT_OF_RANGE
    poisoned_row = out_of_range | ((rows.targets >= 0) & ~_finite(rows.hidden, dim=-1))
    invalid = torch.zeros(rows.num_seqs, dtype=torch.bool, device=hidden.device)
    invalid.index_put_((rows.seq_ids,), poisoned_row, accumulate=True)
    head_finite = _finite(weight) if bias is None else _finite(weight) & _finite(bias)
    invalid |= rows.invalid_seqs | ~head_finite
    targets = torch.where(out_of_range, -1, rows.targets)
    return TokenRows(rows.hidden, targets, rows.seq_ids, rows.num_seqs, invalid), LmHead(
        weight, bias, softcap, temperature
    )


def _finite(x: Tensor, dim: int | None = None) -> Tensor:
    """Whether all of ``x`` (or each slice along ``dim``) is finite, from one min/max pass (NaN propagates into
    both): several times cheaper than ``isfinite().all()``, which makes a bool tensor of x's size. On the CPU a
    finite ``x`` skips the slice-wise pass (10x slower than the whole-tensor one for bf16 rows; the check costs a
    host sync, which the GPU is spared)."""
    if dim is not None and x.device.type == "cpu" and x.numel() > 0 and bool(_finite(x)):
        return torch.ones(x.shape[:dim] + x.shape[dim:][1:], dtype=torch.bool)
    low, high = torch.aminmax(x) if dim is None else torch.aminmax(x, dim=dim)
    return low.isfinite() & high.isfinite()


def _row_targets(labels: Tensor, ignore_index: int, vocab: int) -> Tensor:
    """-1 for ignored labels, :data:`OUT_OF_RANGE` for labels outside [0, V), else the label."""
    out_of_range = (labels < 0) | (labels >= vocab)
    return torch.where(labels == ignore_index, -1, torch.where(out_of_range, OUT_OF_RANGE, labels))


def _padded_rows(hidden: Tensor, labels: Tensor, *, ignore_index: int, shift: bool, vocab: int) -> TokenRows:
    if hidden.dim() != 3:
        raise ValueError(
            f"without cu_seqlens hidden must be padded [B, T, H], got shape {tuple(hidden.shape)} "
            "(pass cu_seqlens for the packed [N, H] layout)"
        )
    batch, length, width = hidden.shape
    if labels.shape != (batch, length):
        raise ValueError(f"labels must be [B, T] = [{batch}, {length}], got shape {tuple(labels.shape)}")
    if batch == 0:
        raise ValueError("empty batch: hidden has B = 0 sequences")
    if length == 0:
        raise ValueError("empty batch: hidden has T = 0 positions")
    if shift:
        labels = torch.cat([labels[:, 1:], labels.new_full((batch, 1), ignore_index)], dim=1)
    targets = _row_targets(labels, ignore_index, vocab).reshape(-1)
    seq_ids = torch.arange(batch, device=hidden.device).repeat_interleave(length)
    none_invalid = torch.zeros(batch, dtype=torch.bool, device=hidden.device)
    return TokenRows(hidden.reshape(batch * length, width), targets, seq_ids, batch, none_invalid)


def _packed_rows(
    hidden: Tensor, labels: Tensor, cu_seqlens: Tensor, *, ignore_index: int, shift: bool, vocab: int
) -> TokenRows:
    cu_seqlens = _check_tensor("cu_seqlens", cu_seqlens)
    if hidden.dim() != 2:
        raise ValueError(f"with cu_seqlens hidden must be packed [N, H], got shape {tuple(hidden.shape)}")
    total = hidden.shape[0]
    if labels.shape != (total,):
        raise ValueError(f"labels must be [N] = [{total}] in the packed layout, got shape {tuple(labels.shape)}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be [B+1] with B >= 1, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.device != hidden.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but hidden is on {hidden.device}")
    if total == 0:
        raise ValueError("empty batch: hidden has N = 0 tokens")
    cu_seqlens = cu_seqlens.long()
    malformed = (cu_seqlens[0] != 0) | (cu_seqlens[-1] != total) | (cu_seqlens[1:] < cu_seqlens[:-1]).any()
    if value_checks_enabled():
        if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != total:
            raise ValueError(
                f"cu_seqlens must start at 0 and end at N = {total}, got {int(cu_seqlens[0])}..{int(cu_seqlens[-1])}"
            )
        if bool(malformed):
            raise ValueError("cu_seqlens must be non-decreasing")
    batch = cu_seqlens.numel() - 1
    positions = torch.arange(total, device=hidden.device)
    seq_ids = torch.searchsorted(cu_seqlens[1:], positions, right=True).clamp_(max=batch - 1)
    if shift:
        is_last = positions + 1 == cu_seqlens[1:][seq_ids]
        labels = torch.cat([labels[1:], labels.new_full((1,), ignore_index)])
        labels = torch.where(is_last, ignore_index, labels)
    return TokenRows(hidden, _row_targets(labels, ignore_index, vocab), seq_ids, batch, malformed.expand(batch))


def check_sequence_values(name: str, value: Tensor, rows: TokenRows, *, probability: bool) -> Tensor:
    """Validate a per-sequence tensor ([B], floating, on the hidden's device) and return it detached."""
    value = _check_tensor(name, value)
    if value.shape != (rows.num_seqs,):
        raise ValueError(f"{name} must be [B] = [{rows.num_seqs}], got shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if value.device != rows.hidden.device:
        raise ValueError(f"{name} is on {value.device} but hidden is on {rows.hidden.device}")
    value = value.detach()
    if value_checks_enabled():
        if probability and bool(((value < 0) | (value > 1) | value.isnan()).any()):
            raise ValueError(f"{name} must lie in [0, 1] with no NaN")
        if not probability and not bool(value.isfinite().all()):
            raise ValueError(f"{name} must be finite (no NaN or Inf)")
    return value
