"""``run``: N SPPO iterations on disjoint prompt splits, each stage of the stage table skipped once it has finished.

Iteration t writes its split of the prompts to ``iter<t>/prompts.jsonl``, then runs every stage of
:data:`~sppo_kernels.pipeline.stages.STAGES` in ``iter<t>/`` (the folder layout is in
:mod:`~sppo_kernels.pipeline.schema`), in this process or, where the stage asks for it (vLLM generation, a
training launcher), as ``sppo-train <stage>`` in a child process. Iteration t samples from, and takes its
reference log-probs from, π_t (the base model for t = 1); ``iter<t>/model`` is π_{t+1}.
"""

from __future__ import annotations

import dataclasses
import shlex
import subprocess
from pathlib import Path
from typing import Any

from sppo_kernels.pipeline import evaluate, schema
from sppo_kernels.pipeline.errors import PipelineError
from sppo_kernels.pipeline.options import to_record, validated
from sppo_kernels.pipeline.prompts import Prompt, PromptOptions, load_prompts, split_prompts
from sppo_kernels.pipeline.rank import PairwiseScorer
from sppo_kernels.pipeline.stages import STAGES, PipelineOptions, RunOptions, default_launcher
from sppo_kernels.pipeline.store import read_json, stage_summary, write_json, write_jsonl

__all__ = ["OPERATIONAL", "PipelineOptions", "RunOptions", "default_launcher", "run_iteration", "run_pipeline"]

OPERATIONAL = {("run", "launcher")}  # may change between attempts without changing any result
# The evaluation never changes a trained model, and checks its own settings (eval/settings.json).
OPERATIONAL |= {("evaluate", f.name) for f in dataclasses.fields(evaluate.EvalOptions)}


def _record(options: PipelineOptions) -> dict[str, dict[str, Any]]:
    """``{group: {option name: value}}``, as stored in ``run.json``."""
    return {f.name: to_record(getattr(options, f.name)) for f in dataclasses.fields(options)}


def _check_run_record(out: Path, record: dict[str, Any]) -> None:
    """Write ``run.json``, or check that a previous attempt in ``out`` used the same model, prompts and options."""
    path = out / schema.RUN_RECORD
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
    scorer: PairwiseScorer | None = None,
) -> Path:
    """All stages of one iteration in ``folder`` (finished stages skipped); returns π_{t+1}'s folder."""
    write_jsonl(schema.PROMPTS.path(folder), [p.to_json() for p in prompts])
    options = dataclasses.replace(options, prompts=PromptOptions())  # the split is already selected
    for stage in STAGES:
        if stage_summary(folder, stage.name) is not None:
            print(f"[{stage.name}] finished earlier in {folder}; skipping")
            continue
        inputs = {i.name: model if i.artefact is None else str(i.artefact.path(folder)) for i in stage.inputs}
        command = stage.child(options)
        if command is None:
            stage.run(inputs, folder, options, scorer=scorer)
        else:
            _subprocess([*command, *stage.argv(inputs, folder, options)], stage.name)
        if stage_summary(folder, stage.name) is None:
            raise PipelineError(f"the {stage.name} stage ended without recording completion in {folder}")
    return folder / schema.MODEL_DIR


def run_pipeline(
    model: str,
    prompts_source: str,
    out: str | Path,
    options: PipelineOptions,
    *,
    scorer: PairwiseScorer | None = None,
) -> Path:
    """``options.run.iterations`` SPPO iterations from ``model``; returns the last iteration's model folder."""
    for group in dataclasses.fields(options):
        validated(getattr(options, group.name))
    out = Path(out)
    prompts = load_prompts(prompts_source, options.prompts)
    splits = split_prompts(prompts, options.run.iterations)
    out.mkdir(parents=True, exist_ok=True)
    _check_run_record(out, {"model": model, "prompts": prompts_source, "options": _record(options)})
    current = model
    for t, split in enumerate(splits, 1):
        print(f"=== iteration {t}/{len(splits)}: {len(split)} prompts, policy {current}")
        current = str(run_iteration(current, split, schema.iteration_dir(out, t), options, scorer=scorer))
    print(f"=== done: final model {current}; per-iteration artefacts in {out}/iter*/")
    if options.evaluate.eval_prompts:  # the evaluate stage, after the last iteration
        evaluate.evaluate_run(out, model, options, scorer=scorer)
    return Path(current)
