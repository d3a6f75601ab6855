"""Crash-safe artefacts: atomic files and folders, stage completion markers, resumable work units.

Every artefact is written to a hidden temporary sibling and renamed into place (``os.replace`` is atomic on
POSIX), so a killed process leaves either the previous state or the complete file, plus at most a stray
``.<name>.<pid>.tmp`` that nothing reads. A stage counts as finished only once its marker exists, and the
marker is written after all of the stage's outputs.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from tqdm.auto import tqdm

from sppo_kernels.pipeline.errors import PipelineError
from sppo_kernels.pipeline.options import to_record
from sppo_kernels.pipeline.schema import marker_path

T = TypeVar("T")


def _temp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path to write a file or folder to; it replaces ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path)
    _remove(tmp)
    try:
        yield tmp
        if tmp.is_dir() and path.exists():
            _remove(path)  # a folder cannot be renamed over another one
        os.replace(tmp, path)
    finally:
        _remove(tmp)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Atomically write a text file (fsync'ed before the rename)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_jsonl(path: str | os.PathLike[str], rows: Iterable[dict[str, Any]]) -> None:
    """Atomically write one JSON object per line."""
    write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def read_json(path: str | os.PathLike[str]) -> Any:
    """Load a JSON file, with a clear error when it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"missing file: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise PipelineError(f"{path} is not valid JSON: {e}") from e


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Load a JSON-lines file (blank lines skipped), with line numbers in errors."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"missing file: {path}")
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise PipelineError(f"{path}:{number} is not valid JSON: {e}") from e
            if not isinstance(row, dict):
                raise PipelineError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def read_rows(path: str | os.PathLike[str], keys: Sequence[str]) -> list[dict[str, Any]]:
    """:func:`read_jsonl`, checking that every row has ``keys`` (an artefact of the expected stage)."""
    rows = read_jsonl(path)
    for number, row in enumerate(rows, 1):
        missing = [key for key in keys if key not in row]
        if missing:
            raise PipelineError(f"{path}: row {number} lacks {missing}; is this the right file?")
    return rows


def stage_summary(folder: str | os.PathLike[str], stage: str) -> dict[str, Any] | None:
    """The summary stored by :func:`mark_done`, or None when the stage has not finished."""
    path = marker_path(folder, stage)
    return read_json(path) if path.is_file() else None


def mark_done(folder: str | os.PathLike[str], stage: str, summary: dict[str, Any]) -> None:
    """Record that ``stage`` finished; call only after all its outputs are in place."""
    write_json(marker_path(folder, stage), summary)


def finish_stage(
    folder: str | os.PathLike[str],
    stage: str,
    summary: dict[str, Any],
    *,
    started: float,
    options: Any,
    report: str,
    output: str | os.PathLike[str],
) -> dict[str, Any]:
    """Mark ``stage`` finished in ``folder`` with ``summary`` plus the ``seconds`` since ``started``
    (``time.perf_counter()``) and its ``options``, and print its one-line report ``[stage] report, <seconds>s ->
    output``. Call after all outputs are in place; returns what was stored."""
    summary = {**summary, "seconds": round(time.perf_counter() - started, 2), "options": to_record(options)}
    mark_done(folder, stage, summary)
    print(f"[{stage}] {report}, {summary['seconds']}s -> {output}")
    return summary


def run_units(
    folder: str | os.PathLike[str],
    units: Sequence[T],
    work: Callable[[int, T], list[dict[str, Any]]],
    *,
    desc: str,
    total: int | None = None,
    weight: Callable[[T], int] = lambda _unit: 1,
) -> list[list[dict[str, Any]]]:
    """Run ``work(i, unit)`` for each unit, persisting each result as ``folder/unit-<i>.jsonl``.

    Units whose file exists are loaded instead of recomputed, so a killed stage resumes where it stopped.
    ``weight(unit)`` advances the progress bar (e.g. the number of prompts in it). Returns the results in order.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    results: list[list[dict[str, Any]]] = []
    with tqdm(total=total, desc=desc, disable=None, dynamic_ncols=True) as bar:
        for index, unit in enumerate(units):
            path = folder / f"unit-{index:05d}.jsonl"
            if path.is_file():
                rows = read_jsonl(path)
            else:
                rows = work(index, unit)
                write_jsonl(path, rows)
            results.append(rows)
            bar.update(weight(unit))
    return results


def chunks(items: Sequence[T], size: int) -> list[Sequence[T]]:
    """Consecutive slices of at most ``size`` items."""
    if size < 1:
        raise PipelineError(f"chunk size must be >= 1, got {size}")
    return [items[i : i + size] for i in range(0, len(items), size)]
