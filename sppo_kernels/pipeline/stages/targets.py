"""Stage 3: win-rate targets from the judge's K×K logits, exactly as the reference computes them.

For one prompt with logits L [K, K] (L_ij: logit that response i beats j, L_ii = 0):

- score        s_i = mean_j (L_ij − L_ji), the mean over all K including j = i;
- preferences  P_ij = σ(s_i − s_j) (½ on the diagonal);
- pair         chosen w = argmax s, rejected l = argmin s (first index on ties; when all K scores tie, l is the
               first index other than w), P_win = mean_j P_wj, P_lose = mean_j P_lj (self term ½ included, so
               they lie in [0.1, 0.9] for K = 5), p = P_wl;
- all-K        every response i with its own win rate mean_j P_ij (the paper's eq. 4.7 over all samples).

Pair targets per named loss come from :func:`sppo_kernels.pair_targets` (``sppo``: P_win/P_lose,
``sppo_single``: p/1−p, ``sppo_hard``: 1/0 with loss scale 2). Output ``targets.jsonl``, one row per training
sequence: ``{"id", "messages", "response", "response_index", "role", "target", "loss_scale", "score",
"complete"}``; a pair's chosen row directly precedes its rejected row.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

import sppo_kernels as sk
from sppo_kernels.pipeline.core import schema
from sppo_kernels.pipeline.core.errors import PipelineError
from sppo_kernels.pipeline.core.fingerprint import Fingerprint, file_identity, stage_fingerprint
from sppo_kernels.pipeline.core.options import at_least, opt
from sppo_kernels.pipeline.core.stage import Rows, Stage, run_stage
from sppo_kernels.pipeline.core.store import read_rows, write_jsonl


@dataclass
class TargetsOptions:
    """How judge logits become training targets."""

    target_mode: str = opt(
        "pair", "pair: chosen/rejected of each prompt (the reference); all: all K responses", ("pair", "all")
    )
    loss_type: str = opt("sppo", "pair-mode target definition", sk.PAIR_LOSS_TYPES)
    drop_all_ties: bool = opt(True, "drop prompts whose K scores all tie (no preference signal)")
    tie_tolerance: float = opt(0.0, "scores closer than this count as tied", check=at_least(0))


class PromptTargets(NamedTuple):
    """Everything the reference derives from one prompt's logits (float64 numpy)."""

    scores: np.ndarray  # [K]
    preferences: np.ndarray  # [K, K]
    win_rates: np.ndarray  # [K], mean_j P_ij
    chosen: int
    rejected: int
    p_win: float
    p_lose: float
    p_chosen_beats_rejected: float
    all_tied: bool


def scores_from_logits(logits: np.ndarray) -> np.ndarray:
    """s_i = mean_j (L_ij − L_ji): [..., K, K] → [..., K] (PairRM's ``max_logits`` policy)."""
    logits = np.asarray(logits, dtype=np.float64)
    return (logits - np.swapaxes(logits, -1, -2)).mean(axis=-1)


def preference_matrix(scores: np.ndarray) -> np.ndarray:
    """P_ij = σ(s_i − s_j): [..., K] → [..., K, K]."""
    diff = scores[..., :, None] - scores[..., None, :]
    return 0.5 * (1.0 + np.tanh(0.5 * diff))  # σ(x) without overflow for large |x|


def prompt_targets(logits: np.ndarray, *, tie_tolerance: float = 0.0) -> PromptTargets:
    """Scores, preferences, chosen/rejected and their win rates for one prompt's logits [K, K]."""
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or logits.shape[0] != logits.shape[1] or logits.shape[0] < 2:
        raise PipelineError(f"judge logits must be K×K with K >= 2, got shape {logits.shape}")
    scores = scores_from_logits(logits)
    prefs = preference_matrix(scores)
    win_rates = prefs.mean(axis=1)
    chosen = int(np.argmax(scores))
    others = np.delete(np.arange(len(scores)), chosen)
    rejected = int(others[np.argmin(scores[others])])
    return PromptTargets(
        scores=scores,
        preferences=prefs,
        win_rates=win_rates,
        chosen=chosen,
        rejected=rejected,
        p_win=float(win_rates[chosen]),
        p_lose=float(win_rates[rejected]),
        p_chosen_beats_rejected=float(prefs[chosen, rejected]),
        all_tied=bool(scores.max() - scores.min() <= tie_tolerance),
    )


