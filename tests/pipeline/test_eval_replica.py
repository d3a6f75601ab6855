"""SPPO learns: a smaller seeded replica of the demo must raise the gold win rate against the base policy; the
full demo meets its bar (gold win rate rising, above 60% at iteration 3 with its interval above 50%); two fresh
demos write the same artefacts."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sppo_kernels.pipeline.core import schema, store
from sppo_kernels.pipeline.demo.console import STORY
from sppo_kernels.pipeline.table import STAGE_NAMES

# The smaller configuration of the learning test: 2 iterations of 64 prompts, 128 eval prompts, shorter
# warm-start and proxy training, a larger learning rate to make up for the fewer steps.
SMALL = {
    "iterations": 2,
    "prompts_per_iteration": 64,
    "eval_prompts": 128,
    "warmstart_steps": 150,
    "pairrm_steps": 150,
    "learning_rate": 2e-4,
    "max_new_tokens": 24,
}
# Gold win rate of the last iteration against the base must exceed 50% + MARGIN (see test_sppo_learns).
MARGIN = 0.10

REPLICA = """
import json, sys
from sppo_kernels.pipeline.demo.replica import DemoConfig, run_demo
config = DemoConfig(**json.loads(sys.argv[2]))
run_demo(sys.argv[1], iterations=config.iterations, config=config)
"""


def _replica(python: Callable[..., subprocess.CompletedProcess], out: Path, seed: int = 0, **env: str) -> str:
    result = python("-c", REPLICA, str(out), json.dumps({**SMALL, "seed": seed}), timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def small_replica(tmp_path_factory: pytest.TempPathFactory, python: Callable) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("replica") / "demo"
    return out, _replica(python, out, PYTHONHASHSEED="1")


def _gold(out: Path) -> list[dict[str, Any]]:
    rows = store.read_json(schema.EVAL_JSON.path(out / schema.DEMO_RUN))
    return sorted((r for r in rows if r["judge"] == "gold"), key=lambda r: r["iteration"])


@pytest.mark.slow
def test_sppo_learns(small_replica: tuple[Path, str]) -> None:
    """After 2 SPPO iterations guided by the proxy PairRM, the policy beats the base under the hidden gold rule.

    Gold win rate of iteration 2 against the base [95% interval] in repeated runs of this configuration:
    seed 0 (the test's) 88.7% [84.4, 92.6], seed 1 89.5% [85.2, 93.0], seed 2 85.5% [80.1, 90.6],
    seed 3 72.3% [66.8, 77.7], seed 4 71.5% [64.8, 78.1] (25-40 s each on 2 shared cores). MARGIN = 0.10 asks
    for > 60%, 11 points under the smallest. With the targets flipped (P -> 1 - P in targets.py) the run gives
    18.0% [13.3, 23.4] (seed 0; seed 3: 50.8%) and the test fails.
    """
    out, _ = small_replica
    gold = _gold(out)
    assert [r["iteration"] for r in gold] == [0, 1, 2] and gold[0]["win_rate"] == 0.5
    assert gold[-1]["win_rate"] > 0.5 + MARGIN, gold[-1]


def test_console_tells_the_story(small_replica: tuple[Path, str]) -> None:
    out, stdout = small_replica
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert all(STORY.match(line) or line.startswith(("|", "proxy judge", "gold judge", "    ")) for line in lines), (
        stdout
    )
    for stage in STAGE_NAMES:
        assert sum(line.startswith(f"[{stage}] ") for line in lines) == SMALL["iterations"]
    assert sum(re.match(r"\| iter\d", line) is not None for line in lines) == 2 * SMALL["iterations"]
    assert lines[-3].startswith(f"    results: {schema.EVAL_JSON.path(out / schema.DEMO_RUN)}")
    log = (out / schema.DEMO_LOG).read_text()
    assert "dataclasses_json" not in log and "No ranker config provided" not in log and "mean_resizing" not in log


def _normalised(path: Path) -> Any:
    """A file's content without its timings: JSON keys named "seconds" are dropped."""

    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k != "seconds"}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    if path.suffix == ".json":
        return strip(json.loads(path.read_text()))
    if path.suffix == ".jsonl":
        return [strip(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
    return path.read_bytes()


def _files(folder: Path) -> list[Path]:
    """The files of a demo folder but its log, relative to it."""
    return sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file() and p.name != schema.DEMO_LOG)


@pytest.mark.slow
def test_two_fresh_demos_write_the_same_artefacts(small_replica: tuple[Path, str], python: Callable) -> None:
    first, _ = small_replica
    moved = first.with_name("first")
    first.rename(moved)
    try:
        _replica(python, first, PYTHONHASHSEED="2")  # same folder, another process and hash seed
        files = sorted(p.relative_to(moved) for p in moved.rglob("*") if p.is_file() and p.name != schema.DEMO_LOG)
        assert files == sorted(
            p.relative_to(first) for p in first.rglob("*") if p.is_file() and p.name != schema.DEMO_LOG
        )
        assert len(files) > 50
        different = [str(f) for f in files if _normalised(moved / f) != _normalised(first / f)]
        assert not different
    finally:
        shutil.rmtree(first, ignore_errors=True)
        moved.rename(first)


VOCABULARIES = """
import json, sys
from sppo_kernels.pipeline.demo.assets import build_pairrm, build_policy_tokenizer, wordpiece_vocab
from sppo_kernels.pipeline.demo.gold import world_prompts
texts = world_prompts()[:200]
build_pairrm(sys.argv[1], texts)
ranker = json.load(open(sys.argv[1] + "/backbone/tokenizer.json"))
print(json.dumps([wordpiece_vocab(texts, 512), ranker["model"]["vocab"], build_policy_tokenizer(texts).get_vocab()]))
"""


def test_tokenizer_vocabularies_are_the_same_in_fresh_processes(tmp_path: Path, python: Callable) -> None:
    """The tiny PairRM's WordPiece vocabulary came from ``tokenizers``' trainer, whose result depends on hash-map
    order: two processes disagreed on 328 of 512 tokens. It is now built deterministically."""
    runs = []
    for seed in ("1", "2"):
        result = python("-c", VOCABULARIES, str(tmp_path / seed), env={"PYTHONHASHSEED": seed})
        assert result.returncode == 0, result.stderr[-3000:]
        runs.append(json.loads(result.stdout.splitlines()[-1]))
    assert runs[0] == runs[1]
    assert (tmp_path / "1" / "model.safetensors").read_bytes() == (tmp_path / "2" / "model.safetensors").read_bytes()


@pytest.mark.slow
def test_demo_meets_its_bar(tmp_path: Path, sppo_train: Callable) -> None:
    """README's first command: the gold win rate rises over the 3 iterations, and iteration 3 exceeds 60% with
    its 95% interval above 50%."""
    result = sppo_train("demo", "--out", str(tmp_path), timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    gold = _gold(tmp_path)
    rates = [r["win_rate"] for r in gold]
    assert [r["iteration"] for r in gold] == [0, 1, 2, 3]
    assert rates == sorted(rates) and rates[3] > 0.6 and gold[3]["win_rate_ci"][0] > 0.5, gold
    ids = [{r["id"] for r in store.read_jsonl(tmp_path / "run" / f"iter{t}" / "prompts.jsonl")} for t in (1, 2, 3)]
    assert not (ids[0] & ids[1] or ids[1] & ids[2] or ids[0] & ids[2])
    assert f"results: {tmp_path / 'run' / 'eval.json'}" in result.stdout
    assert (tmp_path / schema.DEMO_RUN / schema.EVAL_PLOT).is_file()
    assert os.path.isfile(tmp_path / "run" / "eval" / "iter3" / "model_outputs.json")
