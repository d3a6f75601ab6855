"""The evaluation's prompt set and its rows: each chat evaluated once, its overlap with the run's training
prompts, and per-prompt rows read back by prompt id.

A repeated eval prompt (the same chat turns as an earlier one, whatever its id) would count as an independent
prompt and narrow the interval: repeats are dropped with a warning. Eval prompts that are also training prompts
of the run (``iter<t>/prompts.jsonl``) are evaluated, with a warning, and reported in ``eval/settings.json``
and ``eval.md``. Files of per-prompt rows (outputs, verdicts) are matched to the prompts by id, never by
position: a file with a missing, unknown or repeated id is refused, naming it (a finished stage's output, or with
``--discard-stale`` made again: :func:`read_by_id`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sppo_kernels.pipeline.core import distributed, schema
from sppo_kernels.pipeline.core.errors import PipelineError
from sppo_kernels.pipeline.core.prompts import Prompt, PromptOptions, load_prompts
from sppo_kernels.pipeline.core.stage import Stage, run_stage
from sppo_kernels.pipeline.core.store import StaleWorkError, read_rows, remove_tree

SHOWN_IDS = 8  # ids listed in a message before "…"


def _chat(prompt: Prompt) -> tuple[tuple[str, str], ...]:
    """What makes two prompts the same: their chat turns (roles and texts), not their ids."""
    return tuple((m["role"], m["content"]) for m in prompt.messages)


def shown(ids: Sequence[Any]) -> str:
    """``ids`` for a message: the first few, then how many more."""
    head = ", ".join(map(str, ids[:SHOWN_IDS]))
    return head + (f", … ({len(ids) - SHOWN_IDS} more)" if len(ids) > SHOWN_IDS else "")


@dataclass(frozen=True)
class EvalPrompts:
    """The prompts to evaluate (each chat once, in file order), the ids of the repeats that were dropped, and
    the ids of those that are also training prompts of the run (None: the run is not known)."""

    prompts: list[Prompt]
    repeated: list[int]
    overlap: list[int] | None

    def warnings(self, source: str) -> list[str]:
        """One line per problem of the set (printed before any work)."""
        lines = []
        if self.repeated:
            lines.append(
                f"{len(self.repeated)} eval prompts of {source} repeat an earlier one and are dropped (ids "
                f"{shown(self.repeated)}): each prompt counts once"
            )
        if self.overlap:
            lines.append(
                f"{len(self.overlap)} of the {len(self.prompts)} eval prompts are training prompts of the run (ids "
                f"{shown(self.overlap)}): the policies were trained on them"
            )
        return lines


def eval_prompts(source: str, options: PromptOptions, training: Sequence[Prompt] | None) -> EvalPrompts:
    """The eval prompts of ``source`` (unique ids required), without repeats, and their overlap with
    ``training`` (the run's training prompts; None when unknown)."""
    loaded = load_prompts(source, options)
    if len({p.id for p in loaded}) != len(loaded):
        raise PipelineError(f"{source}: prompt ids are not unique")
    first: dict[tuple[tuple[str, str], ...], Prompt] = {}
    for prompt in loaded:
        first.setdefault(_chat(prompt), prompt)
    kept = list(first.values())
    repeated = [p.id for p in loaded if first[_chat(p)] is not p]
    trained = None if training is None else {_chat(p) for p in training}
    overlap = None if trained is None else [p.id for p in kept if _chat(p) in trained]
    return EvalPrompts(kept, repeated, overlap)


def run_training_prompts(run_dir: str | Path, iterations: Iterable[int]) -> list[Prompt] | None:
    """The training prompts of ``iterations`` of the run in ``run_dir`` (their ``prompts.jsonl``), or None when
    one is missing (a folder not written by ``run``)."""
    paths = [schema.PROMPTS.path(schema.iteration_dir(run_dir, t)) for t in iterations]
    if not all(path.is_file() for path in paths):
        return None
    return [prompt for path in paths for prompt in load_prompts(str(path))]


def id_mismatch(rows: Sequence[dict[str, Any]], ids: Sequence[Any]) -> str | None:
    """What keeps ``rows`` from being one row per id of ``ids`` (None: nothing)."""
    counts = Counter(row.get("id") for row in rows)
    wanted = set(ids)
    problems = [
        f"{label} {shown(found)}"
        for label, found in (
            ("no row for ids", [i for i in ids if i not in counts]),
            ("rows of unknown ids", [i for i in counts if i not in wanted]),
            ("repeated ids", [i for i, n in counts.items() if n > 1 and i in wanted]),
        )
        if found
    ]
    return f"holds {len(rows)} rows for {len(ids)} prompts ({'; '.join(problems)})" if problems else None


def rows_by_id(rows: Sequence[dict[str, Any]], ids: Sequence[Any], where: str | Path) -> list[dict[str, Any]]:
    """``rows`` in the order of ``ids``, one per id; refused (one line naming ``where``) otherwise."""
    problem = id_mismatch(rows, ids)
    if problem is not None:
        raise PipelineError(f"{where} {problem}")
    by_id = {row["id"]: row for row in rows}
    return [by_id[i] for i in ids]


def read_by_id(stage: Stage, keys: Sequence[str], ids: Sequence[int]) -> list[dict[str, Any]]:
    """Run ``stage`` (skipped when finished) and read its output's rows by prompt id. An output without exactly
    one row per id (edited or truncated by hand) is refused naming it, or with ``--discard-stale`` made again
    (its finished units are reused, each checked the same way)."""
    path = run_stage(stage)
    if distributed.on_rank_zero(lambda: _unmarked_for_mismatch(stage, path, keys, ids)):
        path = run_stage(stage)
    return rows_by_id(read_rows(path, keys), ids, path)


def _unmarked_for_mismatch(stage: Stage, path: Path, keys: Sequence[str], ids: Sequence[int]) -> bool:
    """False when ``path`` holds one row per id; otherwise refused, or with ``--discard-stale`` the stage's marker
    is removed (True: run the stage again)."""
    problem = id_mismatch(read_rows(path, keys), ids) if path.is_file() else "is missing"
    if problem is None:
        return False
    why = f"{path} {problem}"
    if not stage.fingerprint().discard_stale:
        raise StaleWorkError(f"{why}; pass --discard-stale to make it again")
    print(f"discarding: {why}", flush=True)
    remove_tree(schema.marker_path(stage.folder, stage.name))
    return True
