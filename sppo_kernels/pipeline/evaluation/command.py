"""``sppo-train eval``: the evaluation on the command line, for a run folder or a list of models."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from sppo_kernels.pipeline.core import schema
from sppo_kernels.pipeline.core.errors import PipelineError
from sppo_kernels.pipeline.core.fingerprint import discarding_stale
from sppo_kernels.pipeline.core.options import add_options, from_args
from sppo_kernels.pipeline.core.prompts import PromptOptions
from sppo_kernels.pipeline.core.store import ReuseOptions, read_json
from sppo_kernels.pipeline.evaluation.evaluate import EvalOptions, Policy, evaluate, run_policies
from sppo_kernels.pipeline.evaluation.prompt_sets import run_training_prompts
from sppo_kernels.pipeline.models.judge import RankOptions
from sppo_kernels.pipeline.models.policy import ModelOptions
from sppo_kernels.pipeline.models.sampling import GenerateOptions

GROUPS = {
    "prompts": PromptOptions,
    "model": ModelOptions,
    "generate": GenerateOptions,
    "rank": RankOptions,
    "evaluate": EvalOptions,
    "reuse": ReuseOptions,
}
NOT_INHERITED = ("reuse",)  # what to do with stale work is this command's choice, never the run's


def add_eval_command(commands: Any) -> None:
    """The ``sppo-train eval`` subcommand."""
    text = "win rates of a run's iterations against the base model, judged by PairRM (AlpacaEval-style)"
    sub = commands.add_parser("eval", help=text, description=text)
    source = sub.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", type=Path, help="a `sppo-train run` folder: its base model and every iter<t>/model")
    source.add_argument("--models", nargs="+", help="models in iteration order, the first being the base (iteration 0)")
    sub.add_argument("--out", type=Path, help="output folder (default: the --run folder)")
    for group, cls in GROUPS.items():
        add_options(sub, cls, title=f"{group} options")


def eval_command(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run ``sppo-train eval``: with ``--run``, options not given on the command line default to the run's
    (``run.json`` records every option under its one name, the field's), but for ``--discard-stale``, and eval
    prompts that are training prompts of the run are reported."""
    recorded: dict[str, Any] = {}
    training = None
    if args.run is not None:
        record = read_json(Path(args.run) / schema.RUN_RECORD)
        recorded = {k: v for k, v in record.get("options", {}).items() if k not in NOT_INHERITED}
        policies = run_policies(str(record["model"]), args.run)
        training = run_training_prompts(args.run, [p.iteration for p in policies if p.iteration > 0])
        out = args.out or args.run
    else:
        policies = [Policy(t, model) for t, model in enumerate(args.models)]
        if args.out is None:
            raise PipelineError("eval --models needs --out")
        out = args.out
    groups = {group: from_args(cls, args, **_known(cls, recorded.get(group, {}))) for group, cls in GROUPS.items()}
    evaluation: EvalOptions = groups["evaluate"]
    if evaluation.eval_prompts is None:
        raise PipelineError("eval needs --eval-prompts (held-out prompts)")
    with discarding_stale(groups["reuse"].discard_stale):
        return evaluate(
            policies,
            evaluation.eval_prompts,
            out,
            evaluation,
            groups["generate"],
            groups["model"],
            groups["rank"],
            groups["prompts"],
            training_prompts=training,
        )


def _known(cls: type, recorded: dict[str, Any]) -> dict[str, Any]:
    """The recorded options that ``cls`` has (a record may hold options of other versions)."""
    names = {field.name for field in dataclasses.fields(cls)}
    return {name: value for name, value in recorded.items() if name in names}
