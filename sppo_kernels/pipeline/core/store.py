"""Crash-safe artefacts: atomic files and folders, stage completion markers, resumable work units, and the
fingerprint checks that decide whether earlier work in an output folder may be reused.

Every artefact is written to a hidden temporary sibling and renamed into place (``os.replace`` is atomic on
POSIX), and a folder is removed by renaming it to a hidden ``.<name>.<pid>.trash`` sibling first, so a killed
process leaves either the previous state or the complete new one, plus at most a stray ``.tmp`` or ``.trash``
that nothing reads (trash is swept by the next stage in that folder). A stage counts as finished only once its
marker exists, and the marker is written after all of the stage's outputs.

Work is reused only when its fingerprint (:mod:`~sppo_kernels.pipeline.core.fingerprint`) equals the current one
(the stage protocol, :mod:`~sppo_kernels.pipeline.core.stage`, checks markers; :func:`run_units` checks units);
work made with another fingerprint (or none: an older version) is refused with :class:`StaleWorkError`, or
discarded and recomputed when the fingerprint says ``discard_stale`` (:func:`settle_stale`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from tqdm.auto import tqdm

from sppo_kernels.pipeline.core import distributed
from sppo_kernels.pipeline.core.errors import PipelineError
from sppo_kernels.pipeline.core.fingerprint import Fingerprint, canonical
from sppo_kernels.pipeline.core.options import opt
from sppo_kernels.pipeline.core.schema import marker_path

T = TypeVar("T")
UNIT_TRAILER = "_unit"  # the last line of a unit file: {"_unit": {"rows": n, "fingerprint": digest}}
POLL_SECONDS = 0.5  # how often process 0 looks for the other ranks' finished units


class StaleWorkError(PipelineError):
    """Work in the output folder was made from other inputs or settings (or its fingerprint is missing)."""


@dataclass
class ReuseOptions:
    """What to do with earlier work in the output folder (every command)."""

    discard_stale: bool = opt(
        False,
        "discard work in --out made from other inputs or settings, or by an older version, and recompute it "
        "(without it such work is refused, naming what differs)",
        fingerprinted=False,
    )


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
            remove_tree(path)  # a folder cannot be renamed over another one
        os.replace(tmp, path)
    finally:
        _remove(tmp)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def remove_tree(path: str | os.PathLike[str]) -> None:
    """Remove a file or folder crash-safely: rename it to a hidden ``.<name>.<pid>.trash`` sibling (atomic), then
    delete that. A kill leaves the whole ``path`` or none of it (and a trash folder that nothing reads)."""
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        return
    trash = path.with_name(f".{path.name}.{os.getpid()}.trash")
    _remove(trash)
    try:
        os.replace(path, trash)
    except FileNotFoundError:  # another process (a training rank) removed it first
        return
    _remove(trash)


def sweep_trash(folder: str | os.PathLike[str]) -> None:
    """Delete the ``.trash`` leftovers of killed removals in ``folder``."""
    folder = Path(folder)
    if folder.is_dir():
        for trash in folder.glob(".*.trash"):
            shutil.rmtree(trash, ignore_errors=True) if trash.is_dir() else trash.unlink(missing_ok=True)


def check_out_dir(out: str | os.PathLike[str]) -> None:
    """Refuse an output folder that is a file, lies below a file, or cannot be written (nothing is created)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PipelineError(f"--out {out} is a file, not a folder")
    existing = next(p for p in (out, *out.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise PipelineError(f"--out {out} cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PipelineError(f"--out {out} is not writable ({existing})")


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
    except UnicodeDecodeError as e:
        raise PipelineError(f"{path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})") from e
    except json.JSONDecodeError as e:
        raise PipelineError(f"{path} is not valid JSON: {e}") from e


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Load a JSON-lines file (blank lines skipped), with line numbers in errors."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"missing file: {path}")
    rows = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise PipelineError(f"{path}:{number} is not UTF-8 text (byte {raw[e.start]:#04x})") from e
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


def settle_stale(
    what: str, stored: dict[str, Any] | None, fingerprint: Fingerprint, discard: Callable[[], None]
) -> bool:
    """Decide about earlier work ``what`` whose stored fingerprint record is ``stored``: True when it matches
    ``fingerprint`` (reuse it); otherwise refuse (:class:`StaleWorkError`, one line naming what differs) or, when
    ``fingerprint.discard_stale``, print that line, call ``discard()`` and return False (recompute)."""
    changes = fingerprint.differences(stored)
    if not changes:
        return True
    why = f"{what} was made from other inputs or settings ({'; '.join(changes)})"
    if not fingerprint.discard_stale:
        raise StaleWorkError(
            f"{why}; rerun with the same ones, choose another --out, or pass --discard-stale to recompute"
        )
    print(f"discarding: {why}", flush=True)
    discard()
    return False


def _unit_path(folder: Path, index: int) -> Path:
    return folder / f"unit-{index:05d}.jsonl"


def _read_unit(
    path: Path, digest: str, fingerprint: Fingerprint, ids: Sequence[Any] | None
) -> list[dict[str, Any]] | None:
    """The rows of a finished unit file, or None when it holds another unit (other fingerprint or layout) and
    must be recomputed. A truncated or corrupt file, or one whose rows do not carry ``ids`` (in order, when
    given), is refused (:class:`StaleWorkError`), or recomputed when ``fingerprint.discard_stale``."""
    try:
        rows = read_jsonl(path)
    except PipelineError as e:
        problem = str(e)
    else:
        trailer = rows.pop()[UNIT_TRAILER] if rows and UNIT_TRAILER in rows[-1] else None
        complete = isinstance(trailer, dict) and trailer.get("rows") == len(rows)
        if complete and trailer.get("fingerprint") != digest:
            return None
        if complete and (ids is None or [row.get("id") for row in rows] == list(ids)):
            return rows
        problem = f"{path} has no complete end line" if not complete else f"{path} holds rows of other ids"
    if not fingerprint.discard_stale:
        raise StaleWorkError(f"{problem}: the unit file is truncated or corrupt; delete it or pass --discard-stale")
    print(f"discarding: {problem} (truncated or corrupt unit file)", flush=True)
    return None


def unit_digest(fingerprint: Fingerprint, unit: Any) -> str:
    """The sha256 of the stage's fingerprint and of the unit itself (so a changed shard size never reuses a unit);
    the number of processes is not part of it."""
    return hashlib.sha256(f"{fingerprint.digest}\n{canonical(unit)}".encode()).hexdigest()


def missing_units(
    folder: Path, digests: Sequence[str], fingerprint: Fingerprint, ids: Sequence[Sequence[Any] | None]
) -> list[int]:
    """Prepare the units folder and list the units still to compute: ``fingerprint.json`` records the stage's
    fingerprint (units of another one are settled by :func:`settle_stale` before any is read), unit files past
    the end of a shorter layout are removed, and a unit is missing unless its file holds that very unit (with
    the rows of ``ids[i]``, when not None)."""
    record = folder / "fingerprint.json"
    stored = read_json(record) if record.is_file() else None
    if (stored is not None or any(folder.glob("unit-*.jsonl"))) and not settle_stale(
        f"{folder.name} in {folder.parent}", stored, fingerprint, lambda: remove_tree(folder)
    ):
        stored = None
    folder.mkdir(parents=True, exist_ok=True)
    if stored is None:
        write_json(record, fingerprint.record)
    for path in folder.glob("unit-*.jsonl"):
        if not path.stem[5:].isdigit() or int(path.stem[5:]) >= len(digests):
            path.unlink()
    return [
        index
        for index, digest in enumerate(digests)
        if not _unit_path(folder, index).is_file()
        or _read_unit(_unit_path(folder, index), digest, fingerprint, ids[index]) is None
    ]


def run_units(
    folder: str | os.PathLike[str],
    units: Sequence[T],
    work: Callable[[int, T], list[dict[str, Any]]],
    *,
    fingerprint: Fingerprint,
    desc: str,
    weight: Callable[[T], int] = lambda _unit: 1,
    ids: Callable[[T], Sequence[Any] | None] = lambda _unit: None,
) -> list[list[dict[str, Any]]] | None:
    """Run ``work(i, unit)`` for each unit not finished yet, persisting each result as ``folder/unit-<i>.jsonl``,
    and return every unit's rows in order on rank 0 (None on the other ranks).

    Under a launcher, process 0 decides which units are missing (:func:`missing_units`) and the k-th missing unit
    goes to rank k mod the number of processes; each rank writes only its own unit files, and process 0 shows one
    progress bar over all ranks' units (``weight(unit)``: e.g. the number of prompts in it). A killed stage
    resumes with any number of processes and redoes only the missing units. ``ids(unit)``, when not None, the ids
    its rows must carry, in order (checked when a unit file is read back).
    """
    folder = Path(folder)
    digests = [unit_digest(fingerprint, unit) for unit in units]
    unit_ids = [ids(unit) for unit in units]
    missing = distributed.on_rank_zero(lambda: missing_units(folder, digests, fingerprint, unit_ids))
    mine = missing[distributed.rank() :: distributed.world_size()]
    lead = distributed.rank() == 0
    total = sum(weight(unit) for unit in units)
    done = total - sum(weight(units[i]) for i in missing)
    with tqdm(total=total, initial=done, desc=desc, disable=None if lead else True, dynamic_ncols=True) as bar:

        def show_progress() -> bool:
            finished = [i for i in missing if _unit_path(folder, i).is_file()]
            bar.update(done + sum(weight(units[i]) for i in finished) - bar.n)
            return len(finished) == len(missing)

        for index in mine:
            rows = work(index, units[index])
            trailer = {UNIT_TRAILER: {"rows": len(rows), "fingerprint": digests[index]}}
            write_jsonl(_unit_path(folder, index), [*rows, trailer])
            if lead:
                show_progress()
        while lead and not show_progress():  # the other ranks' units
            time.sleep(POLL_SECONDS)
    distributed.barrier()
    if not lead:
        return None
    return [_read_unit(_unit_path(folder, i), digest, fingerprint, unit_ids[i]) for i, digest in enumerate(digests)]


def chunks(items: Sequence[T], size: int) -> list[Sequence[T]]:
    """Consecutive slices of at most ``size`` items."""
    if size < 1:
        raise PipelineError(f"chunk size must be >= 1, got {size}")
    return [items[i : i + size] for i in range(0, len(items), size)]
