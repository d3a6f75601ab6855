"""Benchmark the SPPO loss (lm-head log-probs + SPPO epilogue) against every peer, in one run.

    python benchmarks/loss_bench.py                       # tiny preset on the CPU (< 3 minutes on 2 cores)
    python benchmarks/loss_bench.py --preset cpu-medium --markdown
    python benchmarks/loss_bench.py --preset gemma2-9b --device cuda --dtype bfloat16 --tokens 8192

Each provider runs in its own subprocess (peak RSS on the CPU is per process), one size after another; a provider
that is missing, cannot run here, fails or times out becomes a row that says why. The float64 reference and the
matmul peak are computed once, in a subprocess of their own, before the providers. See docs/benchmark.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks import measure, report
from benchmarks.providers import PROVIDERS, Provider, select
from benchmarks.workload import (
    DTYPES,
    PRESETS,
    Inputs,
    Problem,
    Reference,
    compute_reference,
    flops,
    make_inputs,
    reference_precision,
)

SCRIPT = Path(__file__).resolve()
DEFAULT_OUT = SCRIPT.parents[1] / "bench_out"
RESULTS_MD = SCRIPT.parent / "RESULTS.md"


@dataclass
class Config:
    """One benchmark run."""

    preset: str = "tiny"
    tokens: list[int] = field(default_factory=list)
    dtype: str = "float32"
    device: str = "cpu"
    providers: list[str | Provider] | None = None
    warmup: int = 1
    repeats: int | None = None
    budget_s: float = 1.0
    seed: int = 0
    isolate: bool = True
    timeout_s: float = 1200.0
    log_dir: Path | None = None

    def problems(self) -> list[Problem]:
        sizes = self.tokens or list(PRESETS[self.preset].tokens)
        made = [Problem.create(self.preset, t, dtype=self.dtype, device=self.device, seed=self.seed) for t in sizes]
        return list({p.tokens: p for p in made}.values())


# ---------------------------------------------------------------- jobs (run in a worker or in-process)


def _ref_path(workdir: Path, problem: Problem, targets: str) -> Path:
    return workdir / f"ref-{problem.key()}-{targets}.pt"


def reference_job(problems: list[Problem], kinds: list[str], workdir: Path) -> dict:
    """Write the reference of every problem and target kind; return machine facts and the matmul peaks."""
    peaks, precisions = {}, {}
    for problem in problems:
        device = problem.torch_device
        for kind in kinds:
            inputs = make_inputs(problem, kind)
            precision = reference_precision(problem, measure.free_memory(device))
            budget = (4 << 30) if device.type == "cuda" else (1 << 30)
            ref = compute_reference(problem, inputs, precision, budget)
            torch.save(ref.as_state(), _ref_path(workdir, problem, kind))
            precisions[f"{problem.tokens}/{kind}"] = ref.precision
            del inputs, ref
            _release(device)
        peaks[str(problem.tokens)] = measure.matmul_peak(problem)
    machine = measure.machine_info(problems[-1].torch_device)
    return {"machine": machine, "matmul_peak": peaks, "reference_precision": precisions}


def _load_reference(workdir: Path, problem: Problem, targets: str) -> Reference | None:
    path = _ref_path(workdir, problem, targets)
    return Reference(**torch.load(path, weights_only=False)) if path.exists() else None


def _release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _row(provider: Provider, problem: Problem) -> dict:
    return {
        "provider": provider.name,
        "family": provider.family,
        "description": provider.description,
        "tokens": problem.tokens,
        "batch": problem.batch,
        "seq_len": problem.seq_len,
        "status": "skipped",
        "reason": None,
        "notes": provider.notes(problem),
        "timing_valid": not provider.interpreted(problem),
    }


def measure_provider(
    provider: Provider, problem: Problem, workdir: Path, *, warmup: int, repeats: int | None, budget_s: float
) -> dict:
    """One row: time, memory and errors of ``provider`` on ``problem``; failures become the row's reason."""
    row = _row(provider, problem) | {"load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    reason = provider.unavailable(problem)
    if reason is not None:
        return row | {"reason": reason}
    device = problem.torch_device
    found: dict = {}
    try:
        inputs = make_inputs(problem, provider.targets)
        reference = _load_reference(workdir, problem, provider.targets)
        loss_fn = provider.build(problem)

        def on_first(loss: torch.Tensor, used: Inputs) -> None:
            if reference is not None:
                found["errors"] = measure.errors(loss, used, reference)
                found["precision"] = reference.precision

        copies = measure.rotation_copies(inputs, device)
        samples = measure.measure_iterations(
            loss_fn, copies, device, warmup=warmup, repeats=repeats, budget_s=budget_s, on_first=on_first
        )
    except Exception as err:  # a provider that breaks is reported, never fatal
        return row | {"status": "error", "reason": f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300]}"}
    finally:
        _release(device)
    errs = found.get("errors")
    status = measure.check(errs, problem.dtype, provider.exact) if errs is not None else "unchecked (no reference)"
    row |= samples.summary() | {"status": status, "errors": errs, "reference_precision": found.get("precision")}
    row |= {"scored_tokens": inputs.scored_tokens, "flops": flops(problem, inputs.scored_tokens)}
    row["matmul_peak_tflops"] = measure.matmul_peak(problem)["tflops"]  # same conditions as the provider's run
    return row


