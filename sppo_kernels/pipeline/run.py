"""``run``: N SPPO iterations on disjoint prompt splits, each stage skipped once it has finished.

Layout of ``out``::

    run.json                   the model, prompts and every option (a rerun must match it)
    iter1/prompts.jsonl        this iteration's split
    iter1/generations.jsonl    generate          iter1/stages/<stage>.json   completion markers + summaries
    iter1/rankings.jsonl       rank              iter1/*_units/              resumable partial work
    iter1/targets.jsonl        targets
    iter1/train_data.parquet   reflogps
    iter1/metrics.jsonl, loss.png, model/       train (model/ is π_2, the policy and reference of iteration 2)
    iter2/...

Iteration t samples from, and takes its reference log-probs from, π_t (the base model for t = 1).
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from sppo_kernels.pipeline import evaluate, generate, rank, reflogps, targets, train
from sppo_kernels.pipeline.errors import PipelineError
from sppo_kernels.pipeline.modeling import ModelOptions
from sppo_kernels.pipeline.options import opt, to_argv, validated
from sppo_kernels.pipeline.prompts import Prompt, PromptOptions, load_prompts, split_prompts
from sppo_kernels.pipeline.store import read_json, stage_summary, write_json, write_jsonl

STAGES = ("generate", "rank", "targets", "reflogps", "train")


@dataclass
class RunOptions:
    """Iteration control."""

    iterations: int = opt(3, "SPPO iterations, each on its own split of the prompts")
    launcher: str | None = opt(
        None,
        "command that starts the train stage in several processes, e.g. 'torchrun --nproc_per_node 8' or "
        "'deepspeed --hostfile hosts' (default: torchrun over the local GPUs when there are several, else "
        "in this process)",
    )


@dataclass
class PipelineOptions:
    """Every option of every stage."""

    run: RunOptions = field(default_factory=RunOptions)
    prompts: PromptOptions = field(default_factory=PromptOptions)
    model: ModelOptions = field(default_factory=ModelOptions)
    generate: generate.GenerateOptions = field(default_factory=generate.GenerateOptions)
    rank: rank.RankOptions = field(default_factory=rank.RankOptions)
    targets: targets.TargetsOptions = field(default_factory=targets.TargetsOptions)
    reflogps: reflogps.RefLogpsOptions = field(default_factory=reflogps.RefLogpsOptions)
    train: train.TrainOptions = field(default_factory=train.TrainOptions)
    evaluate: evaluate.EvalOptions = field(default_factory=evaluate.EvalOptions)  # issue 13


OPERATIONAL = {("run", "launcher")}  # may change between attempts without changing any result
# issue 13: evaluation settings never change a trained model (the evaluation checks its own settings)
OPERATIONAL |= {("evaluate", f.name) for f in fields(evaluate.EvalOptions)}


def _check_run_record(out: Path, record: dict[str, Any]) -> None:
    """Write ``run.json``, or check that a previous attempt in ``out`` used the same model, prompts and options."""
    path = out / "run.json"
    if not path.is_file():
        write_json(path, record)
        return
    previous = read_json(path)
    changed = [key for key in ("model", "prompts") if previous.get(key) != record[key]]
    for group, values in record["options"].items():
        for name, value in values.items():
            if (group, name) not in OPERATIONAL and previous.get("options", {}).get(group, {}).get(name) != value:
                changed.append(f"{group}.{name}")
    if changed:
        raise PipelineError(
            f"{out} holds a run with different settings ({', '.join(changed)}); resume with the same settings "
            "or choose another --out"
        )


def default_launcher() -> str | None:
    """torchrun over all local GPUs when there are several, else None (train in this process)."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return f"torchrun --standalone --nproc_per_node {count}" if count > 1 else None


