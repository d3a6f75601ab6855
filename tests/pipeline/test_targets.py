"""Targets against hand-computed matrices (the reference formulas of sppo.md)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sppo_kernels.pipeline.core.errors import PipelineError
from sppo_kernels.pipeline.stages.targets import (
    TargetsOptions,
    build_targets,
    preference_matrix,
    prompt_targets,
    scores_from_logits,
)


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# L[i][j]: logit that i beats j. Hand computation, s_i = (1/3) Σ_j (L_ij − L_ji):
#   s_0 = (0 + (2 − (−1)) + (1 − 0)) / 3       = 4/3
#   s_1 = ((−1 − 2) + 0 + (0.5 − 1.5)) / 3     = −4/3
#   s_2 = ((0 − 1) + (1.5 − 0.5) + 0) / 3      = 0
L3 = [[0.0, 2.0, 1.0], [-1.0, 0.0, 0.5], [0.0, 1.5, 0.0]]
S3 = [4 / 3, -4 / 3, 0.0]


def test_scores_preferences_and_pair_by_hand() -> None:
    result = prompt_targets(np.array(L3))
    np.testing.assert_allclose(result.scores, S3, atol=1e-12)
    expected_p = [[sigmoid(S3[i] - S3[j]) for j in range(3)] for i in range(3)]
    np.testing.assert_allclose(result.preferences, expected_p, atol=1e-12)
    assert np.allclose(np.diag(result.preferences), 0.5)
    assert (result.chosen, result.rejected) == (0, 1)
    # P_win / P_lose include the self term ½
    assert result.p_win == pytest.approx((0.5 + sigmoid(8 / 3) + sigmoid(4 / 3)) / 3, abs=1e-12)
    assert result.p_lose == pytest.approx((sigmoid(-8 / 3) + 0.5 + sigmoid(-4 / 3)) / 3, abs=1e-12)
    assert result.p_chosen_beats_rejected == pytest.approx(sigmoid(8 / 3), abs=1e-12)
    assert not result.all_tied


def test_win_rate_bounds_for_k5() -> None:
    """With K = 5 the self term bounds P_win/P_lose to [0.1, 0.9] even for extreme scores."""
    logits = np.zeros((5, 5))
    logits[0, 1:] = 1e4
    result = prompt_targets(logits)
    assert 0.1 <= result.p_lose < result.p_win <= 0.9
    assert result.p_win == pytest.approx(0.9, abs=1e-6)


def test_scores_match_llm_blender() -> None:
    from sppo_kernels.pipeline.models.judge import apply_transformers5_shims

    apply_transformers5_shims()
    from llm_blender.gpt_eval.utils import get_scores_from_cmps

    logits = np.random.default_rng(0).normal(size=(4, 5, 5))
    for m in logits:
        np.fill_diagonal(m, 0)
    np.testing.assert_allclose(scores_from_logits(logits), get_scores_from_cmps(logits), rtol=1e-6, atol=1e-6)


def test_ties_first_index_and_all_tied() -> None:
    # s = [1, 1, -1, -1] after antisymmetrising: chosen is the first max (0), rejected the first min (2)
    scores = np.array([1.0, 1.0, -1.0, -1.0])
    logits = np.tile(scores[:, None], (1, 4)) * 2  # L_ij − L_ji = 2(s_i − s_j); mean_j = 2 s_i − 2 mean(s)
    np.fill_diagonal(logits, 0.0)
    result = prompt_targets(logits)
    assert (result.chosen, result.rejected) == (0, 2)
    tied = prompt_targets(np.full((3, 3), 0.7) - np.diag([0.7] * 3))
    assert tied.all_tied
    assert (tied.chosen, tied.rejected) == (0, 1)  # never the same response twice
    assert tied.p_win == tied.p_lose == pytest.approx(0.5)
    assert prompt_targets(np.array(L3), tie_tolerance=3.0).all_tied


def _generations(k: int = 3) -> list[dict]:
    return [
        {
            "id": i,
            "messages": [{"role": "user", "content": f"q{i}"}],
            "responses": [f"r{i}{j}" for j in range(k)],
            "finish_reasons": ["stop"] * (k - 1) + ["length"],
        }
        for i in range(2)
    ]


def test_build_targets_pair_modes() -> None:
    gens = _generations()
    ranks = [{"id": 0, "logits": L3}, {"id": 1, "logits": np.zeros((3, 3)).tolist()}]
    rows, counts = build_targets(gens, ranks, TargetsOptions())
    assert counts == {"prompts": 2, "kept": 1, "dropped_all_ties": 1}
    chosen, rejected = rows
    p = prompt_targets(np.array(L3))
    assert (chosen["role"], chosen["response"], chosen["complete"]) == ("chosen", "r00", True)
    assert (rejected["role"], rejected["response_index"]) == ("rejected", 1)
    assert chosen["target"] == pytest.approx(p.p_win, abs=1e-6)
    assert rejected["target"] == pytest.approx(p.p_lose, abs=1e-6)
    assert chosen["loss_scale"] == 1.0

    single, _ = build_targets(gens, ranks, TargetsOptions(loss_type="sppo_single"))
    assert [r["target"] for r in single] == pytest.approx([p.p_chosen_beats_rejected, 1 - p.p_chosen_beats_rejected])
    hard, _ = build_targets(gens, ranks, TargetsOptions(loss_type="sppo_hard"))
    assert [(r["target"], r["loss_scale"]) for r in hard] == [(1.0, 2.0), (0.0, 2.0)]

    kept_ties, counts = build_targets(gens, ranks, TargetsOptions(drop_all_ties=False))
    assert counts["dropped_all_ties"] == 0
    assert [(r["response_index"], r["target"]) for r in kept_ties[2:]] == [(0, 0.5), (1, 0.5)]


def test_build_targets_all_k() -> None:
    rows, _ = build_targets(_generations(), [{"id": 0, "logits": L3}, {"id": 1, "logits": L3}], TargetsOptions("all"))
    assert len(rows) == 6
    win_rates = preference_matrix(np.array(S3)).mean(axis=1)
    assert [r["target"] for r in rows[:3]] == pytest.approx(list(win_rates))
    assert [r["complete"] for r in rows[:3]] == [True, True, False]
    assert sum(r["target"] for r in rows[:3]) == pytest.approx(1.5)  # Σ_i mean_j P_ij = K/2


def test_build_targets_errors() -> None:
    with pytest.raises(PipelineError, match="lack prompts"):
        build_targets(_generations(), [{"id": 0, "logits": L3}], TargetsOptions())
    with pytest.raises(PipelineError, match="K×K"):
        prompt_targets(np.zeros((3, 2)))
    with pytest.raises(PipelineError, match="responses but"):
        build_targets(_generations(k=4), [{"id": i, "logits": L3} for i in range(2)], TargetsOptions())
