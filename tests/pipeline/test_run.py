"""`run` (skip / resume / kill-and-resume) and CLI errors (the demo: test_eval_replica.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from pipeline_data import PROMPTS_FILE
from safetensors.torch import load_file

from sppo_kernels.pipeline import cli
from sppo_kernels.pipeline.core import schema, store
from sppo_kernels.pipeline.core.errors import PipelineError
from sppo_kernels.pipeline.run import run_pipeline
from sppo_kernels.pipeline.table import STAGE_NAMES

# Runs the CLI in a child process that SIGKILLs itself at a chosen point (argv[1]), like a crash or `kill -9`.
KILLER = r"""
import os, signal, sys
from sppo_kernels.pipeline import cli
from sppo_kernels.pipeline.core import store
from sppo_kernels.pipeline.stages import train

point = sys.argv.pop(1)
if point == "generation":
    write, units = store.write_jsonl, []

    def write_then_die(path, rows):
        if "generate_units" in str(path):
            units.append(path)
            if len(units) == 3:  # die in the middle of writing the third unit of work
                with store.atomic_path(path) as tmp:
                    tmp.write_text('{"text": "half a line')
                    os.kill(os.getpid(), signal.SIGKILL)
        write(path, rows)

    store.write_jsonl = write_then_die
elif point == "training":
    step, calls = train._step, []

    def step_then_die(*args, **kwargs):
        calls.append(1)
        if len(calls) == 6:  # first micro-batch of step 3 (2 per step), after the step-2 checkpoint
            os.kill(os.getpid(), signal.SIGKILL)
        return step(*args, **kwargs)

    train._step = step_then_die
sys.exit(cli.main())
"""


def test_rerun_skips_finished_stages(finished_run: Path, policy: Path, make_options: Callable, capsys) -> None:
    folder = finished_run / "iter1"
    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}
    options = make_options(save_steps=1, keep_checkpoints=True)
    final = run_pipeline(str(policy), str(PROMPTS_FILE), finished_run, options)
    assert final == folder / schema.MODEL_DIR
    assert capsys.readouterr().out.count("finished earlier") == len(STAGE_NAMES)
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file() and p.name != "prompts.jsonl"} == {
        p: t for p, t in before.items() if p.name != "prompts.jsonl"
    }


def test_rerun_with_other_settings_is_refused(finished_run: Path, policy: Path, make_options: Callable) -> None:
    options = make_options(save_steps=1, keep_checkpoints=True, learning_rate=1.0)
    with pytest.raises(
        PipelineError, match=r"other inputs or settings \(learning_rate: 0.0001 -> 1.0\).*--discard-stale"
    ):
        run_pipeline(str(policy), str(PROMPTS_FILE), finished_run, options)


@pytest.mark.slow
def test_kill_and_resume_gives_the_same_artefacts(
    finished_run: Path,
    policy: Path,
    tmp_path: Path,
    make_options: Callable,
    run_argv: Callable,
    sppo_train: Callable,
    python: Callable,
) -> None:
    out = tmp_path / "run"
    argv = run_argv(policy, out, make_options(save_steps=2))
    folder = out / "iter1"

    killed = python("-c", KILLER, "generation", *argv)
    assert killed.returncode == -9
    assert store.stage_summary(folder, "generate") is None and not (folder / "generations.jsonl").exists()
    assert len(list((folder / "generate_units").glob("unit-*.jsonl"))) == 2
    assert len(list((folder / "generate_units").glob(".*.tmp"))) == 1  # the half-written unit, never read

    killed = python("-c", KILLER, "training", *argv)
    assert killed.returncode == -9
    assert "[generate]" in killed.stdout  # finished the 4 missing units
    assert store.stage_summary(folder, "reflogps") is not None and store.stage_summary(folder, "train") is None
    assert store.read_json(folder / schema.CHECKPOINTS / schema.LATEST_CHECKPOINT)["step"] == 2

    resumed = sppo_train(*argv)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and "[generate] finished earlier" in resumed.stdout

    reference = finished_run / "iter1"
    for name in ("prompts.jsonl", "generations.jsonl", "targets.jsonl"):
        assert (folder / name).read_text() == (reference / name).read_text(), name
    ranks, ref_ranks = store.read_jsonl(folder / "rankings.jsonl"), store.read_jsonl(reference / "rankings.jsonl")
    np.testing.assert_allclose([r["logits"] for r in ranks], [r["logits"] for r in ref_ranks], rtol=1e-5, atol=1e-6)
    metrics, ref_metrics = (store.read_jsonl(schema.METRICS.path(f)) for f in (folder, reference))
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert [m["loss"] for m in metrics] == pytest.approx([m["loss"] for m in ref_metrics], rel=1e-5)
    weights, ref_weights = (load_file(str(f / "model" / "model.safetensors")) for f in (folder, reference))
    for name, value in ref_weights.items():
        torch.testing.assert_close(weights[name], value, rtol=1e-5, atol=1e-6)


def test_artefacts_follow_the_schema(finished_run: Path) -> None:
    """Every file of a finished iteration has exactly the schema's columns, in its order; names and markers too."""
    import datasets

    folder = schema.iteration_dir(finished_run, 1)
    for artefact in (schema.PROMPTS, schema.GENERATIONS, schema.RANKINGS, schema.TARGETS, schema.METRICS):
        rows = store.read_jsonl(artefact.path(folder))
        assert rows and all(tuple(row) == artefact.columns for row in rows), artefact.name
    table = datasets.Dataset.from_parquet(str(schema.TRAIN_DATA.path(folder)), keep_in_memory=True)
    assert tuple(table.column_names) == schema.TRAIN_DATA.columns
    assert all(schema.marker_path(folder, stage).is_file() for stage in STAGE_NAMES)
    units = {schema.units_dir(folder, stage).name for stage in ("generate", "rank", "reflogps")}
    assert {p.name for p in folder.glob("*_units")} == units
    assert (folder / schema.LOSS_PLOT).is_file() and (folder / schema.MODEL_DIR).is_dir()
    model_options = store.read_json(finished_run / schema.RUN_RECORD)["options"]["model"]
    assert model_options == {"trust_remote_code": False, "attn_implementation": None, "kernel_backend": "auto"}


