"""Helpers of the Triton backend's own tests: run its autograd Functions on a core test case and measure errors
against the float64 reference and against plain low-precision torch."""

from __future__ import annotations

import torch
from core_cases import DEVICE, Case, plain_low_precision_logps, rel_err
from torch import Tensor

from sppo_kernels.autograd.fused_triton import TritonConfig, TritonSequenceLogprobs, TritonSPPOLoss
from sppo_kernels.inputs import TokenRows, prepare
from sppo_kernels.losses import SPPOObjective
from sppo_kernels.reference import reference_sequence_logprobs

ETA = 2.0  # keeps loss gradients O(1), so relative errors of all parameters are comparable


def objective(case: Case, reduction: str = "mean") -> SPPOObjective:
    return SPPOObjective(case.ref_logps.to(DEVICE), case.target_probs.to(DEVICE), ETA, reduction)


def upstream(out: Tensor, reduction: str) -> Tensor:
    """The upstream gradient the tests apply: 1 for a reduced loss, a non-uniform ramp per sequence for "none"."""
    if reduction == "none":
        return torch.linspace(0.5, 2.0, out.numel(), dtype=out.dtype, device=out.device)
    return torch.ones_like(out)


def token_rows(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None = None,
               cu_seqlens: Tensor | None = None, shift: bool = True) -> TokenRows:  # fmt: skip
    """The validated token rows of the op's inputs (as the public functions build them)."""
    rows, _ = prepare(hidden, weight, labels, bias=bias, cu_seqlens=cu_seqlens, ignore_index=-100, softcap=None,
                      temperature=1.0, shift=shift)  # fmt: skip
    return rows


def run_triton(case: Case, dtype: torch.dtype, config: TritonConfig, *, loss: str | None = "mean",
               seq_upstream: Tensor | None = None, function: str = "logprobs") -> dict[str, Tensor]:  # fmt: skip
    """Run the Triton backend on ``case``: ``function="logprobs"`` (TritonSequenceLogprobs, then the loss in torch)
    or ``"loss"`` (TritonSPPOLoss). ``loss=None`` back-propagates ``seq_upstream`` from the log-probs instead.
    Returns out, logps and the gradients (as produced, in the parameter dtype)."""
    params = case.params(dtype)
    opts = case.options()
    rows = token_rows(params["hidden"], params["weight"], opts["labels"], params["bias"], opts["cu_seqlens"],
                      case.shift)  # fmt: skip
    args = (rows.hidden, params["weight"], params["bias"], rows.targets, rows.seq_ids, rows.num_seqs,
            case.softcap, case.temperature, config)  # fmt: skip
    if function == "loss":
        out, logps = TritonSPPOLoss.apply(*args, objective(case, loss), True)
    else:
        logps = TritonSequenceLogprobs.apply(*args)
        out = logps if loss is None else objective(case, loss)(logps)
    grad = seq_upstream.to(out) if loss is None else upstream(out, loss)
    out.backward(grad)
    result = {"out": out.detach(), "logps": logps.detach()}
    result.update({k: v.grad for k, v in params.items() if v is not None})
    return result


def run_reference(case: Case, *, loss: str | None = "mean", seq_upstream: Tensor | None = None) -> dict[str, Tensor]:
    """The float64 reference of :func:`run_triton`."""
    params = case.params(torch.float64, torch.device("cpu"))
    logps = reference_sequence_logprobs(params["hidden"], params["weight"], bias=params["bias"],
                                        **case.options(torch.device("cpu")))  # fmt: skip
    if loss is None:
        out = logps
        out.backward(seq_upstream.double())
    else:
        out = SPPOObjective(case.ref_logps, case.target_probs, ETA, loss)(logps)
        out.backward(upstream(out, loss))
    result = {"out": out.detach(), "logps": logps.detach()}
    result.update({k: v.grad for k, v in params.items() if v is not None})
    return result


def errors(got: dict[str, Tensor], want: dict[str, Tensor]) -> dict[str, float]:
    return {k: rel_err(got[k], want[k]) for k in want}


def plain_torch(case: Case, dtype: torch.dtype, loss: str = "mean") -> dict[str, Tensor]:
    """What a training script gets from plain torch in ``dtype``: logits in ``dtype``, log-softmax in float32."""
    logps, params = plain_low_precision_logps(case, dtype)
    out = SPPOObjective(case.ref_logps.float(), case.target_probs.float(), ETA, loss)(logps)
    out.backward(upstream(out, loss))
    result = {"out": out.detach(), "logps": logps.detach()}
    result.update({k: v.grad for k, v in params.items() if v is not None})
    return result


def assert_within_plain_error(ours: dict[str, float], plain: dict[str, float]) -> None:
    """Low-precision bound: at most 1.5× plain torch's own error in the same dtype, plus 2e-3 of slack."""
    for name, err in ours.items():
        assert err <= 1.5 * plain[name] + 2e-3, (name, ours, plain)
