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
itself are removed by renaming first (:func:`~sppo_kernels.pipeline.store.remove_tree`).
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
from sppo_kernels.pipeline import chat, schema
from sppo_kernels.pipeline.errors import PipelineError
from sppo_kernels.pipeline.fingerprint import Fingerprint, file_identity, model_identity, stage_fingerprint
from sppo_kernels.pipeline.modeling import ModelOptions, default_device, load_causal_lm, pad_batch
from sppo_kernels.pipeline.options import at_least, between, opt, positive
from sppo_kernels.pipeline.store import (
    atomic_path,
    begin_stage,
    finish_stage,
    read_json,
    read_jsonl,
    remove_tree,
    settle_stale,
    write_json,
    write_jsonl,
)

STAGE = "train"


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
        """Rules across options (see :func:`~sppo_kernels.pipeline.options.validated`)."""
        if self.deepspeed_config is not None:  # a missing file is reported by the stage's fingerprint
            if Path(self.deepspeed_config).is_file() and not isinstance(read_json(self.deepspeed_config), dict):
                raise PipelineError(f"--deepspeed-config {self.deepspeed_config}: expected a JSON object")
        elif self.global_batch_size % self.micro_batch_size:
            raise PipelineError(
                f"--global-batch-size {self.global_batch_size} is not a multiple of --micro-batch-size "
                f"{self.micro_batch_size}"
            )


# --------------------------------------------------------------------------- distributed setup and config


def ensure_distributed() -> None:
    """Join the process group of a launcher (torchrun / deepspeed), or make a one-process group.

    The one-process group uses an in-memory store, so it needs no free TCP port.
    """
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if "RANK" not in os.environ:  # no launcher; RANK stays unset so that child processes start their own
            os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed reads it
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)


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


def run_train(
    model_path: str,
    data_path: str | Path,
    out_dir: str | Path,
    options: TrainOptions,
    model_options: ModelOptions | None = None,
) -> Path:
    """Train π_t (``model_path``) on ``train_data.parquet``; returns the folder of π_{t+1}. Resumes from
    ``out_dir/checkpoints`` when a previous attempt with the same fingerprint was interrupted.
    """
    import deepspeed
    import torch.distributed as dist
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    model_options = model_options or ModelOptions()
    out_dir = Path(out_dir)
    started = time.perf_counter()
    inputs = {"model": model_identity(model_path), "data": file_identity(data_path, "training data")}
    fp = stage_fingerprint(STAGE, inputs, options, model_options)
    model_dir = out_dir / schema.MODEL_DIR
    if begin_stage(out_dir, STAGE, fp) is not None:
        return model_dir
    rows = load_rows(data_path)
    if len({row["loss_scale"] for row in rows}) != 1:
        raise PipelineError(f"{data_path}: rows disagree on loss_scale")
    ensure_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    checkpoints = out_dir / schema.CHECKPOINTS
    checkpoint_fingerprint = fp.with_layout(processes=world)
    resume = checkpoint_to_resume(checkpoints, checkpoint_fingerprint, discard=rank == 0)
    dist.barrier()
    device = default_device()
    bf16 = options.precision == "bf16" or (options.precision == "auto" and device.type == "cuda")
    config = deepspeed_config(options, world, bf16)
    micro, gas, total = (
        config[k] for k in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")
    )
    steps_per_epoch = len(rows) // total
    total_steps = steps_per_epoch * options.num_epochs
    if total_steps == 0:
        raise PipelineError(f"{len(rows)} training sequences are fewer than one global batch ({total})")
    torch.manual_seed(options.seed)
    tokenizer = chat.load_tokenizer(model_path, trust_remote_code=model_options.trust_remote_code)
    zero3_config = HfDeepSpeedConfig(config) if config["zero_optimization"]["stage"] == 3 else None
    try:
        model = load_causal_lm(model_path, model_options, device=device, dtype=model_dtype(config))
        model.config.use_cache = False
        if options.gradient_checkpointing:
            enable_activation_checkpointing(model)
        optimizer = None if "optimizer" in config else torch.optim.RMSprop(model.parameters(), lr=options.learning_rate)
        factor = warmup_linear_decay(total_steps, options.warmup_ratio)
        scheduler = None if "scheduler" in config else (lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor))
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
    finally:
        del zero3_config
        unset_hf_deepspeed_config()
    pad_id = tokenizer.pad_token_id
    start_step = 0
    metrics: list[dict[str, Any]] = []
    if resume is not None:
        _, client_state = engine.load_checkpoint(str(checkpoints), tag=resume["tag"])
        start_step = int(client_state["step"])
        if schema.METRICS.path(out_dir).is_file():
            metrics = [m for m in read_jsonl(schema.METRICS.path(out_dir)) if m["step"] <= start_step]
        if rank == 0:
            print(f"[train] resuming from {checkpoints / resume['tag']} (step {start_step}/{total_steps})")
    engine.train()
    with tqdm(total=total_steps, initial=start_step, desc="train", disable=None if rank == 0 else True) as bar:
        for step in range(start_step, total_steps):
            epoch, in_epoch = divmod(step, steps_per_epoch)
            order = epoch_order(rows, options.seed, epoch)
            step_started = time.perf_counter()
            lr = float(engine.get_lr()[0])
            sums = torch.zeros(len(STATS), device=device)
            for m in range(gas):
                batch = [rows[i] for i in micro_batch(order, in_epoch, m, rank, world, micro, gas)]
                sums += _step(engine, batch, pad_id, device, options.eta, model_options.backend)
            dist.all_reduce(sums)
            total_of = dict(zip(STATS, sums.tolist(), strict=True))
            grad_norm = engine.get_global_grad_norm()
            record = {
                "step": step + 1,
                "epoch": epoch,
                **{key: total_of[key] / total_of["sequences"] for key in ("loss", "log_ratio", "policy_logp")},
                **{
                    key: total_of[key] / total_of[group] if total_of[group] else None
                    for key, group in (("log_ratio_up", "up"), ("log_ratio_down", "down"))
                },
                "lr": lr,
                "grad_norm": None if grad_norm is None else float(grad_norm),
                "sequences": int(total_of["sequences"]),
                "tokens": int(total_of["tokens"]),
                "seconds": round(time.perf_counter() - step_started, 3),
            }
            metrics.append(record)
            if rank == 0:
                write_jsonl(schema.METRICS.path(out_dir), metrics)
            bar.set_postfix(loss=f"{record['loss']:.4g}", lr=f"{lr:.2e}")
            bar.update(1)
            if (step + 1) % options.save_steps == 0 and step + 1 < total_steps:
                save_checkpoint(engine, checkpoints, step + 1, checkpoint_fingerprint)
    save_model(engine, tokenizer, model_dir)
    if rank == 0:
        plot_loss(metrics, out_dir / schema.LOSS_PLOT)
        counts = {
            "steps": total_steps,
            "sequences_per_step": total,
            "processes": world,
            "first_loss": metrics[0]["loss"],
            "last_loss": metrics[-1]["loss"],
            "deepspeed_config": config,
        }
        report = (
            f"{total_steps} steps x {total} sequences on {world} process(es), loss "
            f"{counts['first_loss']:.4g} -> {counts['last_loss']:.4g}"
        )
        finish_stage(
            out_dir,
            STAGE,
            counts,
            fingerprint=fp,
            started=started,
            options=options,
            report=report,
            output=model_dir,
        )
        if not options.keep_checkpoints:  # after the marker: a kill during the removal leaves a finished stage
            remove_tree(checkpoints)
    dist.barrier()
    engine.destroy()
    return model_dir
