"""The C++ CPU backend in depth: several row chunks and vocabulary tiles at odd sizes, the gradient formed in the
forward and its fallbacks, low precision, threads, workspace, poisoned outputs and the build fallback.

The backend-generic checks (every backend against the float64 reference) live in test_core_backends.py; this file
shrinks the tiles so that small inputs span many chunks and tiles, and checks what only this backend does.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from core_cases import make_case, rel_err
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_core_backends import ETA, backend_grads, plain_low_precision_errors, reference_grads

import sppo_kernels as sk
from sppo_kernels import _cpu_extension
from sppo_kernels.registry import cpu_unavailable_reason, resolve, triton_unavailable_reason

CPU = torch.device("cpu")
UNAVAILABLE = cpu_unavailable_reason(CPU)
needs_extension = pytest.mark.skipif(UNAVAILABLE is not None, reason=f"cpu backend unavailable: {UNAVAILABLE}")

if UNAVAILABLE is None:
    from sppo_kernels.autograd import fused_cpu

# Tilings, as (rows per chunk, columns per tile); test cases have sequences of up to 21 rows and V = 150.
TILINGS = {
    "rows7-cols13": (7, 13),  # sequences longer than the block: forward, then backward by recompute
    "rows45-cols37": (45, 37),  # the block holds several whole sequences
    "rows1-cols1": (1, 1),  # degenerate: one row, one column
}


def poisoned(tiling: fused_cpu.Tiling | None = None) -> sk.Backend:
    """The "cpu" backend with ``tiling`` (default: the default tiling) and every buffer the C++ returns starting
    as NaN, so any element it fails to write fails the comparison."""
    return sk.get_backend("cpu", poison=True, **({} if tiling is None else {"tiling": tiling}))


def tiled(rows: int, cols: int, vocab: int) -> sk.Backend:
    """The poisoned "cpu" backend cutting every pass into ``rows`` rows per chunk and ``cols`` columns per tile."""
    tiling = fused_cpu.Tiling(rows * vocab, chunk_rows=rows, tile_elements=rows * cols, max_tile_cols=cols)
    assert tiling.block(vocab) == tiling.chunk(vocab) == (rows, min(cols, vocab))
    return poisoned(tiling)


def errors_against_reference(case, backend: sk.Backend, dtype=torch.float32, **kw) -> dict[str, float]:
    """Relative errors (loss or log-probs, log-probs, gradients) of a "cpu" backend against float64 (NaN: unwritten
    or non-finite output; compare with ``all(e <= bound ...)``, which fails on NaN, never with ``max``)."""
    ref_out, ref_logps, ref_params = reference_grads(case, **kw)
    out, logps, params = backend_grads(case, backend, dtype, **kw)
    errors = {"out": rel_err(out, ref_out), "logps": rel_err(logps, ref_logps)}
    errors.update({name: rel_err(p.grad, ref_params[name].grad) for name, p in params.items() if p is not None})
    return errors


@needs_extension
@pytest.mark.parametrize("tiling", TILINGS)
@pytest.mark.parametrize(
    "variant",
    [
        {},
        {"softcap": None, "temperature": 1.7, "bias": False, "shift": False},
        {"packed": True, "softcap": 2.5, "temperature": 0.6, "seed": 1},
        {"batch": 5, "length": 17, "width": 23, "vocab": 131, "seed": 2},
    ],
    ids=["cap-bias-shift", "nocap-nobias-noshift-temp", "packed", "odd"],
)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_sppo_loss_fp32_matches_reference(tiling, variant, reduction):
    """reduction="none" backpropagates a non-uniform gradient, which takes the recompute path."""
    case = make_case(**variant)
    cpu = tiled(*TILINGS[tiling], case.weight.shape[0])
    errors = errors_against_reference(case, cpu, reduction=reduction)
    assert all(e <= 1e-4 for e in errors.values()), errors


@needs_extension
@pytest.mark.parametrize("tiling", TILINGS)
@pytest.mark.parametrize("packed", [False, True])
def test_sequence_logprobs_random_upstream(tiling, packed):
    case = make_case(batch=4, packed=packed, seed=3)
    cpu = tiled(*TILINGS[tiling], case.weight.shape[0])
    upstream = torch.randn(4, generator=torch.Generator().manual_seed(0)) * 3
    errors = errors_against_reference(case, cpu, upstream=upstream)
    assert all(e <= 1e-4 for e in errors.values()), errors


@needs_extension
def test_default_tiling_with_sequences_longer_than_the_block():
    case = make_case(batch=3, length=230, width=24, vocab=120000, softcap=30.0, fully_masked=False, seed=4)
    rows, cols = fused_cpu.Tiling().block(120000)
    scored = [int((y[1:] != -100).sum()) for y in case.labels]
    assert min(scored) <= rows < max(scored) and cols < 120000, (scored, rows, cols)  # both paths, several tiles
    errors = errors_against_reference(case, poisoned())
    assert all(e <= 1e-4 for e in errors.values()), errors


@needs_extension
def test_fitting_and_long_sequences_in_one_batch():
    """The block holds some sequences whole (gradient in the forward) but not the others (recomputed)."""
    case = make_case(batch=6, length=21, packed=True, seed=15)
    scored = [int((y[1:] != -100).sum()) for y in case.labels.split(case.cu_seqlens.diff().tolist())]
    rows = sorted(scored)[len(scored) // 2]
    assert min(scored) <= rows < max(scored), scored
    cpu = poisoned(fused_cpu.Tiling(workspace_elements=rows * 150, chunk_rows=5, tile_elements=rows * 17))
    for reduction in ("mean", "none"):
        errors = errors_against_reference(case, cpu, reduction=reduction)
        assert all(e <= 1e-4 for e in errors.values()), errors


@needs_extension
def test_float64_inputs_stay_float64():
    case = make_case(seed=5)
    cpu = tiled(7, 13, case.weight.shape[0])
    _, ref_logps, ref_params = reference_grads(case)
    _, logps, params = backend_grads(case, cpu, torch.float64)
    assert logps.dtype == torch.float64
    assert rel_err(logps, ref_logps) < 1e-12
    assert all(rel_err(p.grad, ref_params[k].grad) < 1e-10 for k, p in params.items())


@needs_extension
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_plain_torch_error(dtype):
    case = make_case(seed=6)
    cpu = tiled(7, 13, case.weight.shape[0])
    plain = plain_low_precision_errors(case, dtype)
    ours = errors_against_reference(case, cpu, dtype)
    assert all(ours[k] <= plain[k] + 1e-3 for k in ours), (ours, plain)


@needs_extension
def test_bf16_gradient_correction_keeps_the_float32_paths_error():
    """bf16 gradient GEMMs take da rounded to bf16; its large entries are corrected exactly on the side. That must
    give the error of da in two parts (hi + lo, ~float32): without the correction this case is ~20% worse."""
    case = make_case(batch=4, length=40, width=64, vocab=700, softcap=None, temperature=1.0, seed=21)
    for name, scale in (("hidden", 1.0), ("weight", 3.0), ("bias", 1.0)):  # peaked softmax; exact bf16 inputs
        setattr(case, name, getattr(case, name).mul(scale).bfloat16().double())
    _, _, ref = reference_grads(case)
    tiling = fused_cpu.Tiling(13 * 700, chunk_rows=13, tile_elements=13 * 100, max_tile_cols=100)
    errors = {}
    for mode in ("corrected", "split"):
        _, _, params = backend_grads(case, poisoned(tiling).with_options(low_precision_grad=mode), torch.bfloat16)
        l2 = {k: (p.grad.double() - ref[k].grad).norm() / ref[k].grad.norm() for k, p in params.items()}
        errors[mode] = {k: float(v) for k, v in l2.items()}
    assert all(errors["corrected"][k] <= 1.02 * errors["split"][k] for k in errors["split"]), errors


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_aten_gemms(dtype):
    """blas="aten" (torch without MKL): the same results through at::mm (bf16 tiles upcast)."""
    case = make_case(seed=22)
    vocab = case.weight.shape[0]
    aten = tiled(7, 13, vocab).with_options(blas="aten")
    ours = errors_against_reference(case, aten, dtype)
    if dtype == torch.float32:
        assert all(e <= 1e-4 for e in ours.values()), ours
    else:
        plain = plain_low_precision_errors(case, dtype)
        assert all(ours[k] <= plain[k] + 1e-3 for k in ours), (ours, plain)


@pytest.mark.parametrize("option", [{"blas": "mkl"}, {"low_precision_grad": "round"}])
def test_bad_options_are_refused(option):
    with pytest.raises(ValueError, match=next(iter(option))):
        sk.get_backend("cpu", **option)


@needs_extension
def test_gradient_formed_in_forward_is_used_only_when_valid(monkeypatch):
    """Scalar losses and uniform "none" gradients take the formed gradient; anything else recomputes."""
    calls = []
    recompute = fused_cpu._Rows.backward
    monkeypatch.setattr(fused_cpu._Rows, "backward", lambda *a: calls.append(1) or recompute(*a))
    case = make_case(seed=7)
    cpu = tiled(7, 13, case.weight.shape[0])

    def run(reduction: str, upstream: torch.Tensor | None, logps_weight: torch.Tensor | None = None):
        params = case.params(torch.float32)
        opts = case.options()
        loss, logps = sk.sppo_loss(params["hidden"], params["weight"], opts.pop("labels"), case.ref_logps.float(),
                                   case.target_probs.float(), eta=ETA, bias=params["bias"], reduction=reduction,
                                   backend=cpu, return_logps=True, **opts)  # fmt: skip
        total = (loss * (1.0 if upstream is None else upstream)).sum()
        if logps_weight is not None:
            total = total + (logps * logps_weight).sum()
        total.backward()
        return params

    run("mean", None)
    run("sum", torch.tensor(2.5))
    run("none", torch.full((case.num_seqs,), 0.7))
    assert calls == []
    run("none", torch.linspace(0.5, 2.0, case.num_seqs))
    run("mean", None, logps_weight=torch.linspace(-1.0, 1.0, case.num_seqs))
    assert len(calls) == 2

    # Both pieces against float64 autograd: the loss plus a weighted sum of the log-probs.
    params = case.params(torch.float64)
    opts = case.options()
    logps = sk.sequence_logprobs(params["hidden"], params["weight"], bias=params["bias"], backend="torch", **opts)
    loss = (logps - case.ref_logps - ETA * (case.target_probs - 0.5)).square().mean()
    (loss + (logps * torch.linspace(-1.0, 1.0, case.num_seqs).double()).sum()).backward()
    ours = run("mean", None, logps_weight=torch.linspace(-1.0, 1.0, case.num_seqs))
    assert all(rel_err(ours[k].grad, params[k].grad) < 1e-4 for k in ("hidden", "weight", "bias"))


@needs_extension
def test_second_backward_recomputes():
    case = make_case(seed=8)
    cpu = tiled(7, 13, case.weight.shape[0])
    _, _, ref_params = reference_grads(case)
    params = case.params(torch.float32)
    opts = case.options()
    loss = sk.sppo_loss(params["hidden"], params["weight"], opts.pop("labels"), case.ref_logps.float(),
                        case.target_probs.float(), eta=ETA, bias=params["bias"], backend=cpu, **opts)  # fmt: skip
    loss.backward(retain_graph=True)
    loss.backward()
    assert all(rel_err(params[k].grad, 2 * ref_params[k].grad) < 1e-4 for k in params)


@needs_extension
def test_frozen_head_and_no_grad():
    """Only hidden needs a gradient (dW is never formed), and under no_grad nothing is."""
    case = make_case(seed=9)
    cpu = tiled(7, 13, case.weight.shape[0])
    opts = case.options()
    hidden = case.hidden.float().requires_grad_(True)
    args = (hidden, case.weight.float(), opts.pop("labels"), case.ref_logps.float(), case.target_probs.float())
    kw = {"eta": ETA, "bias": case.bias.float(), "backend": cpu, **opts}
    with torch.no_grad():
        frozen = sk.sppo_loss(*args, **kw)
    loss = sk.sppo_loss(*args, **kw)
    torch.testing.assert_close(loss.detach(), frozen)
    loss.backward()
    _, _, ref_params = reference_grads(case)
    assert rel_err(hidden.grad, ref_params["hidden"].grad) < 1e-4


@needs_extension
def test_non_contiguous_low_precision_inputs():
    case = make_case(seed=10, vocab=97)
    cpu = tiled(7, 13, 97)
    hidden = case.hidden.bfloat16().transpose(0, 1).contiguous().transpose(0, 1)
    weight = case.weight.bfloat16().t().contiguous().t()
    assert not hidden.is_contiguous() and not weight.is_contiguous()
    opts = case.options()
    got = sk.sequence_logprobs(hidden, weight, opts.pop("labels"), bias=case.bias.bfloat16(), backend=cpu, **opts)
    want = sk.sequence_logprobs(hidden.double(), weight.double(), case.labels, bias=case.bias.bfloat16().double(),
                                backend="torch", **opts)  # fmt: skip
    assert rel_err(got, want) < 1e-5  # the same bf16 inputs: float32 accumulation makes the result exact-ish


@needs_extension
def test_fully_masked_batch_writes_zeros():
    """No row scores: every (poisoned) output must still be written: zero log-probs and zero gradients."""
    case = make_case(seed=11)
    params = case.params(torch.float32)
    opts = case.options()
    labels = torch.full_like(opts.pop("labels"), -100)
    loss, logps = sk.sppo_loss(params["hidden"], params["weight"], labels, case.ref_logps.float(),
                               case.target_probs.float(), eta=ETA, bias=params["bias"], backend=poisoned(),
                               return_logps=True, **opts)  # fmt: skip
    loss.backward()
    assert torch.equal(logps, torch.zeros_like(logps))
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in params.values())


@needs_extension
@pytest.mark.parametrize("where", ["hidden", "weight"])
def test_nan_propagates(where):
    case = make_case(seed=12)
    cpu = tiled(7, 13, case.weight.shape[0])
    params = case.params(torch.float32)
    opts = case.options()
    labels = opts.pop("labels")
    with torch.no_grad():
        if where == "hidden":
            params["hidden"][0, -3, 5] = float("nan")  # a scored row of sequence 0 (row -3 predicts row -2)
        else:
            params["weight"][11, 2] = float("nan")
    logps = sk.sequence_logprobs(params["hidden"], params["weight"], labels, bias=params["bias"], backend=cpu,
                                 **opts)  # fmt: skip
    assert not torch.isfinite(logps).all()
    loss = sk.sppo_loss(params["hidden"], params["weight"], labels, case.ref_logps.float(), case.target_probs.float(),
                        bias=params["bias"], backend=cpu, **opts)  # fmt: skip
    assert not torch.isfinite(loss)
    loss.backward()
    assert not torch.isfinite(params["weight"].grad).all()


@needs_extension
def test_thread_count_is_torchs():
    case = make_case(seed=13)
    cpu = tiled(7, 13, case.weight.shape[0])
    before = torch.get_num_threads()
    ext = _cpu_extension.extension()
    assert ext.num_threads() == before
    results = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            assert ext.num_threads() == threads
            results[threads] = backend_grads(case, cpu, torch.float32)
    finally:
        torch.set_num_threads(before)
    (_, logps1, params1), (_, logps2, params2) = results[1], results[2]
    assert torch.equal(logps1, logps2)  # the tiles' log-sum-exp are merged in a fixed order
    assert all(rel_err(params2[k].grad, params1[k].grad) < 1e-6 for k in params1)


def peak_rss_growth(dtype: str, length: int) -> dict:
    """Peak RSS growth of one fused SPPO forward + backward (B = 2 sequences of ``length``, H = 64, V = 50000) in a
    fresh process, with the stated workspace bound and the outputs' bytes."""
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("cannot reset the RSS high-water mark here")
    script = textwrap.dedent(
        f"""
        import json, torch, sppo_kernels as sk
        from sppo_kernels.autograd import fused_cpu
        torch.manual_seed(0)
        B, T, H, V, dtype = 2, {length}, 64, 50000, torch.{dtype}
        hidden = torch.randn(B, T, H).to(dtype).requires_grad_(True)
        weight = (torch.randn(V, H) * 0.05).to(dtype).requires_grad_(True)
        labels = torch.randint(0, V, (B, T))
        ref, probs = torch.full((B,), -2000.0), torch.full((B,), 0.6)
        sk.sppo_loss(hidden[:, :2], weight, labels[:, :2], ref, probs, backend="cpu")  # load, no big allocations

        def kib(key):
            return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key + ":"))

        open("/proc/self/clear_refs", "w").write("5")
        base = kib("VmRSS")
        sk.sppo_loss(hidden, weight, labels, ref, probs, backend="cpu").backward()
        growth = (kib("VmHWM") - base) * 1024
        bound = fused_cpu.workspace_bytes(V, H, B * (T - 1), dtype, seeded=True)
        outputs = dtype.itemsize * (V * H + B * T * H)
        print(json.dumps({{"growth": growth, "workspace": bound, "outputs": outputs, "n_by_v": 4 * B * (T - 1) * V}}))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@needs_extension
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_workspace_bound_and_no_n_by_v_buffer(dtype):
    """Peak RSS growth stays within the stated workspace plus the outputs, far below one N x V float32 buffer
    (float32: the seeded block; bfloat16: the two sweeps, dW summed per vocabulary tile: no float32 [V, H] buffer)."""
    m = peak_rss_growth(dtype, 256)
    assert m["growth"] <= m["workspace"] + m["outputs"] + (12 << 20), m
    assert m["growth"] < 0.7 * m["n_by_v"], m


@needs_extension
def test_seeded_block_never_holds_all_logits():
    """Regression: when every sequence fit the block, one chunk held all N x V float32 logits -- as much as a
    materialising implementation holds at its peak (besides dW), which the backend must stay under. A chunk now
    takes at most half the rows (here: one of two sequences)."""
    m = peak_rss_growth("float32", 128)
    assert m["growth"] - m["outputs"] < 0.75 * m["n_by_v"], m


@needs_extension
@pytest.mark.skipif(importlib.util.find_spec("sppo_kernels.autograd.fused_triton") is None, reason="no triton module")
@pytest.mark.skipif(triton_unavailable_reason(CPU) is not None, reason="triton cannot run on CPU tensors here")
def test_agrees_with_triton_interpreter():
    case = make_case(batch=3, length=14, width=24, vocab=90, seed=14)
    cpu = tiled(7, 13, 90)
    for upstream in (None, torch.tensor([0.4, -2.0, 1.1])):
        out_c, logps_c, params_c = backend_grads(case, cpu, torch.float32, upstream=upstream)
        out_t, logps_t, params_t = backend_grads(case, "triton", torch.float32, upstream=upstream)
        assert rel_err(logps_c, logps_t) < 1e-5
        assert rel_err(out_c, out_t) < 1e-5
        assert all(rel_err(params_c[k].grad, params_t[k].grad) < 1e-5 for k in params_c)


@needs_extension
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=st.integers(1, 4),
    length=st.integers(2, 16),
    width=st.integers(1, 20),
    vocab=st.integers(2, 60),
    block_rows=st.integers(1, 20),
    chunk_rows=st.integers(1, 9),
    tile_elements=st.integers(1, 300),
    softcap=st.one_of(st.none(), st.floats(0.5, 40.0)),
    temperature=st.floats(0.3, 2.5),
    shift=st.booleans(),
    bias=st.booleans(),
    packed=st.booleans(),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    seed=st.integers(0, 2**16),
)
def test_random_shapes_and_tilings(block_rows, chunk_rows, tile_elements, reduction, **kw):
    case = make_case(fully_masked=kw["batch"] > 2, **kw)
    vocab = case.weight.shape[0]
    cpu = poisoned(fused_cpu.Tiling(block_rows * vocab, chunk_rows, tile_elements))
    ref_out, ref_logps, ref_params = reference_grads(case, reduction=reduction)
    out, logps, params = backend_grads(case, cpu, torch.float32, reduction=reduction)
    scale = max(1.0, ref_logps.abs().max().item())
    assert (logps.double() - ref_logps).abs().max() <= 1e-4 * scale
    assert (out.double() - ref_out).abs().max() <= 1e-4 * max(1.0, ref_out.abs().max().item())
    for name, p in params.items():
        if p is not None and ref_params[name].grad.abs().max() > 0:
            assert rel_err(p.grad, ref_params[name].grad) <= 2e-4, name


# ------------------------------------------------------------------ build and build fallback


def test_extension_builds_where_a_toolchain_exists():
    """Where a compiler and ninja exist (CI), an unavailable backend is a broken build, not a reason to skip."""
    from torch.utils import cpp_extension

    if shutil.which(os.environ.get("CXX", "c++")) is None or not cpp_extension.is_ninja_available():
        pytest.skip("no C++ toolchain here")
    assert UNAVAILABLE is None


@pytest.fixture
def fresh_loader(monkeypatch):
    """_cpu_extension with its cache cleared and no ahead-of-time build; the real state is restored after."""
    monkeypatch.setattr(_cpu_extension, "_ahead_of_time", lambda: None)
    _cpu_extension.load.cache_clear()
    yield _cpu_extension
    _cpu_extension.load.cache_clear()


def _reason_after_one_warning(loader) -> str:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first, second = loader.unavailable_reason(), loader.unavailable_reason()
    assert first == second and first is not None
    assert [w.category for w in caught] == [RuntimeWarning], [str(w.message) for w in caught]
    assert first in str(caught[0].message)
    return first


def test_missing_compiler_is_one_warning(fresh_loader, monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    assert "compiler" in _reason_after_one_warning(fresh_loader)
    assert resolve("auto", CPU, torch.float32).name == "chunked"
    with pytest.raises(ValueError, match="compiler"):
        resolve("cpu", CPU, torch.float32)


def test_missing_ninja_is_one_warning(fresh_loader, monkeypatch):
    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: False)
    assert "ninja" in _reason_after_one_warning(fresh_loader)


def test_failed_build_is_one_warning(fresh_loader, monkeypatch):
    def fail():
        raise RuntimeError("ninja: build stopped: subcommand failed.\nError building extension 'sppo_kernels_cpu'")

    monkeypatch.setattr(fresh_loader, "_build", fail)
    assert "Error building extension" in _reason_after_one_warning(fresh_loader)


def test_stale_ahead_of_time_build_is_ignored(monkeypatch):
    class Stale:
        @staticmethod
        def source_hash() -> str:
            return "0" * 16

    monkeypatch.setattr(_cpu_extension.importlib, "import_module", lambda name: Stale)
    assert _cpu_extension._ahead_of_time() is None


def test_build_folder_is_keyed_by_source_torch_and_python(monkeypatch):
    """Two environments on one machine (another torch version or installation, another Python) must not share,
    and so keep evicting, one build folder."""
    folder = _cpu_extension.build_directory()
    assert _cpu_extension.source_hash() in folder.name
    monkeypatch.setattr(torch, "__version__", torch.__version__ + "+another")
    assert _cpu_extension.build_directory() != folder
    monkeypatch.undo()
    monkeypatch.setattr(_cpu_extension.sysconfig, "get_config_var", lambda name: "cpython-312-x86_64-linux-gnu")
    assert _cpu_extension.build_directory() != folder


@needs_extension
def test_lock_left_by_a_killed_build_does_not_block_the_next_run():
    """A build killed mid-compile leaves torch's lock file in the build folder; the next process must not wait on
    it forever (run in a subprocess with a timeout, so a regression fails instead of hanging the suite)."""
    module = _cpu_extension.extension()
    if module.__name__ == _cpu_extension.AOT_MODULE:
        pytest.skip("the ahead-of-time build is in use; no build folder")
    folder = Path(module.__file__).parent
    with _cpu_extension.build_lock(folder):  # plant it while no build runs (other test processes may share it)
        (folder / "lock").write_text("")
    script = (
        "from sppo_kernels import _cpu_extension as c\nc._ahead_of_time = lambda: None\nprint(c.unavailable_reason())"
    )
    try:
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=150)
    finally:
        with _cpu_extension.build_lock(folder):
            stale_left = (folder / "lock").exists()
            (folder / "lock").unlink(missing_ok=True)
    assert not stale_left
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "None"


def test_import_without_compiler_never_builds_or_crashes(tmp_path):
    """A fresh process with no compiler: importing builds nothing; "auto" warns once and runs "chunked"."""
    script = textwrap.dedent(
        """
        import sys, warnings
        import torch
        import sppo_kernels as sk
        from sppo_kernels import _cpu_extension
        assert "sppo_kernels_cpu" not in sys.modules and _cpu_extension.load.cache_info().currsize == 0
        _cpu_extension._ahead_of_time = lambda: None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            hidden, weight = torch.randn(2, 5, 8), torch.randn(11, 8)
            labels = torch.randint(0, 11, (2, 5))
            a = sk.sequence_logprobs(hidden, weight, labels)
            b = sk.sequence_logprobs(hidden, weight, labels, backend="chunked")
        assert torch.equal(a, b)
        print(sum(issubclass(w.category, RuntimeWarning) for w in caught))
        """
    )
    env = {**os.environ, "CXX": "/nonexistent/c++", "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1"
    assert not any(Path(tmp_path).iterdir())


@needs_extension
def test_two_threads_under_python_saved_tensor_hooks_and_inference_mode():
    """Regression: workers once copied the caller's whole thread-local state, incl. Python saved-tensor hooks
    (ZeRO-3, activation checkpointing), which needs the GIL the caller held: a deadlock with >= 2 threads.
    Run in a subprocess with a timeout so a regression fails instead of hanging the suite."""
    script = textwrap.dedent(
        """
        import torch, sppo_kernels as sk
        torch.set_num_threads(2)
        torch.manual_seed(0)
        h = torch.randn(4, 40, 32, requires_grad=True)
        w = torch.randn(3000, 32, requires_grad=True)
        y = torch.randint(0, 3000, (4, 40))
        ref, p = torch.full((4,), -300.0), torch.tensor([0.2, 0.4, 0.6, 0.8])
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            loss = sk.sppo_loss(h, w, y, ref, p, backend="cpu")
            logps = sk.sequence_logprobs(h, w, y, backend="cpu")
        (loss + logps.sum()).backward()
        with torch.inference_mode():
            frozen = sk.sequence_logprobs(h, w, y, backend="cpu")
        torch.testing.assert_close(frozen, logps.detach())
        print("ok", torch.isfinite(h.grad).all().item(), torch.isfinite(w.grad).all().item())
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["ok", "True", "True"]
