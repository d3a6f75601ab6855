"""sppo-train: the SPPO pipeline on the command line.

sppo-train run --model M --prompts P --out runs/x [--iterations 3 ...]   all stages, all iterations, resumable
sppo-train generate|rank|targets|reflogps|train ...                      one stage
sppo-train eval --run runs/x --eval-prompts P                            win rates of each iteration vs the base
sppo-train demo --out DIR                                                CPU-size replica of the paper, no downloads
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from sppo_kernels.pipeline.errors import PipelineError
from sppo_kernels.pipeline.evaluate import EvalOptions, add_eval_command
from sppo_kernels.pipeline.generate import GenerateOptions
from sppo_kernels.pipeline.modeling import ModelOptions
from sppo_kernels.pipeline.options import add_options, from_args
from sppo_kernels.pipeline.prompts import PromptOptions
from sppo_kernels.pipeline.rank import RankOptions
from sppo_kernels.pipeline.reflogps import RefLogpsOptions
from sppo_kernels.pipeline.run import PipelineOptions, RunOptions
from sppo_kernels.pipeline.targets import TargetsOptions
from sppo_kernels.pipeline.train import TrainOptions

GROUPS = {
    "run": RunOptions,
    "prompts": PromptOptions,
    "model": ModelOptions,
    "generate": GenerateOptions,
    "rank": RankOptions,
    "targets": TargetsOptions,
    "reflogps": RefLogpsOptions,
    "train": TrainOptions,
    "evaluate": EvalOptions,  # issue 13: run's evaluate stage
}
STAGE_GROUPS = {
    "generate": ("prompts", "model", "generate"),
    "rank": ("rank",),
    "targets": ("targets",),
    "reflogps": ("model", "reflogps"),
    "train": ("model", "train"),
    "run": tuple(GROUPS),
}


def build_parser() -> argparse.ArgumentParser:
    """The ``sppo-train`` argument parser with one subcommand per stage, plus ``run`` and ``demo``."""
    parser = argparse.ArgumentParser(prog="sppo-train", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str, inputs: Sequence[tuple[str, str]]) -> None:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        for flag, what in inputs:
            sub.add_argument(flag, required=True, help=what)
        sub.add_argument("--out", required=True, type=Path, help="output folder")
        for group in STAGE_GROUPS[name]:
            add_options(sub, GROUPS[group], title=f"{group} options")

    model = ("--model", "policy π_t: a local folder or a hub name")
    prompts = ("--prompts", "prompt file (.jsonl/.json/.txt) or a datasets name/folder")
    command("run", "all stages for N iterations (resumes an interrupted run)", [model, prompts])
    command("generate", "sample K responses per prompt", [model, prompts])
    command("rank", "judge the responses pairwise (PairRM)", [("--generations", "generations.jsonl")])
    command(
        "targets",
        "win-rate targets from the judge logits",
        [("--generations", "generations.jsonl"), ("--rankings", "rankings.jsonl")],
    )
    command("reflogps", "tokenise and store log-probs under π_t", [model, ("--targets", "targets.jsonl")])
    command("train", "one SPPO epoch with DeepSpeed", [model, ("--data", "train_data.parquet")])
    add_eval_command(commands)  # issue 13
    demo = commands.add_parser(
        "demo", help="CPU-size replica of the paper's experiment: 3 SPPO iterations and their win rates (offline)"
    )
    demo.add_argument("--out", type=Path, default=Path("sppo-demo"), help="output folder (default: ./sppo-demo)")
    demo.add_argument("--arch", choices=("llama", "gemma2"), default="llama", help="tiny policy architecture")
    demo.add_argument("--iterations", type=int, default=3, help="SPPO iterations (default: 3, as in the paper)")
    return parser


def _options(args: argparse.Namespace) -> PipelineOptions:
    return PipelineOptions(**{group: from_args(GROUPS[group], args) for group in STAGE_GROUPS[args.command]})


def dispatch(args: argparse.Namespace) -> None:
    """Run the parsed subcommand."""
    from sppo_kernels.pipeline import demo, evaluate, generate, rank, reflogps, run, targets, train
    from sppo_kernels.pipeline.prompts import load_prompts

    if args.command == "demo":
        demo.run_demo(args.out, arch=args.arch, iterations=args.iterations)
        return
    if args.command == "eval":  # issue 13
        evaluate.eval_command(args)
        return
    o = _options(args)
    if args.command == "run":
        run.run_pipeline(args.model, args.prompts, args.out, o)
    elif args.command == "generate":
        prompts = load_prompts(args.prompts, o.prompts)
        generate.run_generate(args.model, prompts, args.out, o.generate, o.model)
    elif args.command == "rank":
        rank.run_rank(args.generations, args.out, o.rank)
    elif args.command == "targets":
        targets.run_targets(args.generations, args.rankings, args.out, o.targets)
    elif args.command == "reflogps":
        reflogps.run_reflogps(args.model, args.targets, args.out, o.reflogps, o.model)
    else:
        train.run_train(args.model, args.data, args.out, o.train, o.model)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; user errors print one line and exit with status 2."""
    # DeepSpeed calls torch.distributed collectives that torch 2.13 renamed; one warning per call is noise.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        dispatch(args)
    except PipelineError as e:
        parser.exit(2, f"sppo-train: error: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
