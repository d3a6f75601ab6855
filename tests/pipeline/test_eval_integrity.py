"""Nothing silently wrong in an evaluation (issue 22): a changed evaluation is never skipped, reports never mix
evaluations, rows are paired by prompt id, ``eval`` accepts ``--discard-stale`` and names what differs, repeated
and trained-on eval prompts are handled and reported, rows come in a fixed order; and ``eval --run`` takes the
run's recorded options (issue 21, item 4)."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pipeline_data import PROMPTS_FILE

from sppo_kernels.pipeline import cli
from sppo_kernels.pipeline.core import schema, store
from sppo_kernels.pipeline.core.errors import PipelineError
from sppo_kernels.pipeline.core.fingerprint import Fingerprint, discarding_stale, stage_fingerprint
from sppo_kernels.pipeline.demo.assets import build_policy
from sppo_kernels.pipeline.demo.gold import GoldJudge
from sppo_kernels.pipeline.evaluation import command, evaluate
from sppo_kernels.pipeline.evaluation.evaluate import EvalOptions, Policy
from sppo_kernels.pipeline.models.sampling import GenerateOptions
from sppo_kernels.pipeline.run import run_pipeline

SMALL_GENERATION = GenerateOptions(max_new_tokens=6, generation_batch_size=4)
REPO = Path(__file__).resolve().parents[2]


class LengthJudge:
    """Prefers the longer response (so verdicts and lengths are correlated, and pairing them matters)."""

    name = "length"

    def compare(self, prompts: Sequence[str], candidates: Sequence[Sequence[str]]) -> np.ndarray:
        lengths = np.array([[len(c) for c in cands] for cands in candidates], dtype=np.float32)
        return (lengths[:, :, None] - lengths[:, None, :]) / 10


@pytest.fixture(scope="module")
def second_policy(tmp_path_factory: pytest.TempPathFactory, texts: list[str]) -> Path:
    return build_policy(tmp_path_factory.mktemp("assets") / "llama-seed1", texts, arch="llama", seed=1)


def _prompt_file(folder: Path, name: str, rows: list[dict[str, Any]]) -> Path:
    path = folder / name
    store.write_jsonl(path, rows)
    return path


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``a``: the last 10 test prompts; ``b``: 6 others."""
    folder, rows = tmp_path_factory.mktemp("prompts"), store.read_jsonl(PROMPTS_FILE)
    return {"a": _prompt_file(folder, "a.jsonl", rows[-10:]), "b": _prompt_file(folder, "b.jsonl", rows[-16:-10])}


def _evaluate(policies: list[Policy], prompts: Path, out: Path, judges: Sequence[Any], **options: Any) -> list[dict]:
    return evaluate.evaluate(
        policies,
        str(prompts),
        out,
        EvalOptions(**{"eval_bootstrap": 200, "eval_shard_size": 4, **options}),
        SMALL_GENERATION,
        judges={judge.name: judge for judge in judges},
    )


@pytest.fixture
def policies(policy: Path, second_policy: Path) -> list[Policy]:
    return [Policy(0, str(policy)), Policy(1, str(second_policy))]


# ----------------------------------------------------------------------- 1. a changed evaluation is not skipped


def test_run_refuses_a_changed_evaluation(
    tmp_path: Path, policy: Path, finished_run: Path, prompt_files: dict[str, Path], make_options: Callable
) -> None:
    """``run <same flags> --eval-prompts OTHER`` (or another eval seed or sampling) used to print "finished
    earlier; skipping" and keep the old eval.json; it is refused, naming what changed, until --discard-stale."""
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    base = make_options(save_steps=1, keep_checkpoints=True)

    def run(prompts: Path, discard: bool = False, **changes: Any) -> None:
        evaluation = EvalOptions(eval_prompts=str(prompts), eval_shard_size=4, eval_bootstrap=100, **changes)
        reuse = dataclasses.replace(base.reuse, discard_stale=discard)
        options = dataclasses.replace(base, evaluate=evaluation, reuse=reuse)
        run_pipeline(str(policy), str(PROMPTS_FILE), run_dir, options)

    run(prompt_files["a"])
    before = schema.EVAL_JSON.path(run_dir).read_bytes()
    refusals = [
        ({"prompts": prompt_files["b"]}, r"\(prompts: other content; settings: dataset 'a' -> 'b'\)"),
        ({"eval_seed": 1}, r"\(settings: seed 0 -> 1\)"),
        ({"eval_sampling": "greedy"}, r"\(settings: temperature 0.7 -> 0.0, top_p 0.9 -> 1.0\)"),
    ]
    for change, message in refusals:
        prompts = change.pop("prompts", prompt_files["a"])
        with pytest.raises(PipelineError, match=rf"^the evaluation in .* or settings {message}.*--discard-stale"):
            run(prompts, **change)
        assert schema.EVAL_JSON.path(run_dir).read_bytes() == before
    run(prompt_files["b"], discard=True)
    assert [(r["iteration"], r["n"]) for r in store.read_json(schema.EVAL_JSON.path(run_dir))] == [(0, 6), (1, 6)]


