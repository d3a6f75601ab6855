"""The Triton backend's fused SPPO loss (gradient formed in the forward from an exp(z − m) workspace of whole
sequences, 6NHV) against the float64 reference: reductions, several workspace chunks, the fallback for sequences
too long for the workspace, upstream gradients it cannot reuse, low precision, determinism."""

from __future__ import annotations

import pytest
import torch
from core_cases import DEVICE, make_case
from triton_cases import (
    ETA,
    assert_within_plain_error,
    errors,
    objective,
    plain_torch,
    run_reference,
    run_triton,
    token_rows,
)

from sppo_kernels.autograd import fused_triton
from sppo_kernels.autograd.fused_triton import TritonConfig, TritonSPPOLoss
from sppo_kernels.kernels.exp_workspace import sequence_chunks
from sppo_kernels.kernels.launch import SM90_TILES
from sppo_kernels.losses import SPPOObjective
from sppo_kernels.registry import triton_unavailable_reason

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(triton_unavailable_reason(DEVICE) is not None, reason="triton cannot run here"),
]


def fused_config(vocab: int, item_size: int, rows: int, **kw) -> TritonConfig:
    """A fused-loss config whose workspace holds ``rows`` rows of the vocabulary."""
    return TritonConfig(fused_sppo_loss=True, fused_workspace_bytes=rows * vocab * item_size, poison=True, **kw)


@pytest.fixture
def fused_calls(monkeypatch):
    """Records whether each TritonSPPOLoss forward took the fused path (True) or fell back (False)."""
    calls = []
    original = fused_triton.fused_forward

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(fused_triton, "fused_forward", spy)
    return calls


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("workspace_rows", [21, 1000], ids=["chunk-per-sequence", "one-chunk"])
def test_fused_loss_fp32_matches_reference(reduction, workspace_rows, fused_calls):
    case = make_case(batch=4, seed=20)
    config = fused_config(case.weight.shape[0], 4, workspace_rows)
    got = run_triton(case, torch.float32, config, loss=reduction, function="loss")
    errs = errors(got, run_reference(case, loss=reduction))
    assert all(err <= 1e-4 for err in errs.values()), errs
    assert fused_calls == [True]


@pytest.mark.parametrize("variant", [{"packed": True, "seed": 21}, {"softcap": None, "bias": False, "seed": 22},
                                     {"batch": 5, "length": 9, "width": 19, "vocab": 67, "seed": 23}])  # fmt: skip
def test_fused_loss_layouts(variant, fused_calls):
    case = make_case(**variant)
    got = run_triton(case, torch.float32, fused_config(case.weight.shape[0], 4, 21), function="loss")
    errs = errors(got, run_reference(case))
    assert all(err <= 1e-4 for err in errs.values()), errs
    assert fused_calls == [True]


def test_sequence_longer_than_the_workspace_falls_back(fused_calls):
    case = make_case(seed=24)
    got = run_triton(case, torch.float32, fused_config(case.weight.shape[0], 4, 3), function="loss")
    errs = errors(got, run_reference(case))
    assert all(err <= 1e-4 for err in errs.values()), errs
    assert fused_calls == [False]


def test_gradient_through_logps_and_loss_recomputes():
    """An upstream gradient on logps as well as on the loss is not what the forward formed: recomputed, exact."""
    case = make_case(batch=3, seed=25)
    params = case.params(torch.float32)
    rows = token_rows(params["hidden"], params["weight"], case.labels.to(DEVICE), params["bias"])
    config = fused_config(case.weight.shape[0], 4, 1000)
    args = (rows.hidden, params["weight"], params["bias"], rows.targets, rows.seq_ids, rows.num_seqs, case.softcap,
            case.temperature, config)  # fmt: skip
    loss, logps = TritonSPPOLoss.apply(*args, objective(case), True)
    (3.0 * loss + (logps * torch.tensor([0.5, -1.0, 2.0], device=DEVICE)).sum()).backward()

    ref = case.params(torch.float64, torch.device("cpu"))
    from sppo_kernels.reference import reference_sequence_logprobs

    ref_logps = reference_sequence_logprobs(ref["hidden"], ref["weight"], bias=ref["bias"],
                                            **case.options(torch.device("cpu")))  # fmt: skip
    ref_loss = SPPOObjective(case.ref_logps, case.target_probs, ETA, "mean")(ref_logps)
    (3.0 * ref_loss + (ref_logps * torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)).sum()).backward()
    for name in ("hidden", "weight", "bias"):
        err = (params[name].grad.double().cpu() - ref[name].grad).abs().max() / ref[name].grad.abs().max()
        assert err < 1e-4, (name, float(err))


