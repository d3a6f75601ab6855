"""Inputs a hostile user tries: never a silent wrong answer from any backend.

Double backward, unchecked out-of-range labels and ``cu_seqlens``, autocast regions, Inf in the inputs, fp16
logits past 65504, NumPy scalars, meta tensors and options whose logits or loss overflow float32.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from core_cases import DEVICE, make_case, rel_err, runnable_backends
from test_core_backends import ETA, assert_close_to_reference, backend_grads, reference_grads

import sppo_kernels as sk
from sppo_kernels.reference import reference_sequence_logprobs

BACKENDS = runnable_backends()
FUSED = [b for b in BACKENDS if b != "torch"]


@pytest.fixture
def unchecked():
    sk.set_value_checks(False)
    yield
    sk.set_value_checks(True)


# ------------------------------------------------------------------ double backward


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("op", ["logprobs", "loss"])
def test_double_backward_raises_on_fused_backends(backend, op):
    """A gradient penalty through a first-order backend must fail loudly, not be silently dropped."""
    case = make_case(seed=20)
    params = case.params(torch.float32)
    opts = case.options()
    labels = opts.pop("labels")
    if op == "loss":
        out = sk.sppo_loss(params["hidden"], params["weight"], labels, case.ref_logps.float().to(DEVICE),
                           case.target_probs.float().to(DEVICE), eta=ETA, backend=backend, **opts)  # fmt: skip
    else:
        out = sk.sequence_logprobs(params["hidden"], params["weight"], labels, backend=backend, **opts).sum()
    (grad_h,) = torch.autograd.grad(out, params["hidden"], create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice through a fused backend"):
        grad_h.square().sum().backward()


def test_double_backward_works_on_torch_backend():
    """The materialising backend is plain autograd: its second derivative equals float64 autograd's."""
    case = make_case(seed=21, bias=False)
    penalties = {}
    for dtype, device in ((torch.float64, torch.device("cpu")), (torch.float32, DEVICE)):
        params = case.params(dtype, device)
        opts = case.options(device)
        labels = opts.pop("labels")
        if dtype == torch.float64:
            logps = reference_sequence_logprobs(params["hidden"], params["weight"], labels, **opts)
        else:
            logps = sk.sequence_logprobs(params["hidden"], params["weight"], labels, backend="torch", **opts)
        (grad_h,) = torch.autograd.grad(logps.sum(), params["hidden"], create_graph=True)
        grad_h.square().sum().backward()
        penalties[dtype] = params["weight"].grad
    assert rel_err(penalties[torch.float32], penalties[torch.float64]) < 1e-4


# ------------------------------------------------------------------ unchecked values


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad_label", [150, 10**6, -7])
def test_unchecked_out_of_range_label_makes_its_sequence_nan(backend, bad_label, unchecked):
    case = make_case(seed=22, fully_masked=False)  # V = 150
    params = case.params(torch.float32)
    opts = case.options()
    labels = opts.pop("labels").clone()
    good = sk.sequence_logprobs(params["hidden"], params["weight"], labels, bias=params["bias"], backend=backend,
                                **opts).detach()  # fmt: skip
    labels[1, -3] = bad_label  # a scored position of sequence 1
    logps = sk.sequence_logprobs(params["hidden"], params["weight"], labels, bias=params["bias"], backend=backend,
                                 **opts)  # fmt: skip
    assert torch.isnan(logps[1])
    torch.testing.assert_close(logps[[0, 2]].detach(), good[[0, 2]], rtol=0, atol=0)
    loss = sk.sppo_loss(params["hidden"], params["weight"], labels, case.ref_logps.float().to(DEVICE),
                        case.target_probs.float().to(DEVICE), bias=params["bias"], backend=backend,
                        reduction="none", **opts)  # fmt: skip
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cu_seqlens", [[0, 5, 11], [1, 5, 12], [0, 7, 5, 12]], ids=["end", "start", "decreasing"])
def test_unchecked_malformed_cu_seqlens_make_everything_nan(backend, cu_seqlens, unchecked):
    gen = torch.Generator().manual_seed(23)
    hidden, weight = torch.randn(12, 8, generator=gen).to(DEVICE), torch.randn(11, 8, generator=gen).to(DEVICE)
    labels = torch.randint(0, 11, (12,), generator=gen).to(DEVICE)
    cu = torch.tensor(cu_seqlens, device=DEVICE)
    logps = sk.sequence_logprobs(hidden, weight, labels, cu_seqlens=cu, backend=backend)
    assert torch.isnan(logps).all(), logps
    batch = len(cu_seqlens) - 1
    loss = sk.sppo_loss(hidden, weight, labels, torch.zeros(batch, device=DEVICE), torch.full((batch,), 0.5,
                        device=DEVICE), cu_seqlens=cu, backend=backend)  # fmt: skip
    assert torch.isnan(loss)


