"""The evaluate stage: win-rate statistics against hand-computed values, both-orders judging, the
artefacts and their resumption, ``sppo-train eval`` / ``run --eval-prompts``, and clear errors on bad input."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
from pipeline_data import PROMPTS_FILE

from sppo_kernels.pipeline import cli
from sppo_kernels.pipeline.core import schema, store
from sppo_kernels.pipeline.core.errors import PipelineError
from sppo_kernels.pipeline.core.fingerprint import stage_fingerprint
from sppo_kernels.pipeline.core.stage import run_stage
from sppo_kernels.pipeline.demo.assets import build_policy
from sppo_kernels.pipeline.demo.gold import GoldJudge, gold_score
from sppo_kernels.pipeline.evaluation import evaluate
from sppo_kernels.pipeline.evaluation.evaluate import EvalOptions, Policy
from sppo_kernels.pipeline.evaluation.statistics import bootstrap_ci, fit_length_glm, lc_win_rate, length_feature
from sppo_kernels.pipeline.evaluation.verdicts import Verdicts
from sppo_kernels.pipeline.models.sampling import GenerateOptions
from sppo_kernels.pipeline.run import run_pipeline

SMALL_GENERATION = GenerateOptions(max_new_tokens=6, generation_batch_size=4)

# ---------------------------------------------------------------------------------------------- statistics


def test_lc_win_rate_hand_computed() -> None:
    """Two length groups of 5 prompts: Δ = len(baseline) − len(policy) = +10 (policy shorter) and −10.

    sd(Δ) (ddof 1) = 10·sqrt(10/9), so x = ±tanh(sqrt(0.9)) takes two values and the logistic GLM
    logit q = θ + φx is saturated: the MLE reproduces the group means, σ(θ + φx₊) = 0.8 and σ(θ − φx₊) = 0.4.
    Hence θ = (logit 0.8 + logit 0.4)/2 = (ln 4 + ln 2/3)/2 = ½ ln(8/3), and the LC win rate is
    σ(θ) = sqrt(8/3) / (1 + sqrt(8/3)) = 0.620204..., while the raw win rate is 0.6.
    """
    preferences = [1, 1, 1, 1, 0, 1, 0.5, 0.5, 0, 0]  # mean 0.8 when shorter, 0.4 when longer
    policy_lengths = [10] * 5 + [30] * 5
    baseline_lengths = [20] * 10
    expected = math.sqrt(8 / 3) / (1 + math.sqrt(8 / 3))
    assert lc_win_rate(preferences, policy_lengths, baseline_lengths, l2=0.0) == pytest.approx(expected, abs=1e-9)
    theta, phi = fit_length_glm(preferences, length_feature(policy_lengths, baseline_lengths), l2=0.0)
    x = math.tanh(math.sqrt(0.9))
    assert theta == pytest.approx(0.5 * math.log(8 / 3), abs=1e-9)
    assert phi == pytest.approx((math.log(4) - math.log(2 / 3)) / (2 * x), abs=1e-8)
    # the default ridge (l2 = 0.01) moves it by less than 1e-3 here
    assert lc_win_rate(preferences, policy_lengths, baseline_lengths) == pytest.approx(expected, abs=1e-3)


def test_lc_win_rate_edge_cases() -> None:
    # no length difference: no length term, LC = the raw win rate
    assert lc_win_rate([1, 0, 0.5, 1], [5] * 4, [5] * 4, l2=0.0) == pytest.approx(0.625, abs=1e-9)
    # the policy wins exactly when it is longer (separable): the ridge keeps the fit finite
    value = lc_win_rate([1, 1, 0, 0], [30, 30, 10, 10], [20] * 4)
    assert 0.0 < value < 1.0 and math.isfinite(value)
    assert lc_win_rate([1.0] * 6, [1, 2, 3, 4, 5, 6], [3] * 6) > 0.99  # all wins


def test_bootstrap_interval() -> None:
    outcomes = [1.0] * 60 + [0.5] * 10 + [0.0] * 30
    low, high = bootstrap_ci(outcomes, resamples=2000, seed=0)
    assert low < np.mean(outcomes) < high and 0.05 < high - low < 0.3
    assert bootstrap_ci(outcomes, resamples=2000, seed=0) == [low, high]  # seeded
    assert bootstrap_ci([0.5] * 20, resamples=100, seed=1) == [0.5, 0.5]


def test_gold_rule() -> None:
    prompt = "Tell me about cats."
    assert gold_score(prompt, "Sure! Cats are nice. Hope this helps!") == 3  # sure + hope + topic
    assert gold_score(prompt, "Meh. Dogs are odd. Dunno.") == -2
    assert gold_score(prompt, "Sure! Sure! Sure!") == 0  # +1 warm, −1 rambling
    assert gold_score(prompt, "") == 0
    logits = GoldJudge().compare([prompt], [["Sure! Cats.", "Meh."]])
    np.testing.assert_array_equal(logits, [[[0, 3], [-3, 0]]])


class BiasedJudge:
    """Prefers the longer response, plus a strong bias for whichever is shown first (cancelled by both orders)."""

    name = "biased"

    def __init__(self) -> None:
        self.calls: list[int] = []

    def compare(self, prompts: Sequence[str], candidates: Sequence[Sequence[str]]) -> np.ndarray:
        self.calls.append(len(prompts))
        lengths = np.array([[len(c) for c in cands] for cands in candidates], dtype=np.float32)
        logits = (lengths[:, :, None] - lengths[:, None, :]) / 10 + 5.0
        for row in logits:
            np.fill_diagonal(row, 0.0)
        return logits


def test_both_orders_cancel_position_bias(tmp_path: Path) -> None:
    policy = [{"id": i, "instruction": "q", "output": text} for i, text in enumerate(["aaaa", "a", "same", "bb"])]
    baseline = [{"id": i, "instruction": "q", "output": text} for i, text in enumerate(["aa", "aa", "same", "bb"])]
    judge = BiasedJudge()
    fingerprint = stage_fingerprint("eval-judge", {"judge": {"scorer": "BiasedJudge"}})
    stage = Verdicts(lambda: judge, "biased", list(zip(policy, baseline, strict=True)), tmp_path, fingerprint,
                     shard_size=2, where="test")  # fmt: skip
    rows = store.read_jsonl(run_stage(stage))
    assert [r["outcome"] for r in rows] == [1.0, 0.0, 0.5, 0.5]  # identical responses: a tie, not asked
    assert judge.calls == [2]  # one shard had only identical pairs
    assert rows[0]["logits"] == pytest.approx([5.2, 4.8]) and rows[0]["preference"] == pytest.approx(0.4)
    summary = store.stage_summary(tmp_path, "judge-biased")
    assert summary["fingerprint"] == fingerprint.record
    assert {k: summary[k] for k in ("pairs", "wins", "ties", "losses")} == {
        "pairs": 4,
        "wins": 1,
        "ties": 2,
        "losses": 1,
    }


# ---------------------------------------------------------------------------------------------- the stage


@pytest.fixture(scope="module")
def second_policy(tmp_path_factory: pytest.TempPathFactory, texts: list[str]) -> Path:
    return build_policy(tmp_path_factory.mktemp("assets") / "llama-seed1", texts, arch="llama", seed=1)


@pytest.fixture(scope="module")
def eval_prompts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "held_out.jsonl"
    rows = store.read_jsonl(PROMPTS_FILE)[-10:]
    store.write_jsonl(path, rows)
    return path


def _evaluate(policies: list[Policy], prompts: Path, out: Path, **options: object) -> list[dict]:
    return evaluate.evaluate(
        policies,
        str(prompts),
        out,
        EvalOptions(eval_bootstrap=200, eval_shard_size=4, **options),
        SMALL_GENERATION,
        judges={"biased": BiasedJudge(), "gold": GoldJudge()},
    )


def test_evaluate_writes_every_artefact_and_resumes(
    tmp_path: Path, policy: Path, second_policy: Path, eval_prompts: Path
) -> None:
    policies = [Policy(0, str(policy)), Policy(1, str(second_policy))]
    rows = _evaluate(policies, eval_prompts, tmp_path)
    assert store.read_json(schema.EVAL_JSON.path(tmp_path)) == rows
    assert [(r["iteration"], r["judge"]) for r in rows] == [(0, "biased"), (0, "gold"), (1, "biased"), (1, "gold")]
    for row in rows:
        assert list(row) == list(schema.EVAL_JSON.columns) and row["n"] == 10
        assert all(0 <= row[k] <= 1 for k in ("win_rate", "lc_win_rate")) and len(row["win_rate_ci"]) == 2
        assert row["win_rate_ci"][0] <= row["win_rate"] <= row["win_rate_ci"][1]
        assert row["avg_length_chars"] > 0 and 0 < row["avg_length_tokens"] <= 6
    assert rows[0]["win_rate"] == rows[0]["lc_win_rate"] == 0.5  # the base against itself: all ties
    outputs = store.read_jsonl(tmp_path / "eval" / "iter1" / "outputs.jsonl")
    assert [r["id"] for r in outputs] == list(range(10))
    alpaca = store.read_json(tmp_path / "eval" / "iter1" / "model_outputs.json")
    assert alpaca[0] == {
        "instruction": outputs[0]["instruction"],
        "output": outputs[0]["output"],
        "generator": f"{tmp_path.name}-iter1",
        "dataset": "held_out",
    }
    assert not (tmp_path / "eval" / "baseline").exists()  # the baseline is iteration 0: generated once
    table = (tmp_path / schema.EVAL_TABLE).read_text()
    assert "| iteration | LC win rate | win rate [95% CI] |" in table
    assert "| base | 50.00 | 50.00 [50.00, 50.00]" in table
    assert (tmp_path / schema.EVAL_PLOT).read_bytes().startswith(b"\x89PNG")

    # resume: a lost unit of work is redone with the same seed; finished parts are not touched
    marker = tmp_path / "eval" / "iter1" / "stages" / "generate.json"
    marker.unlink()
    (tmp_path / "eval" / "iter1" / "generate_units" / "unit-00001.jsonl").unlink()
    before = (tmp_path / "eval" / "iter0" / "outputs.jsonl").stat().st_mtime_ns
    again = _evaluate(policies, eval_prompts, tmp_path)
    assert again == rows
    assert store.read_jsonl(tmp_path / "eval" / "iter1" / "outputs.jsonl") == outputs
    assert (tmp_path / "eval" / "iter0" / "outputs.jsonl").stat().st_mtime_ns == before

    # other settings are refused rather than mixed with the stored outputs
    with pytest.raises(PipelineError, match="made from other inputs or settings"):
        _evaluate(policies, eval_prompts, tmp_path, eval_seed=1)


def test_generation_settings() -> None:
    paper = evaluate.sampling_options(EvalOptions(), GenerateOptions())
    assert (paper.num_responses, paper.temperature, paper.top_p) == (1, 0.7, 0.9)  # the paper's sampling
    greedy = evaluate.sampling_options(EvalOptions(eval_sampling="greedy"), GenerateOptions(max_new_tokens=9))
    assert (greedy.temperature, greedy.top_p, greedy.max_new_tokens) == (0.0, 1.0, 9)  # vLLM: temperature 0 = greedy


def test_greedy_evaluation_is_deterministic(tmp_path: Path, policy: Path, eval_prompts: Path) -> None:
    policies = [Policy(0, str(policy))]
    for seed, out in ((0, tmp_path / "a"), (5, tmp_path / "b")):
        _evaluate(policies, eval_prompts, out, eval_sampling="greedy", eval_seed=seed, eval_baseline=str(policy))
    a, b = (store.read_jsonl(tmp_path / x / "eval" / "iter0" / "outputs.jsonl") for x in "ab")
    assert a == b


def test_evaluate_rejects_bad_input(
    tmp_path: Path, policy: Path, second_policy: Path, eval_prompts: Path, texts: list[str]
) -> None:
    policies = [Policy(0, str(policy)), Policy(1, str(second_policy))]
    with pytest.raises(PipelineError, match="missing file"):
        _evaluate(policies, tmp_path / "none.jsonl", tmp_path / "a")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"prompt": 3}\n')
    with pytest.raises(PipelineError, match=r"bad.jsonl row 1"):
        _evaluate(policies, bad, tmp_path / "b")
    bad.write_text('{"prompt": "fine"}\nnot json\n')
    with pytest.raises(PipelineError, match=r"bad.jsonl:2 is not valid JSON"):
        _evaluate(policies, bad, tmp_path / "c")
    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(second_policy, no_tokenizer)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (no_tokenizer / name).unlink(missing_ok=True)
    with pytest.raises(PipelineError, match=r"cannot load a tokenizer from .*no-tokenizer"):
        _evaluate([Policy(0, str(policy)), Policy(1, str(no_tokenizer))], eval_prompts, tmp_path / "d")
    assert not (tmp_path / "d" / "eval").exists()  # checked before any work

    class NaNJudge(BiasedJudge):
        def compare(self, prompts: Sequence[str], candidates: Sequence[Sequence[str]]) -> np.ndarray:
            logits = super().compare(prompts, candidates)
            logits[-1, 0, 1] = np.nan
            return logits

    out = tmp_path / "e"
    with pytest.raises(PipelineError, match=r"judge 'nan' returned a non-finite logit .* prompt id \d+ of .*held_out"):
        evaluate.evaluate(
            policies, str(eval_prompts), out, EvalOptions(eval_shard_size=4), SMALL_GENERATION,
            judges={"nan": NaNJudge()},
        )  # fmt: skip
    assert not (schema.EVAL_JSON.path(out)).exists()
    assert store.stage_summary(out / "eval" / "iter1", "judge-nan") is None
    assert not (out / "eval" / "iter1" / "judgments-nan.jsonl").exists()


# ---------------------------------------------------------------------------------------------- run and CLI


def test_run_with_eval_prompts_and_eval_command(
    tmp_path: Path,
    policy: Path,
    finished_run: Path,
    eval_prompts: Path,
    make_options: Callable,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)  # a finished one-iteration run (fingerprints compare contents, not paths)
    options = dataclasses.replace(
        make_options(save_steps=1, keep_checkpoints=True),
        evaluate=EvalOptions(eval_prompts=str(eval_prompts), eval_shard_size=4, eval_bootstrap=100),
    )
    run_pipeline(str(policy), str(PROMPTS_FILE), run_dir, options)  # every training stage is skipped
    text = capsys.readouterr().out
    assert text.count("finished earlier") == 5 and "[evaluate-pairrm] iteration 1" in text
    rows = store.read_json(schema.EVAL_JSON.path(run_dir))
    assert [(r["iteration"], r["judge"], r["n"]) for r in rows] == [(0, "pairrm", 10), (1, "pairrm", 10)]
    run_pipeline(str(policy), str(PROMPTS_FILE), run_dir, options)
    assert "[evaluate-pairrm] finished earlier" in capsys.readouterr().out

    # sppo-train eval --run: options default to the run's (max_new_tokens 8, the tiny ranker), flags win
    assert cli.main(["eval", "--run", str(run_dir), "--eval-prompts", str(eval_prompts), "--out",
                     str(tmp_path / "cli"), "--eval-max-prompts", "4", "--eval-sampling", "greedy"]) == 0  # fmt: skip
    rows = store.read_json(schema.EVAL_JSON.path(tmp_path / "cli"))
    assert [(r["iteration"], r["n"]) for r in rows] == [(0, 4), (1, 4)]
    settings = store.read_json(tmp_path / "cli" / "eval" / "settings.json")
    assert settings["generate"]["max_new_tokens"] == 8 and settings["generate"]["temperature"] == 0.0
    assert json.loads(json.dumps(settings["policies"]))[1]["path"] == str(run_dir / "iter1" / "model")


def test_eval_command_errors(tmp_path: Path, policy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["eval", "--models", str(policy), "--out", str(tmp_path)])
    assert exit_info.value.code == 2 and "eval needs --eval-prompts" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["eval", "--out", str(tmp_path), "--eval-prompts", "x.jsonl"])
    assert "one of the arguments --run --models is required" in capsys.readouterr().err