def test_scaled_upstream_reuses_the_formed_gradient(fused_calls):
    case = make_case(seed=26)
    base = run_triton(case, torch.float32, fused_config(case.weight.shape[0], 4, 1000), function="loss")
    params = case.params(torch.float32)
    rows = token_rows(params["hidden"], params["weight"], case.labels.to(DEVICE), params["bias"])
    loss, _ = TritonSPPOLoss.apply(rows.hidden, params["weight"], params["bias"], rows.targets, rows.seq_ids,
                                   rows.num_seqs, case.softcap, case.temperature,
                                   fused_config(case.weight.shape[0], 4, 1000), objective(case), True)  # fmt: skip
    (0.25 * loss).backward()
    for name in ("hidden", "weight", "bias"):
        torch.testing.assert_close(params[name].grad, 0.25 * base[name], rtol=1e-6, atol=0)
    assert fused_calls == [True, True]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_low_precision_within_plain_torch_error(dtype):
    case = make_case(seed=27)
    want = run_reference(case)
    got = run_triton(case, dtype, fused_config(case.weight.shape[0], 2, 21), function="loss")
    assert got["hidden"].dtype == got["weight"].dtype == dtype
    assert_within_plain_error(errors(got, want), errors(plain_torch(case, dtype), want))


def test_fused_loss_is_bitwise_deterministic():
    case = make_case(seed=28)
    config = fused_config(case.weight.shape[0], 2, 21)
    first, second = (run_triton(case, torch.bfloat16, config, function="loss") for _ in range(2))
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_sequence_chunks():
    assert sequence_chunks([0, 3, 5, 9], 4) == [(0, 1), (1, 2), (2, 3)]
    assert sequence_chunks([0, 3, 5, 9], 5) == [(0, 2), (2, 3)]
    assert sequence_chunks([0, 3, 5, 9], 9) == [(0, 3)]
    assert sequence_chunks([0, 3, 3, 3, 7], 4) == [(0, 3), (3, 4)]  # empty sequences ride along
    assert sequence_chunks([0, 0, 0], 4) == []
    assert sequence_chunks([0, 3, 9], 5) is None


def test_public_api_with_a_configured_backend(fused_calls):
    import sppo_kernels as sk

    case = make_case(seed=29)
    backend = sk.get_backend("triton", fused_sppo_loss=True, poison=True,
                             fused_workspace_bytes=21 * case.weight.shape[0] * 4)  # fmt: skip
    params = case.params(torch.float32)
    opts = case.options()
    tensors = (params["hidden"], params["weight"], opts.pop("labels"), case.ref_logps.to(DEVICE),
               case.target_probs.to(DEVICE))  # fmt: skip
    loss = sk.sppo_loss(*tensors, eta=2.0, bias=params["bias"], backend=backend, **opts)
    loss.backward()
    got = {"out": loss.detach(), **{k: v.grad for k, v in params.items()}}
    want = run_reference(case)
    errs = errors(got | {"logps": want["logps"]}, want)
    assert all(err <= 1e-4 for err in errs.values()), errs
    assert fused_calls == [True]


@pytest.mark.parametrize("release", sorted(SM90_TILES))
def test_gpu_tiles_of_every_release(release):
    """The sm_90 16-bit tile shapes of each Triton release (not only the small interpreter ones) through the forward,
    the chunked backward and the fused loss: in float32 in the interpreter (exact), in bf16 on a GPU (those tiles'
    float32 operands would not fit its shared memory)."""
    block = SM90_TILES[release][("fused", 2)]
    dtype = torch.float32 if DEVICE.type == "cpu" else torch.bfloat16
    case = make_case(batch=2, length=40, width=83, vocab=300, seed=30)
    want = run_reference(case)
    for fused in (False, True):
        config = TritonConfig(forward_block=block, backward_block=block, fused_block=block, fused_sppo_loss=fused,
                              chunk_bytes=1, poison=True)  # fmt: skip
        errs = errors(run_triton(case, dtype, config, function="loss"), want)
        if dtype == torch.float32:
            assert all(err <= 1e-4 for err in errs.values()), (fused, errs)
        else:
            assert_within_plain_error(errs, errors(plain_torch(case, dtype), want))
