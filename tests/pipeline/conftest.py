"""Shared fixtures for the pipeline tests (which need the ``train`` extra): tiny random policies and PairRM,
built offline once per session."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from pipeline_data import PROMPTS_FILE

from sppo_kernels.pipeline.core.options import to_argv
from sppo_kernels.pipeline.core.prompts import Prompt, PromptOptions, load_prompts
from sppo_kernels.pipeline.demo.assets import build_pairrm, build_policy
from sppo_kernels.pipeline.models.judge import RankOptions
from sppo_kernels.pipeline.models.sampling import GenerateOptions
from sppo_kernels.pipeline.run import run_pipeline
from sppo_kernels.pipeline.stages.reflogps import RefLogpsOptions
from sppo_kernels.pipeline.stages.train import TrainOptions
from sppo_kernels.pipeline.table import PipelineOptions, RunOptions

REPO = Path(__file__).resolve().parents[2]


@contextmanager
def single_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread; child processes get OMP_NUM_THREADS=1 too (see run_python)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    with single_thread():
        yield


@pytest.fixture(autouse=True, scope="module")
def leave_no_process_group() -> Iterator[None]:
    """In-process training creates a one-process group and sets launcher variables (LOCAL_RANK, ...); leave
    neither to the test modules that follow (transformers' Trainer would take them for a distributed launch)."""
    initialized = torch.distributed.is_initialized()
    environment = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(environment)
    if torch.distributed.is_initialized() and not initialized:
        import deepspeed.comm

        if deepspeed.comm.is_initialized():  # also drops DeepSpeed's cached groups (its world-group clone)
            deepspeed.comm.destroy_process_group()
        else:
            torch.distributed.destroy_process_group()


@pytest.fixture(scope="session")
def prompts() -> list[Prompt]:
    """The prompts of the pipeline tests."""
    return load_prompts(str(PROMPTS_FILE))


@pytest.fixture(scope="session")
def texts(prompts: list[Prompt]) -> list[str]:
    return [p.text for p in prompts]


@pytest.fixture(scope="session")
def policy(tmp_path_factory: pytest.TempPathFactory, texts: list[str]) -> Path:
    """A tiny random Llama with a BPE tokenizer and chat template."""
    return build_policy(tmp_path_factory.mktemp("assets") / "llama", texts, arch="llama")


@pytest.fixture(scope="session")
def gemma_policy(tmp_path_factory: pytest.TempPathFactory, texts: list[str]) -> Path:
    """A tiny random Gemma-2 (final-logit soft-cap 30, tied embeddings)."""
    return build_policy(tmp_path_factory.mktemp("assets") / "gemma2", texts, arch="gemma2")


@pytest.fixture(scope="session")
def ranker(tmp_path_factory: pytest.TempPathFactory, texts: list[str]) -> Path:
    """A tiny random PairRM in llm-blender's format."""
    return build_pairrm(tmp_path_factory.mktemp("assets") / "pairrm", texts)


def small_options(ranker: Path, *, iterations: int = 1, **train: object) -> PipelineOptions:
    """Settings small enough for a CPU test: 8 prompts per iteration, K = 3, 8 new tokens, 4 sequences per step."""
    return PipelineOptions(
        run=RunOptions(iterations=iterations),
        prompts=PromptOptions(max_prompts=8 * iterations),
        generate=GenerateOptions(num_responses=3, max_new_tokens=8, generation_batch_size=4, generation_shard_size=4),
        rank=RankOptions(ranker=str(ranker), rank_batch_size=4, rank_shard_size=4),
        reflogps=RefLogpsOptions(max_length=64, max_prompt_length=48, reflogps_batch_size=8),
        train=TrainOptions(**{"learning_rate": 1e-4, "global_batch_size": 4, "micro_batch_size": 2, **train}),
    )


@pytest.fixture(scope="session")
def make_options(ranker: Path) -> Callable[..., PipelineOptions]:
    """Factory of small pipeline options using the tiny ranker: ``make_options(iterations=1, **train_options)``."""
    return lambda **kwargs: small_options(ranker, **kwargs)


def run_command(policy: Path, out: Path, options: PipelineOptions, *extra: str) -> list[str]:
    """The ``sppo-train run`` arguments that reproduce ``run_pipeline(policy, PROMPTS_FILE, out, options)``."""
    flags = [flag for group in dataclasses.fields(options) for flag in to_argv(getattr(options, group.name))]
    return ["run", "--model", str(policy), "--prompts", str(PROMPTS_FILE), "--out", str(out), *flags, *extra]


@pytest.fixture(scope="session")
def run_argv() -> Callable[..., list[str]]:
    """``run_argv(policy, out, options, *extra)``: see :func:`run_command`."""
    return run_command


@pytest.fixture(scope="session")
def sppo_train() -> Callable[..., subprocess.CompletedProcess]:
    """Run ``sppo-train ARGS`` in a fresh process: ``sppo_train(*args, timeout=..., env=...)``."""
    return run_cli


@pytest.fixture(scope="session")
def python() -> Callable[..., subprocess.CompletedProcess]:
    """Run ``python ARGS`` in a fresh process from the repository root: ``python(*args, timeout=..., env=...)``."""
    return run_python


def run_cli(*args: str, timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m sppo_kernels.pipeline.cli ARGS`` in a fresh process, output captured."""
    return run_python("-m", "sppo_kernels.pipeline.cli", *args, timeout=timeout, env=env)


def run_python(*args: str, timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python ARGS`` from the repository root with the package importable."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory: pytest.TempPathFactory, policy: Path, make_options: Callable) -> Path:
    """One complete in-process iteration (ZeRO-3, checkpoints every step kept) of ``make_options()``."""
    out = tmp_path_factory.mktemp("run")
    with single_thread():  # session fixtures start before the module-scoped one_thread
        run_pipeline(str(policy), str(PROMPTS_FILE), out, make_options(save_steps=1, keep_checkpoints=True))
    return out
