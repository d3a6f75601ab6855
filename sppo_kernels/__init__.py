"""sppo-kernels: fused lm-head sequence log-probs and the SPPO loss.

>>> import sppo_kernels as sk
>>> loss = sk.sppo_loss(hidden, lm_head.weight, labels, ref_logps, target_probs)  # doctest: +SKIP
"""

from sppo_kernels.api import SPPOLoss, sequence_logprobs, sppo_loss
from sppo_kernels.inputs import set_value_checks
from sppo_kernels.losses import PAIR_LOSS_TYPES, PairTargets, pair_targets
from sppo_kernels.registry import Backend, get_backend, names

BACKENDS = ("auto", *names())

__all__ = [
    "BACKENDS",
    "PAIR_LOSS_TYPES",
    "Backend",
    "PairTargets",
    "SPPOLoss",
    "get_backend",
    "pair_targets",
    "sequence_logprobs",
    "set_value_checks",
    "sppo_loss",
]
__version__ = "0.1.0"
