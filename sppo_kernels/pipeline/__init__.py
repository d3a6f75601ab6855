"""``sppo-train``: the reference SPPO pipeline (sample → PairRM → win-rate targets → ref log-probs → DeepSpeed).

Each stage is a module with an options dataclass and a ``run_*`` function that reads and writes the files
:mod:`.schema` defines; :mod:`.stages` lists the stages (inputs, option groups, how each runs) in one table,
which :mod:`.run` chains over iterations with completion markers and :mod:`.cli` exposes as ``sppo-train``
subcommands. See docs/pipeline.md ("Code structure") for the import layers.
"""
