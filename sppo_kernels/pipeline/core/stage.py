"""The stage protocol, written once: fingerprint → skip when finished → units of work → outputs → marker.

Every stage of ``sppo-train`` (the five training stages, and the evaluation's generation, judging and report) is
a :class:`Stage`: it says what its work depends on (:meth:`Stage.fingerprint`), what it splits the work into
(:attr:`Stage.units`, one :meth:`Stage.work` call each) and how it writes its outputs from the results
(:meth:`Stage.finish`). :func:`run_stage` does the rest, the same way for all of them:

1. compute the fingerprint, refuse an output folder that cannot be written, and skip a stage that finished
   with the same fingerprint (a finished one with another is refused, or discarded with ``--discard-stale``);
2. run the units, each persisted as it finishes (:func:`~sppo_kernels.pipeline.core.store.run_units`), so a
   killed stage resumes where it stopped;
3. write the outputs, then the completion marker with the summary, the options, the fingerprint and the time,
   and print the stage's one-line report.

Under a launcher (``torchrun``, DeepSpeed's launcher, ``srun``: see :mod:`.distributed`) every process runs the
same stage: process 0 computes the fingerprint and decides what is finished, the units are shared out among the
processes (each writes only its own unit files), then process 0 merges them, writes the outputs and the marker,
and the others wait at a barrier. The outputs are the same bytes whatever the number of processes.

A stage that is not a list of units (training) overrides :meth:`Stage.compute`.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from sppo_kernels.pipeline.core import distributed
from sppo_kernels.pipeline.core.fingerprint import Fingerprint
from sppo_kernels.pipeline.core.options import to_record
from sppo_kernels.pipeline.core.schema import marker_path, units_dir
from sppo_kernels.pipeline.core.store import (
    check_out_dir,
    mark_done,
    remove_tree,
    run_units,
    settle_stale,
    stage_summary,
    sweep_trash,
)

Rows = list[dict[str, Any]]


class Stage(ABC):
    """One stage writing into ``folder``; subclasses set ``name`` and ``options`` and implement the abstract
    methods. ``quiet`` stages (the evaluation's inner steps) print no skip or report line."""

    name: str  # the marker's name and the units folder's (``<name>_units``): a class attribute, or set per instance
    quiet: ClassVar[bool] = False
    backend: str = "gloo"  # of the process group under a launcher (see core.distributed.join)

    def __init__(self, folder: str | Path, options: Any) -> None:
        self.folder = Path(folder)
        self.options = options  # an options dataclass, recorded in the marker (None: nothing to record)

    @property
    @abstractmethod
    def output(self) -> Path:
        """The stage's main output (returned by :func:`run_stage`)."""

    @abstractmethod
    def fingerprint(self) -> Fingerprint:
        """What the stage's work depends on; computed before anything is read or written."""

    # The units of work, in order: a stage with units overrides this with a ``functools.cached_property``
    # (evaluated once the stage is known to need running, so it may read the inputs).
    units: Sequence[Any] = ()

    def work(self, index: int, unit: Any) -> Rows:
        """The rows of unit ``index`` (JSON-able; persisted before the next unit starts)."""
        raise NotImplementedError(f"the {self.name} stage has units but no work()")

    def size(self, unit: Any) -> int:
        """How far ``unit`` advances the progress bar (e.g. its number of prompts)."""
        return 1

    def unit_ids(self, unit: Any) -> Sequence[Any] | None:
        """The ids that the rows of ``unit`` carry, in order, checked when a finished unit is read back (None:
        not checked)."""
        return None

    def compute(self, fingerprint: Fingerprint) -> list[Rows] | None:
        """Run the units (resuming from finished unit files, sharing them out among the launcher's processes);
        returns their rows in order on process 0 (None on the others)."""
        if not self.units:
            return []
        return run_units(
            units_dir(self.folder, self.name),
            self.units,
            self.work,
            fingerprint=fingerprint,
            desc=self.progress_label,
            weight=self.size,
            ids=self.unit_ids,
        )

    @property
    def progress_label(self) -> str:
        """The progress bar's label."""
        return self.name

    @abstractmethod
    def finish(self, computed: Any) -> tuple[dict[str, Any], str]:
        """Write the outputs from what :meth:`compute` returned; returns the summary stored in the marker and the
        one-line report (``[name] <report>, <seconds>s -> <output>``)."""

    def finished(self) -> None:
        """Called after the marker is written (e.g. to remove checkpoints that are no longer needed)."""
        return None


def run_stage(stage: Stage) -> Path:
    """Run ``stage`` by the protocol of the module docstring, in this process alone or as one rank of the
    launcher's processes (which join their process group here); returns its output."""
    distributed.join(stage.backend)
    fingerprint = distributed.on_rank_zero(stage.fingerprint)  # model folders are hashed once, not per rank
    if distributed.on_rank_zero(lambda: _finished(stage, fingerprint)):
        return stage.output
    started = time.perf_counter()
    computed = stage.compute(fingerprint)
    seconds = distributed.gather(round(time.perf_counter() - started, 2))
    if distributed.rank() == 0:  # one process writes the outputs and the marker; the others wait for it
        summary, report = stage.finish(computed)
        summary = {**summary, "seconds": round(time.perf_counter() - started, 2)}
        if len(seconds) > 1:
            summary["rank_seconds"] = seconds
            report += f" (per rank: {', '.join(f'{s:.1f}' for s in seconds)}s)"
        if stage.options is not None:
            summary["options"] = to_record(stage.options)
        mark_done(stage.folder, stage.name, {**summary, "fingerprint": fingerprint.record})
        if not stage.quiet:
            print(f"[{stage.name}] {report}, {summary['seconds']}s -> {stage.output}", flush=True)
        stage.finished()
    distributed.barrier()
    return stage.output


def _finished(stage: Stage, fingerprint: Fingerprint) -> bool:
    """Refuse an output folder that cannot be written, sweep leftover trash, and say whether ``stage`` finished
    there with ``fingerprint`` (a line says so unless quiet). A finished stage with another fingerprint is
    refused, or discarded with ``--discard-stale`` (:func:`~sppo_kernels.pipeline.core.store.settle_stale`)."""
    check_out_dir(stage.folder)
    sweep_trash(stage.folder)
    summary = stage_summary(stage.folder, stage.name)
    if summary is None:
        return False
    marker = marker_path(stage.folder, stage.name)
    what = f"the finished {stage.name} stage in {stage.folder}"
    if not settle_stale(what, summary.get("fingerprint"), fingerprint, lambda: remove_tree(marker)):
        return False
    if not stage.quiet:
        print(f"[{stage.name}] finished earlier in {stage.folder}; skipping", flush=True)
    return True
