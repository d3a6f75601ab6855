"""``sppo-train``: the reference SPPO pipeline (sample → PairRM → win-rate targets → ref log-probs → DeepSpeed).

Each stage is a module with an options dataclass and a ``run_*`` function; :mod:`.run` chains them over
iterations with completion markers, and :mod:`.cli` exposes everything as ``sppo-train`` subcommands.
"""
