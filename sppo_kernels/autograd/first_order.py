"""The contract every fused backend's backward keeps: first order only, and immune to autocast.

- Under ``create_graph=True`` (e.g. a gradient penalty) the gradients it returns carry a node that raises as soon
  as anything differentiates through them, instead of silently acting as constants.
- It runs with autocast off, like the forward: the op computes in its inputs' dtype with float32 accumulation.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

SECOND_ORDER_ERROR = (
    "sppo_kernels: tried to differentiate twice through a fused backend, whose backward is first order only "
    "(create_graph=True, e.g. a gradient penalty); use backend='torch' for higher-order gradients"
)


class _SecondOrderError(torch.autograd.Function):
    """Identity on gradients whose own backward raises :data:`SECOND_ORDER_ERROR`."""

    @staticmethod
    def forward(ctx, *grads: Tensor) -> tuple[Tensor, ...]:
        return tuple(g.view_as(g) for g in grads)

    @staticmethod
    def backward(ctx, *_: Tensor) -> None:
        raise RuntimeError(SECOND_ORDER_ERROR)


def first_order_backward(backward: Callable[..., tuple]) -> Callable[..., tuple]:
    """Decorate a ``torch.autograd.Function.backward`` with the contract of this module."""

    @functools.wraps(backward)
    def wrapper(ctx: Any, *grad_outputs: Any) -> tuple:
        device = next((g.device for g in grad_outputs if isinstance(g, Tensor)), torch.device("cpu"))
        with torch.no_grad(), torch.autocast(device_type=device.type, enabled=False):
            grads = backward(ctx, *grad_outputs)
        if not torch.is_grad_enabled():
            return grads
        tensors = [g for g in grads if isinstance(g, Tensor)]
        if not tensors:
            return grads
        marked = iter(_SecondOrderError.apply(*(g.detach().requires_grad_(True) for g in tensors)))
        return tuple(next(marked) if isinstance(g, Tensor) else g for g in grads)

    return wrapper
