"""``run``: N SPPO iterations on disjoint prompt splits, each stage of the stage table skipped once it has finished.

Iteration t writes its split of the prompts to ``iter<t>/prompts.jsonl``, then runs every stage of
:data:`~sppo_kernels.pipeline.stages.STAGES` in ``iter<t>/`` (the folder layout is in
:mod:`~sppo_kernels.pipeline.core.schema`), in this process or, where the stage asks for it (vLLM generation, a
training launcher), as ``sppo-train <stage>`` in a child process. Iteration t samples from, and takes its
reference log-probs from, π_t (the base model for t = 1); ``iter<t>/model`` is π_{t+1}.

``run.json`` holds the run's fingerprint (:func:`run_fingerprint`: model and prompt content, judge, options
that change results); a rerun with another one is refused, or with ``--discard-stale`` accepted, after which
each stage reuses exactly the work whose own fingerprint still matches (an earlier stage's changed output
changes the next stage's input hash, so the change cascades).
"""

from __future__ import annotations

import dataclasses
import shlex
import subprocess
from pathlib import Path
from typing import Any

from sppo_kernels.pipeline.core import distributed, schema
from sppo_kernels.pipeline.core.errors import PipelineError
from sppo_kernels.pipeline.core.fingerprint import (
    Fingerprint,
    discarding_stale,
    model_identity,
    prompts_identity,
    stage_fingerprint,
)
from sppo_kernels.pipeline.core.options import to_argv, to_record, validated
from sppo_kernels.pipeline.core.prompts import Prompt, PromptOptions, load_prompts, split_prompts
from sppo_kernels.pipeline.core.store import (
    check_out_dir,
    read_json,
    settle_stale,
    stage_summary,
    write_json,
    write_jsonl,
)
from sppo_kernels.pipeline.evaluation.evaluate import evaluate_run
from sppo_kernels.pipeline.models import chat
from sppo_kernels.pipeline.models.judge import PairwiseScorer, judge_identity
from sppo_kernels.pipeline.models.policy import context_length
from sppo_kernels.pipeline.table import STAGES, PipelineOptions, on_every_gpu

__all__ = ["run_fingerprint", "run_iteration", "run_pipeline"]


def _record(options: PipelineOptions) -> dict[str, dict[str, Any]]:
    """``{group: {option name: value}}``, as stored in ``run.json``."""
    return {f.name: to_record(getattr(options, f.name)) for f in dataclasses.fields(options)}


def run_fingerprint(
    model: str, prompts: list[Prompt], options: PipelineOptions, scorer: PairwiseScorer | None = None
) -> Fingerprint:
    """What a run's results depend on: the model's and the prompts' content, the judge and every fingerprinted
    option (all groups validated here). Stored in ``run.json``; a rerun must match it."""
    groups = [getattr(options, f.name) for f in dataclasses.fields(options)]
    if scorer is not None:  # a plugged-in judge replaces the ranker checkpoint
        groups = [dataclasses.replace(g, ranker=None) if g is options.rank else g for g in groups]
    inputs = {"model": model_identity(model), "prompts": prompts_identity(prompts), "judge": judge_identity(scorer)}
    return stage_fingerprint("run", inputs, *groups)


def _check_run_record(out: Path, fingerprint: Fingerprint, record: dict[str, Any]) -> None:
    """Write ``run.json``, or check that a previous attempt in ``out`` had the same fingerprint: a different one is
    refused, or (``--discard-stale``) replaced; the stages then reuse what still matches."""
    path = out / schema.RUN_RECORD
    stored = read_json(path) if path.is_file() else None
    if stored is None or not settle_stale(f"the run in {out}", stored.get("fingerprint"), fingerprint, lambda: None):
        write_json(path, {**record, "fingerprint": fingerprint.record})


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
    """All stages of one iteration in ``folder`` (a stage skips itself when it finished with the same
    fingerprint); returns π_{t+1}'s folder."""
    write_jsonl(schema.PROMPTS.path(folder), [p.to_json() for p in prompts])
    options = dataclasses.replace(options, prompts=PromptOptions())  # the split is already selected
    for stage in STAGES:
        inputs = {i.name: model if i.artefact is None else str(i.artefact.path(folder)) for i in stage.inputs}
        command = stage.child(options, scorer)
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
    """``options.run.iterations`` SPPO iterations from ``model``; returns the last iteration's model folder.

    Everything is checked before anything is written: the options, ``out``, the model folder, every prompt (and
    that it fits in the model's context) and ``run.json`` of an earlier attempt."""
    with discarding_stale(options.reuse.discard_stale):
        return _run_pipeline(model, prompts_source, Path(out), options, scorer)


def _run_pipeline(
    model: str, prompts_source: str, out: Path, options: PipelineOptions, scorer: PairwiseScorer | None
) -> Path:
    if distributed.launched_world_size() > 1:
        raise PipelineError(
            "start sppo-train run once, not under a launcher: it starts each stage under --launcher (default: "
            "torchrun over the local GPUs)"
        )
    for group in dataclasses.fields(options):
        validated(getattr(options, group.name))
    check_out_dir(out)
    prompts = load_prompts(prompts_source, options.prompts)
    fingerprint = run_fingerprint(model, prompts, options, scorer)
    splits = split_prompts(prompts, options.run.iterations)
    trust = options.model.trust_remote_code
    chat.encode_prompts(
        chat.load_tokenizer(model, trust_remote_code=trust), prompts, context_length(model, trust_remote_code=trust)
    )
    out.mkdir(parents=True, exist_ok=True)
    _check_run_record(out, fingerprint, {"model": model, "prompts": prompts_source, "options": _record(options)})
    current = model
    for t, split in enumerate(splits, 1):
        print(f"=== iteration {t}/{len(splits)}: {len(split)} prompts, policy {current}")
        current = str(run_iteration(current, split, schema.iteration_dir(out, t), options, scorer=scorer))
    print(f"=== done: final model {current}; per-iteration artefacts in {out}/iter*/")
    if options.evaluate.eval_prompts:  # the evaluate stage, after the last iteration
        run_evaluation(out, model, options, scorer)
    return Path(current)


def run_evaluation(out: Path, model: str, options: PipelineOptions, scorer: PairwiseScorer | None) -> None:
    """The evaluate stage of ``run``: in this process, or ``sppo-train eval --run`` on every GPU (the run's
    options are passed as flags, so it evaluates what ``run.json`` records)."""
    command = on_every_gpu(options, scorer)
    if command is None:
        evaluate_run(out, model, options, scorer=scorer)
        return
    groups = ("prompts", "model", "generate", "rank", "evaluate", "reuse")
    flags = [flag for group in groups for flag in to_argv(getattr(options, group))]
    _subprocess([*command, "eval", "--run", str(out), *flags], schema.EVALUATE_STAGE)
