"""Every backend against the float64 reference: log-probs, SPPO loss and gradients."""

from __future__ import annotations

import pytest
import torch
from core_cases import DEVICE, Case, make_case, plain_low_precision_logps, rel_err, runnable_backends

import sppo_kernels as sk
from sppo_kernels.losses import sppo_epilogue
from sppo_kernels.reference import reference_sequence_logprobs

BACKENDS = runnable_backends()
VARIANTS = {
    "softcap-bias-shift": {},
    "nocap-nobias-noshift": {"softcap": None, "temperature": 1.3, "shift": False, "bias": False},
    "packed": {"packed": True, "seed": 1},
    "odd-small": {"batch": 5, "length": 9, "width": 19, "vocab": 67, "seed": 2},
}
ETA = 2.0  # keeps loss gradients O(1) so relative errors of all parameters are comparable


def reference_grads(case: Case, upstream: torch.Tensor | None = None, reduction: str = "mean"):
    """float64 reference (loss or log-probs, grads of hidden/weight/bias)."""
    params = case.params(torch.float64, torch.device("cpu"))
    opts = case.options(torch.device("cpu"))
    logps = reference_sequence_logprobs(params["hidden"], params["weight"], bias=params["bias"], **opts)
    if upstream is None:
        out = sppo_epilogue(logps, case.ref_logps, case.target_probs, ETA, reduction)
        out.backward(torch.ones_like(out) if reduction != "none" else torch.linspace(0.5, 2.0, case.num_seqs).double())
    else:
        out = logps
        out.backward(upstream.double())
    return out.detach(), logps.detach(), params


def backend_grads(case: Case, backend: str, dtype: torch.dtype, upstream=None, reduction: str = "mean"):
    params = case.params(dtype)
    opts = case.options()
    if upstream is None:
        out, logps = sk.sppo_loss(
            params["hidden"], params["weight"], opts.pop("labels"), case.ref_logps.to(DEVICE),
            case.target_probs.to(DEVICE), eta=ETA, bias=params["bias"], reduction=reduction,
            backend=backend, return_logps=True, **opts,
        )  # fmt: skip
        grad = torch.ones_like(out) if reduction != "none" else torch.linspace(0.5, 2.0, case.num_seqs)
        out.backward(grad.to(out))
    else:
        out = logps = sk.sequence_logprobs(
            params["hidden"], params["weight"], opts.pop("labels"), bias=params["bias"], backend=backend, **opts
        )
        out.backward(upstream.to(out))
    return out.detach(), logps.detach(), params


def assert_close_to_reference(case, backend, dtype, bound, **kw):
    ref_out, ref_logps, ref_params = reference_grads(case, **kw)
    out, logps, params = backend_grads(case, backend, dtype, **kw)
    assert out.dtype == torch.float32
    errors = {"out": rel_err(out, ref_out), "logps": rel_err(logps, ref_logps)}
    for name, p in params.items():
        if p is not None:
            errors[name] = rel_err(p.grad, ref_params[name].grad)
    assert all(err <= bound for err in errors.values()), errors  # all(): a NaN error fails
    return errors


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_sppo_loss_fp32_matches_reference(backend, variant):
    assert_close_to_reference(make_case(**VARIANTS[variant]), backend, torch.float32, 1e-4)


@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_reductions_match_reference(backend, reduction):
    assert_close_to_reference(make_case(seed=3), backend, torch.float32, 1e-4, reduction=reduction)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sequence_logprobs_nonuniform_upstream(backend):
    case = make_case(batch=4, seed=4)
    upstream = torch.tensor([0.3, -1.7, 2.2, 0.9])
    assert_close_to_reference(case, backend, torch.float32, 1e-4, upstream=upstream)


def plain_low_precision_errors(case: Case, dtype: torch.dtype) -> dict[str, float]:
    """Errors of the naive path computed in ``dtype`` (logits in ``dtype``, log_softmax in float32)."""
    ref_out, ref_logps, ref_params = reference_grads(case)
    logps, params = plain_low_precision_logps(case, dtype)
    loss = sppo_epilogue(logps, case.ref_logps.float(), case.target_probs.float(), ETA, "mean")
    loss.backward()
    errors = {"out": rel_err(loss, ref_out), "logps": rel_err(logps, ref_logps)}
    errors.update({k: rel_err(v.grad, ref_params[k].grad) for k, v in params.items() if v is not None})
    return errors


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision_within_plain_torch_error(backend, dtype):
    case = make_case(seed=5)
    plain = plain_low_precision_errors(case, dtype)
    ref_out, ref_logps, ref_params = reference_grads(case)
    out, logps, params = backend_grads(case, backend, dtype)
    ours = {"out": rel_err(out, ref_out), "logps": rel_err(logps, ref_logps)}
    ours.update({k: rel_err(v.grad, ref_params[k].grad) for k, v in params.items() if v is not None})
    for name, err in ours.items():
        assert err <= 1.5 * plain[name] + 2e-3, (name, ours, plain)
    assert params["hidden"].grad.dtype == dtype


