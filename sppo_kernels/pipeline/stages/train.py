"""Stage 5: one SPPO epoch with DeepSpeed (ZeRO-3 by default) on the stored targets and ref log-probs.

Runs in one process, or in many under ``torchrun`` / ``deepspeed`` (one per GPU, any number of nodes). The loss
is :func:`sppo_kernels.integrations.hf.model_sppo_loss`: ``sk.sppo_loss`` on the final hidden states and the
lm_head weight, which ZeRO-3 partitions (:func:`sppo_kernels.integrations.zero3.gathered_lm_head` makes it
usable with the unpartitioned gradient).

Batches: ``global_batch_size`` sequences per optimizer step over all processes (pairs stay adjacent; pair order
shuffled with ``seed`` each epoch), split into micro-batches of ``micro_batch_size`` per process with gradient
accumulation; an incomplete last global batch is dropped, as the DeepSpeed batch size is fixed.

Learning rate: linear warmup over ``ceil(warmup_ratio·steps)`` steps, then linear decay to 0. Optimizer step s
(0-based) uses ``lr·(s+1)/W`` during warmup, so the first step already trains; Hugging Face's
``get_linear_schedule_with_warmup`` and DeepSpeed's ``WarmupLR`` with ``warmup_min_lr=0`` spend step 0 at
lr 0. Decay: ``lr·(S−s)/(S−W)``, so the last step still has a small positive lr.

Outputs in ``out_dir``: ``checkpoints/`` (resumable DeepSpeed state, removed after the stage's marker is
written unless kept), ``metrics.jsonl`` (one row per step), ``loss.png``, and ``model/`` (π_{t+1}, Hugging Face
format + tokenizer).

Checkpoints: ``checkpoints/latest.json`` names the newest complete one, lists its files and sizes and carries its
fingerprint (with the number of processes, which a ZeRO checkpoint is partitioned over). A training resumes
from it only when every listed file is there with its size and the fingerprint matches; an incomplete or
unreferenced checkpoint (a killed save or removal, in any order) is discarded and training starts from step 0;
one made from other inputs is refused, or discarded with ``discard_stale``. Old checkpoints and the folder
itself are removed by renaming first (:func:`~sppo_kernels.pipeline.core.store.remove_tree`).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from sppo_kernels.integrations import hf
from sppo_kernels.pipeline.core import distributed, schema
from sppo_kernels.pipeline.core.errors import PipelineError
from sppo_kernels.pipeline.core.fingerprint import Fingerprint, file_identity, model_identity, stage_fingerprint
from sppo_kernels.pipeline.core.options import at_least, between, opt, positive
from sppo_kernels.pipeline.core.stage import Stage, run_stage
from sppo_kernels.pipeline.core.store import (
    atomic_path,
    read_json,
    read_jsonl,
    remove_tree,
    settle_stale,
    write_json,
    write_jsonl,
)
from sppo_kernels.pipeline.models import chat
from sppo_kernels.pipeline.models.policy import ModelOptions, default_device, load_causal_lm, pad_batch


@dataclass
class TrainOptions:
    """Optimisation settings (defaults: the SPPO reference runs)."""

    learning_rate: float = opt(5e-7, "peak learning rate (RMSprop)", check=positive())
    num_epochs: int = opt(1, "epochs over the iteration's data", check=at_least(1))
    warmup_ratio: float = opt(0.1, "fraction of the steps spent warming up linearly", check=between(0, 1))
    global_batch_size: int = opt(
        128, "sequences per optimizer step over all processes (reference: 64 pairs)", check=at_least(1)
    )
    micro_batch_size: int = opt(2, "sequences per process per forward/backward", check=at_least(1))
    eta: float = opt(1000.0, "eta = 1/beta of the SPPO loss", check=positive())
    zero_stage: int = opt(3, "DeepSpeed ZeRO stage (0-3)", check=((lambda v: v in (0, 1, 2, 3)), "0, 1, 2 or 3"))
    deepspeed_config: str | None = opt(
        None,
        "DeepSpeed JSON config; its values win over these flags, missing or 'auto' ones are filled from them",
        identity="file",
    )
    precision: str = opt("auto", "auto: bf16 on GPU, fp32 on CPU", ("auto", "bf16", "fp32"))
    # the same arithmetic either way (activations are recomputed exactly)
    gradient_checkpointing: bool = opt(True, "recompute activations in the backward", fingerprinted=False)
    max_grad_norm: float = opt(
        1.0,
        "gradient clipping threshold, 0 to disable (HF Trainer's default, as used by the reference)",
        check=at_least(0),
    )
    seed: int = opt(42, "seed of the data order", check=at_least(0))
    save_steps: int = opt(
        100,
        "save a resumable checkpoint every N optimizer steps (the end saves the model)",
        check=at_least(1),
        fingerprinted=False,
    )
    keep_checkpoints: bool = opt(
        False, "keep the DeepSpeed checkpoints once the final model is saved", fingerprinted=False
    )

    def check(self) -> None:
        """Rules across options (see :func:`~sppo_kernels.pipeline.core.options.validated`)."""
        if self.deepspeed_config is not None:  # a missing file is reported by the stage's fingerprint
            if Path(self.deepspeed_config).is_file() and not isinstance(read_json(self.deepspeed_config), dict):
                raise PipelineError(f"--deepspeed-config {self.deepspeed_config}: expected a JSON object")
        elif self.global_batch_size % self.micro_batch_size:
            raise PipelineError(
                f"--global-batch-size {self.global_batch_size} is not a multiple of --micro-batch-size "
                f"{self.micro_batch_size}"
            )


# --------------------------------------------------------------------------- distributed setup and config


def training_backend() -> str:
    """The process group backend of training: NCCL on GPUs, else gloo."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def ensure_distributed() -> None:
    """The process group DeepSpeed trains in: the launcher's (joined by the stage protocol), or a one-process
    group with an in-memory store (no TCP port needed) when there is no launcher."""
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():  # no launcher; RANK stays unset so that child processes start their own
        os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed reads it
        dist.init_process_group(training_backend(), store=dist.HashStore(), rank=0, world_size=1)
    if torch.cuda.is_available():
        torch.cuda.set_device(distributed.local_rank())
    deepspeed.init_distributed(dist_backend=training_backend(), auto_mpi_discovery=False)


