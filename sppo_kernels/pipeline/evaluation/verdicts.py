"""The evaluation's judging step: one judge's verdicts on one policy's responses against the baseline's, in both
orders, as a resumable stage.

The judge gets candidates ``[policy, baseline]`` and returns logits [n, 2, 2]; the preference is
``L[0][1] − L[1][0]`` (llm-blender's ``compare(mode="[A,B]+[B,A]")``: the policy's logit when shown first minus the
baseline's when shown first), and the outcome is 1 / ½ / 0 as it is > 0 / 0 / < 0. Identical responses are a
tie without asking the judge (as AlpacaEval does). Rows go to ``judgments-<judge>.jsonl`` in the policy's folder.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sppo_kernels.pipeline.core import schema
from sppo_kernels.pipeline.core.errors import PipelineError
from sppo_kernels.pipeline.core.fingerprint import Fingerprint
from sppo_kernels.pipeline.core.stage import Rows, Stage
from sppo_kernels.pipeline.core.store import chunks, write_jsonl
from sppo_kernels.pipeline.evaluation.statistics import outcome_of
from sppo_kernels.pipeline.models.judge import PairwiseScorer

Pair = tuple[dict[str, Any], dict[str, Any]]  # (policy output row, baseline output row) of one prompt


class Verdicts(Stage):
    """Shards of (policy, baseline) response pairs; a unit is one shard, judged in one ``compare`` call of
    ``judge()`` (called at the first unit: a fully resumed stage builds no judge)."""

    quiet = True

    def __init__(self, judge: Callable[[], PairwiseScorer], judge_name: str, pairs: Sequence[Pair], folder: Path,
                 fingerprint: Fingerprint, *, shard_size: int, where: str) -> None:  # fmt: skip
        super().__init__(folder, None)  # its settings are in its fingerprint
        self.name = f"{schema.JUDGE_STAGE}-{judge_name}"
        self.judge, self.judge_name, self.pairs, self.shard_size = judge, judge_name, pairs, shard_size
        self.given_fingerprint, self.where = fingerprint, where

    @property
    def output(self) -> Path:
        return schema.judgments_path(self.folder, self.judge_name)

    def fingerprint(self) -> Fingerprint:
        return self.given_fingerprint

    @property
    def units(self) -> list[Sequence[Pair]]:
        return chunks(self.pairs, self.shard_size)

    def work(self, index: int, shard: Sequence[Pair]) -> Rows:
        asked = [(p, b) for p, b in shard if p["output"] != b["output"]]
        verdicts = dict(zip((p["id"] for p, _ in asked), self.logits(asked), strict=True))
        rows = []
        for p, _b in shard:
            if p["id"] in verdicts:
                first, second = verdicts[p["id"]]
                rows.append({"id": p["id"], "logits": [first, second], "preference": first - second})
            else:
                rows.append({"id": p["id"], "logits": None, "preference": 0.0, "identical": True})
            rows[-1]["outcome"] = outcome_of(rows[-1]["preference"])
        return rows

    def logits(self, asked: Sequence[Pair]) -> list[tuple[float, float]]:
        """(policy-first logit L[0][1], baseline-first logit L[1][0]) of each pair, checked finite."""
        if not asked:
            return []
        logits = np.asarray(
            self.judge().compare([p["instruction"] for p, _ in asked], [[p["output"], b["output"]] for p, b in asked])
        )
        if logits.shape != (len(asked), 2, 2):
            raise PipelineError(
                f"judge {self.judge_name!r} returned logits of shape {logits.shape}, expected {(len(asked), 2, 2)}"
            )
        pairs = [(float(m[0][1]), float(m[1][0])) for m in logits]
        for (p, _b), (first, second) in zip(asked, pairs, strict=True):
            if not (math.isfinite(first) and math.isfinite(second)):
                raise PipelineError(
                    f"judge {self.judge_name!r} returned a non-finite logit ({first}, {second}) for prompt id "
                    f"{p['id']} of {self.where}"
                )
        return pairs

    def size(self, shard: Sequence[Pair]) -> int:
        return len(shard)

    def unit_ids(self, shard: Sequence[Pair]) -> list[int]:
        return [p["id"] for p, _b in shard]

    @property
    def progress_label(self) -> str:
        return f"eval judge {self.judge_name} {self.folder.name}"

    def finish(self, computed: list[Rows]) -> tuple[dict[str, Any], str]:
        rows = [row for shard in computed for row in shard]
        write_jsonl(self.output, rows)
        outcomes = [row["outcome"] for row in rows]
        counts = {"wins": outcomes.count(1.0), "ties": outcomes.count(0.5), "losses": outcomes.count(0.0)}
        return {"pairs": len(rows), **counts}, f"{len(rows)} verdicts of {self.judge_name}"
