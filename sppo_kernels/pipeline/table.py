"""The stage table: every stage of ``sppo-train`` with its inputs, its option groups and how it is run.

``cli`` makes one subcommand per entry of :data:`STAGES` (its inputs become required flags, its option groups
become flags), and ``run`` runs the entries in order in each iteration folder, passing each input the file of
the folder that the schema names (the model input: the current policy). Adding a stage: write its module (a
:class:`~sppo_kernels.pipeline.core.stage.Stage`, its ``run_*`` function and its options dataclass), add its
options group to :class:`PipelineOptions` and its :class:`StageSpec` to :data:`STAGES` here.
"""

from __future__ import annotations

import shlex
import shutil
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sppo_kernels.pipeline.core import schema
from sppo_kernels.pipeline.core.distributed import visible_devices
from sppo_kernels.pipeline.core.errors import PipelineError
from sppo_kernels.pipeline.core.fingerprint import discarding_stale
from sppo_kernels.pipeline.core.options import at_least, opt, to_argv
from sppo_kernels.pipeline.core.prompts import PromptOptions, load_prompts
from sppo_kernels.pipeline.core.store import ReuseOptions
from sppo_kernels.pipeline.evaluation.evaluate import EvalOptions
from sppo_kernels.pipeline.models.judge import RankOptions
from sppo_kernels.pipeline.models.policy import ModelOptions
from sppo_kernels.pipeline.models.sampling import GenerateOptions, engine_name
from sppo_kernels.pipeline.stages import generate, rank, reflogps, targets, train

__all__ = [
    "COMMON_GROUPS",
    "STAGES",
    "STAGE_NAMES",
    "Input",
    "PipelineOptions",
    "RunOptions",
    "StageSpec",
    "cli_command",
    "stage",
]


@dataclass
class RunOptions:
    """Iteration control."""

    iterations: int = opt(3, "SPPO iterations, each on its own split of the prompts", check=at_least(1))
    launcher: str | None = opt(
        None,
        "command that starts every stage but targets in several processes, e.g. 'torchrun --nproc_per_node 8', "
        "'deepspeed --hostfile hosts' or 'srun --ntasks-per-node 8' (default: torchrun over the local GPUs when "
        "there are several, one process per --tensor-parallel-size GPUs for vLLM; else in this process)",
        fingerprinted=False,
    )


@dataclass
class PipelineOptions:
    """Every option of every stage, by group (a group's flags are those of its options dataclass)."""

    run: RunOptions = field(default_factory=RunOptions)
    reuse: ReuseOptions = field(default_factory=ReuseOptions)
    prompts: PromptOptions = field(default_factory=PromptOptions)
    model: ModelOptions = field(default_factory=ModelOptions)
    generate: GenerateOptions = field(default_factory=GenerateOptions)
    rank: RankOptions = field(default_factory=RankOptions)
    targets: targets.TargetsOptions = field(default_factory=targets.TargetsOptions)
    reflogps: reflogps.RefLogpsOptions = field(default_factory=reflogps.RefLogpsOptions)
    train: train.TrainOptions = field(default_factory=train.TrainOptions)
    evaluate: EvalOptions = field(default_factory=EvalOptions)  # run-level, after the last iteration


@dataclass(frozen=True)
class Input:
    """An input of a stage: the flag ``--<name>`` of its subcommand, and what ``run`` passes for it."""

    name: str
    help: str
    artefact: schema.Artefact | None = None  # in a run, this file of the iteration folder; None: the policy π_t


MODEL = Input("model", "policy π_t: a local folder or a hub name")
PROMPTS = Input("prompts", "prompt file (.jsonl/.json/.txt) or a datasets name/folder", schema.PROMPTS)
GENERATIONS = Input("generations", schema.GENERATIONS.name, schema.GENERATIONS)
RANKINGS = Input("rankings", schema.RANKINGS.name, schema.RANKINGS)
TARGETS = Input("targets", schema.TARGETS.name, schema.TARGETS)
DATA = Input("data", schema.TRAIN_DATA.name, schema.TRAIN_DATA)

Inputs = Mapping[str, str]  # input name -> the model, or a file's path
Runner = Callable[[Inputs, Path, PipelineOptions, Any], Path]  # (inputs, out, options, scorer) -> main output


def cli_command(launcher: str | None) -> list[str]:
    """The command that runs ``sppo-train`` in a child process: ``python -m`` without a launcher, else the
    launcher running the ``sppo-train`` console script (launchers take a script path)."""
    if not launcher:
        return [sys.executable, "-m", "sppo_kernels.pipeline.cli"]
    script = Path(sys.executable).with_name("sppo-train")
    found = str(script) if script.is_file() else shutil.which("sppo-train")
    if found is None:
        raise PipelineError("--launcher needs the sppo-train console script: pip install the package")
    return [*shlex.split(launcher), found]


def default_launcher(processes: int) -> str | None:
    """torchrun with ``processes`` processes on this node when there are several, else None."""
    return f"torchrun --standalone --nproc_per_node {processes}" if processes > 1 else None


