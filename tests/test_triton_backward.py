"""The Triton backend's atomic-free chunked backward (and the atomic one kept for measurement), in the interpreter
on CPU tensors or on a GPU: float64 reference, low-precision bounds, determinism, poisoned buffers, options."""

from __future__ import annotations

import pytest
import torch
from core_cases import DEVICE, make_case
from triton_cases import (
    assert_within_plain_error,
    errors,
    plain_torch,
    run_reference,
    run_triton,
    token_rows,
)

from sppo_kernels.autograd import fused_triton
from sppo_kernels.autograd.fused_triton import BlockConfig, TritonConfig
from sppo_kernels.kernels.exp_workspace import fused_chunk_rows
from sppo_kernels.kernels.launch import SM90_TILES
from sppo_kernels.kernels.logit_grad import chunk_columns
from sppo_kernels.kernels.lse_forward import wave_splits
from sppo_kernels.registry import triton_unavailable_reason

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(triton_unavailable_reason(DEVICE) is not None, reason="triton cannot run here"),
]

# chunk_bytes=1: every dA chunk is one block of columns wide, so each case runs several vocabulary chunks.
CHUNKED = TritonConfig(chunk_bytes=1, poison=True)
ATOMIC = TritonConfig(backward="atomic", poison=True)
CASES = {
    "softcap-bias-temperature": {},
    "odd-sizes": {"batch": 5, "length": 9, "width": 19, "vocab": 67, "seed": 2},
    "packed": {"packed": True, "seed": 1},
    "nocap-nobias-noshift": {"softcap": None, "temperature": 1.3, "shift": False, "bias": False, "seed": 3},
}


@pytest.mark.parametrize("config", [CHUNKED, ATOMIC], ids=["chunked", "atomic"])
@pytest.mark.parametrize("variant", CASES)
def test_fp32_matches_reference(variant, config):
    case = make_case(**CASES[variant])
    errs = errors(run_triton(case, torch.float32, config), run_reference(case))
    assert all(err <= 1e-4 for err in errs.values()), errs  # all(): a NaN (unwritten poisoned element) fails


