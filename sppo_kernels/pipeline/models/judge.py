"""Pairwise judges: for n prompts with K candidates each, the logits that candidate i beats candidate j.

PairRM through llm-blender by default (:class:`PairRMScorer`); any object with the :class:`PairwiseScorer`
method can replace it. :class:`RankOptions` holds the judge's settings; the rank stage and the evaluation use it.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from sppo_kernels.pipeline.core.errors import PipelineError
from sppo_kernels.pipeline.core.fingerprint import looks_like_hub_name
from sppo_kernels.pipeline.core.options import at_least, opt


@dataclass
class RankOptions:
    """Judge settings."""

    ranker: str = opt(
        "llm-blender/PairRM", "PairRM checkpoint: a local folder, or a hub name (downloads)", identity="model"
    )
    # batch size and device change the logits by rounding only; units are keyed by their content
    rank_batch_size: int = opt(
        16, "prompts per judge forward batch (each costs K*(K-1) pair passes)", check=at_least(1), fingerprinted=False
    )
    rank_shard_size: int = opt(256, "prompts per saved unit of work", check=at_least(1), fingerprinted=False)
    ranker_device: str | None = opt(
        None, "device for the judge (default: cuda when present, else cpu)", fingerprinted=False
    )
    source_max_length: int | None = opt(
        None, "judge prompt token budget (default: the checkpoint's)", check=at_least(1)
    )
    candidate_max_length: int | None = opt(
        None, "judge response token budget (default: the checkpoint's)", check=at_least(1)
    )


class PairwiseScorer(Protocol):
    """A judge: for n prompts with K candidates each, a float32 array [n, K, K] of logits that i beats j."""

    def compare(self, prompts: Sequence[str], candidates: Sequence[Sequence[str]]) -> np.ndarray: ...


def apply_transformers5_shims() -> None:
    """Let llm-blender 0.0.2 run on transformers 5 (both shims are no-ops on transformers 4).

    1. ``transformers.utils.hub.TRANSFORMERS_CACHE`` was removed; llm-blender imports it as its default cache.
    2. ``batch_encode_plus`` was removed; llm-blender's collator calls it in one helper, which is replaced by an
       equivalent ``tokenizer(...)`` call (same padding/truncation arguments).
    """
    import transformers.utils.hub as hub

    if not hasattr(hub, "TRANSFORMERS_CACHE"):
        from huggingface_hub import constants

        hub.TRANSFORMERS_CACHE = constants.HF_HUB_CACHE
    import llm_blender.pair_ranker.collator as collator
    from transformers import PreTrainedTokenizerBase

    if not hasattr(PreTrainedTokenizerBase, "batch_encode_plus"):

        def encode_texts(texts: list[str], tokenizer: Any, max_length: int | None = None) -> tuple[Any, Any]:
            encoded = tokenizer(
                texts, max_length=max_length, padding="max_length", truncation=True, return_tensors="pt"
            )
            return encoded["input_ids"], encoded["attention_mask"]

        collator.encode_texts = encode_texts


def _relative_backbone(ranker: str) -> dict[str, str]:
    """``{"model_name": <absolute path>}`` when a local ranker's config names its backbone by a relative folder."""
    config = Path(ranker) / "config.json"
    if not config.is_file():
        return {}
    name = json.loads(config.read_text(encoding="utf-8")).get("model_name")
    return {"model_name": str(Path(ranker) / name)} if name and (Path(ranker) / name).is_dir() else {}


class PairRMScorer:
    """PairRM through llm-blender: ``Blender().loadranker(path)``, then every ordered pair of candidates.

    This is the computation of ``Blender.rank`` (same collator, same ``_full_predict``), kept at the K×K
    logits that ``rank`` reduces to scores; ``scores_from_logits`` of the result equals
    ``rank(..., return_scores=True)``.
    """

    def __init__(self, ranker: str, *, device: str | None = None, batch_size: int = 16, **rank_kwargs: Any) -> None:
        import torch

        apply_transformers5_shims()
        import llm_blender

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.batch_size = batch_size
        if not os.path.isdir(ranker) and not looks_like_hub_name(ranker):
            raise PipelineError(f"cannot load the PairRM ranker {ranker!r}: no such local folder (not a hub name)")
        self.blender = llm_blender.Blender()
        try:
            self.blender.loadranker(ranker, device=self.device, **_relative_backbone(ranker))
        except (OSError, ValueError) as e:
            where = "local folder" if os.path.isdir(ranker) else "not a local folder, and the hub download failed"
            raise PipelineError(f"cannot load the PairRM ranker {ranker!r} ({where}): {e}") from e
        self.collator = copy.copy(self.blender.ranker_collator)
        config = self.blender.ranker_config
        self.collator.source_maxlength = rank_kwargs.get("source_max_length") or config.source_maxlength
        self.collator.candidate_maxlength = rank_kwargs.get("candidate_max_length") or config.candidate_maxlength

    def compare(self, prompts: Sequence[str], candidates: Sequence[Sequence[str]]) -> np.ndarray:
        """Logits [n, K, K] (float32) that candidate i beats candidate j, 0 on the diagonal."""
        import torch
        from llm_blender.blender.blender_utils import RankerDataset

        dataset = RankerDataset(list(prompts), [list(c) for c in candidates])
        loader = torch.utils.data.DataLoader(dataset, batch_size=self.batch_size, collate_fn=self.collator)
        logits = []
        with torch.no_grad():
            for batch in loader:
                batch = {k: v.to(self.device) for k, v in batch.items() if v is not None}
                logits.append(self.blender.ranker._full_predict(**batch)["logits"].float().cpu().numpy())
        return np.concatenate(logits).astype(np.float32)


def judge_identity(scorer: PairwiseScorer | None) -> dict[str, str]:
    """The judge as a fingerprint input: PairRM (its checkpoint is the ``ranker`` option), or a plugged-in
    scorer, known by its class only."""
    kind = "PairRM" if scorer is None else f"{type(scorer).__module__}.{type(scorer).__qualname__}"
    return {"scorer": kind}


def pairrm(options: RankOptions) -> PairRMScorer:
    """PairRM as ``options`` configure it."""
    return PairRMScorer(
        options.ranker,
        device=options.ranker_device,
        batch_size=options.rank_batch_size,
        source_max_length=options.source_max_length,
        candidate_max_length=options.candidate_max_length,
    )
