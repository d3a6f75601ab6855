"""One ``torch.autograd.Function`` per backend; each maps :class:`~sppo_kernels.inputs.TokenRows` to
per-sequence summed log-probs [B] float32 and back-propagates a per-sequence upstream gradient [B]."""
