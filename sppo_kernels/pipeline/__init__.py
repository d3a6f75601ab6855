"""``sppo-train``: the reference SPPO pipeline (sample → PairRM → win-rate targets → ref log-probs → DeepSpeed).

The trainer's rooms, lowest first (each imports only the public ``sppo_kernels`` API, ``sppo_kernels.integrations``
and the rooms before it; tests/pipeline/test_layers.py enforces it):

- ``core``: options and flags, the run layout (``schema``), fingerprints, crash-safe storage, the stage protocol
  (``stage``), the process layout and prompt sets;
- ``models``: loading the policy, its chat template, generation engines and pairwise judges;
- ``stages``: the five stages of an iteration, one module each, none importing another;
- ``evaluation``: win rates against a baseline (its steps are stages too);
- ``table`` (the stage table: inputs, option groups, how each stage runs), ``run`` (iterations), ``demo`` and
  ``cli`` (the ``sppo-train`` command).
"""