def _sequence(gen: dict[str, Any], index: int, role: str, target: float, scale: float, score: float) -> dict[str, Any]:
    return {
        "id": gen["id"],
        "messages": gen["messages"],
        "response": gen["responses"][index],
        "response_index": index,
        "role": role,
        "target": float(target),
        "loss_scale": scale,
        "score": float(score),
        "complete": gen["finish_reasons"][index] == "stop",
    }


def build_targets(
    generations: list[dict[str, Any]], rankings: list[dict[str, Any]], options: TargetsOptions
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Training sequences with targets, and counts for the summary."""
    by_id = {row["id"]: row for row in rankings}
    missing = [gen["id"] for gen in generations if gen["id"] not in by_id]
    if missing:
        raise PipelineError(f"the rankings lack prompts {missing[:5]} (of {len(missing)} missing)")
    kept = []
    for gen in generations:
        result = prompt_targets(np.array(by_id[gen["id"]]["logits"]), tie_tolerance=options.tie_tolerance)
        if len(result.scores) != len(gen["responses"]):
            raise PipelineError(
                f"prompt {gen['id']}: {len(gen['responses'])} responses but {len(result.scores)} scores"
            )
        if not (options.drop_all_ties and result.all_tied):
            kept.append((gen, result))
    rows: list[dict[str, Any]] = []
    if options.target_mode == "all":
        for gen, result in kept:
            rows += [_sequence(gen, i, "response", result.win_rates[i], 1.0, s) for i, s in enumerate(result.scores)]
    elif kept:
        pairs = sk.pair_targets(
            options.loss_type,
            p_win=torch.tensor([r.p_win for _, r in kept], dtype=torch.float64),
            p_lose=torch.tensor([r.p_lose for _, r in kept], dtype=torch.float64),
            p_chosen_beats_rejected=torch.tensor([r.p_chosen_beats_rejected for _, r in kept], dtype=torch.float64),
        )
        chosen_targets, rejected_targets = pairs.target_probs.double().view(2, len(kept)).tolist()
        for (gen, r), t_w, t_l in zip(kept, chosen_targets, rejected_targets, strict=True):
            rows.append(_sequence(gen, r.chosen, "chosen", t_w, pairs.loss_scale, r.scores[r.chosen]))
            rows.append(_sequence(gen, r.rejected, "rejected", t_l, pairs.loss_scale, r.scores[r.rejected]))
    counts = {"prompts": len(generations), "kept": len(kept), "dropped_all_ties": len(generations) - len(kept)}
    return rows, counts


class Targets(Stage):
    """One step, no units: read the generations and the judge logits, write the training sequences."""

    name = schema.TARGETS_STAGE

    def __init__(self, generations: str | Path, rankings: str | Path, folder: str | Path,
                 options: TargetsOptions) -> None:  # fmt: skip
        super().__init__(folder, options)
        self.generations, self.rankings = generations, rankings

    @property
    def output(self) -> Path:
        return schema.TARGETS.path(self.folder)

    def fingerprint(self) -> Fingerprint:
        inputs = {"generations": file_identity(self.generations), "rankings": file_identity(self.rankings)}
        return stage_fingerprint(self.name, inputs, self.options)

    def finish(self, computed: list[Rows]) -> tuple[dict[str, Any], str]:
        generations = read_rows(self.generations, schema.GENERATIONS.required)
        rows, counts = build_targets(generations, read_rows(self.rankings, schema.RANKINGS.required), self.options)
        if not rows:
            raise PipelineError(f"no training sequences left: {counts}")
        write_jsonl(self.output, rows)
        counts.update(sequences=len(rows), mean_target=float(np.mean([r["target"] for r in rows])))
        report = (
            f"{counts['kept']}/{counts['prompts']} prompts kept ({counts['dropped_all_ties']} all-tie), "
            f"{len(rows)} sequences, mode {self.options.target_mode}"
        )
        return counts, report


def run_targets(
    generations_path: str | Path, rankings_path: str | Path, out_dir: str | Path, options: TargetsOptions
) -> Path:
    """Turn generations + judge logits into ``targets.jsonl``; returns its path."""
    return run_stage(Targets(generations_path, rankings_path, out_dir, options))
