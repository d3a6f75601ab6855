"""Work in an output folder is reused only when its fingerprint (model and input
content, options that change results) matches; otherwise it is refused with one line naming what differs, or
with ``--discard-stale`` discarded and recomputed to exactly what a fresh folder gets. For every stage and ``run``,
at the level of finished stages (markers), unit files and training checkpoints; ``run.json`` compares content,
not path strings."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pipeline_data import PROMPTS_FILE
from safetensors.torch import load_file

from sppo_kernels.pipeline import cli
from sppo_kernels.pipeline.core import schema, store
from sppo_kernels.pipeline.core.fingerprint import discarding_stale, model_identity, stage_fingerprint
from sppo_kernels.pipeline.core.prompts import Prompt
from sppo_kernels.pipeline.core.store import StaleWorkError
from sppo_kernels.pipeline.demo.assets import build_policy
from sppo_kernels.pipeline.models.judge import RankOptions
from sppo_kernels.pipeline.models.sampling import GenerateOptions
from sppo_kernels.pipeline.run import run_pipeline
from sppo_kernels.pipeline.stages.generate import run_generate
from sppo_kernels.pipeline.stages.rank import run_rank
from sppo_kernels.pipeline.stages.reflogps import RefLogpsOptions, run_reflogps
from sppo_kernels.pipeline.stages.targets import TargetsOptions, run_targets
from sppo_kernels.pipeline.stages.train import run_train
from sppo_kernels.pipeline.table import STAGE_NAMES

GENERATE = GenerateOptions(num_responses=2, max_new_tokens=4, generation_batch_size=2, generation_shard_size=2)
REFLOGPS = RefLogpsOptions(max_length=40, max_prompt_length=24, reflogps_batch_size=4, reflogps_shard_size=4)


@pytest.fixture(scope="module")
def other_policy(tmp_path_factory: pytest.TempPathFactory, texts: list[str]) -> Path:
    """The tiny Llama with other random weights (same tokenizer)."""
    return build_policy(tmp_path_factory.mktemp("assets") / "llama-seed1", texts, arch="llama", seed=1)


class LengthJudge:
    """The longer response wins."""

    def compare(self, prompts: Sequence[str], candidates: Sequence[Sequence[str]]) -> np.ndarray:
        lengths = np.array([[len(c) for c in cands] for cands in candidates], dtype=np.float32)
        return lengths[:, :, None] - lengths[:, None, :]


class ShortJudge(LengthJudge):
    """The shorter response wins."""

    def compare(self, prompts: Sequence[str], candidates: Sequence[Sequence[str]]) -> np.ndarray:
        return -super().compare(prompts, candidates)


def _generations(path: Path, salt: str = "") -> Path:
    rows = [
        {
            "id": i,
            "messages": [{"role": "user", "content": f"Tell me about topic {i}."}],
            "responses": [f"{salt}It is a fine topic." * (1 + (i + j) % 3) for j in range(3)],
            "finish_reasons": ["stop", "length", "stop"],
            "num_tokens": [5, 9, 5],
        }
        for i in range(4)
    ]
    store.write_jsonl(path, rows)
    return path


def _rankings(path: Path, generations: Path, judge: Any) -> Path:
    rows = store.read_jsonl(generations)
    logits = judge.compare([""] * len(rows), [row["responses"] for row in rows])
    store.write_jsonl(path, [{"id": row["id"], "logits": m.tolist()} for row, m in zip(rows, logits, strict=True)])
    return path


def _targets(path: Path, folder: Path) -> Path:
    generations = _generations(folder / "g.jsonl")
    return run_targets(generations, _rankings(folder / "r.jsonl", generations, LengthJudge()), folder, TargetsOptions())


@dataclasses.dataclass
class Case:
    """A stage run twice into one folder: with ``first`` settings, then with ``changed`` ones (``message``: what
    the refusal names). ``units``: the stage saves units of work."""

    stage: str
    changed: dict[str, Any]
    message: str
    units: bool = True


CASES = [
    Case("generate", {"temperature": 1.0}, r"temperature: 0.7 -> 1.0"),
    Case("generate", {"generation_seed": 5}, r"generation_seed: 0 -> 5"),
    Case("generate", {"prompts": "other"}, r"prompts: "),
    Case("generate", {"model": "other"}, r"model: other content in .*llama-seed1 than recorded from .*llama\d*"),
    Case("rank", {"generations": "other"}, r"generations: other content in .*g\.jsonl"),
    Case("rank", {"scorer": ShortJudge()}, r"judge: .*LengthJudge.* -> .*ShortJudge"),
    Case("targets", {"loss_type": "sppo_hard"}, r"loss_type: 'sppo' -> 'sppo_hard'", units=False),
    Case("targets", {"rankings": "other"}, r"rankings: other content", units=False),
    Case("reflogps", {"model": "other"}, r"model: other content in .*llama-seed1 than recorded from .*llama\d*"),
    Case("reflogps", {"max_length": 48}, r"max_length: 40 -> 48"),
]


def _runner(case: Case, policy: Path, other: Path, prompts: list[Prompt], inputs: Path) -> Callable[..., Path]:
    """``run(out, changed: bool)`` for the stage of ``case``; inputs are made in ``inputs``."""
    inputs.mkdir(exist_ok=True)
    if case.stage == "generate":

        def run(out: Path, changed: bool) -> Path:
            values = {"model": policy, "prompts": prompts[:3], **(case.changed if changed else {})}
            model = other if values.pop("model") == "other" else policy
            chosen = prompts[3:6] if values.pop("prompts") == "other" else prompts[:3]
            options = dataclasses.replace(GENERATE, **values)
            return run_generate(str(model), chosen, out, options)

    elif case.stage == "rank":
        path = _generations(inputs / "g.jsonl")

        def run(out: Path, changed: bool) -> Path:
            values = case.changed if changed else {}
            _generations(path, "other " if values.get("generations") else "")  # same path, other content
            judge = values.get("scorer", LengthJudge())
            return run_rank(path, out, RankOptions(rank_shard_size=2), scorer=judge)

    elif case.stage == "targets":
        generations = _generations(inputs / "g.jsonl")

        def run(out: Path, changed: bool) -> Path:
            values = dict(case.changed) if changed else {}
            judge = ShortJudge() if values.pop("rankings", None) else LengthJudge()
            rankings = _rankings(inputs / "r.jsonl", generations, judge)
            options = TargetsOptions(**values)
            return run_targets(generations, rankings, out, options)

    else:
        targets = _targets(inputs / "t.jsonl", inputs)

        def run(out: Path, changed: bool) -> Path:
            values = dict(case.changed) if changed else {}
            model = other if values.pop("model", None) else policy
            options = dataclasses.replace(REFLOGPS, **values)
            return run_reflogps(str(model), targets, out, options)

    return run


def _content(path: Path) -> Any:
    if path.suffix == ".parquet":
        import datasets

        return datasets.Dataset.from_parquet(str(path), keep_in_memory=True).to_list()
    return path.read_text()


@pytest.mark.parametrize("level", ["marker", "units"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.stage}-{'-'.join(c.changed)}")
def test_stage_refuses_or_recomputes_stale_work(
    case: Case, level: str, tmp_path: Path, policy: Path, other_policy: Path, prompts: list[Prompt], capsys
) -> None:
    if level == "units" and not case.units:
        pytest.skip("this stage saves no units")
    run = _runner(case, policy, other_policy, prompts, tmp_path / "inputs")
    out = tmp_path / "out"
    output = run(out, changed=False)
    stored = store.stage_summary(out, case.stage)["fingerprint"]
    if level == "units":  # killed after its units were saved: no marker, no output yet
        schema.marker_path(out, case.stage).unlink()
        output.unlink()
        what = f"{case.stage}_units in {out}"
    else:
        what = f"the finished {case.stage} stage in {out}"
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    with pytest.raises(StaleWorkError, match=case.message) as refused:
        run(out, changed=True)
    assert str(refused.value).startswith(what) and "--discard-stale" in str(refused.value)
    assert "\n" not in str(refused.value)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # nothing touched

    capsys.readouterr()
    with discarding_stale():
        recomputed = run(out, changed=True)
    assert "discarding: " + what in capsys.readouterr().out
    fresh = run(tmp_path / "fresh", changed=True)
    assert _content(recomputed) == _content(fresh)
    assert (
        store.stage_summary(out, case.stage)["fingerprint"]
        == store.stage_summary(fresh.parent, case.stage)["fingerprint"]
        != stored
    )
    assert run(out, changed=True) == recomputed  # now it matches: skipped
    assert "finished earlier" in capsys.readouterr().out


def test_units_of_another_layout_are_recomputed_not_refused(tmp_path: Path) -> None:
    """A changed shard size (not a result-changing option) never reuses a unit by its index, and is no error."""
    path = _generations(tmp_path / "g.jsonl")
    first = run_rank(path, tmp_path / "a", RankOptions(rank_shard_size=3), scorer=LengthJudge()).read_text()
    schema.marker_path(tmp_path / "a", "rank").unlink()
    relaid = run_rank(path, tmp_path / "a", RankOptions(rank_shard_size=1), scorer=LengthJudge()).read_text()
    assert relaid == first and relaid.count("\n") == 4
    assert len(list((tmp_path / "a" / "rank_units").glob("unit-*.jsonl"))) == 4


def test_every_unit_carries_its_fingerprint(tmp_path: Path) -> None:
    path = _generations(tmp_path / "g.jsonl")
    run_rank(path, tmp_path, RankOptions(rank_shard_size=2), scorer=LengthJudge())
    record = store.read_json(tmp_path / "rank_units" / "fingerprint.json")
    assert record == store.stage_summary(tmp_path, "rank")["fingerprint"]
    for unit in (tmp_path / "rank_units").glob("unit-*.jsonl"):
        trailer = store.read_jsonl(unit)[-1]["_unit"]
        assert trailer["rows"] == 2 and len(trailer["fingerprint"]) == 64


# ---------------------------------------------------------------------------------------------- train


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / schema.MODEL_DIR / "model.safetensors"))


def test_train_refuses_or_discards_another_models_checkpoint(
    finished_run: Path, policy: Path, other_policy: Path, tmp_path: Path, make_options: Callable, capsys
) -> None:
    """``train`` with another model into a folder holding the first model's checkpoint."""
    source = finished_run / "iter1"
    data = source / schema.TRAIN_DATA.name
    options = make_options(save_steps=2)
    with pytest.raises(StaleWorkError, match=r"^the finished train stage .*model: other content in .*llama-seed1 than"):
        run_train(str(other_policy), data, source, options.train, options.model)  # refused before any work

    out = tmp_path / "out"
    shutil.copytree(source / schema.CHECKPOINTS, out / schema.CHECKPOINTS)
    with pytest.raises(StaleWorkError, match=r"^the training checkpoint in .*model: other content in .*llama-seed1"):
        run_train(str(other_policy), data, out, options.train, options.model)
    assert (out / schema.CHECKPOINTS / "step-0000003").is_dir() and not (out / schema.METRICS.name).exists()

    capsys.readouterr()
    with discarding_stale():
        run_train(str(other_policy), data, out, options.train, options.model)
    printed = capsys.readouterr().out
    assert "discarding: the training checkpoint" in printed and "resuming" not in printed
    run_train(str(other_policy), data, tmp_path / "fresh", options.train, options.model)
    fresh = _weights(tmp_path / "fresh")
    for name, value in _weights(out).items():
        torch.testing.assert_close(value, fresh[name], rtol=1e-6, atol=1e-7)
    losses = [[m["loss"] for m in store.read_jsonl(schema.METRICS.path(f))] for f in (out, tmp_path / "fresh")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6) and len(losses[0]) == 4


