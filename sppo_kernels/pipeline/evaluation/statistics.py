"""The statistics of an evaluation: verdicts, the win rate and its bootstrap interval, and the length-controlled
win rate (AlpacaEval 2.0's GLM; docs/evaluation.md holds the exact formula)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from sppo_kernels.pipeline.core.errors import PipelineError

LC_L2 = 0.01  # ridge on (θ, φ): keeps the fit finite on separable data (see docs/evaluation.md)


def outcome_of(preference: float) -> float:
    """A verdict from the both-orders preference logit: 1 (policy wins) if > 0, 0 if < 0, ½ on a tie."""
    return 1.0 if preference > 0 else 0.0 if preference < 0 else 0.5


def bootstrap_ci(outcomes: Sequence[float], *, resamples: int, seed: int, level: float = 0.95) -> list[float]:
    """Percentile bootstrap interval of the mean outcome: ``resamples`` resamples of the prompts with replacement
    (``numpy.random.default_rng(seed)``), then the (1 ± level)/2 quantiles of their means."""
    values = np.asarray(outcomes, dtype=np.float64)
    if values.size == 0:
        raise PipelineError("no outcomes to bootstrap")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(resamples, values.size))].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return [float(low), float(high)]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def length_feature(policy_lengths: Sequence[float], baseline_lengths: Sequence[float]) -> np.ndarray:
    """AlpacaEval 2.0's length feature ``tanh(Δ_i / sd(Δ))`` with ``Δ_i = len(baseline_i) − len(policy_i)`` and
    ``sd`` the sample standard deviation (ddof 1); all zeros when ``sd`` is 0 (or there is one prompt)."""
    delta = np.asarray(baseline_lengths, dtype=np.float64) - np.asarray(policy_lengths, dtype=np.float64)
    sd = float(delta.std(ddof=1)) if delta.size > 1 else 0.0
    return np.tanh(delta / sd) if sd > 0 else np.zeros_like(delta)


def fit_length_glm(preferences: Sequence[float], feature: Sequence[float], *, l2: float = LC_L2) -> tuple[float, float]:
    """(θ, φ) minimising ``Σ_i −[p_i log σ(θ + φ x_i) + (1 − p_i) log σ(−θ − φ x_i)] + (l2/2)(θ² + φ²)``
    (damped Newton; soft labels p_i in [0, 1]). φ is 0 when every x_i is 0."""
    p = np.asarray(preferences, dtype=np.float64)
    x = np.asarray(feature, dtype=np.float64)
    design = np.stack([np.ones_like(x), x], axis=1) if np.any(x != 0) else np.ones((x.size, 1))
    beta = np.zeros(design.shape[1])

    def objective(b: np.ndarray) -> float:
        z = design @ b
        return float(np.sum(np.logaddexp(0.0, -z) * p + np.logaddexp(0.0, z) * (1 - p)) + 0.5 * l2 * b @ b)

    current = objective(beta)
    for _ in range(200):
        q = _sigmoid(design @ beta)
        gradient = design.T @ (q - p) + l2 * beta
        hessian = (design * (q * (1 - q))[:, None]).T @ design + l2 * np.eye(design.shape[1])
        step = np.linalg.lstsq(hessian, gradient, rcond=None)[0]
        scale = 1.0
        while scale > 1e-8:
            candidate = beta - scale * step
            value = objective(candidate)
            if value <= current + 1e-12:
                break
            scale /= 2
        beta, previous, current = candidate, current, value
        if np.max(np.abs(scale * step)) < 1e-10 or previous - current < 1e-14:
            break
    return float(beta[0]), float(beta[1]) if beta.size > 1 else 0.0


def lc_win_rate(
    preferences: Sequence[float],
    policy_lengths: Sequence[float],
    baseline_lengths: Sequence[float],
    *,
    l2: float = LC_L2,
) -> float:
    """Length-controlled win rate: σ(θ) of :func:`fit_length_glm` on :func:`length_feature`, i.e. the GLM's
    predicted preference when the policy's and the baseline's responses have the same length."""
    theta, _ = fit_length_glm(preferences, length_feature(policy_lengths, baseline_lengths), l2=l2)
    return float(_sigmoid(np.array(theta)))


def summarize(
    outcomes: Sequence[float],
    policy_outputs: Sequence[dict[str, Any]],
    baseline_outputs: Sequence[dict[str, Any]],
    *,
    resamples: int,
    seed: int,
) -> dict[str, Any]:
    """The eval.json statistics of one (policy, judge): n, win rate, its interval, LC win rate, lengths."""
    chars = [len(row["output"]) for row in policy_outputs]
    return {
        "n": len(outcomes),
        "win_rate": float(np.mean(outcomes)),
        "win_rate_ci": bootstrap_ci(outcomes, resamples=resamples, seed=seed),
        "lc_win_rate": lc_win_rate(outcomes, chars, [len(row["output"]) for row in baseline_outputs]),
        "avg_length_tokens": float(np.mean([row["num_tokens"] for row in policy_outputs])),
        "avg_length_chars": float(np.mean(chars)),
    }
