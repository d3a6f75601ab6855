"""The train stage: DeepSpeed config, schedule, batching, and real ZeRO-3 runs (1 process and 2 with torchrun)."""

from __future__ import annotations

import json
import math
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sppo_kernels.pipeline.core import schema, store
from sppo_kernels.pipeline.core.errors import PipelineError
from sppo_kernels.pipeline.stages import reflogps, train
from sppo_kernels.pipeline.stages.train import (
    TrainOptions,
    deepspeed_config,
    epoch_order,
    micro_batch,
    warmup_linear_decay,
)

# ---------------------------------------------------------------------------------------------- config


def test_config_from_flags() -> None:
    config = deepspeed_config(TrainOptions(global_batch_size=64, micro_batch_size=4), world_size=8, bf16=True)
    assert (config["train_batch_size"], config["train_micro_batch_size_per_gpu"]) == (64, 4)
    assert config["gradient_accumulation_steps"] == 2
    assert config["zero_optimization"]["stage"] == 3 and config["bf16"] == {"enabled": True}
    assert config["zero_allow_untested_optimizer"] is True and config["gradient_clipping"] == 1.0
    assert train.model_dtype(config) == torch.bfloat16


def test_user_json_wins_and_auto_is_filled(tmp_path: Path) -> None:
    path = tmp_path / "ds.json"
    user = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": 4,
        "bf16": {"enabled": "auto"},
        "zero_optimization": {"stage": 2, "overlap_comm": True},
        "gradient_clipping": "auto",
    }
    path.write_text(json.dumps(user))
    config = deepspeed_config(TrainOptions(deepspeed_config=str(path), micro_batch_size=2), world_size=2, bf16=False)
    assert (config["train_batch_size"], config["gradient_accumulation_steps"]) == (16, 4)
    assert config["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    assert config["bf16"] == {"enabled": False} and config["gradient_clipping"] == 1.0
    assert train.model_dtype(config) == torch.float32
    assert train.model_dtype({**config, "fp16": {"enabled": True}}) == torch.float16


@pytest.mark.parametrize(
    ("user", "message"),
    [
        ({"train_batch_size": 10}, "not a multiple"),
        (
            {"train_batch_size": 16, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 3},
            "inconsistent",
        ),
    ],
)
def test_bad_batch_config(tmp_path: Path, user: dict, message: str) -> None:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(user))
    with pytest.raises(PipelineError, match=message):
        deepspeed_config(TrainOptions(deepspeed_config=str(path)), world_size=2, bf16=False)


def test_unreadable_config(tmp_path: Path) -> None:
    (tmp_path / "ds.json").write_text("{not json")
    with pytest.raises(PipelineError, match="not valid JSON"):
        deepspeed_config(TrainOptions(deepspeed_config=str(tmp_path / "ds.json")), world_size=1, bf16=False)
    with pytest.raises(PipelineError, match="missing file"):
        deepspeed_config(TrainOptions(deepspeed_config=str(tmp_path / "none.json")), world_size=1, bf16=False)


def test_schedule_never_zero() -> None:
    factor = warmup_linear_decay(20, 0.1)  # 2 warmup steps
    values = [factor(s) for s in range(20)]
    assert values[:3] == [0.5, 1.0, 1.0] and values[-1] == pytest.approx(1 / 18)
    assert all(v > 0 for v in values) and values == sorted(values[:2]) + sorted(values[2:], reverse=True)
    assert warmup_linear_decay(5, 0.0)(0) == 1.0
    assert math.ceil(0.1 * 3) == 1 and warmup_linear_decay(3, 0.1)(0) == 1.0


