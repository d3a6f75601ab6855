"""Fingerprints: what produced a unit of work, a training checkpoint, a stage's outputs or a run.

A fingerprint is a JSON record of a stage's inputs and of its options that change results::

    {"version": 1, "stage": "reflogps",
     "inputs": {"model": {"sha256": "…", "path": "/abs/policy"}, "targets": {"sha256": "…", "path": "/abs/t.jsonl"}},
     "options": {"ModelOptions": {"attn_implementation": null}, "RefLogpsOptions": {"max_length": 1024, …}}}

Identities of inputs (:func:`model_identity`, :func:`file_identity`, :func:`content_identity`):

- a local model folder (policy or ranker): the sha256 of every file in it (weights included; each file is read
  once per process), after checking that it is one (``config.json``, weights, intact safetensors headers);
- a hub name (``owner/name``, taken only when no such local path exists): the name (the library picks the
  revision);
- a file (an earlier stage's artefact, a DeepSpeed config): the sha256 of its bytes;
- a prompt set: the sha256 of its prompts (ids and chat turns) as loaded.

Options with ``fingerprinted=True`` (see :mod:`~sppo_kernels.pipeline.core.options`) count by value; path-valued
ones (``identity=``) by the identity of what they name. ``path`` entries are kept for messages but never
compared: a folder that is moved or copied, ``dir/`` or ``./dir``, keeps its fingerprint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sppo_kernels.pipeline.core.errors import PipelineError
from sppo_kernels.pipeline.core.options import validated

VERSION = 1
# owner/name with no file suffix: the only sources that may be looked up on the hub
HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
FILE_SUFFIX = re.compile(r"\.[A-Za-z][A-Za-z0-9]{0,7}$")
WEIGHTS = ("*.safetensors", "*.bin", "*.pt", "*.pth")

_FILE_HASHES: dict[tuple[int, int, int, int], str] = {}  # (device, inode, size, mtime_ns) -> sha256, per process
_DISCARD_STALE: ContextVar[bool] = ContextVar("discard_stale", default=False)


@contextmanager
def discarding_stale(enabled: bool = True) -> Iterator[None]:
    """Within the block, stages discard and recompute work in their output folder that another fingerprint made
    (``--discard-stale``); outside, or with ``enabled=False``, they refuse it."""
    token = _DISCARD_STALE.set(enabled)
    try:
        yield
    finally:
        _DISCARD_STALE.reset(token)


def looks_like_hub_name(source: str) -> bool:
    """True for ``owner/name`` (no file suffix) when neither that path nor its ``owner`` folder exists locally;
    anything else is a local path and never reaches the network."""
    path = Path(source)
    return (
        HUB_NAME.fullmatch(source) is not None
        and FILE_SUFFIX.search(source) is None
        and not path.exists()
        and not path.parent.exists()
    )


def _sha256_file(path: Path) -> str:
    stat = path.stat()
    key = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if key not in _FILE_HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(1 << 22):
                digest.update(block)
        _FILE_HASHES[key] = digest.hexdigest()
    return _FILE_HASHES[key]


def file_identity(path: str | os.PathLike[str], what: str = "file") -> dict[str, str]:
    """``{"sha256", "path"}`` of a file; :class:`PipelineError` ``missing <what>: <path>`` when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"missing {what}: {path}")
    return {"sha256": _sha256_file(path), "path": str(path.resolve())}


def canonical(obj: Any) -> str:
    """Compact JSON with sorted keys (ranges and tuples as lists, paths as strings): the text that is hashed."""

    def convert(value: Any) -> Any:
        if isinstance(value, range):
            return [value.start, value.stop, value.step]
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if hasattr(value, "item"):  # NumPy scalars
            return value.item()
        raise TypeError(f"cannot fingerprint a {type(value).__name__}")

    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=convert)


def content_identity(obj: Any) -> dict[str, str]:
    """``{"sha256"}`` of JSON-able data (e.g. a prompt set)."""
    return {"sha256": hashlib.sha256(canonical(obj).encode()).hexdigest()}