def provider_job(
    provider: Provider,
    problems: list[Problem],
    workdir: Path,
    *,
    warmup: int,
    repeats: int | None,
    budget_s: float,
    emit: Callable[[list[dict]], None] = lambda rows: None,
) -> list[dict]:
    """Rows of one provider over all problems, smallest first; ``emit`` gets the rows so far after each."""
    rows: list[dict] = []
    for problem in problems:
        rows.append(measure_provider(provider, problem, workdir, warmup=warmup, repeats=repeats, budget_s=budget_s))
        emit(rows)
    return rows


def worker_main(spec_path: Path) -> int:
    """Entry point of a worker subprocess: run the job in ``spec_path`` and write its JSON result."""
    spec = json.loads(spec_path.read_text())
    workdir, out = Path(spec["workdir"]), Path(spec["result"])
    problems = [Problem(**p) for p in spec["problems"]]
    write = lambda payload: out.write_text(json.dumps(payload, default=str))
    if spec["kind"] == "reference":
        write(reference_job(problems, spec["targets"], workdir))
        return 0
    provider_job(
        PROVIDERS[spec["provider"]],
        problems,
        workdir,
        warmup=spec["warmup"],
        repeats=spec["repeats"],
        budget_s=spec["budget_s"],
        emit=write,
    )
    return 0


# ---------------------------------------------------------------- orchestration


def _problem_state(problem: Problem) -> dict:
    state = problem.as_dict()
    state.pop("tokens")
    return state


def _spawn(name: str, spec: dict, config: Config, workdir: Path) -> tuple[object | None, str | None]:
    """Run one job in a fresh interpreter; return its result (possibly partial) and why it stopped early."""
    spec_path, result = workdir / f"job-{name}.json", workdir / f"result-{name}.json"
    spec_path.write_text(json.dumps(spec | {"workdir": str(workdir), "result": str(result)}))
    command = [sys.executable, str(SCRIPT), "--worker", str(spec_path)]
    failure = None
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=config.timeout_s)
        log = proc.stdout + proc.stderr
        if proc.returncode != 0:
            tail = [line for line in proc.stderr.strip().splitlines() if line.strip()][-1:] or [""]
            failure = f"worker exited with code {proc.returncode}: {tail[0][:300]}"
    except subprocess.TimeoutExpired as err:
        log = str(err.stdout or "") + str(err.stderr or "")
        failure = f"timed out after {config.timeout_s:.0f} s"
    if config.log_dir is not None:
        config.log_dir.mkdir(parents=True, exist_ok=True)
        (config.log_dir / f"{name}.log").write_text(log)
    return (json.loads(result.read_text()) if result.exists() else None), failure


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _result(config: Config, problems: list[Problem], env: dict, rows: list[dict], started: float,
            complete: bool) -> dict:  # fmt: skip
    """The report so far: rows with ratios, machine, config; ``complete`` is False while providers remain."""
    result = {
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "elapsed_s": round(time.time() - started, 1),
        "complete": complete,
        "config": {
            "preset": config.preset,
            "dtype": config.dtype,
            "device": config.device,
            "tokens": [p.tokens for p in problems],
            "warmup": config.warmup,
            "repeats": config.repeats,
            "isolated": config.isolate,
            "problems": [p.as_dict() for p in problems],
            "tolerance": measure.TOLERANCE[config.dtype],
        },
        "machine": env.get("machine") or measure.machine_info(torch.device("cpu")),
        "matmul_peak": env.get("matmul_peak", {}),
        "reference_precision": env.get("reference_precision", {}),
        "rows": list(rows),
    }
    report.add_ratios(result)
    return result


def _reference(config: Config, problems: list[Problem], kinds: list[str], workdir: Path) -> dict:
    """Machine facts, matmul peaks and reference precision, from the reference job (in its own process)."""
    _progress(f"reference ({', '.join(kinds) or 'none'} targets) for {[p.tokens for p in problems]} tokens …")
    if not config.isolate:
        return reference_job(problems, kinds, workdir)
    spec = {"kind": "reference", "problems": [_problem_state(p) for p in problems], "targets": kinds}
    env, failure = _spawn("reference", spec, config, workdir)
    if failure:
        _progress(f"  reference failed: {failure} (errors will not be checked)")
    return env or {}