def launched(options: PipelineOptions, processes: int) -> list[str] | None:
    """The command that starts a data-parallel stage: ``--launcher``, else torchrun over ``processes`` local
    processes when there are several, else None (the stage runs in the process of ``run``)."""
    launcher = options.run.launcher or default_launcher(processes)
    return cli_command(launcher) if launcher else None


def in_process(_options: PipelineOptions, _scorer: Any) -> list[str] | None:
    """The stage runs in the process of ``run``."""
    return None


def on_every_gpu(options: PipelineOptions, scorer: Any) -> list[str] | None:
    """One process per visible GPU (or ``--launcher``'s); in-process with a Python judge, which cannot travel."""
    return None if scorer is not None else launched(options, len(visible_devices()))


COMMON_GROUPS = ("reuse",)  # option groups of every stage (and of run): what to do with stale work in --out


@dataclass(frozen=True)
class StageSpec:
    """One stage: its name (subcommand, marker), its inputs, the option groups it takes (besides
    :data:`COMMON_GROUPS`), its runner, and ``child(options, scorer)``: the command that runs it in child
    processes during ``run`` (under a launcher, data-parallel), or None for in-process."""

    name: str
    inputs: tuple[Input, ...]
    groups: tuple[str, ...]
    runner: Runner
    child: Callable[[PipelineOptions, Any], list[str] | None] = in_process
    help: str = ""  # of its subcommand

    @property
    def option_groups(self) -> tuple[str, ...]:
        """Its option groups and the common ones: the flags of its subcommand."""
        return (*self.groups, *COMMON_GROUPS)

    def run(self, inputs: Inputs, out: Path, options: PipelineOptions, *, scorer: Any = None) -> Path:
        """Run the stage in this process on ``inputs`` (``{input name: value}``), writing into ``out``; stale
        work there is discarded with ``options.reuse.discard_stale``, else refused."""
        with discarding_stale(options.reuse.discard_stale):
            return self.runner(inputs, out, options, scorer)

    def argv(self, inputs: Inputs, out: Path, options: PipelineOptions) -> list[str]:
        """The ``sppo-train`` arguments that run the stage as :meth:`run` does."""
        argv = [self.name, *(arg for i in self.inputs for arg in (f"--{i.name}", str(inputs[i.name])))]
        flags = (arg for g in self.option_groups for arg in to_argv(getattr(options, g)))
        return [*argv, "--out", str(out), *flags]


# Runners: ``runner(inputs, out, options, scorer)`` calls the stage's ``run_*`` function.


def _generate(i: Inputs, out: Path, o: PipelineOptions, scorer: Any) -> Path:
    return generate.run_generate(i["model"], load_prompts(str(i["prompts"]), o.prompts), out, o.generate, o.model)


def _rank(i: Inputs, out: Path, o: PipelineOptions, scorer: Any) -> Path:
    return rank.run_rank(i["generations"], out, o.rank, scorer=scorer)


def _targets(i: Inputs, out: Path, o: PipelineOptions, scorer: Any) -> Path:
    return targets.run_targets(i["generations"], i["rankings"], out, o.targets)


def _reflogps(i: Inputs, out: Path, o: PipelineOptions, scorer: Any) -> Path:
    return reflogps.run_reflogps(i["model"], i["targets"], out, o.reflogps, o.model)


def _train(i: Inputs, out: Path, o: PipelineOptions, scorer: Any) -> Path:
    return train.run_train(i["model"], i["data"], out, o.train, o.model)


def _generate_child(o: PipelineOptions, _scorer: Any) -> list[str] | None:
    """vLLM: one engine process per --tensor-parallel-size GPUs, each on its own GPUs; a child process even on one
    GPU, so the engine's memory is returned before the next stage. HF: one process per GPU."""
    if engine_name(o.generate) == "hf":
        return on_every_gpu(o, None)
    engines = max(1, len(visible_devices()) // o.generate.tensor_parallel_size)
    return launched(o, engines) or cli_command(None)


# fmt: off
STAGES: tuple[StageSpec, ...] = (  # in the order run runs them
    #         name                   inputs                  option groups                     runner
    StageSpec(schema.GENERATE_STAGE, (MODEL, PROMPTS),       ("prompts", "model", "generate"), _generate,
              child=_generate_child, help="sample K responses per prompt"),
    StageSpec(schema.RANK_STAGE,     (GENERATIONS,),         ("rank",),                        _rank,
              child=on_every_gpu, help="judge the responses pairwise (PairRM)"),
    StageSpec(schema.TARGETS_STAGE,  (GENERATIONS, RANKINGS), ("targets",),                    _targets,
              help="win-rate targets from the judge logits"),
    StageSpec(schema.REFLOGPS_STAGE, (MODEL, TARGETS),       ("model", "reflogps"),            _reflogps,
              child=on_every_gpu, help="tokenise and store log-probs under π_t"),
    StageSpec(schema.TRAIN_STAGE,    (MODEL, DATA),          ("model", "train"),               _train,
              child=on_every_gpu, help="one SPPO epoch with DeepSpeed"),
)
# fmt: on
STAGE_NAMES = tuple(s.name for s in STAGES)


def stage(name: str) -> StageSpec:
    """The stage called ``name``."""
    return next(s for s in STAGES if s.name == name)
