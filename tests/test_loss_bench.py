"""The benchmark's own correctness: realistic inputs, an exact reference, every provider checked, failures reported."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # `benchmarks` is a folder, not an installed package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sppo_kernels as sk
from benchmarks import loss_bench, report, workload
from benchmarks.providers import PROVIDERS, Provider, naive_nll, needs_module, per_token
from benchmarks.workload import IGNORE, Inputs, Problem, compute_reference, make_inputs
from sppo_kernels.reference import reference_sequence_logprobs

ROOT = Path(__file__).resolve().parents[1]
# Small enough for the Triton interpreter: B=2 sequences of 32 positions, H=64, V=512. On a GPU also in bf16 there.
MICRO = Problem(preset="tiny", batch=2, seq_len=32, hidden=64, vocab=512)
CUDA_MICRO = dataclasses.replace(MICRO, device="cuda", dtype="bfloat16")
CHECKED = [MICRO] + ([CUDA_MICRO] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def refdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ref")
    loss_bench.reference_job(CHECKED, ["soft", "hard"], path)
    return path


def measure(provider: Provider, refdir: Path, problem: Problem = MICRO) -> dict:
    return loss_bench.measure_provider(provider, problem, refdir, warmup=0, repeats=1, budget_s=0.0)


# ---------------------------------------------------------------- inputs and reference


def test_inputs_are_realistic_sppo_batches() -> None:
    problem = Problem.create("tiny", 1024)
    inputs = make_inputs(problem)
    b, t = problem.batch, problem.seq_len
    assert (b, t) == (8, 128) and inputs.hidden.shape == (b, t, problem.hidden)
    first = (inputs.labels != IGNORE).float().argmax(1)
    assert (first >= t // 4).all() and (first <= t // 2).all(), "prompts are masked"
    assert torch.equal(first[: b // 2], first[b // 2 :]), "chosen and rejected share the prompt"
    assert ((inputs.labels == IGNORE).sum(1) > first).any(), "some responses end in padding"
    probs = inputs.target_probs
    assert ((probs >= 0.1) & (probs <= 0.9)).all() and probs.std() > 0.05, "non-uniform win rates"
    assert (probs[: b // 2] >= 0.5).all() and (probs[b // 2 :] <= 0.5).all()
    with torch.no_grad():
        policy = reference_sequence_logprobs(inputs.hidden, inputs.weight, inputs.labels)
    gap = (policy - inputs.ref_logps).abs()
    assert (gap > 0).all() and (gap < 0.05 * policy.abs()).all(), "ref log-probs near the policy's"
    again = make_inputs(problem)
    assert torch.equal(again.hidden, inputs.hidden) and torch.equal(again.ref_logps, inputs.ref_logps)
    hard = make_inputs(problem, "hard")
    assert hard.target_probs.tolist() == [1.0] * (b // 2) + [0.0] * (b // 2) and hard.loss_scale == 2.0


def test_problem_shapes_and_presets() -> None:
    assert set(workload.PRESETS) >= {"tiny", "cpu-medium", "mistral-7b", "llama3-8b", "gemma2-9b"}
    assert workload.PRESETS["gemma2-9b"].softcap == 30.0
    medium = Problem.create("cpu-medium", 2048)
    assert (medium.tokens, medium.hidden, medium.vocab) == (2048, 1024, 32000)
    assert Problem.create("tiny", 300).batch % 2 == 0
    with pytest.raises(ValueError, match="unknown preset"):
        Problem.create("gpt-5", 256)


def test_reference_equals_full_float64_autograd() -> None:
    problem = Problem(preset="tiny", batch=4, seq_len=24, hidden=32, vocab=256, softcap=30.0, logit_std=20.0)
    inputs = make_inputs(problem)
    ref = compute_reference(problem, inputs, torch.float64, budget_bytes=1)  # one sequence per group
    h = inputs.hidden.detach().double().requires_grad_()
    w = inputs.weight.detach().double().requires_grad_()
    loss = sk.sppo_loss(
        h, w, inputs.labels, inputs.ref_logps, inputs.target_probs, eta=problem.eta, softcap=30.0, backend="torch"
    )
    loss.backward()
    assert ref.loss == pytest.approx(loss.item(), rel=1e-12)
    torch.testing.assert_close(ref.grad_hidden, h.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ref.grad_weight, w.grad, rtol=1e-10, atol=1e-12)


def test_sampled_weight_rows_cover_every_label(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(workload, "FULL_DW_ELEMENTS", 1000)
    monkeypatch.setattr(workload, "SAMPLED_DW_ROWS", 16)
    loss_bench.reference_job([MICRO], ["soft"], tmp_path)
    ref = loss_bench._load_reference(tmp_path, MICRO, "soft")
    labels = make_inputs(MICRO).labels
    assert ref is not None and ref.weight_rows is not None
    assert set(labels[labels != IGNORE].tolist()) <= set(ref.weight_rows.tolist())
    assert measure(PROVIDERS["naive"], tmp_path)["status"] == "ok"


# ---------------------------------------------------------------- every provider, and the checks themselves


@pytest.mark.parametrize(
    "problem",
    [pytest.param(p, marks=[pytest.mark.gpu] if p.device == "cuda" else []) for p in CHECKED],
    ids=lambda p: f"{p.device}-{p.dtype}",
)
@pytest.mark.parametrize("name", list(PROVIDERS))
def test_every_provider_matches_the_reference_or_says_why(name: str, problem: Problem, refdir: Path) -> None:
    row = measure(PROVIDERS[name], refdir, problem)
    if row["status"] == "skipped":
        assert row["reason"], "a provider that cannot run must say why"
        pytest.skip(row["reason"])
    assert row["status"] in ("ok", "approx"), row  # ok: every error within the dtype's tolerance
    assert row["fwd_ms"] > 0 and row["bwd_ms"] > 0 and row["peak_bytes"] is not None
    assert row["reference_precision"] == "float64"


def _scaled(factor: float) -> Provider:
    build = per_token(naive_nll)
    return Provider("scaled", "peer", "naive loss × factor", lambda problem: lambda x: factor * build(problem)(x))


def _no_shift_nll(inputs: Inputs, problem: Problem) -> torch.Tensor:
    """Position t scores its own label instead of the next one."""
    pad = torch.full_like(inputs.labels[:, :1], IGNORE)
    return naive_nll(dataclasses.replace(inputs, labels=torch.cat([pad, inputs.labels[:, :-1]], 1)), problem)


@pytest.mark.parametrize(
    "provider",
    [_scaled(2.0), Provider("no-shift", "peer", "position t scores its own label", per_token(_no_shift_nll))],
    ids=["loss-times-2", "no-shift"],
)
def test_check_catches_a_wrong_provider(provider: Provider, refdir: Path) -> None:
    row = measure(provider, refdir)
    assert row["status"].startswith("FAIL"), row


def test_failing_and_missing_providers_become_rows(refdir: Path) -> None:
    def explode(problem: Problem):
        raise RuntimeError("boom")

    broken = measure(Provider("broken", "peer", "raises", explode), refdir)
    assert broken["status"] == "error" and "boom" in broken["reason"]
    missing = Provider("missing", "peer", "absent", explode, requirements=(needs_module("no_such_pkg_x", "nope"),))
    row = measure(missing, refdir)
    assert row["status"] == "skipped" and "nope is not installed" in row["reason"]
    approx = measure(dataclasses.replace(_scaled(1.5), exact=False), refdir)
    assert approx["status"] == "approx" and approx["errors"]["loss"] == pytest.approx(0.5, rel=1e-4)


def test_worker_timeout_is_a_row_not_a_crash(tmp_path: Path) -> None:
    config = loss_bench.Config(tokens=[64], providers=["naive"], timeout_s=0.2, log_dir=tmp_path)
    result = loss_bench.run_benchmark(config)
    (row,) = result["rows"]
    assert row["status"] == "error" and "timed out" in row["reason"]
    assert "timed out" in report.terminal(result)


# ---------------------------------------------------------------- ratios, outputs, CLI


def test_ratios_use_the_best_passing_peer() -> None:
    def row(name: str, family: str, ms: float, mib: int, status: str = "ok", valid: bool = True) -> dict:
        return {
            "provider": name, "family": family, "tokens": 8, "status": status, "fwdbwd_ms": ms,
            "peak_bytes": mib << 20, "flops": 8e9, "timing_valid": valid,
        }  # fmt: skip

    result = {
        "config": {"tokens": [8]},
        "matmul_peak": {"8": {"tflops": 10.0}},
        "rows": [
            row("naive", "naive", 100, 400),
            row("fast-but-wrong", "peer", 1, 1, status="FAIL: loss"),
            row("interpreted", "peer", 2, 2, valid=False),
            row("peer", "peer", 50, 100),
            row("ours", "ours", 25, 50),
        ],
    }
    report.add_ratios(result)
    ours = result["rows"][-1]
    assert result["best_peer"]["8"] == {"time": "peer", "memory": "peer"}
    assert (ours["x_naive"], ours["x_peer"], ours["mem_x_naive"], ours["mem_x_peer"]) == (4.0, 2.0, 8.0, 2.0)
    assert ours["tflops"] == pytest.approx(8e9 / 0.025 / 1e12) and ours["pct_peak"] == pytest.approx(3.2)
    assert "x_naive" not in result["rows"][2]


def test_cli_runs_every_provider_in_its_own_process(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    results = tmp_path / "RESULTS.md"
    argv = ["--device", "cpu", "--tokens", "64,128", "--providers", "naive,ours-chunked,cce-filtered", "--repeats", "2"]
    code = loss_bench.main([*argv, "--out", str(tmp_path), "--markdown", str(results)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    data = json.loads((tmp_path / "loss_bench_tiny_float32_cpu.json").read_text())
    assert {"cpu", "logical_cpus", "torch_threads", "versions"} <= set(data["machine"])
    assert data["machine"]["versions"]["torch"] and data["machine"]["versions"]["triton"]
    rows = {(r["provider"], r["tokens"]): r for r in data["rows"]}
    assert len(rows) == 6 and data["config"]["isolated"]
    for tokens in (64, 128):
        for name in ("naive", "ours-chunked"):
            assert rows[name, tokens]["status"] == "ok" and rows[name, tokens]["peak_bytes"] > 0
        assert rows["cce-filtered", tokens]["status"] == "skipped"
    assert rows["naive", 128]["x_naive"] == 1.0
    assert (tmp_path / "loss_bench_tiny_float32_cpu.png").stat().st_size > 1000
    assert "filter_eps" in printed and "ours-chunked" in printed
    section = results.read_text()
    assert section.startswith("# Benchmark results") and "| naive | ok |" in section
    assert (tmp_path / "logs" / "naive.log").exists()
    assert loss_bench.main(["--providers", "nope"]) == 2


def test_cli_writes_each_provider_row_as_soon_as_it_is_measured(tmp_path: Path) -> None:
    """A run stopped early (the device's step limit) still leaves every row measured before it."""
    seen: list[dict] = []
    config = loss_bench.Config(tokens=[64], providers=["naive", "ours-chunked", "cce-filtered"], repeats=1)
    final = loss_bench.run_benchmark(config, sink=lambda partial: seen.append(json.loads(json.dumps(partial))))
    assert [len(r["rows"]) for r in seen] == [0, 1, 2, 3]
    assert [r["complete"] for r in seen] == [False, False, False, True] and final["complete"]
    assert seen[1]["rows"][0]["provider"] == "naive" and seen[1]["rows"][0]["status"] == "ok"


def test_gpu_summary_verdict_on_the_fused_loss(tmp_path: Path) -> None:
    from benchmarks.gpu_summary import sweep_summary

    def row(variant: str, ms: float, device: str = "NVIDIA H200") -> dict:
        return {"variant": variant, "preset": "gemma2-9b", "device": device, "forward_ms": 30.0, "fwd_bwd_ms": ms,
                "peak_extra_mib": 250.0, "deterministic": True, "formula_mib": {"backward": 242.0}}  # fmt: skip

    path = tmp_path / "triton_sweep.jsonl"
    for fused_ms, verdict in ((80.0, "1.25x the default's speed -> make it the default"),
                              (125.0, "0.80x the default's speed -> keep the recomputing default")):  # fmt: skip
        path.write_text("\n".join(json.dumps(r) for r in (row("default", 100.0), row("fused-loss", fused_ms))))
        assert sweep_summary(path)[-1] == f"verdict fused_sppo_loss: {verdict}"
    path.write_text(json.dumps(row("default", 100.0, "cpu")) + "\n" + json.dumps(row("fused-loss", 1.0, "cpu")))
    assert sweep_summary(path)[-1].startswith("verdict fused_sppo_loss: none")


@pytest.mark.parametrize("part", ["tests", "bench"])
def test_gpu_check_dry_run(part: str, tmp_path: Path) -> None:
    """Every step of each device command, run here with the micro preset, the Triton interpreter and the GPU image's
    missing packages hidden: no path, flag or import can break there. Each command leaves one archive and one
    summary (the device returns at most 8 files) within its time budget."""
    script = ROOT / "benchmarks" / "gpu_check.sh"
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SPPO_HIDE_MODULES")}
    env |= {"PYTHON": sys.executable, "SPPO_GPU_WHEELS": str(empty), "TMPDIR": str(tmp_path)}
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(script), "--dry-run", part, str(out)], env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == [f"gpu-{part}.tar.gz", "summary.txt"]
    summary = (out / "summary.txt").read_text()
    assert f"part {part}, dry run 1" in summary and "hidden or missing: datasets,deepspeed,trl" in summary
    with tarfile.open(out / f"gpu-{part}.tar.gz") as archive:
        names = {Path(n).as_posix().removeprefix("./") for n in archive.getnames()}
    steps = ["pytest", "sweep"] if part == "tests" else ["bench-1-micro", "bench-2-micro"]
    for step in steps:
        assert re.search(rf"^{step}: rc=0 \(\d+ s; limit \d+ s\)$", summary, flags=re.M), summary
        assert f"{step}.log" in names
    budget = int(re.search(r"budget (\d+) s", summary).group(1))
    assert budget <= 8 * 60
    if part == "tests":
        counts = re.search(r"^pytest counts: (.*)$", summary, flags=re.M).group(1)
        assert "error" not in counts and int(re.match(r"(\d+)/\d+ tests collected", counts).group(1)) > 20, counts
        assert "sweep/triton_sweep.jsonl" in names and "verdict fused_sppo_loss: none (Triton interpreter" in summary
    else:
        assert {"bench-1/loss_bench_micro_bfloat16_cpu.json", "RESULTS-gpu.md"} <= names
        assert re.search(r"liger-flce \| skipped: liger-kernel is not installed", summary), summary
        assert re.search(r"ours-triton \| ok \|", summary) and re.search(r"ours-triton-fused \| ok \|", summary)
