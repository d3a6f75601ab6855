"""The files of an ``sppo-train`` run: names, row keys and columns of every artefact, the folder layout, the
stage names and the completion markers. Stages, the evaluation, ``run``, the demo and the tests take names and
columns from here, never from one another and never as literals.

Layout of a run folder ``out``::

    run.json                  RUN_RECORD     the model, prompts, every option and the fingerprint (a rerun must match)
    iter1/                    iteration_dir(out, 1)
      prompts.jsonl           PROMPTS        run: this iteration's split of the prompts
      generations.jsonl       GENERATIONS    generate
      rankings.jsonl          RANKINGS       rank
      targets.jsonl           TARGETS        targets
      train_data.parquet      TRAIN_DATA     reflogps
      metrics.jsonl           METRICS        train: one row per optimizer step
      loss.png                LOSS_PLOT      train
      model/                  MODEL_DIR      train: π_{t+1}, the policy and reference of iteration t+1
      stages/<stage>.json     marker_path    completion marker, summary and fingerprint of each stage (written last)
      <stage>_units/          units_dir      resumable partial work (generate, rank, reflogps), with its fingerprint
      checkpoints/            CHECKPOINTS    train's resumable DeepSpeed state; LATEST_CHECKPOINT names the newest,
                                             lists its files and carries its fingerprint
    iter2/...
    eval.json, eval.md, eval.png  EVAL_JSON, EVAL_TABLE, EVAL_PLOT: the evaluation's results (or in eval --out)
    eval/                     EVAL_DIR
      settings.json           EVAL_SETTINGS  policies, baseline, prompts and options of the evaluation
      iter<t>/ or baseline/   eval_policy_dir(eval_dir, t)  (None: the baseline)
        outputs.jsonl         EVAL_OUTPUTS   one response per eval prompt
        model_outputs.json    MODEL_OUTPUTS  the same in AlpacaEval's format
        judgments-<judge>.jsonl   judgments_path(folder, judge): both orders' logits and the verdict per prompt

The demo (``sppo-train demo --out D``) writes DEMO_DATA/ (prompt files), DEMO_ASSETS/ (tiny policy and judge),
DEMO_RUN/ (a run folder as above) and DEMO_LOG.

Adding a column: add it to its artefact here (and write it in its stage); a column that TRAIN_DATA shares with
TARGETS is carried over by the reflogps stage without further edits.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CHECKPOINTS",
    "DEMO_ASSETS",
    "DEMO_DATA",
    "DEMO_LOG",
    "DEMO_RUN",
    "EVALUATE_STAGE",
    "EVAL_DIR",
    "EVAL_JSON",
    "EVAL_OUTPUTS",
    "EVAL_PLOT",
    "EVAL_SETTINGS",
    "EVAL_TABLE",
    "GENERATE_STAGE",
    "GENERATIONS",
    "ITERATION_STAGES",
    "JUDGE_STAGE",
    "JUDGMENTS",
    "LATEST_CHECKPOINT",
    "LOSS_PLOT",
    "MARKER_DIR",
    "METRICS",
    "MODEL_DIR",
    "MODEL_OUTPUTS",
    "PROMPTS",
    "RANKINGS",
    "RANK_STAGE",
    "REFLOGPS_STAGE",
    "RUN_RECORD",
    "TARGETS",
    "TARGETS_STAGE",
    "TRAIN_DATA",
    "TRAIN_STAGE",
    "Artefact",
    "eval_policy_dir",
    "iteration_dir",
    "iteration_name",
    "judgments_path",
    "marker_path",
    "units_dir",
]


@dataclass(frozen=True)
class Artefact:
    """One data file of an iteration folder: its name and the keys of its rows (JSON lines) or its columns
    (parquet), in the order they are written."""

    name: str
    columns: tuple[str, ...]
    optional: tuple[str, ...] = ()  # written, but not required from a file given to a stage (e.g. written by hand)

    @property
    def required(self) -> tuple[str, ...]:
        """The columns a stage reading this artefact checks for."""
        return tuple(column for column in self.columns if column not in self.optional)

    def path(self, folder: str | os.PathLike[str]) -> Path:
        """This artefact in ``folder``."""
        return Path(folder) / self.name


# {"id": 3, "messages": [{"role", "content"}, ...]}: the chat turns before the reply; ids index the full prompt set.
PROMPTS = Artefact("prompts.jsonl", ("id", "messages"))
# One row per prompt: K responses, each with its finish reason ("stop" | "length") and its number of tokens.
GENERATIONS = Artefact(
    "generations.jsonl", ("id", "messages", "responses", "finish_reasons", "num_tokens"), optional=("num_tokens",)
)
# One row per prompt: logits[i][j], the judge's logit that response i beats response j (0 on the diagonal).
RANKINGS = Artefact("rankings.jsonl", ("id", "logits"))
# One row per training sequence (a pair's chosen row directly precedes its rejected row).
TARGETS = Artefact(
    "targets.jsonl",
    ("id", "messages", "response", "response_index", "role", "target", "loss_scale", "score", "complete"),
    optional=("score",),
)
# One row per training sequence, tokenised, with its log-prob under π_t (a ``datasets`` parquet table).
TRAIN_DATA = Artefact(
    "train_data.parquet",
    ("id", "role", "response_index", "target", "loss_scale", "input_ids", "prompt_length", "truncated", "ref_logp"),
)
# One row per optimizer step; log_ratio_up/down are None when no sequence of the step had a target above/below ½.
METRICS = Artefact(
    "metrics.jsonl",
    (
        "step",
        "epoch",
        "loss",
        "log_ratio",
        "policy_logp",
        "log_ratio_up",
        "log_ratio_down",
        "lr",
        "grad_norm",
        "sequences",
        "tokens",
        "seconds",
    ),
)

# The evaluation's results: a JSON list, one row per (iteration, judge), sorted by iteration then judge.
EVAL_JSON = Artefact(
    "eval.json",
    ("iteration", "judge", "n", "win_rate", "win_rate_ci", "lc_win_rate", "avg_length_tokens", "avg_length_chars",
     "wins", "ties", "losses"),
)  # fmt: skip
# Eval outputs of one policy, one row per eval prompt (the end-of-turn token is not counted in num_tokens).
EVAL_OUTPUTS = Artefact("outputs.jsonl", ("id", "instruction", "output", "num_tokens", "finish_reason"))
# Verdicts of one judge on one policy against the baseline, one row per eval prompt.
JUDGMENTS = Artefact("judgments-{judge}.jsonl", ("id", "logits", "preference", "outcome"), optional=("logits",))

# Stage names: subcommands, completion markers (stages/<name>.json) and units folders (<name>_units/)
GENERATE_STAGE = "generate"
RANK_STAGE = "rank"
TARGETS_STAGE = "targets"
REFLOGPS_STAGE = "reflogps"
TRAIN_STAGE = "train"
ITERATION_STAGES = (GENERATE_STAGE, RANK_STAGE, TARGETS_STAGE, REFLOGPS_STAGE, TRAIN_STAGE)  # in run's order
EVALUATE_STAGE = "evaluate"
JUDGE_STAGE = "judge"  # the evaluation's judging of one policy by one judge: marker judge-<judge>

RUN_RECORD = "run.json"
LOSS_PLOT = "loss.png"
MODEL_DIR = "model"
CHECKPOINTS = "checkpoints"
LATEST_CHECKPOINT = (
    "latest.json"  # in CHECKPOINTS: {"tag": "step-0000042", "step": 42, "files": {…}, "fingerprint": {…}}
)
MARKER_DIR = "stages"
EVAL_TABLE = "eval.md"
EVAL_PLOT = "eval.png"
EVAL_DIR = "eval"
EVAL_SETTINGS = "settings.json"
MODEL_OUTPUTS = "model_outputs.json"
DEMO_DATA = "data"
DEMO_ASSETS = "assets"
DEMO_RUN = "run"
DEMO_LOG = "demo.log"


def iteration_dir(out: str | os.PathLike[str], iteration: int) -> Path:
    """The folder of iteration ``iteration`` (1-based) of the run in ``out``."""
    return Path(out) / iteration_name(iteration)


def iteration_name(iteration: int) -> str:
    """``iter<t>``: the folder of iteration t in a run, and its name in the evaluation (0: the base model)."""
    return f"iter{iteration}"


def eval_policy_dir(eval_dir: str | os.PathLike[str], iteration: int | None) -> Path:
    """Where the evaluation keeps the outputs and verdicts of iteration ``iteration`` (None: the baseline)."""
    return Path(eval_dir) / ("baseline" if iteration is None else iteration_name(iteration))


def judgments_path(folder: str | os.PathLike[str], judge: str) -> Path:
    """The verdicts of ``judge`` in a policy's evaluation folder."""
    return Path(folder) / JUDGMENTS.name.format(judge=judge)


def marker_path(folder: str | os.PathLike[str], stage: str) -> Path:
    """The completion marker of ``stage`` in ``folder``."""
    return Path(folder) / MARKER_DIR / f"{stage}.json"


def units_dir(folder: str | os.PathLike[str], stage: str) -> Path:
    """Where ``stage`` keeps its finished units of work in ``folder``."""
    return Path(folder) / f"{stage}_units"
