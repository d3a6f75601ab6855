"""Right-padded batches of token sequences in the Hugging Face layout the model-level functions take.

One implementation of the padding shared by the Trainer integration's collator, the pipeline's reflogps and
train stages, and the tiny test batches.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["IGNORE_INDEX", "prompt_masked_labels", "right_pad"]

IGNORE_INDEX = -100


def prompt_masked_labels(input_ids: Sequence[int], prompt_length: int, ignore_index: int = IGNORE_INDEX) -> list[int]:
    """Labels of one prompt + response sequence: the token ids, with ``ignore_index`` on the prompt."""
    return [ignore_index] * prompt_length + list(input_ids[prompt_length:])


def right_pad(
    input_ids: Sequence[Sequence[int]],
    labels: Sequence[Sequence[int]],
    *,
    pad_token_id: int = 0,
    ignore_index: int = IGNORE_INDEX,
    pad_to_multiple_of: int | None = None,
) -> dict[str, Tensor]:
    """``input_ids``, ``attention_mask`` and ``labels`` [B, T] int64 from B sequences and their labels.

    Each sequence's labels have its length (HF convention: aligned with ``input_ids``, unshifted). Padding
    is ``pad_token_id`` in ``input_ids``, 0 in ``attention_mask`` and ``ignore_index`` in ``labels``; T is the
    longest length, rounded up to a multiple of ``pad_to_multiple_of`` when given.
    """
    longest = max(len(ids) for ids in input_ids)
    if pad_to_multiple_of:
        longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    rows = len(input_ids)
    batch = {
        "input_ids": torch.full((rows, longest), pad_token_id, dtype=torch.long),
        "attention_mask": torch.zeros(rows, longest, dtype=torch.long),
        "labels": torch.full((rows, longest), ignore_index, dtype=torch.long),
    }
    for i, (ids, row_labels) in enumerate(zip(input_ids, labels, strict=True)):
        if len(row_labels) != len(ids):
            raise ValueError(f"sequence {i}: {len(ids)} input_ids but {len(row_labels)} labels")
        n = len(ids)
        batch["input_ids"][i, :n] = torch.as_tensor(ids)
        batch["attention_mask"][i, :n] = 1
        batch["labels"][i, :n] = torch.as_tensor(row_labels)
    return batch
