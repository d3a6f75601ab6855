"""Fault injection for the data-parallel tests: Python imports this module at the start of every process that has
this folder on its PYTHONPATH. In the launcher's process of rank ``$FAULT_RANK`` the stage dies (exit status 3,
no clean-up) right after it has written its ``$FAULT_AFTER``-th unit file (default 1)."""

import os
from pathlib import Path

if "FAULT_RANK" in os.environ and os.environ.get("RANK") == os.environ["FAULT_RANK"]:
    from sppo_kernels.pipeline.core import store

    write_jsonl = store.write_jsonl
    written: list[str] = []

    def write_then_die(path: str | os.PathLike[str], rows: object) -> None:
        write_jsonl(path, rows)
        if Path(path).name.startswith("unit-"):
            written.append(str(path))
            if len(written) >= int(os.environ.get("FAULT_AFTER", "1")):
                os._exit(3)

    store.write_jsonl = write_then_die