@pytest.mark.parametrize("backend", BACKENDS)
def test_padded_and_packed_agree(backend):
    padded, packed = make_case(seed=6), make_case(seed=6, packed=True)
    out_a, logps_a, params_a = backend_grads(padded, backend, torch.float32)
    out_b, logps_b, params_b = backend_grads(packed, backend, torch.float32)
    assert rel_err(logps_b, logps_a) < 1e-6
    assert rel_err(out_b, out_a) < 1e-6
    assert rel_err(params_b["weight"].grad, params_a["weight"].grad) < 1e-5
    lengths = packed.cu_seqlens.diff().tolist()
    grad_a = torch.cat([params_a["hidden"].grad[b, :n] for b, n in enumerate(lengths)])
    assert rel_err(params_b["hidden"].grad, grad_a) < 1e-5
    assert torch.all(params_a["hidden"].grad[padded.num_seqs - 1] == 0)  # the fully masked sequence


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_sequence_scores_zero(backend):
    case = make_case(seed=7)
    params = case.params(torch.float32)
    logps = sk.sequence_logprobs(params["hidden"], params["weight"], bias=params["bias"], backend=backend,
                                 **case.options())  # fmt: skip
    assert logps[-1].item() == 0.0
    assert torch.all(logps[:-1] < 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    case = make_case(seed=8, bias=False)
    hidden = case.hidden.float().transpose(0, 1).contiguous().transpose(0, 1).to(DEVICE)  # [B, T, H], strided
    weight = case.weight.float().t().contiguous().t().to(DEVICE)  # [V, H] with stride (1, V)
    assert not hidden.is_contiguous() and not weight.is_contiguous()
    opts = case.options()
    got = sk.sequence_logprobs(hidden, weight, opts.pop("labels"), backend=backend, **opts)
    want = reference_sequence_logprobs(case.hidden, case.weight, **case.options(torch.device("cpu")))
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_and_partial_grads(backend):
    case = make_case(seed=9)
    opts = case.options()
    hidden = case.hidden.float().to(DEVICE).requires_grad_(True)
    weight = case.weight.float().to(DEVICE)  # frozen head: only dH is needed
    with torch.no_grad():
        frozen = sk.sequence_logprobs(hidden, weight, opts["labels"], backend=backend, softcap=case.softcap)
    assert not frozen.requires_grad
    logps = sk.sequence_logprobs(hidden, weight, opts["labels"], backend=backend, softcap=case.softcap)
    torch.testing.assert_close(logps.detach(), frozen, rtol=1e-6, atol=1e-5)
    logps.sum().backward()
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_hidden_is_never_a_finite_loss(backend):
    case = make_case(seed=10)
    params = case.params(torch.float32)
    with torch.no_grad():
        params["hidden"][0, 5, 3] = float("nan")
    opts = case.options()
    loss = sk.sppo_loss(params["hidden"], params["weight"], opts.pop("labels"), case.ref_logps.to(DEVICE),
                        case.target_probs.to(DEVICE), bias=params["bias"], backend=backend, **opts)  # fmt: skip
    assert not torch.isfinite(loss)


def test_auto_backend_matches_reference():
    assert_close_to_reference(make_case(seed=11), "auto", torch.float32, 1e-4)


def test_module_equals_function():
    case = make_case(seed=12)
    params = case.params(torch.float32)
    opts = case.options()
    labels = opts.pop("labels")
    options = {k: opts[k] for k in ("softcap", "temperature", "shift")}
    module = sk.SPPOLoss(eta=ETA, reduction="sum", **options)
    args = (params["hidden"], params["weight"], labels, case.ref_logps.to(DEVICE), case.target_probs.to(DEVICE))
    got = module(*args, bias=params["bias"])
    want = sk.sppo_loss(*args, eta=ETA, bias=params["bias"], reduction="sum", **opts)
    torch.testing.assert_close(got, want)
    assert "eta=2.0" in repr(module)