# ------------------------------------------------------------------ autocast


@pytest.mark.parametrize("backend", [*BACKENDS, "auto"])
@pytest.mark.parametrize("op", ["loss", "logprobs"])
@pytest.mark.parametrize("backward", ["inside", "outside"])
def test_float32_inputs_under_cpu_autocast_stay_exact_float32(backend, op, backward):
    """The op ignores autocast: it runs in its inputs' dtype with float32 accumulation. The fused backends' backward
    too, wherever it is called; the "torch" backend is plain autograd, whose backward follows the caller's autocast
    state, so (as PyTorch recommends) its backward is called outside the region."""
    if DEVICE.type != "cpu":
        pytest.skip("CPU autocast needs CPU tensors")
    if backend == "torch" and backward == "inside":
        pytest.skip("plain autograd's backward follows the caller's autocast state")
    case = make_case(batch=4, length=20, width=64, vocab=3000, seed=24)
    upstream = None if op == "loss" else torch.tensor([0.3, -1.2, 2.0, 0.7])
    ref_out, ref_logps, ref_params = reference_grads(case, upstream=upstream)
    if backward == "inside":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, logps, params = backend_grads(case, backend, torch.float32, upstream=upstream)
    else:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, logps, params = forward_only(case, backend, upstream is None)
        out.backward(torch.ones_like(out) if upstream is None else upstream)
    assert out.dtype == logps.dtype == torch.float32
    errors = {"out": rel_err(out, ref_out), "logps": rel_err(logps, ref_logps)}
    errors.update({k: rel_err(p.grad, ref_params[k].grad) for k, p in params.items()})
    assert all(e <= 1e-4 for e in errors.values()), errors


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA autocast needs a GPU")
@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_inputs_under_cuda_autocast_stay_float32(backend):
    case = make_case(seed=25)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert_close_to_reference(case, backend, torch.float32, 1e-3 if backend == "triton" else 1e-4)


def forward_only(case, backend: str, loss: bool):
    """(loss or log-probs, log-probs, params) in float32 without calling backward."""
    params = case.params(torch.float32)
    opts = case.options()
    labels = opts.pop("labels")
    if loss:
        out, logps = sk.sppo_loss(params["hidden"], params["weight"], labels, case.ref_logps.to(DEVICE),
                                  case.target_probs.to(DEVICE), eta=ETA, bias=params["bias"], backend=backend,
                                  return_logps=True, **opts)  # fmt: skip
        return out, logps, params
    logps = sk.sequence_logprobs(params["hidden"], params["weight"], labels, bias=params["bias"], backend=backend,
                                 **opts)  # fmt: skip
    return logps, logps, params


# ------------------------------------------------------------------ non-finite and overflowing values


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [float("inf"), float("-inf")])
def test_inf_in_hidden_gives_nan_not_inf(backend, value):
    case = make_case(seed=26, fully_masked=False)
    params = case.params(torch.float32)
    with torch.no_grad():
        params["hidden"][0, -3, 4] = value  # a scored row of sequence 0
    opts = case.options()
    logps = sk.sequence_logprobs(params["hidden"], params["weight"], opts.pop("labels"), bias=params["bias"],
                                 backend=backend, **opts)  # fmt: skip
    assert torch.isnan(logps[0]), logps
    assert torch.isfinite(logps[1:]).all(), logps