@pytest.mark.parametrize("release", sorted(SM90_TILES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sm90_tiles_of_every_release(release, dtype):
    """The GPU tile shapes of each Triton release (not only the small interpreter ones), with the forward's
    vocabulary split over several programs and the backward over several chunks."""
    size = 4 if dtype == torch.float32 else 2
    tiles = {f"{kind}_block": SM90_TILES[release][(kind, size)] for kind in ("forward", "backward")}
    case = make_case(batch=2, length=40, width=83, vocab=300, seed=13)
    forward = tiles["forward_block"]
    splits = wave_splits(-(-80 // forward.block_n), -(-300 // forward.block_v), 4, forward.group_n)
    assert DEVICE.type == "cuda" or splits > 1
    got = run_triton(case, dtype, TritonConfig(chunk_bytes=1, poison=True, **tiles))
    want = run_reference(case)
    if dtype == torch.float32:
        errs = errors(got, want)
        assert all(err <= 1e-4 for err in errs.values()), errs
    else:
        assert_within_plain_error(errors(got, want), errors(plain_torch(case, dtype), want))


def test_chunked_nonuniform_upstream_and_masked_rows():
    case = make_case(batch=4, seed=4)  # prompts, right padding and one fully masked sequence
    seq_upstream = torch.tensor([0.3, -1.7, 2.2, 0.9])
    got = run_triton(case, torch.float32, CHUNKED, loss=None, seq_upstream=seq_upstream)
    errs = errors(got, run_reference(case, loss=None, seq_upstream=seq_upstream))
    assert all(err <= 1e-4 for err in errs.values()), errs
    masked_rows = (case.labels[:, 1:] == -100).to(DEVICE)  # shift: row t scores label t + 1
    assert torch.all(got["hidden"][:, :-1][masked_rows] == 0)
    assert torch.all(got["hidden"][:, -1] == 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_plain_torch_error(dtype):
    case = make_case(seed=5)
    want = run_reference(case)
    got = run_triton(case, dtype, CHUNKED)
    assert got["hidden"].dtype == got["weight"].dtype == got["bias"].dtype == dtype
    assert_within_plain_error(errors(got, want), errors(plain_torch(case, dtype), want))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_backward_is_bitwise_deterministic(dtype):
    case = make_case(seed=6)
    first, second = (run_triton(case, dtype, CHUNKED) for _ in range(2))
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_chunk_size_does_not_change_the_result_beyond_rounding():
    case = make_case(seed=7)
    small = run_triton(case, torch.float32, CHUNKED)
    whole = run_triton(case, torch.float32, TritonConfig(poison=True))
    assert errors(small, whole)["weight"] < 1e-6
    assert torch.equal(small["logps"], whole["logps"])


def test_partial_gradients():
    case = make_case(seed=8)
    params = case.params(torch.float32)
    params["weight"].requires_grad_(False)
    rows = token_rows(params["hidden"], params["weight"], case.labels.to(DEVICE))
    logps = fused_triton.TritonSequenceLogprobs.apply(
        rows.hidden, params["weight"], None, rows.targets, rows.seq_ids, rows.num_seqs, 4.0, 0.7, CHUNKED
    )
    logps.sum().backward()
    assert params["weight"].grad is None and torch.isfinite(params["hidden"].grad).all()


def test_double_backward_raises():
    case = make_case(seed=9, bias=False)
    hidden = case.hidden.float().to(DEVICE).requires_grad_(True)
    weight = case.weight.float().to(DEVICE).requires_grad_(True)
    rows = token_rows(hidden, weight, case.labels.to(DEVICE))
    logps = fused_triton.TritonSequenceLogprobs.apply(
        rows.hidden, weight, None, rows.targets, rows.seq_ids, rows.num_seqs, None, 1.0, CHUNKED
    )
    upstream = torch.ones_like(logps, requires_grad=True)
    (grad,) = torch.autograd.grad(logps, hidden, upstream, create_graph=True)
    with pytest.raises(RuntimeError, match="first order only"):
        grad.sum().backward()


def test_no_scored_rows():
    case = make_case(seed=10)
    case.labels[:] = -100
    got = run_triton(case, torch.float32, CHUNKED, loss=None, seq_upstream=torch.ones(case.num_seqs))
    assert torch.all(got["logps"] == 0)
    assert all(torch.all(got[k] == 0) for k in ("hidden", "weight", "bias"))


def test_chunk_columns_and_workspace_rows():
    assert chunk_columns(8192, 256000, 2, TritonConfig().chunk_bytes, 128) == 4096
    assert chunk_columns(8192, 128256, 2, 256 << 20, 128) == 16384
    assert chunk_columns(10, 150, 4, 1, 64) == 64  # at least one block of columns
    assert chunk_columns(10, 150, 4, 1 << 20, 64) == 150  # the whole vocabulary fits
    assert fused_chunk_rows(256000, 2, 1 << 30) == 2097
    assert fused_chunk_rows(256000, 2, 1) == 1


def test_config_validation():
    with pytest.raises(ValueError, match="backward"):
        TritonConfig(backward="fast")
    with pytest.raises(ValueError, match="fp32_precision"):
        TritonConfig(fp32_precision="tf32")
    with pytest.raises(ValueError, match="dh_accumulation"):
        TritonConfig(dh_accumulation="bf16")
    with pytest.raises(ValueError, match="power of two"):
        BlockConfig(96, 128, 64)
    with pytest.raises(TypeError, match="forward_block"):
        TritonConfig(forward_block=(128, 128, 64))


def test_tf32x3_option_is_accepted():
    """The interpreter computes fp32 dots exactly whatever the precision; on a GPU tf32x3 is ~fp32-accurate."""
    case = make_case(seed=11, batch=2)
    got = run_triton(case, torch.float32, TritonConfig(fp32_precision="tf32x3", chunk_bytes=1, poison=True))
    errs = errors(got, run_reference(case))
    assert all(err <= (1e-4 if DEVICE.type == "cpu" else 1e-3) for err in errs.values()), errs
