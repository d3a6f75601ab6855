"""Every script in examples/ runs on a tiny offline model."""

from __future__ import annotations

import math
import runpy
from pathlib import Path

import pytest
from test_zero3 import run_two_ranks

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _main(name: str):
    return runpy.run_path(str(EXAMPLES / name))["main"]


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_training_loop_lowers_the_loss(arch: str) -> None:
    losses = _main("sppo_training_loop.py")(["--arch", arch, "--steps", "4"])
    assert losses[-1] < losses[0]


def test_hf_trainer_example() -> None:
    pytest.importorskip("datasets")
    assert math.isfinite(_main("sppo_hf_trainer.py")(["--steps", "2"]))


@pytest.mark.parametrize("options", [["--loss-type", "sppo_hard"], ["--lora"]])
def test_trl_example(options: list[str]) -> None:
    pytest.importorskip("trl")
    if "--lora" in options:
        pytest.importorskip("peft")
    assert math.isfinite(_main("sppo_trl.py")([*options, "--steps", "2"]))


@pytest.mark.slow
def test_deepspeed_zero3_example() -> None:
    log = run_two_ranks(EXAMPLES / "sppo_deepspeed_zero3.py", "--steps", "2")
    assert "step 1: rank-0 sppo loss" in log