def _provider_rows(provider: Provider, problems: list[Problem], runnable: bool, config: Config,
                   workdir: Path) -> list[dict]:  # fmt: skip
    """The rows of one provider over every problem: measured (in a worker unless ``config.isolate`` is off), or
    saying why not."""
    if not runnable:
        return [_row(provider, problem) | {"reason": provider.unavailable(problem)} for problem in problems]
    jobs = {"warmup": config.warmup, "repeats": config.repeats, "budget_s": config.budget_s}
    if not config.isolate:
        return provider_job(provider, problems, workdir, **jobs)
    if provider.name not in PROVIDERS or PROVIDERS[provider.name] is not provider:
        raise ValueError(f"provider {provider.name!r} is not registered; run it with isolate=False")
    spec = {"kind": "provider", "provider": provider.name, "problems": [_problem_state(p) for p in problems]}
    done, failure = _spawn(provider.name, spec | jobs, config, workdir)
    done = list(done or [])
    missing = problems[len(done) :]
    return done + [
        _row(provider, p) | {"status": "error", "reason": failure or "worker wrote nothing"} for p in missing
    ]


def run_benchmark(config: Config, sink: Callable[[dict], None] = lambda result: None) -> dict:
    """Measure every selected provider on every problem; returns the report (rows with ratios, machine, config).
    ``sink`` receives the report so far after the reference and after each provider (``complete`` False until
    the last), so a run stopped early still leaves every row measured before it."""
    started = time.time()
    problems = config.problems()
    providers = [PROVIDERS[p] if isinstance(p, str) else p for p in (config.providers or select(None))]
    runnable = [p for p in providers if any(p.unavailable(problem) is None for problem in problems)]
    with tempfile.TemporaryDirectory(prefix="loss_bench_") as tmp:
        workdir = Path(tmp)
        env = _reference(config, problems, sorted({p.targets for p in runnable}), workdir)
        rows: list[dict] = []
        sink(_result(config, problems, env, rows, started, complete=False))
        for index, provider in enumerate(providers, 1):
            _progress(f"[{index}/{len(providers)}] {provider.name} ({time.time() - started:.0f} s)")
            rows += _provider_rows(provider, problems, provider in runnable, config, workdir)
            sink(_result(config, problems, env, rows, started, complete=index == len(providers)))
    return _result(config, problems, env, rows, started, complete=True)


# ---------------------------------------------------------------- CLI


def _csv(kind: Callable[[str], object]) -> Callable[[str], list]:
    return lambda text: [kind(part) for part in text.split(",") if part.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), help="shapes (default: tiny on CPU, llama3-8b on CUDA)")
    ap.add_argument("--tokens", type=_csv(int), help="comma-separated token counts B×T (default: the preset's)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), help="default: float32 on CPU, bfloat16 on CUDA")
    ap.add_argument("--device", default="cuda" if cuda else "cpu", help="cpu, cuda or cuda:N (default: %(default)s)")
    ap.add_argument("--providers", type=_csv(str), help=f"comma-separated subset of: {', '.join(PROVIDERS)}")
    ap.add_argument("--repeats", type=int, help="timed iterations (default: fit ~1 s per size, 3..25)")
    ap.add_argument("--warmup", type=int, help="untimed iterations first (default: 2 on CPU, 3 on CUDA)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory for JSON, PNG, logs (%(default)s)")
    ap.add_argument(
        "--markdown", type=Path, nargs="?", const=RESULTS_MD, help="append a dated section (default: %(const)s)"
    )
    ap.add_argument("--timeout", type=float, default=1200.0, help="seconds per provider subprocess (%(default)s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--in-process", action="store_true", help="no subprocesses (CPU peak memory less exact)")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--list", action="store_true", help="list the providers and exit")
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> Config:
    on_cuda = args.device.startswith("cuda")
    if on_cuda and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available here")
    if (args.repeats is not None and args.repeats < 1) or (args.warmup is not None and args.warmup < 0):
        raise ValueError("--repeats must be >= 1 and --warmup >= 0")
    preset = args.preset or ("llama3-8b" if on_cuda else "tiny")
    return Config(
        preset=preset,
        tokens=args.tokens or [],
        dtype=args.dtype or ("bfloat16" if on_cuda else "float32"),
        device=args.device,
        providers=args.providers or None,
        warmup=args.warmup if args.warmup is not None else (3 if on_cuda else 2),
        repeats=args.repeats,
        seed=args.seed,
        isolate=not args.in_process,
        timeout_s=args.timeout,
        log_dir=args.out / "logs",
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        return worker_main(args.worker)
    if args.list:
        for p in PROVIDERS.values():
            print(f"{p.name:18} {p.family:6} {p.description}")
        return 0
    try:
        config = config_from_args(args)
        config.problems()
        if args.providers:
            select(args.providers)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    given = sys.argv[1:] if argv is None else argv
    command = " ".join(["python", "benchmarks/loss_bench.py", *map(shlex.quote, given)])
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"loss_bench_{config.preset}_{config.dtype}_{config.device.replace(':', '')}"
    json_path = stem.with_suffix(".json")
    result = run_benchmark(config, sink=lambda partial: report.write_json(partial | {"command": command}, json_path))
    result["command"] = command
    paths = report.write_outputs(result, stem, plot_png=not args.no_plot)
    print(report.terminal(result))
    for path in paths:
        print(f"wrote {path}")
    if args.markdown is not None:
        report.append_markdown(result, args.markdown)
        print(f"appended a section to {args.markdown}")
    return 1 if report.failures(result) else 0


if __name__ == "__main__":
    raise SystemExit(main())