# ----------------------------------------------------------------------- 2. reports never mix evaluations


def test_reports_never_mix_evaluations(tmp_path: Path, policies: list[Policy], prompt_files: dict[str, Path]) -> None:
    judges = [LengthJudge(), GoldJudge()]
    _evaluate(policies, prompt_files["a"], tmp_path, judges)
    # a re-evaluation on other prompts by one judge: the other judge's rows (other prompts) go with the old ones
    with discarding_stale():
        rows = _evaluate(policies, prompt_files["b"], tmp_path, [GoldJudge()])
    assert {(r["judge"], r["n"]) for r in rows} == {("gold", 6)}
    assert store.read_json(schema.EVAL_JSON.path(tmp_path)) == rows

    # settings.json deleted by hand: the judges' results there are of an unknown evaluation
    _evaluate(policies, prompt_files["b"], tmp_path, judges)
    (tmp_path / schema.EVAL_DIR / schema.EVAL_SETTINGS).unlink()
    with pytest.raises(PipelineError, match=r"^the evaluation in .*eval was made from other inputs"):
        _evaluate(policies, prompt_files["a"], tmp_path, [GoldJudge()])
    with discarding_stale():
        rows = _evaluate(policies, prompt_files["a"], tmp_path, [GoldJudge()])
    assert {(r["judge"], r["n"]) for r in rows} == {("gold", 10)}

    # other statistics for one judge: the other judge's rows were computed with the old ones
    _evaluate(policies, prompt_files["a"], tmp_path, judges)
    with pytest.raises(PipelineError, match=r"evaluate-length\.json holds another evaluation's results \(statistics: "
                       r"bootstrap 200 -> 300\); evaluate with that judge again, or pass --discard-stale"):  # fmt: skip
        _evaluate(policies, prompt_files["a"], tmp_path, [GoldJudge()], eval_bootstrap=300)
    with discarding_stale():
        rows = _evaluate(policies, prompt_files["a"], tmp_path, [GoldJudge()], eval_bootstrap=300)
    assert {r["judge"] for r in rows} == {"gold"}
    # and a changed statistic is never skipped as "finished earlier"
    with pytest.raises(PipelineError, match=r"finished evaluate-gold stage .*statistics: lc_fit 'ridge' -> 'alpaca'"):
        _evaluate(policies, prompt_files["a"], tmp_path, [GoldJudge()], eval_bootstrap=300, lc_fit="alpaca")


# ----------------------------------------------------------------------- 3. rows are paired by id


def _rewrite(path: Path, change: Callable[[list[dict]], list[dict]]) -> None:
    store.write_jsonl(path, change(store.read_jsonl(path)))