@pytest.mark.parametrize("backend", BACKENDS)
def test_float16_logits_beyond_65504(backend):
    """float16 inputs whose logits exceed float16's range: accumulated and kept in float32, never Inf."""
    gen = torch.Generator().manual_seed(27)
    hidden = (torch.rand(2, 6, 4, generator=gen, dtype=torch.float64) * 40 + 200).to(torch.float16)
    weight = (torch.rand(9, 4, generator=gen, dtype=torch.float64) * 40 + 200).to(torch.float16)
    labels = torch.randint(0, 9, (2, 6), generator=gen)
    want = reference_sequence_logprobs(hidden.double(), weight.double(), labels)
    assert (hidden.double() @ weight.double().T).max() > 1.5e5
    got = sk.sequence_logprobs(hidden.to(DEVICE), weight.to(DEVICE), labels.to(DEVICE), backend=backend)
    assert torch.isfinite(got).all(), got
    assert rel_err(got, want) < 1e-3


def test_numpy_scalars_are_accepted():
    case = make_case(seed=28)
    params = case.params(torch.float32)
    opts = case.options()
    labels = opts.pop("labels")
    args = (params["hidden"], params["weight"], labels, case.ref_logps.float().to(DEVICE),
            case.target_probs.float().to(DEVICE))  # fmt: skip
    want = sk.sppo_loss(*args, eta=2.0, softcap=4.0, temperature=0.7, ignore_index=-100, shift=True)
    got = sk.sppo_loss(*args, eta=np.float32(2.0), softcap=np.float64(4.0), temperature=np.float32(0.7),
                       ignore_index=np.int64(-100), shift=True)  # fmt: skip
    torch.testing.assert_close(got, want)
    module = sk.SPPOLoss(eta=np.float64(2.0), softcap=np.float32(4.0), temperature=np.float64(0.7))
    torch.testing.assert_close(module(*args), want)


@pytest.mark.parametrize("name", ["hidden", "weight", "labels", "ref_logps", "target_probs"])
def test_meta_tensors_name_the_argument(name):
    args = {
        "hidden": torch.randn(2, 5, 8),
        "weight": torch.randn(11, 8),
        "labels": torch.randint(0, 11, (2, 5)),
        "ref_logps": torch.zeros(2),
        "target_probs": torch.full((2,), 0.5),
    }
    args[name] = args[name].to("meta")
    with pytest.raises(ValueError, match=rf"{name} is a meta tensor"):
        sk.sppo_loss(**args)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"temperature": 1e-39}, "temperature=1e-39 is so small that the logits overflow float32"),
        ({"temperature": 1e-38, "softcap": 30.0}, "overflow float32"),
        ({"eta": 1e20}, "so large that the SPPO loss of 2 sequences overflows float32"),
    ],
)
def test_options_that_overflow_float32_are_refused(options, match):
    hidden, weight = torch.randn(2, 5, 8), torch.randn(11, 8)
    labels = torch.randint(0, 11, (2, 5))
    with pytest.raises(ValueError, match=match):
        sk.sppo_loss(hidden, weight, labels, torch.zeros(2), torch.full((2,), 0.5), **options)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_largest_accepted_eta_gives_a_finite_loss(reduction):
    hidden, weight = torch.randn(4, 5, 8), torch.randn(11, 8)
    labels = torch.randint(0, 11, (4, 5))
    largest = float(np.sqrt(np.finfo(np.float32).max / 4))
    args = (hidden, weight, labels, torch.zeros(4), torch.tensor([0.0, 1.0, 0.0, 1.0]))
    loss = sk.sppo_loss(*args, eta=largest * 0.999, reduction=reduction)
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="overflows float32"):
        sk.sppo_loss(*args, eta=largest * 1.01, reduction=reduction)