def _is_auto(config: dict[str, Any], key: str) -> bool:
    return config.get(key, "auto") == "auto"


def deepspeed_config(options: TrainOptions, world_size: int, bf16: bool) -> dict[str, Any]:
    """The DeepSpeed config: the user's JSON (if any) with missing/'auto' values filled from the flags.

    The three batch sizes satisfy ``train_batch_size = micro · accumulation · world_size``; any given in the JSON
    are kept and the others derived.
    """
    config: dict[str, Any] = dict(read_json(options.deepspeed_config)) if options.deepspeed_config else {}
    micro_key, gas_key, total_key = "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"
    micro = options.micro_batch_size if _is_auto(config, micro_key) else int(config[micro_key])
    if not _is_auto(config, total_key):
        total = int(config[total_key])
    elif not _is_auto(config, gas_key):
        total = micro * int(config[gas_key]) * world_size
    else:
        total = options.global_batch_size
    if micro < 1 or total % (micro * world_size):
        raise PipelineError(f"global batch {total} is not a multiple of micro batch {micro} x {world_size} processes")
    gas = total // (micro * world_size)
    if not _is_auto(config, gas_key) and int(config[gas_key]) != gas:
        raise PipelineError(
            f"inconsistent DeepSpeed batch sizes: {total} != {micro} x {config[gas_key]} x {world_size}"
        )
    config.update({micro_key: micro, gas_key: gas, total_key: total})
    config.setdefault("zero_allow_untested_optimizer", True)  # RMSprop is not on DeepSpeed's tested list
    config.setdefault("steps_per_print", 2**31 - 1)
    if _is_auto(config, "gradient_clipping"):
        config["gradient_clipping"] = options.max_grad_norm
    zero = config.setdefault("zero_optimization", {})
    if _is_auto(zero, "stage"):
        zero["stage"] = options.zero_stage
    for key, enabled in (("bf16", bf16), ("fp16", False)):
        if key in config and _is_auto(config[key], "enabled"):
            config[key]["enabled"] = enabled
    config.setdefault("bf16", {"enabled": bf16})
    return config


