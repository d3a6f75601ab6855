"""The files of an ``sppo-train`` run: names, row keys and columns of every artefact, the folder layout and the
completion markers. Stages, ``run`` and the tests take names and columns from here, never from one another.

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

Adding a column: add it to its artefact here (and write it in its stage); a column that TRAIN_DATA shares with
TARGETS is carried over by the reflogps stage without further edits.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CHECKPOINTS",
    "GENERATIONS",
    "LATEST_CHECKPOINT",
    "LOSS_PLOT",
    "MARKER_DIR",
    "METRICS",
    "MODEL_DIR",
    "PROMPTS",
    "RANKINGS",
    "RUN_RECORD",
    "TARGETS",
    "TRAIN_DATA",
    "Artefact",
    "iteration_dir",
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

RUN_RECORD = "run.json"
LOSS_PLOT = "loss.png"
MODEL_DIR = "model"
CHECKPOINTS = "checkpoints"
LATEST_CHECKPOINT = (
    "latest.json"  # in CHECKPOINTS: {"tag": "step-0000042", "step": 42, "files": {…}, "fingerprint": {…}}
)
MARKER_DIR = "stages"


def iteration_dir(out: str | os.PathLike[str], iteration: int) -> Path:
    """The folder of iteration ``iteration`` (1-based) of the run in ``out``."""
    return Path(out) / f"iter{iteration}"


def marker_path(folder: str | os.PathLike[str], stage: str) -> Path:
    """The completion marker of ``stage`` in ``folder``."""
    return Path(folder) / MARKER_DIR / f"{stage}.json"


def units_dir(folder: str | os.PathLike[str], stage: str) -> Path:
    """Where ``stage`` keeps its finished units of work in ``folder``."""
    return Path(folder) / f"{stage}_units"