def _cli_command(launcher: str | None, argv: list[str]) -> list[str]:
    """``sppo-train ARGV`` in a child process: ``python -m`` without a launcher, else the launcher running the
    ``sppo-train`` console script (launchers take a script path)."""
    if not launcher:
        return [sys.executable, "-m", "sppo_kernels.pipeline.cli", *argv]
    script = Path(sys.executable).with_name("sppo-train")
    found = str(script) if script.is_file() else shutil.which("sppo-train")
    if found is None:
        raise PipelineError("--launcher needs the sppo-train console script: pip install the package")
    return [*shlex.split(launcher), found, *argv]


def _subprocess(command: list[str], stage: str) -> None:
    print(f"[{stage}] running: {shlex.join(command)}", flush=True)
    result = subprocess.run(command, check=False)
    if result.returncode != 0:
        raise PipelineError(f"the {stage} stage failed (exit status {result.returncode})")


def run_iteration(
    model: str,
    prompts: list[Prompt],
    folder: Path,
    options: PipelineOptions,
    *,
    scorer: rank.PairwiseScorer | None = None,
) -> Path:
    """All stages of one iteration in ``folder`` (finished stages skipped); returns π_{t+1}'s folder."""
    write_jsonl(folder / "prompts.jsonl", [p.to_json() for p in prompts])
    generations, rankings = folder / generate.OUTPUT, folder / rank.OUTPUT
    target_rows, train_data = folder / targets.OUTPUT, folder / reflogps.OUTPUT
    for stage in STAGES:
        if stage_summary(folder, stage) is not None:
            print(f"[{stage}] finished earlier in {folder}; skipping")
            continue
        if stage == "generate":
            if options.generate.generation_backend == "vllm" or (
                options.generate.generation_backend == "auto" and generate.vllm_usable()
            ):  # a separate process returns vLLM's GPU memory before the next stages
                argv = ["generate", "--model", model, "--prompts", str(folder / "prompts.jsonl"), "--out", str(folder)]
                _subprocess(_cli_command(None, argv + to_argv(options.generate) + to_argv(options.model)), stage)
            else:
                generate.run_generate(model, prompts, folder, options.generate, options.model)
        elif stage == "rank":
            rank.run_rank(generations, folder, options.rank, scorer=scorer)
        elif stage == "targets":
            targets.run_targets(generations, rankings, folder, options.targets)
        elif stage == "reflogps":
            reflogps.run_reflogps(model, target_rows, folder, options.reflogps, options.model)
        else:
            launcher = options.run.launcher or default_launcher()
            if launcher:
                argv = ["train", "--model", model, "--data", str(train_data), "--out", str(folder)]
                _subprocess(_cli_command(launcher, argv + to_argv(options.train) + to_argv(options.model)), stage)
            else:
                train.run_train(model, train_data, folder, options.train, options.model)
        if stage_summary(folder, stage) is None:
            raise PipelineError(f"the {stage} stage ended without recording completion in {folder}")
    return folder / train.MODEL_DIR


def run_pipeline(
    model: str,
    prompts_source: str,
    out: str | Path,
    options: PipelineOptions,
    *,
    scorer: rank.PairwiseScorer | None = None,
) -> Path:
    """``options.run.iterations`` SPPO iterations from ``model``; returns the last iteration's model folder."""
    for group in asdict(options):
        validated(getattr(options, group))
    out = Path(out)
    prompts = load_prompts(prompts_source, options.prompts)
    splits = split_prompts(prompts, options.run.iterations)
    out.mkdir(parents=True, exist_ok=True)
    _check_run_record(out, {"model": model, "prompts": prompts_source, "options": asdict(options)})
    current = model
    for t, split in enumerate(splits, 1):
        print(f"=== iteration {t}/{len(splits)}: {len(split)} prompts, policy {current}")
        current = str(run_iteration(current, split, out / f"iter{t}", options, scorer=scorer))
    print(f"=== done: final model {current}; per-iteration artefacts in {out}/iter*/")
    if options.evaluate.eval_prompts:  # issue 13: the evaluate stage, after the last iteration
        evaluate.evaluate_run(out, model, options, scorer=scorer)
    return Path(current)
