"""The Triton backend's own accounting (docs/triton_design.md), checked against the code: the forward's work items
fill whole waves, the soft-cap epilogue's tanh is within two float32 ulps, dH is accumulated by one float32-output
GEMM per chunk with no scratch buffer, and the default backward's extra memory at gemma2-9b stays within 256 MiB.

The memory and GEMM checks run the chunked backward's real host code on ``meta`` tensors of the gemma2-9b preset
(no memory, no device; the one Triton launch is stubbed) and record every allocation and every op it issues."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from core_cases import DEVICE, make_case
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from triton_cases import assert_within_plain_error, errors, plain_torch, run_reference, run_triton

from sppo_kernels.autograd.fused_triton import TritonConfig
from sppo_kernels.kernels import logit_grad
from sppo_kernels.kernels.launch import SM90_TILES, LogitTransform, plan_bytes
from sppo_kernels.kernels.logit_tile import tanh
from sppo_kernels.kernels.lse_forward import wave_splits
from sppo_kernels.kernels.rows import ROW_VECTOR_BYTES, ScoredRows
from sppo_kernels.registry import triton_unavailable_reason

GEMMA = {"rows": 8192, "vocab": 256000, "width": 3584}  # the gemma2-9b preset at N = 8192 scored rows, bf16
MIB = 2**20


# ---------------------------------------------------------------- the forward's waves


def wave_efficiency(items: int, programs: int) -> float:
    return items / (programs * triton.cdiv(items, programs))


@pytest.mark.parametrize("v_blocks", [1000, 2000, 501, 1002])  # gemma2-9b, llama3-8b at BLOCK_V = 256, 128
def test_forward_work_items_are_whole_waves_at_the_presets(v_blocks):
    """64 row blocks (N = 8192, BLOCK_N = 128) on 132 SMs in groups of 16: the old rule (the fewest splits that keep a
    group's programs busy, 9) gave 576 items, 4.36 waves (87 %); now 33 splits, 2112 items, 16 whole waves."""
    assert wave_efficiency(64 * 9, 132) == pytest.approx(0.873, abs=1e-3)
    splits = wave_splits(64, v_blocks, 132, 16)
    assert splits == 33 and 64 * splits % 132 == 0


def test_forward_split_counts_fill_waves_for_every_row_count():
    """Prompts and padding leave any number of scored rows: every row-block count up to 64 gets >= 95 % of whole
    waves, and at least as many items as one group needs to keep every program busy."""
    for row_blocks in range(1, 65):
        splits = wave_splits(row_blocks, 1000, 132, 16)
        assert splits * min(row_blocks, 16) >= 132, row_blocks
        assert wave_efficiency(row_blocks * splits, 132) >= 0.95, (row_blocks, splits)


# ---------------------------------------------------------------- the soft-cap epilogue


@triton.jit
def _tanh_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, tanh(tl.load(x_ptr + offs, mask=mask, other=0.0)), mask=mask)


@pytest.mark.gpu
@pytest.mark.skipif(triton_unavailable_reason(DEVICE) is not None, reason="triton cannot run here")
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # e^{2x} = inf is the intended limit
def test_tanh_with_one_exp_and_one_division_is_within_two_float32_ulps():
    x = torch.cat([torch.linspace(-12, 12, 1001), torch.tensor([0.0, 1e-7, -1e-7, 3e-4, 45.0, -45.0, 1e4, -1e4])])
    x = x.float().to(DEVICE)
    out = torch.full_like(x, float("nan"))
    _tanh_kernel[(1,)](x, out, x.numel(), BLOCK=triton.next_power_of_2(x.numel()))
    want = torch.tanh(x.double())
    # two float32 ulps of 1.0 with exact exp and division (the interpreter: max seen 1.6e-7); a GPU's ex2.approx and
    # div.full are each within 2 ulps, so allow twice that there
    bound = 2.4e-7 if DEVICE.type == "cpu" else 4.8e-7
    assert (out.double() - want).abs().max() <= bound
    assert out[-4:].tolist() == [1.0, -1.0, 1.0, -1.0]  # saturates exactly, no NaN from inf / inf


def test_softcap_transform_passes_reciprocals():
    args = LogitTransform(softcap=30.0, temperature=0.5, has_bias=False, dot_precision="tf32").kernel_args()
    assert args["inv_softcap"] == 1 / 30 and args["cap_scale"] == 60.0 and args["inv_temperature"] == 2.0


# ---------------------------------------------------------------- dH accumulation and memory, on meta tensors