def test_checkpoint_of_another_process_count_is_stale(tmp_path: Path) -> None:
    """A ZeRO checkpoint is partitioned over its processes: the count is part of its fingerprint."""
    from sppo_kernels.pipeline.stages.train import checkpoint_to_resume

    fingerprint = stage_fingerprint("train", {})
    folder = tmp_path / schema.CHECKPOINTS
    (folder / "step-0000002").mkdir(parents=True)
    (folder / "step-0000002" / "a.pt").write_bytes(b"123")
    state = {"tag": "step-0000002", "step": 2, "files": {"a.pt": 3}}
    store.write_json(
        folder / schema.LATEST_CHECKPOINT, {**state, "fingerprint": fingerprint.with_layout(processes=2).record}
    )
    with pytest.raises(StaleWorkError, match=r"processes: 2 -> 1"):
        checkpoint_to_resume(folder, fingerprint.with_layout(processes=1), discard=True)
    assert checkpoint_to_resume(folder, fingerprint.with_layout(processes=2), discard=True)["step"] == 2


# ---------------------------------------------------------------------------------------------- run


def _copy_run(finished_run: Path, to: Path) -> Path:
    shutil.copytree(finished_run, to, ignore=shutil.ignore_patterns(schema.CHECKPOINTS))
    return to