def model_dtype(config: dict[str, Any]) -> torch.dtype:
    """The dtype DeepSpeed trains in under ``config`` (bf16, fp16, else fp32), which the model is loaded in."""
    if config.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    return torch.float16 if config.get("fp16", {}).get("enabled") else torch.float32


def warmup_linear_decay(total_steps: int, warmup_ratio: float) -> Callable[[int], float]:
    """The lr multiplier of optimizer step s (0-based) described in the module docstring."""
    warmup = math.ceil(warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return factor


def enable_activation_checkpointing(model: Any) -> None:
    """Non-reentrant activation checkpointing (transformers >= 5 renamed gradient_ to activation_checkpointing)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


# --------------------------------------------------------------------------- data


def load_rows(path: str | Path) -> list[dict[str, Any]]:
    """The rows of ``train_data.parquet`` as dicts, checking the columns."""
    import datasets

    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"missing training data: {path}")
    try:
        table = datasets.Dataset.from_parquet(str(path), keep_in_memory=True)
    except Exception as e:  # pyarrow and datasets raise several types for a corrupt file
        raise PipelineError(f"cannot read {path} as a parquet table: {e}") from e
    missing = sorted(set(schema.TRAIN_DATA.required) - set(table.column_names))
    if missing:
        raise PipelineError(f"{path} lacks the columns {missing}; was it written by the reflogps stage?")
    return table.to_list()


def epoch_order(rows: Sequence[dict[str, Any]], seed: int, epoch: int) -> list[int]:
    """Row indices for one epoch: prompts (groups of consecutive rows with the same id) shuffled, rows kept together."""
    groups: list[list[int]] = []
    for index, row in enumerate(rows):
        if groups and rows[groups[-1][0]]["id"] == row["id"]:
            groups[-1].append(index)
        else:
            groups.append([index])
    permutation = np.random.default_rng([seed, epoch]).permutation(len(groups))
    return [index for g in permutation for index in groups[g]]


def micro_batch(
    order: Sequence[int], step: int, micro_step: int, rank: int, world: int, micro: int, gas: int
) -> list[int]:
    """Indices of the rows that process ``rank`` uses in ``micro_step`` of global step ``step`` (within the epoch)."""
    start = step * micro * world * gas + (micro_step * world + rank) * micro
    return list(order[start : start + micro])


# --------------------------------------------------------------------------- metrics and checkpoints


def plot_loss(metrics: Sequence[dict[str, Any]], path: str | Path) -> None:
    """PNG of the loss (log scale) and of the mean log-ratio r = log π − log π_t per step, for sequences whose
    target is above ½ (pushed up) and below ½ (pushed down)."""
    from matplotlib.figure import Figure

    steps = [m["step"] for m in metrics]
    fig = Figure(figsize=(8, 3.2), layout="constrained")
    loss_ax, ratio_ax = fig.subplots(1, 2)
    loss_ax.plot(steps, [m["loss"] for m in metrics])
    loss_ax.set(xlabel="optimizer step", ylabel="SPPO loss", yscale="log", title="loss")
    for key, label in (("log_ratio_up", "target > ½"), ("log_ratio_down", "target < ½")):
        ratio_ax.plot(steps, [np.nan if m[key] is None else m[key] for m in metrics], label=label)
    ratio_ax.set(xlabel="optimizer step", ylabel="mean log π − log π_t (nats)", title="log-ratio")
    ratio_ax.legend()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def _missing_files(folder: Path, state: dict[str, Any]) -> list[str]:
    """What ``latest.json`` names but ``folder`` lacks: its tag folder, or listed files (or sizes) in it."""
    tag_dir = folder / str(state.get("tag"))
    if not tag_dir.is_dir():
        return [f"{tag_dir.name}/"]
    listed = state.get("files", {}).items()  # no listing: written by an older version (settled as stale)
    return [name for name, size in listed if not (tag_dir / name).is_file() or (tag_dir / name).stat().st_size != size]


def checkpoint_to_resume(folder: Path, fingerprint: Fingerprint, *, discard: bool) -> dict[str, Any] | None:
    """The ``latest.json`` state of the checkpoint in ``folder`` to resume from, or None: train from step 0.

    Incomplete or unreferenced checkpoints (any partial save or removal) are discarded; a complete one made
    with another fingerprint (or without one) is refused, or discarded with ``fingerprint.discard_stale``.
    ``discard``: whether this process removes what is discarded (rank 0; the others only decide the same).
    """
    latest = folder / schema.LATEST_CHECKPOINT
    try:
        state = read_json(latest) if latest.is_file() else None
    except PipelineError:
        state = None  # written atomically: only a hand-made file can be unreadable
    remove = (lambda: remove_tree(folder)) if discard else (lambda: None)
    missing = ["latest.json"] if state is None else _missing_files(folder, state)
    if missing:
        if folder.exists():
            print(f"[train] discarding incomplete checkpoints in {folder} ({', '.join(missing[:3])} missing)")
            remove()
        return None
    if not settle_stale(f"the training checkpoint in {folder}", state.get("fingerprint"), fingerprint, remove):
        return None
    return state


def save_checkpoint(engine: Any, folder: Path, step: int, fingerprint: Fingerprint) -> None:
    """Save DeepSpeed state for ``step`` (all ranks), then point ``LATEST_CHECKPOINT`` at it with the listing
    of its files and its ``fingerprint``, and drop older ones (renamed away first)."""
    import torch.distributed as dist

    tag = f"step-{step:07d}"
    engine.save_checkpoint(str(folder), tag=tag, client_state={"step": step}, save_latest=False)
    dist.barrier()
    if dist.get_rank() == 0:
        files = {
            p.relative_to(folder / tag).as_posix(): p.stat().st_size for p in (folder / tag).rglob("*") if p.is_file()
        }
        state = {"tag": tag, "step": step, "files": files, "fingerprint": fingerprint.record}
        write_json(folder / schema.LATEST_CHECKPOINT, state)
        for old in folder.glob("step-*"):
            if old.name != tag:
                remove_tree(old)
    dist.barrier()


def save_model(engine: Any, tokenizer: Any, path: Path) -> None:
    """Write the trained model (Hugging Face format, training dtype) and tokenizer atomically (rank 0)."""
    import torch.distributed as dist

    if engine.zero_optimization_partition_weights():
        state = engine._zero3_consolidated_16bit_state_dict()  # gathers layer by layer onto rank 0
    else:
        state = engine.module.state_dict()
    if dist.get_rank() == 0:
        with atomic_path(path) as tmp:
            hf.unwrap_model(engine).save_pretrained(tmp, state_dict=state)
            tokenizer.save_pretrained(tmp)
    dist.barrier()


# --------------------------------------------------------------------------- training


STATS = ("loss", "log_ratio", "policy_logp", "sequences", "tokens", "up", "log_ratio_up", "down", "log_ratio_down")


def _step(
    engine: Any, rows: Sequence[dict[str, Any]], pad_id: int, device: torch.device, eta: float, backend: str
) -> torch.Tensor:
    """Forward + backward of one micro-batch; returns its sums of the ``STATS`` quantities, [len(STATS)] float32.

    ``up``/``down``: sequences whose target is above/below ½ (the loss pushes their log-ratio up/down).
    """
    input_ids, mask, labels = pad_batch(rows, pad_id, device)
    ref = torch.tensor([row["ref_logp"] for row in rows], dtype=torch.float32, device=device)
    target = torch.tensor([row["target"] for row in rows], dtype=torch.float32, device=device)
    loss, logps = hf.model_sppo_loss(
        engine, input_ids, mask, labels, target, ref_logps=ref, eta=eta, backend=backend, return_logps=True
    )
    loss = loss * rows[0]["loss_scale"]
    engine.backward(loss)
    engine.step()
    logps = logps.detach().float()
    ratio = logps - ref
    up, down = (target > 0.5).float(), (target < 0.5).float()
    n = float(len(rows))
    return torch.stack(
        [
            loss.detach().float() * n,
            ratio.sum(),
            logps.sum(),
            torch.tensor(n, device=device),
            (labels != -100).sum().float(),
            up.sum(),
            (ratio * up).sum(),
            down.sum(),
            (ratio * down).sum(),
        ]
    )


def step_record(sums: dict[str, float], step: int, epoch: int, lr: float, grad_norm: Any, seconds: float) -> dict:
    """The ``metrics.jsonl`` row of one optimizer step from the ``STATS`` sums over all processes."""
    return {
        "step": step + 1,
        "epoch": epoch,
        **{key: sums[key] / sums["sequences"] for key in ("loss", "log_ratio", "policy_logp")},
        **{
            key: sums[key] / sums[group] if sums[group] else None
            for key, group in (("log_ratio_up", "up"), ("log_ratio_down", "down"))
        },
        "lr": lr,
        "grad_norm": None if grad_norm is None else float(grad_norm),
        "sequences": int(sums["sequences"]),
        "tokens": int(sums["tokens"]),
        "seconds": round(seconds, 3),
    }


@dataclass(frozen=True)
class Schedule:
    """Batch sizes and step counts of a training run."""

    micro: int  # sequences per process per micro-batch
    accumulation: int  # micro-batches per optimizer step
    total: int  # sequences per optimizer step over all processes
    steps_per_epoch: int
    steps: int


class Train(Stage):
    """Every process of the launcher trains (no units); process 0 writes the plot and the marker, then removes
    the checkpoints (after the marker: a kill during the removal leaves a finished stage)."""

    name = schema.TRAIN_STAGE

    @property
    def backend(self) -> str:  # type: ignore[override]
        return training_backend()

    def __init__(self, model: str, data: str | Path, folder: str | Path, options: TrainOptions,
                 model_options: ModelOptions) -> None:  # fmt: skip
        super().__init__(folder, options)
        self.model, self.data, self.model_options = model, data, model_options
        self.checkpoints = self.folder / schema.CHECKPOINTS

    @property
    def output(self) -> Path:
        return self.folder / schema.MODEL_DIR

    def fingerprint(self) -> Fingerprint:
        inputs = {"model": model_identity(self.model), "data": file_identity(self.data, "training data")}
        return stage_fingerprint(self.name, inputs, self.options, self.model_options)

    def compute(self, fingerprint: Fingerprint) -> dict[str, Any]:
        import torch.distributed as dist

        rows = load_rows(self.data)
        if len({row["loss_scale"] for row in rows}) != 1:
            raise PipelineError(f"{self.data}: rows disagree on loss_scale")
        ensure_distributed()
        rank, world = dist.get_rank(), dist.get_world_size()
        checkpoint_fingerprint = fingerprint.with_layout(processes=world)
        resume = checkpoint_to_resume(self.checkpoints, checkpoint_fingerprint, discard=rank == 0)
        dist.barrier()
        device = default_device()
        bf16 = self.options.precision == "bf16" or (self.options.precision == "auto" and device.type == "cuda")
        config = deepspeed_config(self.options, world, bf16)
        schedule = self.schedule(config, len(rows), world)
        torch.manual_seed(self.options.seed)
        tokenizer = chat.load_tokenizer(self.model, trust_remote_code=self.model_options.trust_remote_code)
        engine = self.engine(config, device, schedule.steps)
        start, metrics = self.resume(engine, resume, schedule.steps)
        self.loop(engine, rows, schedule, start, metrics, tokenizer.pad_token_id, checkpoint_fingerprint)
        save_model(engine, tokenizer, self.output)
        engine.destroy()
        return {"metrics": metrics, "schedule": schedule, "processes": world, "deepspeed_config": config}

    def schedule(self, config: dict[str, Any], rows: int, world: int) -> Schedule:
        """The batch sizes of the DeepSpeed ``config`` and the number of optimizer steps over ``rows`` sequences."""
        keys = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")
        micro, accumulation, total = (config[key] for key in keys)
        if rows < total:
            raise PipelineError(f"{rows} training sequences are fewer than one global batch ({total})")
        per_epoch = rows // total
        return Schedule(micro, accumulation, total, per_epoch, per_epoch * self.options.num_epochs)

    def engine(self, config: dict[str, Any], device: torch.device, steps: int) -> Any:
        """π_t in the training dtype, wrapped by ``deepspeed.initialize`` with RMSprop and the lr schedule (unless
        the config brings its own); under ZeRO-3 the model is built partitioned (``HfDeepSpeedConfig``)."""
        import deepspeed
        from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

        options = self.options
        zero3_config = HfDeepSpeedConfig(config) if config["zero_optimization"]["stage"] == 3 else None
        try:
            model = load_causal_lm(self.model, self.model_options, device=device, dtype=model_dtype(config))
            model.config.use_cache = False
            if options.gradient_checkpointing:
                enable_activation_checkpointing(model)
            optimizer = (
                None if "optimizer" in config else torch.optim.RMSprop(model.parameters(), options.learning_rate)
            )
            factor = warmup_linear_decay(steps, options.warmup_ratio)
            scheduler = None if "scheduler" in config else (lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor))
            engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
        finally:
            del zero3_config
            unset_hf_deepspeed_config()
        return engine

    def resume(self, engine: Any, state: dict[str, Any] | None, steps: int) -> tuple[int, list[dict[str, Any]]]:
        """(first step, metrics so far): from the checkpoint ``state`` names, or (0, [])."""
        if state is None:
            return 0, []
        _, client_state = engine.load_checkpoint(str(self.checkpoints), tag=state["tag"])
        start = int(client_state["step"])
        path = schema.METRICS.path(self.folder)
        metrics = [m for m in read_jsonl(path) if m["step"] <= start] if path.is_file() else []
        if distributed.rank() == 0:
            print(f"[{self.name}] resuming from {self.checkpoints / state['tag']} (step {start}/{steps})")
        return start, metrics

    def loop(self, engine: Any, rows: list[dict[str, Any]], schedule: Schedule, start: int,
             metrics: list[dict[str, Any]], pad_id: int, checkpoint_fingerprint: Fingerprint) -> None:  # fmt: skip
        """Optimizer steps ``start`` … ``schedule.steps − 1``, appending to ``metrics`` (and ``metrics.jsonl``)."""
        import torch.distributed as dist

        rank, world = dist.get_rank(), dist.get_world_size()
        device, options = default_device(), self.options
        engine.train()
        with tqdm(total=schedule.steps, initial=start, desc=self.name, disable=None if rank == 0 else True) as bar:
            for step in range(start, schedule.steps):
                epoch, in_epoch = divmod(step, schedule.steps_per_epoch)
                order = epoch_order(rows, options.seed, epoch)
                started, lr = time.perf_counter(), float(engine.get_lr()[0])
                sums = torch.zeros(len(STATS), device=device)
                for m in range(schedule.accumulation):
                    picked = micro_batch(order, in_epoch, m, rank, world, schedule.micro, schedule.accumulation)
                    sums += _step(engine, [rows[i] for i in picked], pad_id, device, options.eta,
                                  self.model_options.kernel_backend)  # fmt: skip
                dist.all_reduce(sums)
                record = step_record(dict(zip(STATS, sums.tolist(), strict=True)), step, epoch, lr,
                                     engine.get_global_grad_norm(), time.perf_counter() - started)  # fmt: skip
                metrics.append(record)
                if rank == 0:
                    write_jsonl(schema.METRICS.path(self.folder), metrics)
                bar.set_postfix(loss=f"{record['loss']:.4g}", lr=f"{lr:.2e}")
                bar.update(1)
                if (step + 1) % options.save_steps == 0 and step + 1 < schedule.steps:
                    save_checkpoint(engine, self.checkpoints, step + 1, checkpoint_fingerprint)

    def finish(self, computed: dict[str, Any]) -> tuple[dict[str, Any], str]:
        metrics, schedule = computed["metrics"], computed["schedule"]
        plot_loss(metrics, self.folder / schema.LOSS_PLOT)
        counts = {
            "steps": schedule.steps,
            "sequences_per_step": schedule.total,
            "processes": computed["processes"],
            "first_loss": metrics[0]["loss"],
            "last_loss": metrics[-1]["loss"],
            "deepspeed_config": computed["deepspeed_config"],
        }
        report = (
            f"{schedule.steps} steps x {schedule.total} sequences on {counts['processes']} process(es), loss "
            f"{counts['first_loss']:.4g} -> {counts['last_loss']:.4g}"
        )
        return counts, report

    def finished(self) -> None:
        if not self.options.keep_checkpoints:
            remove_tree(self.checkpoints)


def run_train(
    model_path: str,
    data_path: str | Path,
    out_dir: str | Path,
    options: TrainOptions,
    model_options: ModelOptions | None = None,
) -> Path:
    """Train π_t (``model_path``) on ``train_data.parquet``; returns the folder of π_{t+1}. Resumes from
    ``out_dir/checkpoints`` when a previous attempt with the same fingerprint was interrupted."""
    return run_stage(Train(model_path, data_path, out_dir, options, model_options or ModelOptions()))
