"""Data-parallel stages under a launcher (``torchrun --nproc_per_node 2``, gloo, CPU, tiny models): the same bytes
as one process, a killed rank's stage resumed with any number of processes, vLLM engines on their own GPUs (the
fake ``vllm``), and ``run``'s launch commands on a machine with several GPUs."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from pipeline_data import FAKE_VLLM, HERE, PROMPTS_FILE

from sppo_kernels.pipeline import cli, table
from sppo_kernels.pipeline.core import schema, store
from sppo_kernels.pipeline.core.errors import PipelineError
from sppo_kernels.pipeline.stages.targets import TargetsOptions, run_targets

pytestmark = pytest.mark.parallel
REPO = HERE.parents[1]
GENERATE = ["--max-prompts", "8", "--num-responses", "2", "--max-new-tokens", "6", "--generation-batch-size", "2",
            "--generation-shard-size", "2"]  # fmt: skip


def launch(processes: int, *args: object, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node <processes> sppo-train ARGS`` (one thread per process)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    command += ["-m", "sppo_kernels.pipeline.cli", *map(str, args)]
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(command, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=600, check=False)


def succeeded(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory, policy: Path, ranker: Path) -> Path:
    """generate → rank → targets → reflogps of the tiny policy in one process under torchrun."""
    out = tmp_path_factory.mktemp("one") / "iter"
    generations = schema.GENERATIONS.path(out)
    succeeded(launch(1, "generate", "--model", policy, "--prompts", PROMPTS_FILE, "--out", out, *GENERATE))
    succeeded(launch(1, "rank", "--generations", generations, "--out", out, "--ranker", ranker,
                     "--rank-shard-size", "2"))  # fmt: skip
    run_targets(generations, schema.RANKINGS.path(out), out, TargetsOptions())
    succeeded(launch(1, "reflogps", "--model", policy, "--targets", schema.TARGETS.path(out), "--out", out,
                     "--reflogps-shard-size", "3", "--reflogps-batch-size", "2"))  # fmt: skip
    return out


def test_parallel_stages_write_the_same_bytes(one_process: Path, tmp_path: Path, policy: Path, ranker: Path) -> None:
    out = tmp_path / "iter"
    result = succeeded(launch(2, "generate", "--model", policy, "--prompts", PROMPTS_FILE, "--out", out, *GENERATE))
    assert "per rank:" in result.stdout and result.stdout.count("[generate] 8 prompts") == 1  # rank 0 reports
    assert (out / schema.GENERATIONS.name).read_bytes() == (one_process / schema.GENERATIONS.name).read_bytes()
    # the next stages of the two-process run start from the one-process artefacts: each is compared alone
    for artefact in (schema.GENERATIONS, schema.TARGETS):
        artefact.path(out).write_bytes(artefact.path(one_process).read_bytes())
    succeeded(launch(2, "rank", "--generations", schema.GENERATIONS.path(out), "--out", out, "--ranker", ranker,
                     "--rank-shard-size", "2"))  # fmt: skip
    succeeded(launch(2, "reflogps", "--model", policy, "--targets", schema.TARGETS.path(out), "--out", out,
                     "--reflogps-shard-size", "3", "--reflogps-batch-size", "2"))  # fmt: skip
    for artefact in (schema.RANKINGS, schema.TRAIN_DATA):
        assert artefact.path(out).read_bytes() == artefact.path(one_process).read_bytes(), artefact.name
    summary = store.stage_summary(out, schema.REFLOGPS_STAGE)
    assert len(summary["rank_seconds"]) == 2 and "rank_seconds" not in store.stage_summary(one_process, "reflogps")


def _unit_times(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("unit-*.jsonl")}


@pytest.mark.parametrize(("killed", "rerun"), [(1, 1), (1, 2), (0, 1)])
def test_parallel_stage_killed_then_resumed(
    one_process: Path, tmp_path: Path, policy: Path, killed: int, rerun: int
) -> None:
    """Rank ``killed`` of a two-process generate stage dies after its first unit: the launcher fails, nothing is
    marked finished; a rerun with ``rerun`` processes redoes only the missing units and writes the same bytes as
    one process did. (killed 0, rerun 1: a stage started with 2 processes and finished with 1.)"""
    out = tmp_path / "iter"
    args = ("generate", "--model", policy, "--prompts", PROMPTS_FILE, "--out", out, *GENERATE)
    failed = launch(2, *args, env={"PYTHONPATH": f"{HERE / 'fault'}{os.pathsep}{REPO}", "FAULT_RANK": str(killed)})
    assert failed.returncode != 0
    assert store.stage_summary(out, schema.GENERATE_STAGE) is None and not schema.GENERATIONS.path(out).exists()
    units = schema.units_dir(out, schema.GENERATE_STAGE)
    before = _unit_times(units)
    assert 1 <= len(before) < 8
    succeeded(launch(rerun, *args))
    after = _unit_times(units)
    assert len(after) == 8 and all(after[name] == time for name, time in before.items())  # not redone
    assert schema.GENERATIONS.path(out).read_bytes() == schema.GENERATIONS.path(one_process).read_bytes()


def test_parallel_evaluation_writes_the_same_bytes(tmp_path: Path, policy: Path, ranker: Path) -> None:
    copy = shutil.copytree(policy, tmp_path / "policy-copy")  # another path: evaluated as iteration 1
    eval_prompts = tmp_path / "held_out.jsonl"
    store.write_jsonl(eval_prompts, store.read_jsonl(PROMPTS_FILE)[-6:])
    flags = ["--eval-prompts", eval_prompts, "--ranker", ranker, "--max-new-tokens", "5", "--eval-shard-size", "2",
             "--eval-bootstrap", "50", "--generation-batch-size", "2"]  # fmt: skip
    outs = [tmp_path / str(n) / "eval-out" for n in (1, 2)]  # the same folder name: it is in model_outputs.json
    for processes, out in zip((1, 2), outs, strict=True):
        succeeded(launch(processes, "eval", "--models", policy, copy, "--out", out, *flags))
    policy_dir = schema.eval_policy_dir(schema.EVAL_DIR, 1)
    files = [Path(schema.EVAL_JSON.name), Path(schema.EVAL_TABLE), schema.EVAL_OUTPUTS.path(policy_dir),
             policy_dir / schema.MODEL_OUTPUTS, schema.judgments_path(policy_dir, "pairrm")]  # fmt: skip
    for name in files:
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name


def test_parallel_vllm_engines_on_their_own_gpus(tmp_path: Path, policy: Path) -> None:
    """Two engine processes, tensor parallel 2, four visible GPUs: each engine starts on its own two GPUs and
    samples its own units; together they sample every unit once, and the artefact is one engine's."""
    vllm = ["--generation-backend", "vllm", "--tensor-parallel-size", "2"]
    env = {"PYTHONPATH": f"{FAKE_VLLM}{os.pathsep}{REPO}", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    records = []
    for processes in (2, 1):
        log, out = tmp_path / f"log{processes}", tmp_path / f"run{processes}" / "iter"
        log.mkdir()
        succeeded(launch(processes, "generate", "--model", policy, "--prompts", PROMPTS_FILE, "--out", out,
                         *GENERATE, *vllm, env={**env, "FAKE_VLLM_LOG": str(log)}))  # fmt: skip
        records.append([json.loads(p.read_text()) for p in sorted(log.glob("engine-*.json"))])
    two, one = records
    assert sorted((r["rank"], r["devices"]) for r in two) == [(0, "0,1"), (1, "2,3")]
    assert all(r["kwargs"]["tensor_parallel_size"] == 2 for r in two)
    seeds = [sorted(call["seed"] for call in r["calls"]) for r in two]
    assert len(seeds[0]) == len(seeds[1]) == 4 and not set(seeds[0]) & set(seeds[1])  # 8 units, split 4 + 4
    assert sorted(seeds[0] + seeds[1]) == sorted(call["seed"] for call in one[0]["calls"])
    artefacts = [schema.GENERATIONS.path(tmp_path / f"run{n}" / "iter").read_bytes() for n in (2, 1)]
    assert artefacts[0] == artefacts[1]


def test_parallel_launch_commands_use_every_gpu(
    monkeypatch: pytest.MonkeyPatch, make_options: Callable, ranker: Path
) -> None:
    monkeypatch.setattr(table, "visible_devices", lambda: ["0", "1", "2", "3"])
    options = make_options()
    commands = {spec.name: spec.child(options, None) for spec in table.STAGES}
    torchrun = ["torchrun", "--standalone", "--nproc_per_node", "4"]
    for name in (schema.GENERATE_STAGE, schema.RANK_STAGE, schema.REFLOGPS_STAGE, schema.TRAIN_STAGE):
        assert commands[name][: len(torchrun)] == torchrun and commands[name][-1].endswith("sppo-train"), name
    assert commands[schema.TARGETS_STAGE] is None  # no model: in the process of run
    vllm = dataclasses.replace(options, generate=dataclasses.replace(options.generate, generation_backend="vllm",
                                                                     tensor_parallel_size=2))  # fmt: skip
    assert table.stage(schema.GENERATE_STAGE).child(vllm, None)[:4] == [*torchrun[:3], "2"]
    assert table.stage(schema.RANK_STAGE).child(options, object()) is None  # a Python judge stays in-process
    user = dataclasses.replace(options, run=dataclasses.replace(options.run, launcher="srun --ntasks-per-node 8"))
    assert all(spec.child(user, None)[:3] == ["srun", "--ntasks-per-node", "8"] for spec in table.STAGES
               if spec.name != schema.TARGETS_STAGE)  # fmt: skip
    monkeypatch.setattr(table, "visible_devices", lambda: ["0"])  # one GPU: in-process, vLLM in a child
    assert table.stage(schema.RANK_STAGE).child(options, None) is None
    in_child = [sys.executable, "-m", "sppo_kernels.pipeline.cli"]
    assert table.stage(schema.GENERATE_STAGE).child(vllm, None) == in_child


def test_parallel_run_refuses_to_be_launched(monkeypatch: pytest.MonkeyPatch, policy: Path, tmp_path: Path) -> None:
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(PipelineError, match="start sppo-train run once, not under a launcher"):
        cli.dispatch(cli.build_parser().parse_args(["run", "--model", str(policy), "--prompts", str(PROMPTS_FILE),
                                                    "--out", str(tmp_path)]))  # fmt: skip