# ---------------------------------------------------------------------------------------------- CLI errors


def _cli_error(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(list(argv))
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_cli_errors(tmp_path: Path, policy: Path, capsys) -> None:
    out = str(tmp_path / "out")
    missing = str(tmp_path / "missing.jsonl")
    assert "missing file" in _cli_error(capsys, "run", "--model", str(policy), "--prompts", missing, "--out", out)
    (tmp_path / "empty.jsonl").write_text("\n")
    empty = str(tmp_path / "empty.jsonl")
    assert "is empty" in _cli_error(capsys, "generate", "--model", str(policy), "--prompts", empty, "--out", out)
    assert "cannot be split" in _cli_error(
        capsys, "run", "--model", str(policy), "--prompts", str(PROMPTS_FILE), "--out", out,
        "--iterations", "100",
    )  # fmt: skip
    assert "local path not found" in _cli_error(
        capsys, "generate", "--model", str(tmp_path / "no-model"), "--prompts", str(PROMPTS_FILE),
        "--out", out, "--max-prompts", "2",
    )  # fmt: skip
    assert "missing file" in _cli_error(capsys, "rank", "--generations", missing, "--out", out)
    assert "missing training data" in _cli_error(
        capsys, "train", "--model", str(policy), "--data", str(tmp_path / "d.parquet"), "--out", out
    )
    assert "invalid choice" in _cli_error(capsys, "targets", "--generations", missing, "--rankings", missing,
                                          "--out", out, "--target-mode", "best")  # fmt: skip
    assert "the following arguments are required: --out" in _cli_error(capsys, "rank", "--generations", missing)


def test_cli_help_lists_all_commands(capsys) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    assert all(name in text for name in (*STAGE_NAMES, "run", "demo"))
