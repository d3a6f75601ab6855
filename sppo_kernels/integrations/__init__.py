"""Drop-in integrations of the fused SPPO loss (see docs/integrations.md). Modules, lowest first (each imports
only those above it in this list):

- :mod:`~sppo_kernels.integrations.batching`: right-padded [B, T] batches of token sequences.
- :mod:`~sppo_kernels.integrations.model_parts`: what the op needs from an HF causal LM: final hidden states
  without logits, the lm_head parameters, the logit scale and soft-cap.
- :mod:`~sppo_kernels.integrations.zero3`: a ZeRO-3 partitioned lm_head with correct gradients.
- :mod:`~sppo_kernels.integrations.hf`: the model-level recipe, ``model_sequence_logprobs`` /
  ``model_reference_logprobs`` / ``model_sppo_loss`` (everything model-level calls these).
- :mod:`~sppo_kernels.integrations.trainer`: ``SPPOTrainer`` for ``transformers.Trainer``.
- :mod:`~sppo_kernels.integrations.trl`: ``SPPODPOTrainer``, TRL's DPOTrainer with the SPPO losses.

Tiny offline models for tests and examples are in :mod:`sppo_kernels.pipeline.demo.tiny_models`. Submodules
import their optional dependencies (transformers, deepspeed, trl, peft) only when imported or used.
"""