def test_epoch_order_keeps_prompts_together() -> None:
    rows = [{"id": i // 2} for i in range(20)]
    order = epoch_order(rows, seed=42, epoch=0)
    assert sorted(order) == list(range(20)) and order != list(range(20))
    assert all(rows[order[i]]["id"] == rows[order[i + 1]]["id"] for i in range(0, 20, 2))
    assert order == epoch_order(rows, seed=42, epoch=0) != epoch_order(rows, seed=42, epoch=1)


@pytest.mark.parametrize(("world", "micro", "gas"), [(1, 2, 4), (2, 2, 2), (4, 1, 2)])
def test_micro_batches_partition_each_global_batch(world: int, micro: int, gas: int) -> None:
    order = list(range(100, 132))
    size = world * micro * gas
    for step in range(len(order) // size):
        used = [i for m in range(gas) for r in range(world) for i in micro_batch(order, step, m, r, world, micro, gas)]
        assert sorted(used) == order[step * size : (step + 1) * size]


# ---------------------------------------------------------------------------------------------- real runs


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


def test_in_process_zero3_iteration(finished_run: Path, policy: Path) -> None:
    folder = finished_run / "iter1"
    metrics = store.read_jsonl(schema.METRICS.path(folder))
    summary = store.stage_summary(folder, "train")
    assert len(metrics) == summary["steps"] == 4 and summary["deepspeed_config"]["zero_optimization"]["stage"] == 3
    assert abs(metrics[0]["log_ratio"]) < 1e-3  # policy == π_t at the first step: ref log-probs are consistent
    assert metrics[0]["lr"] == pytest.approx(1e-4) and metrics[-1]["lr"] > 0
    assert all(math.isfinite(m["loss"]) and m["grad_norm"] > 0 for m in metrics)
    assert (folder / schema.LOSS_PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    before, after = _weights(policy), _weights(folder / schema.MODEL_DIR)
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert (folder / schema.CHECKPOINTS / schema.LATEST_CHECKPOINT).is_file()  # kept by keep_checkpoints


@pytest.mark.slow
def test_two_process_zero3_matches_one_process(
    finished_run: Path, policy: Path, tmp_path: Path, make_options: Callable, run_argv: Callable, sppo_train: Callable
) -> None:
    """``run --launcher torchrun --nproc_per_node 2`` (gloo): the same global batches as the one-process run,
    so the same loss trajectory and weights."""
    launcher = f"{sys.executable} -m torch.distributed.run --standalone --nproc_per_node 2"
    argv = run_argv(policy, tmp_path, make_options(), "--launcher", launcher)
    result = sppo_train(*argv)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    folder, reference = tmp_path / "iter1", finished_run / "iter1"
    assert (folder / "train_data.parquet").read_bytes() == (reference / "train_data.parquet").read_bytes()
    two, one = store.read_jsonl(schema.METRICS.path(folder)), store.read_jsonl(schema.METRICS.path(reference))
    assert store.stage_summary(folder, "train")["processes"] == 2
    assert [m["sequences"] for m in two] == [m["sequences"] for m in one]
    for key in ("loss", "log_ratio", "grad_norm", "lr"):
        assert [m[key] for m in two] == pytest.approx([m[key] for m in one], rel=1e-4, abs=1e-4), key
    w1, w2 = _weights(reference / schema.MODEL_DIR), _weights(folder / schema.MODEL_DIR)
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_gemma2_softcap_and_tied_head(
    finished_run: Path, gemma_policy: Path, tmp_path: Path, make_options: Callable, zero_stage: int
) -> None:
    """Gemma-2 (final-logit soft-cap, lm_head tied to the embeddings): the train stage's log-probs equal the
    reflogps stage's at the first step, and the saved model keeps its tied head."""
    from transformers import AutoModelForCausalLM

    options = make_options(zero_stage=zero_stage)
    data = reflogps.run_reflogps(
        str(gemma_policy), finished_run / "iter1" / "targets.jsonl", tmp_path, options.reflogps, options.model
    )
    model_dir = train.run_train(str(gemma_policy), data, tmp_path, options.train, options.model)
    metrics = store.read_jsonl(schema.METRICS.path(tmp_path))
    assert abs(metrics[0]["log_ratio"]) < 1e-3 and all(math.isfinite(m["loss"]) for m in metrics)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert not torch.equal(model.lm_head.weight, AutoModelForCausalLM.from_pretrained(gemma_policy).lm_head.weight)


def test_train_errors(tmp_path: Path, finished_run: Path, policy: Path) -> None:
    data = finished_run / "iter1" / "train_data.parquet"
    with pytest.raises(PipelineError, match="missing training data"):
        train.run_train(str(policy), tmp_path / "none.parquet", tmp_path, TrainOptions())
    with pytest.raises(PipelineError, match="fewer than one global batch"):
        train.run_train(str(policy), data, tmp_path, TrainOptions(global_batch_size=1024))
    shutil.copy(finished_run / "iter1" / "targets.jsonl", tmp_path / "t.parquet")
    with pytest.raises(PipelineError, match=r"cannot read .* as a parquet table"):
        train.run_train(str(policy), tmp_path / "t.parquet", tmp_path, TrainOptions())


def test_resume_continues_from_checkpoint(
    finished_run: Path, policy: Path, tmp_path: Path, make_options: Callable
) -> None:
    """Restart from the kept step-3 checkpoint: steps 4.. are recomputed and match the uninterrupted run."""
    source = finished_run / "iter1"
    shutil.copytree(source / schema.CHECKPOINTS, tmp_path / schema.CHECKPOINTS)
    metrics = store.read_jsonl(schema.METRICS.path(source))
    store.write_jsonl(schema.METRICS.path(tmp_path), [*metrics[:3], {**metrics[3], "loss": -1.0}])  # a stale extra row
    latest = store.read_json(tmp_path / schema.CHECKPOINTS / schema.LATEST_CHECKPOINT)
    assert latest["step"] == 3
    options = make_options(save_steps=1)
    train.run_train(str(policy), source / "train_data.parquet", tmp_path, options.train, options.model)
    resumed = store.read_jsonl(schema.METRICS.path(tmp_path))
    assert [m["loss"] for m in resumed] == pytest.approx([m["loss"] for m in metrics], rel=1e-5)
    assert not (tmp_path / schema.CHECKPOINTS).exists()
    w1, w2 = _weights(source / schema.MODEL_DIR), _weights(tmp_path / schema.MODEL_DIR)
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-5, atol=1e-6)