def _cli_error(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(list(argv))
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_run_refuses_other_content_and_old_records(
    finished_run: Path, policy: Path, other_policy: Path, tmp_path: Path, make_options: Callable, run_argv, capsys
) -> None:
    run = _copy_run(finished_run, tmp_path / "run")
    options = make_options(save_steps=1, keep_checkpoints=True)
    prompts = tmp_path / "prompts.jsonl"
    rows = store.read_jsonl(PROMPTS_FILE)
    store.write_jsonl(prompts, [{**rows[0], "prompt": "Something else entirely?"}, *rows[1:]])
    cases = [
        ((str(other_policy), str(PROMPTS_FILE)), r"model: other content in .*llama-seed1 than recorded from"),
        ((str(policy), str(prompts)), r"prompts: "),
    ]
    for (model, source), message in cases:
        with pytest.raises(StaleWorkError, match=r"^the run in .*" + message):
            run_pipeline(model, source, run, options)
    error = _cli_error(capsys, *run_argv(other_policy, run, options))
    assert error.startswith("sppo-train: error: the run in") and error.count("\n") == 1
    assert "pass --discard-stale to recompute" in error

    record = store.read_json(run / schema.RUN_RECORD)
    store.write_json(run / schema.RUN_RECORD, {k: v for k, v in record.items() if k != "fingerprint"})
    with pytest.raises(StaleWorkError, match=r"no fingerprint \(made by an older sppo-train\)"):
        run_pipeline(str(policy), str(PROMPTS_FILE), run, options)
    store.write_json(run / schema.RUN_RECORD, record)
    marker = store.stage_summary(run / "iter1", "rank")
    store.write_json(schema.marker_path(run / "iter1", "rank"), {k: v for k, v in marker.items() if k != "fingerprint"})
    with pytest.raises(StaleWorkError, match=r"^the finished rank stage .*no fingerprint"):
        run_pipeline(str(policy), str(PROMPTS_FILE), run, options)


def test_run_with_discard_stale_recomputes_only_what_changed(
    finished_run: Path, policy: Path, tmp_path: Path, make_options: Callable, capsys
) -> None:
    """A changed training option: the first four stages are reused (same fingerprints), train is recomputed."""
    run = shutil.copytree(finished_run, tmp_path / "run")
    options = make_options(save_steps=1, keep_checkpoints=True, learning_rate=2e-4)
    options = dataclasses.replace(options, reuse=dataclasses.replace(options.reuse, discard_stale=True))
    capsys.readouterr()
    run_pipeline(str(policy), str(PROMPTS_FILE), run, options)
    printed = capsys.readouterr().out
    assert "discarding: the run in" in printed and "learning_rate: 0.0001 -> 0.0002" in printed
    assert [s for s in STAGE_NAMES if f"[{s}] finished earlier" in printed] == [
        "generate",
        "rank",
        "targets",
        "reflogps",
    ]
    assert "discarding: the finished train stage" in printed and "discarding: the training checkpoint" in printed
    metrics = store.read_jsonl(schema.METRICS.path(run / "iter1"))
    assert metrics[0]["lr"] == pytest.approx(2e-4) and [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert store.read_json(run / schema.RUN_RECORD)["options"]["train"]["learning_rate"] == 2e-4
    assert not torch.equal(*(next(iter(_weights(f / "iter1").values())) for f in (run, finished_run)))


def test_run_record_compares_content_not_path_strings(
    finished_run: Path, policy: Path, tmp_path: Path, make_options: Callable, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """Item 10: ``dir/`` vs ``dir``, ``./p`` vs ``p``, a relative ``--out``, a moved run folder, a moved model and
    the prompts of another install are the same run: every stage is skipped."""
    run = _copy_run(finished_run, tmp_path / "moved" / "run")  # a moved run folder
    model = shutil.copytree(policy, tmp_path / "moved" / "policy")  # a moved (copied) model
    install = tmp_path / "other-install"
    install.mkdir()
    shutil.copy(PROMPTS_FILE, install / "demo_prompts.jsonl")  # the same prompts in another folder
    monkeypatch.chdir(tmp_path)
    options = make_options(save_steps=1, keep_checkpoints=True)
    for model_arg, prompts_arg, out_arg in [
        (str(model) + "/", "./other-install/demo_prompts.jsonl", "moved/run"),
        ("moved/policy", "other-install/demo_prompts.jsonl", str(run) + "/"),
        (str(policy), str(PROMPTS_FILE), "./moved/../moved/run"),
    ]:
        capsys.readouterr()
        run_pipeline(model_arg, prompts_arg, out_arg, options)
        assert capsys.readouterr().out.count("finished earlier") == len(STAGE_NAMES)
    assert model_identity("moved/policy")["sha256"] == model_identity(str(policy))["sha256"]
    recorded = json.loads((run / schema.RUN_RECORD).read_text())
    assert recorded["fingerprint"]["inputs"]["model"]["path"] == str(policy.resolve())  # kept for messages only
