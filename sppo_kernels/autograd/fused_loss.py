"""The backward shared by the fused SPPO loss Functions (``CpuSPPOLoss``, ``TritonSPPOLoss``).

Such a Function returns ``(loss, logps)`` from ``forward(ctx, hidden, weight, bias, targets, seq_ids, num_seqs,
softcap, temperature, config, objective, form_grads)`` and may have formed, during its forward, the gradients of
the loss for an upstream gradient of 1 (``ctx.formed``: (dH, dW, db), entries None where not needed). Its backward
hands those out, scaled, when the loss's upstream gradient is one value c for every element and nothing flows
into ``logps``; anything else (non-uniform ``reduction="none"`` gradients, gradients on the log-probs, a second
backward) is recomputed exactly by the backend's per-sequence backward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

NON_TENSOR_INPUTS = 8  # targets, seq_ids, num_seqs, softcap, temperature, config, objective, form_grads


def uniform_scale(grad_loss: Tensor) -> Tensor | None:
    """The loss's upstream gradient as one scalar tensor when it is the same for every element, else None.
    A scalar loss costs no host synchronisation."""
    if grad_loss.numel() == 1:
        return grad_loss.reshape(())
    first = grad_loss.reshape(-1)[0]
    return first if bool((grad_loss == first).all()) else None


def fused_loss_backward(
    ctx: Any,
    grad_loss: Tensor | None,
    grad_logps: Tensor | None,
    recompute: Callable[[Callable[[Tensor], Tensor]], tuple],
) -> tuple:
    """The gradients of a fused loss Function's inputs. ``recompute(grad_seq)`` runs the backend's per-sequence
    backward for the upstream gradient ``grad_seq(logps)`` [B] of the saved log-probs and returns (dH, dW, db)."""
    nones = (None,) * NON_TENSOR_INPUTS
    formed, ctx.formed = ctx.formed, None  # handed out once; a second backward recomputes
    if grad_loss is None and grad_logps is None:
        return (None, None, None, *nones)
    scale = uniform_scale(grad_loss) if formed is not None and grad_logps is None else None
    if scale is not None:
        unit = scale.device.type == "cpu" and bool(scale == 1)  # no sync on the CPU: skip a pass over dW and dH
        return (*(g if g is None or unit else g.mul_(scale.to(g.dtype)) for g in formed), *nones)

    def grad_seq(logps: Tensor) -> Tensor:
        total = torch.zeros_like(logps)
        if grad_loss is not None:
            total += ctx.objective.logps_grad(logps, grad_loss)
        if grad_logps is not None:
            total += grad_logps.to(logps)
        return total

    return (*recompute(grad_seq), *nones)
