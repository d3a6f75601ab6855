"""The statistics of an evaluation: verdicts, the win rate and its bootstrap interval, and the length-controlled
win rate (AlpacaEval 2.0's GLM), fitted by a ridge-penalised Newton iteration (``ridge``, the default) or exactly
as AlpacaEval's ``length_controlled_minimal`` does (``alpaca``: cross-validated L1 through scikit-learn, an
optional dependency). docs/evaluation.md holds the exact formulas and when each fit applies."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from sppo_kernels.pipeline.core.errors import PipelineError

LC_L2 = 0.01  # ridge on (θ, φ): keeps the fit finite on separable data (see docs/evaluation.md)
LC_FITS = ("ridge", "alpaca")  # --lc-fit
ALPACA_FOLDS = 5  # AlpacaEval's n_splits: grouped by prompt
ALPACA_SEED = 123  # AlpacaEval's random_state of liblinear


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
    fit: str = "ridge",
    l2: float = LC_L2,
) -> float:
    """Length-controlled win rate: σ(θ), the GLM's predicted preference when the policy's and the baseline's
    responses have the same length, with θ from :func:`fit_length_glm` (``fit="ridge"``, penalty ``l2``) or from
    :func:`alpaca_length_glm` (``fit="alpaca"``) on :func:`length_feature`."""
    feature = length_feature(policy_lengths, baseline_lengths)
    if fit == "alpaca":
        theta, _ = alpaca_length_glm(preferences, feature)
    elif fit == "ridge":
        theta, _ = fit_length_glm(preferences, feature, l2=l2)
    else:
        raise PipelineError(f"--lc-fit must be one of {LC_FITS}, got {fit!r}")
    return float(_sigmoid(np.array(theta)))


def require_sklearn() -> Any:
    """scikit-learn, or a clear error naming the extra that installs it (``--lc-fit alpaca`` needs it)."""
    try:
        import sklearn
    except ImportError as e:
        raise PipelineError(
            "--lc-fit alpaca needs scikit-learn: pip install 'sppo-kernels[eval]' (or scikit-learn>=1.4)"
        ) from e
    return sklearn


def _soft_log_loss(y_true: np.ndarray, y_prob: np.ndarray, soft_labels: np.ndarray) -> float:
    """Mean log loss of predicted win probabilities ``y_prob`` against soft labels p in [0, 1], clipped as
    AlpacaEval does; ``y_true`` (the 0/1 copies) is not used: each copy of a prompt is scored against its p."""
    q = np.clip(y_prob, 1e-15, 1 - 1e-15)
    return float(-np.mean(soft_labels * np.log(q) + (1 - soft_labels) * np.log(1 - q)))


def _l1_penalty(estimator: type) -> dict[str, Any]:
    """The L1 penalty in the estimator's own terms: ``l1_ratios=(1,)`` from scikit-learn 1.8 on (where ``penalty``
    is deprecated), ``penalty="l1"`` before."""
    if inspect.signature(estimator).parameters["penalty"].default == "deprecated":
        return {"l1_ratios": (1.0,)}
    return {"penalty": "l1"}


def alpaca_length_glm(preferences: Sequence[float], feature: Sequence[float]) -> tuple[float, float]:
    """(θ, φ) of AlpacaEval 2.0's ``length_controlled_minimal`` GLM, fitted as AlpacaEval 0.6.6 does: each prompt
    twice (label 1 with weight p_i, label 0 with weight 1 − p_i; design columns ``[x_i, 1]``), scikit-learn's
    ``LogisticRegressionCV`` (10 values of C, L1, liblinear, no intercept, ``random_state=123``) with 5 folds
    grouped by prompt, scored by the soft-label log loss; θ is the coefficient of the constant column."""
    sklearn = require_sklearn()
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.metrics import make_scorer
    from sklearn.model_selection import GroupKFold

    p = np.asarray(preferences, dtype=np.float64)
    x = np.asarray(feature, dtype=np.float64)
    if p.size < ALPACA_FOLDS:
        raise PipelineError(f"--lc-fit alpaca needs at least {ALPACA_FOLDS} prompts (its 5 folds), got {p.size}")
    design = np.stack([x, np.ones_like(x)], axis=1)
    with sklearn.config_context(enable_metadata_routing=True), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # scikit-learn's notices of future defaults
        scorer = make_scorer(_soft_log_loss, response_method="predict_proba", greater_is_better=False)
        model = LogisticRegressionCV(
            cv=GroupKFold(ALPACA_FOLDS), scoring=scorer.set_score_request(soft_labels=True), solver="liblinear",
            fit_intercept=False, dual=False, random_state=ALPACA_SEED, **_l1_penalty(LogisticRegressionCV),
        )  # fmt: skip
        model.set_fit_request(sample_weight=True).fit(
            np.concatenate([design, design]),
            np.repeat([1, 0], p.size),
            sample_weight=np.concatenate([p, 1 - p]),
            groups=np.tile(np.arange(p.size), 2),
            soft_labels=np.concatenate([p, p]),
        )
    phi, theta = model.coef_[0]
    return float(theta), float(phi)


def summarize(
    outcomes: Sequence[float],
    policy_outputs: Sequence[dict[str, Any]],
    baseline_outputs: Sequence[dict[str, Any]],
    *,
    resamples: int,
    seed: int,
    lc_fit: str = "ridge",
) -> dict[str, Any]:
    """The eval.json statistics of one (policy, judge): n, win rate, its interval, LC win rate (``lc_fit``),
    lengths. The three sequences are aligned: entry i of each belongs to the same prompt."""
    chars = [len(row["output"]) for row in policy_outputs]
    baseline_chars = [len(row["output"]) for row in baseline_outputs]
    return {
        "n": len(outcomes),
        "win_rate": float(np.mean(outcomes)),
        "win_rate_ci": bootstrap_ci(outcomes, resamples=resamples, seed=seed),
        "lc_win_rate": lc_win_rate(outcomes, chars, baseline_chars, fit=lc_fit),
        "avg_length_tokens": float(np.mean([row["num_tokens"] for row in policy_outputs])),
        "avg_length_chars": float(np.mean(chars)),
    }
