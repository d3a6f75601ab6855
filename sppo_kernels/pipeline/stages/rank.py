"""Stage 2: compare the K responses of every prompt pairwise with a judge (PairRM by default).

Output ``rankings.jsonl``, one row per prompt: ``{"id": 3, "logits": K×K}``, where ``logits[i][j]`` is the judge's
logit that response i beats response j (0 on the diagonal). Any
:class:`~sppo_kernels.pipeline.models.judge.PairwiseScorer` can replace PairRM.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

from sppo_kernels.pipeline.core import schema
from sppo_kernels.pipeline.core.errors import PipelineError
from sppo_kernels.pipeline.core.fingerprint import Fingerprint, file_identity, stage_fingerprint
from sppo_kernels.pipeline.core.prompts import Prompt
from sppo_kernels.pipeline.core.stage import Rows, Stage, run_stage
from sppo_kernels.pipeline.core.store import chunks, read_rows, write_jsonl
from sppo_kernels.pipeline.models.judge import PairwiseScorer, RankOptions, judge_identity, pairrm


class Rank(Stage):
    """Shards of prompts; a unit is one shard, judged in one ``compare`` call."""

    name = schema.RANK_STAGE

    def __init__(self, generations: str | Path, folder: str | Path, options: RankOptions,
                 scorer: PairwiseScorer | None) -> None:  # fmt: skip
        super().__init__(folder, options)
        self.generations, self.scorer = generations, scorer

    @property
    def output(self) -> Path:
        return schema.RANKINGS.path(self.folder)

    def fingerprint(self) -> Fingerprint:
        inputs = {"generations": file_identity(self.generations), "judge": judge_identity(self.scorer)}
        judged = self.options if self.scorer is None else dataclasses.replace(self.options, ranker=None)
        return stage_fingerprint(self.name, inputs, judged)  # a plugged-in scorer replaces the ranker checkpoint

    @cached_property
    def judge(self) -> PairwiseScorer:
        """Built at the first unit: a fully resumed stage loads no judge."""
        return self.scorer if self.scorer is not None else pairrm(self.options)

    @cached_property
    def units(self) -> list[Sequence[dict[str, Any]]]:
        rows = read_rows(self.generations, schema.GENERATIONS.required)
        if not rows:
            raise PipelineError(f"{self.generations} holds no generations")
        sizes = {len(row["responses"]) for row in rows}
        if len(sizes) != 1 or min(sizes) < 2:
            raise PipelineError(
                f"{self.generations}: every prompt needs the same number (>= 2) of responses, got {sizes}"
            )
        return chunks(rows, self.options.rank_shard_size)

    def work(self, index: int, shard: Sequence[dict[str, Any]]) -> Rows:
        logits = self.judge.compare([Prompt.from_json(row).text for row in shard], [row["responses"] for row in shard])
        k = len(shard[0]["responses"])
        if logits.shape != (len(shard), k, k):
            raise PipelineError(f"the judge returned logits of shape {logits.shape}, expected {(len(shard), k, k)}")
        return [{"id": row["id"], "logits": matrix.tolist()} for row, matrix in zip(shard, logits, strict=True)]

    def size(self, shard: Sequence[dict[str, Any]]) -> int:
        return len(shard)

    def finish(self, computed: list[Rows]) -> tuple[dict[str, Any], str]:
        rows = [row for shard in computed for row in shard]
        write_jsonl(self.output, rows)
        return {"prompts": len(rows)}, f"{len(rows)} prompts judged pairwise"


def run_rank(
    generations_path: str | Path,
    out_dir: str | Path,
    options: RankOptions,
    *,
    scorer: PairwiseScorer | None = None,
) -> Path:
    """Judge all responses of ``generations.jsonl``; returns the path of ``rankings.jsonl``."""
    return run_stage(Rank(generations_path, out_dir, options, scorer))