def test_judgments_and_outputs_are_paired_by_id(
    tmp_path: Path, policies: list[Policy], prompt_files: dict[str, Path]
) -> None:
    rows = _evaluate(policies, prompt_files["a"], tmp_path, [LengthJudge()])
    iter1 = tmp_path / schema.EVAL_DIR / "iter1"
    judgments = schema.judgments_path(iter1, "length")
    marker = schema.marker_path(tmp_path / schema.EVAL_DIR, "evaluate-length")

    # reversed verdicts: the same results (read by id, not by position)
    _rewrite(judgments, lambda r: r[::-1])
    marker.unlink()
    assert _evaluate(policies, prompt_files["a"], tmp_path, [LengthJudge()]) == rows

    # a verdict missing: refused in one line naming the file, or redone with --discard-stale
    _rewrite(judgments, lambda r: [row for row in r if row["id"] != 9])
    marker.unlink()
    with pytest.raises(PipelineError, match=r"^\S*judgments-length\.jsonl holds 9 rows for 10 prompts \(no row for "
                       r"ids 9\); pass --discard-stale to make it again$"):  # fmt: skip
        _evaluate(policies, prompt_files["a"], tmp_path, [LengthJudge()])
    with discarding_stale():
        assert _evaluate(policies, prompt_files["a"], tmp_path, [LengthJudge()]) == rows

    # reversed outputs: the verdicts no longer match their content (refused); recomputed, paired by id
    _rewrite(schema.EVAL_OUTPUTS.path(iter1), lambda r: r[::-1])
    marker.unlink()
    with pytest.raises(PipelineError, match=r"judge-length stage .*policy outputs: other content in \S*outputs"):
        _evaluate(policies, prompt_files["a"], tmp_path, [LengthJudge()])
    with discarding_stale():
        assert _evaluate(policies, prompt_files["a"], tmp_path, [LengthJudge()]) == rows

    # a unit file holding the rows of other prompts (its count and fingerprint intact) is not reused as such
    unit = schema.units_dir(iter1, "judge-length") / "unit-00000.jsonl"
    _rewrite(unit, lambda r: [*r[:-1][::-1], r[-1]])
    for path in (judgments, marker, schema.marker_path(iter1, "judge-length")):
        path.unlink()
    with pytest.raises(PipelineError, match=r"unit-00000\.jsonl holds rows of other ids"):
        _evaluate(policies, prompt_files["a"], tmp_path, [LengthJudge()])
    with discarding_stale():
        assert _evaluate(policies, prompt_files["a"], tmp_path, [LengthJudge()]) == rows


# ----------------------------------------------------------------------- 4. eval --discard-stale, messages


def test_eval_command_accepts_discard_stale(
    tmp_path: Path, policy: Path, ranker: Path, prompt_files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["eval", "--models", str(policy), "--eval-prompts", str(prompt_files["a"]), "--out", str(tmp_path),
            "--ranker", str(ranker), "--max-new-tokens", "4", "--eval-shard-size", "4",
            "--eval-bootstrap", "50"]  # fmt: skip
    assert cli.main(argv) == 0
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*argv, "--eval-seed", "1"])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "(settings: seed 0 -> 1)" in error and "sha256" not in error
    assert "pass --discard-stale to recompute" in error
    assert cli.main([*argv, "--eval-seed", "1", "--discard-stale"]) == 0
    assert store.read_json(tmp_path / schema.EVAL_DIR / schema.EVAL_SETTINGS)["options"]["eval_seed"] == 1


def test_messages_name_content_changes_without_hashes() -> None:
    """A copied run whose iteration-2 model has other content: the message says content, not a path change."""
    stored = stage_fingerprint("evaluate", {}).record
    changed = json.loads(json.dumps(stored))
    stored["inputs"] = {
        "iteration 2": {"sha256": "1" * 64, "path": "/a/iter2/model"},
        "prompts": {"sha256": "2" * 64},
        "settings": {"seed": 0, "top_p": 0.9},
    }
    changed["inputs"] = {
        "iteration 2": {"sha256": "3" * 64, "path": "/b/iter2/model"},
        "prompts": {"sha256": "4" * 64},
        "settings": {"seed": 1, "top_p": 0.9},
    }
    moved = {**changed["inputs"], "iteration 2": {"sha256": "1" * 64, "path": "/b/iter2/model"}}
    assert Fingerprint(changed).differences(stored) == [
        "iteration 2: other content in /b/iter2/model than recorded from /a/iter2/model",
        "prompts: other content",
        "settings: seed 0 -> 1",
    ]
    assert Fingerprint({**changed, "inputs": moved}).differences(stored)[0] == "prompts: other content"


# ----------------------------------------------------------------------- 5. repeated and trained-on prompts


