"""``--lc-fit alpaca``: AlpacaEval 2.0's ``length_controlled_minimal`` fit (cross-validated L1 through
scikit-learn) against a hand-checked case, its edge cases, and, when alpaca_eval is installed, against
AlpacaEval's own code on random and length-gamed data."""

from __future__ import annotations

import math
import sys
import warnings

import numpy as np
import pytest

from sppo_kernels.pipeline.core.errors import PipelineError
from sppo_kernels.pipeline.evaluation.statistics import alpaca_length_glm, lc_win_rate, length_feature

pytest.importorskip("sklearn", reason="--lc-fit alpaca needs scikit-learn (the eval extra)")


def _two_groups(m: int) -> tuple[list[float], list[int], list[int]]:
    """5m prompts where the policy is 10 characters shorter than the baseline (4m wins, m losses) and 5m where it
    is 10 longer (2m wins, 3m losses), interleaved."""
    shorter = [1.0] * (4 * m) + [0.0] * m
    longer = [1.0] * (2 * m) + [0.0] * (3 * m)
    preferences = [p for pair in zip(shorter, longer, strict=True) for p in pair]
    return preferences, [10, 30] * (5 * m), [20] * (10 * m)


def test_alpaca_fit_hand_computed() -> None:
    """x takes two values (±tanh(Δ/sd)), so the unpenalised logistic MLE reproduces the group means 0.8 and 0.4:
    θ = (logit 0.8 + logit 0.4)/2 = ½ ln(8/3), LC = √(8/3)/(1 + √(8/3)) = 0.620204 (raw win rate 0.6). With
    1000 prompts the cross-validation picks a weak penalty (C = 1292: its shrinkage of θ is below 10⁻⁵), so
    the L1 fit lands on the MLE to within liblinear's tolerance."""
    preferences, policy_lengths, baseline_lengths = _two_groups(100)
    expected = math.sqrt(8 / 3) / (1 + math.sqrt(8 / 3))
    assert lc_win_rate(preferences, policy_lengths, baseline_lengths, fit="alpaca") == pytest.approx(expected, abs=2e-5)
    feature = length_feature(policy_lengths, baseline_lengths)
    theta, phi = alpaca_length_glm(preferences, feature)
    x = float(np.max(feature))
    assert theta == pytest.approx(0.5 * math.log(8 / 3), abs=1e-4)
    assert phi == pytest.approx((math.log(4) - math.log(2 / 3)) / (2 * x), abs=1e-3)


def test_alpaca_fit_edge_cases(monkeypatch: pytest.MonkeyPatch) -> None:
    # the base against itself (all ties, equal lengths): 50% exactly, as AlpacaEval reports a baseline
    assert lc_win_rate([0.5] * 20, [7] * 20, [7] * 20, fit="alpaca") == 0.5
    # wins and losses alternate, lengths unrelated: the L1 fit zeroes the model term (the ridge fit only nearly)
    rng = np.random.default_rng(0)
    policy_lengths, baseline_lengths = rng.integers(5, 50, 40), rng.integers(5, 50, 40)
    alternating = [1.0, 0.0] * 20
    assert lc_win_rate(alternating, policy_lengths, baseline_lengths, fit="alpaca") == 0.5
    assert lc_win_rate(alternating, policy_lengths, baseline_lengths) != 0.5
    with pytest.raises(PipelineError, match=r"--lc-fit alpaca needs at least 5 prompts"):
        lc_win_rate([1, 0, 1, 0], [1, 2, 3, 4], [2, 2, 2, 2], fit="alpaca")
    with pytest.raises(PipelineError, match=r"--lc-fit must be one of"):
        lc_win_rate([1, 0, 1, 0], [1, 2, 3, 4], [2, 2, 2, 2], fit="lasso")
    monkeypatch.setitem(sys.modules, "sklearn", None)  # scikit-learn not installed
    with pytest.raises(PipelineError, match=r"needs scikit-learn: pip install 'sppo-kernels\[eval\]'"):
        lc_win_rate([1.0, 0.0] * 5, list(range(10)), [5] * 10, fit="alpaca")


def _alpaca_eval_lc(preferences: np.ndarray, baseline: list[str], policy: list[str]) -> float:
    """AlpacaEval 0.6.6's own length_controlled_minimal fit, its frame built as ``_get_featurized_data`` builds it
    (which would download instruction difficulties this formula does not use)."""
    import pandas as pd
    from alpaca_eval.metrics.glm_winrate import GLM_INFO, fit_LogisticRegressionCV, make_dmatrix_for_model

    info = GLM_INFO["length_controlled_minimal"]
    frame = pd.DataFrame({"preference": preferences + 1, "output_1": baseline, "output_2": policy})
    delta = frame["output_1"].str.len() - frame["output_2"].str.len()
    data = pd.DataFrame({"preference": frame["preference"].astype(float).replace({0.0: 1.5}) - 1})
    data["std_delta_len"] = delta / delta.std()
    data["not_gamed_baseline"] = True
    test = data[["not_gamed_baseline"]].copy()
    test["std_delta_len"] = 0
    train, test = make_dmatrix_for_model(data, test, formula=info["formula"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = fit_LogisticRegressionCV(train, "preference", is_ytrue_proba=True, **info["kwargs"])
    return float(model.predict_proba(test)[:, 1].mean())


def test_alpaca_fit_matches_alpaca_eval() -> None:
    pytest.importorskip("alpaca_eval.metrics.glm_winrate", reason="the cross-check needs alpaca_eval (and pandas)")
    rng = np.random.default_rng(0)
    for n, gamed in ((40, False), (256, False), (256, True), (805, True)):
        baseline = rng.integers(20, 400, n)
        policy = baseline + rng.integers(0, 600, n) if gamed else rng.integers(20, 400, n)
        z = (policy - baseline) / 150.0 - 0.8 + rng.normal(0, 1, n) if gamed else rng.normal(0.2, 1, n)
        preferences = np.where(z > 0.3, 1.0, np.where(z < -0.3, 0.0, 0.5))
        ours = lc_win_rate(preferences, policy, baseline, fit="alpaca")
        theirs = _alpaca_eval_lc(preferences, ["b" * k for k in baseline], ["p" * k for k in policy])
        assert ours == pytest.approx(theirs, abs=1e-12), (n, gamed)
