"""Drop-in integrations of the fused SPPO loss (see docs/integrations.md).

- :mod:`~sppo_kernels.integrations.hf`: hidden states, lm_head and logit transform of HF causal LMs; model-level
  :func:`~sppo_kernels.integrations.hf.sequence_logprobs` / :func:`~sppo_kernels.integrations.hf.sppo_loss`.
- :mod:`~sppo_kernels.integrations.zero3`: a ZeRO-3 partitioned lm_head with correct gradients.
- :mod:`~sppo_kernels.integrations.trainer`: ``SPPOTrainer`` for ``transformers.Trainer``.
- :mod:`~sppo_kernels.integrations.trl`: ``SPPODPOTrainer``, TRL's DPOTrainer with the SPPO losses.
- :mod:`~sppo_kernels.integrations.testing`: tiny offline models, tokenizer and batches.

Submodules import their optional dependencies (transformers, deepspeed, trl, peft) only when imported or used.
"""
