"""Prompt sets: load from a file or a ``datasets`` dataset, and split into disjoint per-iteration parts.

A prompt is a chat (``messages``: the turns before the assistant's reply). Accepted sources:

- ``.jsonl`` / ``.json`` (a list): objects with a ``prompt`` string or a ``messages`` list (column names configurable);
- ``.txt``: one prompt per non-empty line;
- a local folder: a ``datasets`` dataset folder, loaded with ``datasets.load_dataset``;
- ``owner/name`` when no such local path (nor an ``owner`` folder) exists: a hub dataset, loaded with
  ``datasets.load_dataset`` (which may download it). Any other source is a local path and never reaches the
  network: a missing file or one of another type is refused.

Texts must be valid Unicode (no lone surrogates such as ``"\\ud800"``) and chat messages need string ``role`` and
``content`` values; errors name the source and row.

Prompt ids are the row positions, unless every row carries a distinct integer ``id`` (as the per-iteration
``prompts.jsonl`` files written by ``run`` do).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from sppo_kernels.pipeline.core.errors import PipelineError
from sppo_kernels.pipeline.core.fingerprint import looks_like_hub_name
from sppo_kernels.pipeline.core.options import at_least, opt
from sppo_kernels.pipeline.core.store import read_json, read_jsonl

SUFFIXES = (".jsonl", ".json", ".txt")

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


def _text(value: Any, where: str) -> str:
    """``value`` if it is a string of valid Unicode (encodable as UTF-8), else a clear error."""
    if not isinstance(value, str):
        raise PipelineError(f"{where}: expected a string, got {value!r:.80}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise PipelineError(f"{where}: not valid Unicode text (lone surrogate {value[e.start]!r} at {e.start})") from e
    return value


def _message(message: dict[str, Any], where: str) -> Message:
    missing = [key for key in ("role", "content") if key not in message]
    if missing:
        raise PipelineError(f"{where}: the chat message lacks {' and '.join(map(repr, missing))}")
    return {key: _text(message[key], f"{where} {key}") for key in ("role", "content")}


def _messages(record: Any, column: str, where: str) -> tuple[Message, ...]:
    value = record.get(column) if isinstance(record, dict) else record
    if isinstance(value, str):
        if not _text(value, where).strip():
            raise PipelineError(f"{where}: empty prompt")
        return ({"role": "user", "content": value},)
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        messages = tuple(_message(m, f"{where} message {i + 1}") for i, m in enumerate(value))
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]  # a dataset row with a reference answer: keep the turns before it
        if not any(m["role"] == "user" for m in messages):
            raise PipelineError(f"{where}: the chat has no user turn")
        return messages
    raise PipelineError(f"{where}: expected a string or a list of chat messages in {column!r}, got {value!r:.80}")


def _records(source: str, split: str) -> list[Any]:
    path = Path(source)
    if path.is_file() and path.suffix not in SUFFIXES:
        raise PipelineError(f"{path}: unsupported prompt file type {path.suffix!r} (use {', '.join(SUFFIXES)})")
    if path.suffix == ".txt" and path.is_file():
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise PipelineError(f"{path} is not UTF-8 text (byte {e.object[e.start]:#04x} at {e.start})") from e
        return [line.strip() for line in text.splitlines() if line.strip()]
    if path.suffix == ".jsonl" and path.is_file():
        return read_jsonl(path)
    if path.suffix == ".json" and path.is_file():
        data = read_json(path)
        if not isinstance(data, list):
            raise PipelineError(f"{path}: expected a JSON list of prompts")
        return data
    if not path.is_dir() and not looks_like_hub_name(source):
        raise PipelineError(
            f"missing file: {source} (a local path, so not looked up on the hub: hub datasets are named owner/name)"
        )
    import datasets

    where = "local dataset folder" if path.is_dir() else "hub dataset (no such local path)"
    try:
        return list(datasets.load_dataset(source, split=split))
    except Exception as e:  # datasets raises many types for a bad name or path
        raise PipelineError(f"cannot load prompts from the {where} {source!r} (split {split!r}): {e}") from e


@dataclass
class PromptOptions:
    """Where the prompts are in a file or dataset."""

    # not fingerprinted: what they select is, through the prompts' content hash
    prompt_column: str = opt(
        "prompt", "column with the prompt string (a 'messages' column is used if this is absent)", fingerprinted=False
    )
    prompt_split: str = opt("train", "dataset split (datasets sources only)", fingerprinted=False)
    max_prompts: int | None = opt(None, "use only the first N prompts", check=at_least(1), fingerprinted=False)


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
