"""What the trainer runs models with: loading the policy (``policy``), its chat template (``chat``), generation
engines (``sampling``: vLLM or HF) and pairwise judges (``judge``: PairRM through llm-blender)."""