def check_safetensors(path: Path) -> None:
    """Refuse a truncated or malformed safetensors file from its header alone (nothing else is read)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little") if size >= 8 else -1
            header = json.loads(f.read(length)) if 0 < length <= size - 8 else None
        ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        header = None
    if header is None:
        raise PipelineError(f"{path} is not a valid safetensors file (truncated or corrupt header)")
    needed = 8 + length + max(ends, default=0)
    if needed > size:
        raise PipelineError(f"{path} is truncated: {size} bytes, its header describes {needed}")


def check_model_folder(folder: Path, what: str = "model") -> None:
    """Refuse an empty folder, one without ``config.json`` (or a PEFT ``adapter_config.json``) or weights, or
    with a truncated safetensors file."""
    if not any(folder.iterdir()):
        raise PipelineError(f"the {what} folder {folder} is empty")
    if not any((folder / name).is_file() for name in ("config.json", "adapter_config.json")):  # PEFT adapters too
        raise PipelineError(f"{folder} is not a {what} folder: it has no config.json")
    weights = [path for pattern in WEIGHTS for path in sorted(folder.glob(pattern))]
    if not weights:
        raise PipelineError(f"the {what} folder {folder} holds no weights ({', '.join(WEIGHTS)})")
    for path in weights:
        if path.suffix == ".safetensors":
            check_safetensors(path)


def model_identity(source: str, what: str = "model") -> dict[str, str]:
    """The identity of a model given as a local folder or a hub name (see the module docstring); a local-looking
    path that does not exist is refused without any network access."""
    path = Path(source)
    if path.is_dir():
        check_model_folder(path, what)
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.parts[len(path.parts) :])
        )
        listing = "".join(f"{p.relative_to(path).as_posix()}\0{_sha256_file(p)}\n" for p in files)
        return {"sha256": hashlib.sha256(listing.encode()).hexdigest(), "path": str(path.resolve())}
    if looks_like_hub_name(source):
        return {"hub": source}
    kind = "a file, not a folder" if path.exists() else "not found"
    raise PipelineError(
        f"{what} {source!r}: local path {kind} (hub names look like owner/name; local paths never reach the network)"
    )


def options_record(options: Any) -> dict[str, Any]:
    """``{option name: value}`` of the fingerprinted options of an options object (path-valued ones by the
    identity of what they name)."""
    record = {}
    for field in dataclasses.fields(options):
        if not field.metadata.get("fingerprinted", True):
            continue
        value = getattr(options, field.name)
        kind = field.metadata.get("identity")
        if value is not None and kind == "model":
            value = model_identity(str(value), what=field.name.replace("_", " "))
        elif value is not None and kind == "file":
            value = file_identity(value, what=field.name.replace("_", " ") + " file")
        record[field.name] = value
    return record


def _compared(value: Any) -> Any:
    """``value`` without its ``path`` entries (kept for messages, never compared)."""
    if isinstance(value, dict):
        return {k: _compared(v) for k, v in value.items() if k != "path"}
    return value


def _describe(value: Any) -> str:
    """A short text for one side of a difference: a hub name, a path, or the value (never a raw hash)."""
    if isinstance(value, dict) and ("path" in value or "hub" in value):
        return value.get("path") or value["hub"]
    if isinstance(value, dict) and "sha256" in value:
        return "(a content)"
    return "(none)" if value is None else repr(value)


def _plain(value: Any) -> bool:
    """A dict of settings (compared entry by entry), not the identity of a model, a file or a content."""
    return isinstance(value, dict) and not {"sha256", "hub", "path"} & value.keys()


def _change(key: str, before: Any, after: Any) -> str:
    """One phrase for a difference: a content change names where the content is now (and where it was recorded,
    if elsewhere, so a moved run does not read as a path change); settings name each changed entry."""
    if isinstance(before, dict) and isinstance(after, dict) and "sha256" in before and "sha256" in after:
        now, recorded = after.get("path"), before.get("path")
        where = f" in {now}" if now else ""
        elsewhere = f" than recorded from {recorded}" if recorded and recorded != now else ""
        return f"{key}: other content{where}{elsewhere}"
    if (_plain(before) or before is None) and (_plain(after) or after is None):
        entries = _changes(before or {}, after or {})
        return f"{key}: {', '.join(entry.replace(': ', ' ', 1) for entry in entries)}"
    return f"{key}: {_describe(before)} -> {_describe(after)}"


def _changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    return [
        _change(key, old.get(key), new.get(key))
        for key in sorted(set(old) | set(new))
        if _compared(old.get(key)) != _compared(new.get(key))
    ]


def differences(stored: Mapping[str, Any] | None, record: Mapping[str, Any]) -> list[str]:
    """What differs between a stored fingerprint record and ``record``, one short phrase each (empty: same)."""
    if not stored:
        return ["no fingerprint (made by an older sppo-train)"]
    if stored.get("version") != record.get("version"):
        return [f"fingerprint version {stored.get('version')} -> {record.get('version')}"]
    changes = _changes({"stage": stored.get("stage")}, {"stage": record.get("stage")})
    changes += _changes(stored.get("inputs", {}), record.get("inputs", {}))
    old_options, new_options = stored.get("options", {}), record.get("options", {})
    for group in sorted(set(old_options) | set(new_options)):
        changes += _changes(old_options.get(group, {}), new_options.get(group, {}))
    changes += _changes(stored.get("layout", {}), record.get("layout", {}))
    return changes


@dataclass(frozen=True)
class Fingerprint:
    """What produces a stage's work (``record``, see the module docstring), and ``discard_stale``: what to do
    with work in the output folder that another fingerprint produced (False: refuse; True: discard, recompute)."""

    record: dict[str, Any]
    discard_stale: bool = False

    @property
    def digest(self) -> str:
        """sha256 of the compared part of the record."""
        return hashlib.sha256(canonical(_compared(self.record)).encode()).hexdigest()

    def differences(self, stored: Mapping[str, Any] | None) -> list[str]:
        """What differs between ``stored`` (a record read from disk, or None) and this fingerprint."""
        return differences(stored, self.record) if not stored or _compared(stored) != _compared(self.record) else []

    def with_layout(self, **layout: Any) -> Fingerprint:
        """This fingerprint plus facts that do not change results but must match to reuse the work (e.g. the
        number of training processes a ZeRO checkpoint was partitioned over)."""
        return Fingerprint({**self.record, "layout": layout}, self.discard_stale)


def stage_fingerprint(stage: str, inputs: Mapping[str, dict[str, str]], *options: Any) -> Fingerprint:
    """The fingerprint of ``stage`` on ``inputs`` (``{input name: identity}``) with ``options`` (options objects,
    validated here); it discards stale work inside a :func:`discarding_stale` block, else refuses it."""
    groups = {type(o).__name__: options_record(validated(o)) for o in options}
    record = {"version": VERSION, "stage": stage, "inputs": dict(inputs), "options": groups}
    return Fingerprint(json.loads(canonical(record)), _DISCARD_STALE.get())


def prompts_identity(prompts: Sequence[Any]) -> dict[str, str]:
    """The identity of a prompt set (objects with ``to_json()``)."""
    return content_identity([p.to_json() for p in prompts])
