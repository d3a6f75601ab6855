"""Chunked torch backend: exact, no N×V buffer, runs anywhere torch runs.

Rows whose target is ignored are dropped before the matmul. The forward keeps one [chunk, V] float32 logits tile
at a time and saves only the per-row log-sum-exp; the backward recomputes each tile's logits (2NHV extra FLOPs).
Workspace: a few chunk × V float32 tiles (``chunk`` is sized so one tile is about 32 MiB), plus a float32 copy of
the weight for float16 inputs (whose logits would overflow at 65504 in float16). A row whose logits are not all
finite (Inf or NaN in its inputs) scores NaN, as on every backend.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sppo_kernels.autograd.first_order import first_order_backward

TILE_ELEMENTS = 1 << 23


def chunk_rows(vocab: int) -> int:
    """Rows per chunk so that one [chunk, V] float32 tile holds about ``TILE_ELEMENTS`` values."""
    return max(16, TILE_ELEMENTS // vocab)


def _raw_logits(h: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """[n, H] × [V, H]ᵀ (+ b) with float accumulation, returned as float32 (float64 stays). float16 operands are
    multiplied in float32 (pass the weight already upcast): float16 logits overflow at 65504."""
    if weight.dtype == torch.float32 and h.dtype == torch.float16:
        h = h.float()
    raw = torch.nn.functional.linear(h, weight, bias)
    return raw if raw.dtype == torch.float64 else raw.float()


def _compute_params(weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """The weight and bias the logits are computed from: float32 copies for float16, else the inputs."""
    if weight.dtype != torch.float16:
        return weight, bias
    return weight.float(), None if bias is None else bias.float()


def _transform(raw: Tensor, softcap: float | None, temperature: float) -> tuple[Tensor, Tensor | None]:
    """Logits z = softcap(raw)/temperature and, with a soft-cap, tanh(raw/c) for the chain rule."""
    if softcap is None:
        return raw / temperature, None
    t = torch.tanh(raw / softcap)
    return t * (softcap / temperature), t


class ChunkedSequenceLogprobs(torch.autograd.Function):
    """hidden [N, H], weight [V, H], bias [V] | None → summed log-probs [B] float32 (float64 for float64)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, seq_ids, num_seqs, softcap, temperature, config):
        rows = (targets >= 0).nonzero().squeeze(1)
        h = hidden.index_select(0, rows)
        y = targets.index_select(0, rows)
        step = chunk_rows(weight.shape[0])
        out_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        lse = torch.empty(rows.numel(), dtype=out_dtype, device=hidden.device)
        picked = torch.empty_like(lse)
        w, b = _compute_params(weight, bias)
        for start in range(0, rows.numel(), step):
            z, _ = _transform(_raw_logits(h[start : start + step], w, b), softcap, temperature)
            # logsumexp of a row holding +Inf is +Inf, not NaN: make non-finite rows NaN explicitly.
            finite = torch.where(z.isfinite().all(dim=-1), 0.0, float("nan"))
            lse[start : start + step] = torch.logsumexp(z, dim=-1) + finite
            picked[start : start + step] = z.gather(1, y[start : start + step, None]).squeeze(1)
        seq = seq_ids.index_select(0, rows)
        logps = torch.zeros(num_seqs, dtype=out_dtype, device=hidden.device).index_add_(0, seq, picked - lse)
        ctx.save_for_backward(hidden, weight, bias, rows, y, seq, lse)
        ctx.options = (softcap, temperature, step)
        return logps

    @staticmethod
    @first_order_backward
    def backward(ctx, grad_logps):
        hidden, weight, bias, rows, y, seq, lse = ctx.saved_tensors
        softcap, temperature, step = ctx.options
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        h_all = hidden.index_select(0, rows)
        g = grad_logps.to(lse.dtype).index_select(0, seq)
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        grad_h = torch.zeros(rows.numel(), hidden.shape[1], dtype=hidden.dtype, device=hidden.device)
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None
        w, b = _compute_params(weight, bias)
        for start in range(0, rows.numel(), step):
            stop = start + step
            h = h_all[start:stop]
            z, t = _transform(_raw_logits(h, w, b), softcap, temperature)
            dz = torch.exp(z - lse[start:stop, None]).mul_(-g[start:stop, None])
            dz.scatter_add_(1, y[start:stop, None], g[start:stop, None])
            da = dz / temperature if t is None else dz.mul_(1 - t * t).div_(temperature)
            if need_b:
                grad_b += da.sum(0)
            da = da.to(hidden.dtype)
            if need_h:
                grad_h[start:stop] = da @ weight
            if need_w:
                grad_w += (da.t() @ h).to(acc)
        grad_hidden = None
        if need_h:
            grad_hidden = torch.zeros_like(hidden).index_copy_(0, rows, grad_h)
        grad_weight = None if grad_w is None else grad_w.to(weight.dtype)
        grad_bias = None if grad_b is None else grad_b.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None