def test_repeated_eval_prompts_count_once(
    tmp_path: Path, policies: list[Policy], prompt_files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    rows = store.read_jsonl(prompt_files["a"])
    repeated = _prompt_file(tmp_path, "repeated.jsonl", [*rows, rows[2], rows[5], rows[2]])  # ids 10, 11, 12
    evaluated = _evaluate(policies, repeated, tmp_path / "out", [LengthJudge()])
    assert {r["n"] for r in evaluated} == {10}
    assert "3 eval prompts of" in capsys.readouterr().out
    settings = store.read_json(tmp_path / "out" / schema.EVAL_DIR / schema.EVAL_SETTINGS)
    assert settings["repeated_prompts"] == [10, 11, 12] and settings["training_overlap"] is None
    assert "note: 3 repeated eval prompts were dropped (ids 10, 11, 12)" in (tmp_path / "out" / "eval.md").read_text()


def test_eval_prompts_the_run_trained_on_are_reported(
    tmp_path: Path, finished_run: Path, prompt_files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    trained = store.read_jsonl(schema.PROMPTS.path(schema.iteration_dir(finished_run, 1)))
    held_out = store.read_jsonl(prompt_files["a"])[:5]
    mixed = _prompt_file(tmp_path, "mixed.jsonl", [*held_out, {"messages": trained[3]["messages"]}])
    out = tmp_path / "eval"
    argv = ["eval", "--run", str(finished_run), "--eval-prompts", str(mixed), "--out", str(out),
            "--eval-shard-size", "4", "--eval-bootstrap", "50"]  # fmt: skip
    assert cli.main(argv) == 0
    assert "warning: 1 of the 6 eval prompts are training prompts of the run (ids 5)" in capsys.readouterr().out
    assert store.read_json(out / schema.EVAL_DIR / schema.EVAL_SETTINGS)["training_overlap"] == [5]
    assert "note: 1 of the eval prompts are training prompts of the run (ids 5)" in (out / "eval.md").read_text()


# ----------------------------------------------------------------------- 6. same inputs, same bytes


def test_rows_come_in_a_fixed_order(tmp_path: Path, policies: list[Policy], prompt_files: dict[str, Path]) -> None:
    for name, judges in (("a", [LengthJudge(), GoldJudge()]), ("b", [GoldJudge(), LengthJudge()])):
        _evaluate(policies, prompt_files["a"], tmp_path / name, judges)
    for artefact in (schema.EVAL_JSON.name, schema.EVAL_TABLE):
        assert (tmp_path / "a" / artefact).read_bytes() == (tmp_path / "b" / artefact).read_bytes()
    rows = store.read_json(schema.EVAL_JSON.path(tmp_path / "a"))
    assert [(r["iteration"], r["judge"]) for r in rows] == [(0, "gold"), (0, "length"), (1, "gold"), (1, "length")]


# ----------------------------------------------------------------------- 7. the demo's numbers are not universal


def test_demo_numbers_are_not_called_reproducible_across_machines() -> None:
    """The documented demo numbers were measured on one machine; another gave 91% proxy agreement (not 93%) and
    82.0% gold at iteration 3 (not 83.2%). Every sentence that calls the demo deterministic or its artefacts the
    same must say on which machine."""
    texts = [(REPO / "README.md").read_text(), (REPO / "docs" / "evaluation.md").read_text()]
    texts.append((REPO / "sppo_kernels" / "pipeline" / "demo" / "replica.py").read_text().split('"""')[1])
    claims = [
        sentence
        for text in texts
        for sentence in re.split(r"(?<=[.;])\s+", " ".join(text.split()))
        if re.search(r"demo is deterministic|same artefacts|same `?eval\.json|reproducible", sentence)
    ]
    assert claims and all("machine" in sentence for sentence in claims), claims


# ----------------------------------------------------------------------- eval --run takes the run's options


def test_eval_run_takes_the_runs_recorded_options(
    tmp_path: Path, policy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """run.json records options under their one name (``kernel_backend``); ``eval --run`` used to filter them by
    another (``backend``) and silently dropped the run's kernel backend. ``--discard-stale`` is never inherited."""
    run_dir = tmp_path / "run"
    options = {"model": {"kernel_backend": "chunked"}, "generate": {"max_new_tokens": 5},
               "reuse": {"discard_stale": True}}  # fmt: skip
    store.write_json(run_dir / schema.RUN_RECORD, {"model": str(policy), "prompts": "p.jsonl", "options": options})
    captured: dict[str, Any] = {}

    def fake_evaluate(policies: Sequence[Policy], prompts: str, out: Path, *groups: Any, **kwargs: Any) -> list:
        captured.update(policies=policies, groups=groups, discard=stage_fingerprint("x", {}).discard_stale)
        return []

    monkeypatch.setattr(command, "evaluate", fake_evaluate)
    assert cli.main(["eval", "--run", str(run_dir), "--eval-prompts", "held_out.jsonl"]) == 0
    _evaluation, generate, model, _rank, _prompts = captured["groups"]
    assert model.kernel_backend == "chunked" and generate.max_new_tokens == 5 and not captured["discard"]
    assert captured["policies"] == [Policy(0, str(policy))]
    assert cli.main(["eval", "--run", str(run_dir), "--eval-prompts", "h.jsonl", "--kernel-backend", "auto"]) == 0
    assert captured["groups"][2].kernel_backend == "auto"  # a flag wins over the record
