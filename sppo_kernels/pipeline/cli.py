"""sppo-train: the SPPO pipeline on the command line.

sppo-train run --model M --prompts P --out runs/x [--iterations 3 ...]   all stages, all iterations, resumable
sppo-train generate|rank|targets|reflogps|train ...                      one stage
sppo-train eval --run runs/x --eval-prompts P                            win rates of each iteration vs the base
sppo-train demo --out DIR                                                CPU-size replica of the paper, no downloads
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from sppo_kernels.pipeline import run
from sppo_kernels.pipeline.core import distributed
from sppo_kernels.pipeline.core.errors import PipelineError
from sppo_kernels.pipeline.core.options import add_options, from_args
from sppo_kernels.pipeline.evaluation.command import add_eval_command, eval_command
from sppo_kernels.pipeline.table import MODEL, PROMPTS, STAGES, Input, PipelineOptions, stage

GROUPS = {f.name: f.default_factory for f in dataclasses.fields(PipelineOptions)}  # option group -> its dataclass


def build_parser() -> argparse.ArgumentParser:
    """The ``sppo-train`` argument parser: ``run``, one subcommand per stage of the stage table, and ``demo``."""
    parser = argparse.ArgumentParser(prog="sppo-train", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str, inputs: Sequence[Input], groups: Sequence[str]) -> None:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        for i in inputs:
            sub.add_argument(f"--{i.name}", required=True, help=i.help)
        sub.add_argument("--out", required=True, type=Path, help="output folder")
        for group in groups:
            add_options(sub, GROUPS[group], title=f"{group} options")

    command("run", "all stages for N iterations (resumes an interrupted run)", (MODEL, PROMPTS), tuple(GROUPS))
    for s in STAGES:
        command(s.name, s.help, s.inputs, s.option_groups)
    add_eval_command(commands)
    demo = commands.add_parser(
        "demo", help="CPU-size replica of the paper's experiment: 3 SPPO iterations and their win rates (offline)"
    )
    demo.add_argument("--out", type=Path, default=Path("sppo-demo"), help="output folder (default: ./sppo-demo)")
    demo.add_argument("--arch", choices=("llama", "gemma2"), default="llama", help="tiny policy architecture")
    demo.add_argument("--iterations", type=int, default=3, help="SPPO iterations (default: 3, as in the paper)")
    return parser


def _options(args: argparse.Namespace, groups: Sequence[str]) -> PipelineOptions:
    """The options of ``groups`` from the parsed flags, the other groups' defaults."""
    return PipelineOptions(**{group: from_args(GROUPS[group], args) for group in groups})


def dispatch(args: argparse.Namespace) -> None:
    """Run the parsed subcommand."""
    if args.command == "demo":
        from sppo_kernels.pipeline.demo.replica import run_demo

        run_demo(args.out, arch=args.arch, iterations=args.iterations)
        return
    if args.command == "eval":
        eval_command(args)
    elif args.command == "run":
        run.run_pipeline(args.model, args.prompts, args.out, _options(args, tuple(GROUPS)))
    else:
        chosen = stage(args.command)
        chosen.run(
            {i.name: getattr(args, i.name) for i in chosen.inputs}, args.out, _options(args, chosen.option_groups)
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; user errors print one line and exit with status 2."""
    # DeepSpeed calls torch.distributed collectives that torch 2.13 renamed; one warning per call is noise.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        dispatch(args)
    except PipelineError as e:  # every rank stops (a launcher stops the others when one fails)
        parser.exit(2, f"sppo-train: error: {e}\n")
    distributed.leave()
    return 0


if __name__ == "__main__":
    sys.exit(main())
