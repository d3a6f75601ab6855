"""Prompt sets: load from a file or a ``datasets`` dataset, and split into disjoint per-iteration parts.

A prompt is a chat (``messages``: the turns before the assistant's reply). Accepted sources:

- ``.jsonl`` / ``.json`` (a list): objects with a ``prompt`` string or a ``messages`` list (column names configurable);
- ``.txt``: one prompt per non-empty line;
- anything else: a ``datasets`` name or local dataset folder, loaded with ``datasets.load_dataset``.

Prompt ids are the row positions, unless every row carries a distinct integer ``id`` (as the per-iteration
``prompts.jsonl`` files written by ``run`` do).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from sppo_kernels.pipeline.errors import PipelineError
from sppo_kernels.pipeline.options import opt
from sppo_kernels.pipeline.store import read_json, read_jsonl

Message = dict[str, str]


@dataclass(frozen=True)
class Prompt:
    """One prompt: a stable integer id (its position in the full set) and the chat turns before the reply."""

    id: int
    messages: tuple[Message, ...]

    @property
    def text(self) -> str:
        """The last user turn: what the ranker sees as the instruction."""
        return next(m["content"] for m in reversed(self.messages) if m["role"] == "user")

    def to_json(self) -> dict[str, Any]:
        """The JSON form stored in artefacts."""
        return {"id": self.id, "messages": list(self.messages)}

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> Prompt:
        """Inverse of :meth:`to_json`."""
        return cls(int(row["id"]), tuple(row["messages"]))


def bundled_prompts_path() -> Path:
    """The small prompt file shipped with the package (used by the demo)."""
    return Path(str(resources.files("sppo_kernels.pipeline") / "data" / "demo_prompts.jsonl"))


def _messages(record: Any, column: str, where: str) -> tuple[Message, ...]:
    value = record.get(column) if isinstance(record, dict) else record
    if isinstance(value, str):
        if not value.strip():
            raise PipelineError(f"{where}: empty prompt")
        return ({"role": "user", "content": value},)
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        messages = tuple({"role": str(m["role"]), "content": str(m["content"])} for m in value)
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]  # a dataset row with a reference answer: keep the turns before it
        if not any(m["role"] == "user" for m in messages):
            raise PipelineError(f"{where}: the chat has no user turn")
        return messages
    raise PipelineError(f"{where}: expected a string or a list of chat messages in {column!r}, got {value!r:.80}")


def _records(source: str, split: str) -> list[Any]:
    path = Path(source)
    if path.suffix == ".txt":
        if not path.is_file():
            raise PipelineError(f"prompt file not found: {path}")
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        return read_jsonl(path)
    if path.suffix == ".json":
        data = read_json(path)
        if not isinstance(data, list):
            raise PipelineError(f"{path}: expected a JSON list of prompts")
        return data
    import datasets

    try:
        return list(datasets.load_dataset(source, split=split))
    except Exception as e:  # datasets raises many types for a bad name or path
        raise PipelineError(f"cannot load prompts from {source!r} (split {split!r}): {e}") from e


@dataclass
class PromptOptions:
    """Where the prompts are in a file or dataset."""

    prompt_column: str = opt("prompt", "column with the prompt string (a 'messages' column is used if this is absent)")
    prompt_split: str = opt("train", "dataset split (datasets sources only)")
    max_prompts: int | None = opt(None, "use only the first N prompts")


def load_prompts(source: str, options: PromptOptions | None = None) -> list[Prompt]:
    """All prompts of ``source`` (see the module docstring)."""
    options = options or PromptOptions()
    records = _records(source, options.prompt_split)[: options.max_prompts]
    ids = [r.get("id") if isinstance(r, dict) else None for r in records]
    if not (all(isinstance(i, int) for i in ids) and len(set(ids)) == len(ids)):
        ids = list(range(len(records)))
    prompts = []
    for index, record in zip(ids, records, strict=True):
        column = options.prompt_column
        if isinstance(record, dict) and column not in record and "messages" in record:
            column = "messages"
        prompts.append(Prompt(index, _messages(record, column, f"{source} row {index}")))
    if not prompts:
        raise PipelineError(f"the prompt set {source!r} is empty")
    return prompts


def split_prompts(prompts: list[Prompt], parts: int) -> list[list[Prompt]]:
    """``parts`` disjoint consecutive splits of (nearly) equal size, one per iteration, in the given order."""
    if parts < 1:
        raise PipelineError(f"the number of iterations must be >= 1, got {parts}")
    if len(prompts) < parts:
        raise PipelineError(f"{len(prompts)} prompts cannot be split into {parts} non-empty iterations")
    bounds = [round(i * len(prompts) / parts) for i in range(parts + 1)]
    return [prompts[bounds[i] : bounds[i + 1]] for i in range(parts)]