class Recorder(TorchDispatchMode):
    """Every aten op issued inside, and the bytes of every storage it creates (storages seen before don't count)."""

    def __init__(self, existing: list[torch.Tensor]) -> None:
        super().__init__()
        self.seen = {t.untyped_storage()._cdata for t in existing}
        self.allocated: list[int] = []
        self.ops: list[tuple[object, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append((func, args))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage()._cdata not in self.seen:
                self.seen.add(tensor.untyped_storage()._cdata)
                self.allocated.append(tensor.untyped_storage().nbytes())
        return out


def gemma_backward_on_meta(monkeypatch, release: str, dh_accumulation: str = "float32"):
    """(recorder, plan, dH accumulator args) of the default chunked backward at gemma2-9b, run on meta tensors."""
    n, vocab, width = GEMMA["rows"], GEMMA["vocab"], GEMMA["width"]
    meta = {"device": "meta"}
    hidden = torch.empty(n, width, dtype=torch.bfloat16, **meta)
    weight = torch.empty(vocab, width, dtype=torch.bfloat16, **meta)
    rows = ScoredRows(torch.zeros(n, dtype=torch.long, **meta), torch.zeros(n, dtype=torch.long, **meta), 8)
    lse, row_grad = torch.empty(n, **meta), torch.empty(n, **meta)
    monkeypatch.setattr(ScoredRows, "count", lambda self: n)
    monkeypatch.setattr(logit_grad, "logit_grad", lambda *args: None)  # the Triton launch: nothing to run on meta
    block, config = SM90_TILES[release][("backward", 2)], TritonConfig()
    transform = LogitTransform(30.0, 1.0, False, "tf32")
    existing = [hidden, weight, lse, row_grad, rows.order, rows.key, rows.targets, rows.starts, rows.in_range]
    with Recorder(existing) as recorder:
        grads = logit_grad.chunked_backward(hidden, weight, None, rows, lse, row_grad, (True, True, False), transform,
                                            block, config.chunk_bytes, dh_accumulation, False)  # fmt: skip
    plan = logit_grad.chunked_backward_plan(n, vocab, width, torch.bfloat16, block, config.chunk_bytes,
                                            (True, True, False), dh_accumulation)  # fmt: skip
    return recorder, plan, grads


@pytest.mark.parametrize("release", sorted(SM90_TILES))
def test_default_backward_extra_memory_at_gemma2_9b_is_at_most_256_mib(monkeypatch, release):
    """The buffers the code allocates (its plan) are all it allocates besides dH and dW, and with the row vectors
    they stay within 256 MiB (was 593 MiB: a 256 MiB dA chunk, a 112 MiB dH GEMM scratch and a 56 MiB dH cast)."""
    recorder, plan, (grad_h, grad_w, _) = gemma_backward_on_meta(monkeypatch, release)
    outputs = grad_h.untyped_storage().nbytes() + grad_w.untyped_storage().nbytes()
    assert sum(recorder.allocated) == plan_bytes(plan)["total"] + outputs, (recorder.allocated, plan_bytes(plan))
    total = plan_bytes(plan)["total"] + ROW_VECTOR_BYTES * GEMMA["rows"]
    assert total <= 256 * MIB, plan_bytes(plan)
    assert "dH float32 accumulator" in plan and plan["dH float32 accumulator"].dtype == torch.float32


def test_dh_is_accumulated_by_one_float32_gemm_per_chunk(monkeypatch):
    """One ``addmm(out_dtype=float32)`` into the accumulator per vocabulary chunk (beta = 0 for the first, 1 after),
    and no separate add on it: no 16-bit product, no scratch buffer."""
    recorder, plan, _ = gemma_backward_on_meta(monkeypatch, "3.6")
    chunks = triton.cdiv(GEMMA["vocab"], plan["dA chunk"].shape[1])
    gemms = [args for func, args in recorder.ops if func is torch.ops.aten.addmm.dtype_out]
    assert len(gemms) == chunks > 1
    accumulator = gemms[0][0]
    assert all(args[0].untyped_storage()._cdata == accumulator.untyped_storage()._cdata for args in gemms)
    adds = [func for func, args in recorder.ops if "add" in str(func) and "addmm" not in str(func)]
    assert adds == [] and not any(name.startswith("dH 16-bit") for name in plan)


def test_rounded_accumulation_is_the_explicit_fallback(monkeypatch):
    recorder, plan, _ = gemma_backward_on_meta(monkeypatch, "3.6", dh_accumulation="rounded")
    assert plan["dH 16-bit chunk product"].dtype == torch.bfloat16
    assert not any(func is torch.ops.aten.addmm.dtype_out for func, _ in recorder.ops)


def test_float32_gemm_availability_by_torch_version():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert logit_grad.float32_gemm_available(cuda, "2.11.0+cu130") and logit_grad.float32_gemm_available(cuda, "2.10.0")
    assert not logit_grad.float32_gemm_available(cuda, "2.9.1")
    assert logit_grad.float32_gemm_available(cpu, "2.3.0")  # emulated by an upcast GEMM on the CPU
    assert logit_grad.resolve_dh_accumulation("auto", cpu, torch.bfloat16) == "float32"
    assert logit_grad.resolve_dh_accumulation("rounded", cpu, torch.float32) == "float32"


@pytest.mark.gpu
@pytest.mark.skipif(triton_unavailable_reason(DEVICE) is not None, reason="triton cannot run here")
def test_float32_accumulation_is_more_exact_than_rounding_each_chunk():
    """bf16 inputs, one vocabulary block per chunk (many chunks): both modes stay within plain bf16 torch's error
    against float64, and accumulating in float32 loses less on dH (relative L2 error) than rounding each chunk's
    product to 16 bits; dW does not depend on it."""
    case = make_case(batch=4, length=17, width=48, vocab=400, seed=31)
    want = run_reference(case)
    plain = errors(plain_torch(case, torch.bfloat16), want)
    got = {}
    for mode in ("float32", "rounded"):
        got[mode] = run_triton(case, torch.bfloat16, TritonConfig(chunk_bytes=1, dh_accumulation=mode, poison=True))
        assert_within_plain_error(errors(got[mode], want), plain)
    l2 = {
        mode: float((g["hidden"].double().cpu() - want["hidden"]).norm() / want["hidden"].norm())
        for mode, g in got.items()
    }
    assert l2["float32"] < 0.95 * l2["rounded"], l2
    assert torch.equal(got["float32"]["weight"], got["rounded"]["weight"])
