"""DeepSpeed ZeRO-3: use a partitioned lm_head in the fused op, with the backward run anywhere.

Under ZeRO-3 ``lm_head.weight`` has numel 0 outside the lm_head's own forward. Gathering it with
``deepspeed.zero.GatheredParameters`` for the op is not enough when the backward runs after the context
(``engine.backward``, ``Trainer``): the context re-partitions the weight on exit, so (1) an op that reads the
saved weight in its backward finds an empty tensor, and (2) autograd's AccumulateGrad, which copies the
[V, H] gradient into the parameter's layout, fails on the [0]-shaped parameter ("size mismatch").

:func:`gathered_lm_head` handles both, the way ZeRO-3 handles a module's own weight:

- forward: the head's parameters are gathered for the block; saved-tensor hooks store any tensor the op saves
  from a gathered parameter's storage as a reference to the parameter (no copy is kept);
- backward: unpacking such a tensor gathers the parameter again; otherwise (ops that form the gradient in the
  forward) a pre-hook on the parameter's AccumulateGrad gathers it. A post-accumulate hook re-partitions it
  right after the gradient is accumulated, after ZeRO-3's own hook has taken the gradient for its
  reduce-scatter. The gradient therefore goes through ZeRO-3's reduction unchanged and equals the
  unpartitioned one.

Requirement on the op: tensors it needs in the backward are saved with ``save_for_backward`` (or by ordinary
autograd ops), as every ``sppo_kernels`` backend does. A parameter gathered in a backward that never reaches
its AccumulateGrad (e.g. ``torch.autograd.grad`` with other ``inputs``) stays gathered until its next one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from sppo_kernels.integrations.model_parts import lm_head_module, lm_head_params

__all__ = ["gathered_lm_head", "partitioned_head_params"]

_HELD = "_sppo_gathered_for_backward"  # set on a parameter this module gathered during a backward
_ARMED = "_sppo_accumulation_hooks"  # (AccumulateGrad node, pre-hook handle, post-hook handle)


def _status() -> Any:
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return ZeroParamStatus


def partitioned_head_params(model: nn.Module) -> list[nn.Parameter]:
    """The ZeRO-3 managed parameters of the lm_head module (weight, bias, PEFT adapters); [] without ZeRO-3."""
    head = lm_head_module(model)
    if head is None:
        return []
    unique = {id(p): p for p in head.parameters() if hasattr(p, "ds_id")}
    return list(unique.values())


def _gather_for_backward(param: nn.Parameter) -> None:
    """Gather ``param`` (an all-gather on every rank) if it is partitioned; remember to release it."""
    if param.ds_status == _status().NOT_AVAILABLE:
        param.all_gather()
        setattr(param, _HELD, True)


def _arm(param: nn.Parameter) -> None:
    """Make the next gradient accumulation of ``param`` see its full shape, then re-partition it (once)."""
    if getattr(param, _ARMED, None) is not None:
        return
    node = torch.autograd.graph.get_gradient_edge(param).node

    def before(_grad_outputs: Any) -> None:
        _gather_for_backward(param)

    def after(p: Tensor) -> None:
        _node, pre, post = getattr(p, _ARMED)
        pre.remove()
        post.remove()
        setattr(p, _ARMED, None)
        if getattr(p, _HELD, False):
            setattr(p, _HELD, False)
            if not p.ds_active_sub_modules:  # a module still using it (tied embeddings) releases it itself
                p.partition()

    # ZeRO-3 registered its reduce hook at initialisation, so it runs before ``after``.
    setattr(param, _ARMED, (node, node.register_prehook(before), param.register_post_accumulate_grad_hook(after)))


@dataclass(frozen=True)
class _Regather:
    """A saved tensor replaced by (parameter, view geometry); materialised again in the backward."""

    param: nn.Parameter
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int  # storage offset relative to the gathered parameter's data

    def materialize(self) -> Tensor:
        param = self.param
        if param.ds_status == _status().NOT_AVAILABLE and getattr(param, _ARMED, None) is None:
            import deepspeed  # no accumulation will release it: use a temporary copy

            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                return param.data.clone().as_strided(self.size, self.stride, self.offset)
        _gather_for_backward(param)
        data = param.data
        return data.as_strided(self.size, self.stride, data.storage_offset() + self.offset)


def _storage_key(t: Tensor) -> int | None:
    return t.untyped_storage().data_ptr() if t.layout == torch.strided and t.numel() else None


@contextmanager
def gathered_lm_head(model: nn.Module) -> Iterator[tuple[Tensor, Tensor | None]]:
    """Yield ``(weight [V, H], bias [V] | None)`` of the lm_head (:func:`.model_parts.lm_head_params`) for the op.

    Under ZeRO-3 the parameters are gathered for the block and again in the backward, which may run inside or
    after the block. Without deepspeed, or when nothing is partitioned, this only yields the parameters.
    Compute the hidden states before entering, so the full head is held only while the op runs.
    """
    params = partitioned_head_params(model)
    if not params:
        yield lm_head_params(model)
        return
    import deepspeed

    to_gather = [p for p in params if p.ds_status == _status().NOT_AVAILABLE]
    with ExitStack() as stack:
        if to_gather:
            stack.enter_context(deepspeed.zero.GatheredParameters(to_gather, modifier_rank=None))
        if torch.is_grad_enabled():  # after gathering: AccumulateGrad records the shape it is created with
            for p in params:
                if p.requires_grad:
                    _arm(p)
        by_storage = {_storage_key(p.data): p for p in params if p.data.numel()}

        def pack(t: Tensor) -> Tensor | _Regather:
            param = by_storage.get(_storage_key(t))
            if param is None:
                return t
            offset = t.storage_offset() - param.data.storage_offset()
            return _Regather(param, tuple(t.shape), tuple(t.stride()), offset)

        def unpack(saved: Tensor | _Regather) -> Tensor:
            return saved.materialize() if isinstance(saved, _Regather) else saved

        stack.enter_context(torch.autograd.graph.saved_tensors_hooks(pack, unpack))
        yield lm_head_params(model)
