"""Keep third-party noise off the console (used by the demo): targeted silencing, and a console that shows only
the story lines while everything else is captured in a log file."""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from sppo_kernels.pipeline.core import schema

# Lines the console shows: the demo's and the stages' one-line summaries (the evaluation's are
# "[evaluate-<judge>] ...") and the "=== ..." headlines.
STORY = re.compile(rf"^(\[(demo|{'|'.join(schema.ITERATION_STAGES)}|{schema.EVALUATE_STAGE}(-[\w.-]+)?)\] |=== )")


def silence_third_party() -> None:
    """Silence the known noise for the rest of the process: dataclasses_json's decoding warnings (llm-blender's
    RankerConfig), llm-blender's root-logger warnings, transformers' and datasets' notices and progress bars, and
    DeepSpeed's info/warning log lines."""
    warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"dataclasses_json(\..*)?")
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    logging.getLogger().setLevel(logging.ERROR)  # llm-blender logs "No ranker config provided ..." on the root logger
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # no "Setting accelerator to CPU" warning
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import datasets
    import transformers

    transformers.utils.logging.set_verbosity_error()  # e.g. the embedding-resize notice
    transformers.utils.logging.disable_progress_bar()
    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    import deepspeed.utils.logging  # noqa: F401  (creates the DeepSpeed logger at its level; lower it after)

    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)


class _StoryFilter:
    """A text stream that writes every line to ``log`` and the lines matching ``STORY`` to ``console`` too."""

    def __init__(self, console: TextIO, log: TextIO) -> None:
        self.console, self.log, self.pending = console, log, ""

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            self.log.write(line + "\n")
            if STORY.match(line):
                self.console.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.log.flush()
        self.console.flush()

    def isatty(self) -> bool:
        return False


@contextmanager
def story_console(log_path: str | os.PathLike[str]) -> Iterator[TextIO]:
    """Redirect file descriptors 1 and 2 (so also C++ builds, progress bars and any logging handler) into
    ``log_path``; ``print`` still reaches the console for the ``STORY`` lines. Yields the console stream for the
    caller's own output. On an exception the log's last lines are shown before it propagates."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    console = os.fdopen(os.dup(saved_out), "w", buffering=1, encoding="utf-8")
    log = open(log_path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115  (closed below)
    previous_stdout = sys.stdout
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = _StoryFilter(console, log)  # type: ignore[assignment]
    failed = False
    try:
        yield console
    except BaseException:
        failed = True
        raise
    finally:
        sys.stdout.flush()
        sys.stdout = previous_stdout
        sys.stderr.flush()
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        os.close(saved_out)
        os.close(saved_err)
        log.close()
        console.close()
        if failed:
            tail = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-40:]
            print(f"--- last lines of {log_path}:", *tail, sep="\n", file=sys.stderr)
