"""The process layout of a stage: one process, or one of several that a launcher started.

The launchers users already have set the layout in the environment: ``torchrun`` and DeepSpeed's launcher set
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; under Slurm's ``srun`` the ranks
come from ``SLURM_PROCID``, ``SLURM_NTASKS`` and ``SLURM_LOCALID`` (``MASTER_ADDR``/``MASTER_PORT`` are set by the
job script, as for any multi-node PyTorch job). :func:`join` makes the ``torch.distributed`` process group of
that layout; every other helper works without a group too (one process: rank 0 of 1).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from sppo_kernels.pipeline.core.errors import PipelineError

T = TypeVar("T")
SLURM = {"RANK": "SLURM_PROCID", "WORLD_SIZE": "SLURM_NTASKS", "LOCAL_RANK": "SLURM_LOCALID"}
# Ranks wait for each other at the end of a stage, while the slowest one finishes its units.
WAIT = datetime.timedelta(hours=24)


def _group_ready() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def launched_world_size() -> int:
    """The number of processes the launcher started (1 without a launcher); Slurm's variables are copied to the
    ``torch.distributed`` ones when those are absent."""
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        for name, slurm in SLURM.items():
            os.environ[name] = os.environ[slurm]
    return int(os.environ.get("WORLD_SIZE", "1")) if "RANK" in os.environ else 1


def local_rank() -> int:
    """This process's index on its node (0 without a launcher)."""
    launched_world_size()
    return int(os.environ.get("LOCAL_RANK", "0"))


def join(backend: str = "gloo") -> None:
    """Join the process group of the launcher's layout (nothing for one process, or when already joined).

    ``backend``: ``gloo`` for the stages that only wait for each other and exchange small objects (it takes no
    GPU memory), ``nccl`` for training on GPUs."""
    import torch.distributed as dist

    world = launched_world_size()
    if world == 1 or _group_ready():
        return
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise PipelineError(f"{world} processes but {' and '.join(missing)} unset: set them as for torch.distributed")
    dist.init_process_group(backend, rank=int(os.environ["RANK"]), world_size=world, timeout=WAIT)
    if dist.get_rank() > 0:
        quiet()


def leave() -> None:
    """Leave the launcher's process group once the command has succeeded on every rank (a gloo group left to the
    interpreter's exit can abort the process after its work is written). A one-process group stays."""
    import torch.distributed as dist

    if launched_world_size() > 1 and _group_ready():
        dist.barrier()
        dist.destroy_process_group()


def quiet() -> None:
    """Keep a rank other than 0 off the console: no progress bars or notices of the libraries that load models
    (rank 0 shows the stage's one progress bar over all ranks' units, and its report)."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        import datasets
    except ImportError:
        return
    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()


def rank() -> int:
    """This process's rank in the process group (0 without one)."""
    import torch.distributed as dist

    return dist.get_rank() if _group_ready() else 0


def world_size() -> int:
    """The number of processes in the group (1 without one)."""
    import torch.distributed as dist

    return dist.get_world_size() if _group_ready() else 1


def barrier() -> None:
    """Wait for every process of the group (nothing without one)."""
    import torch.distributed as dist

    if _group_ready():
        dist.barrier()


def on_rank_zero(decide: Callable[[], T]) -> T:
    """``decide()`` on rank 0, its result on every rank; a :class:`PipelineError` it raises is raised on every
    rank (so every process stops with the same one-line message)."""
    import torch.distributed as dist

    if world_size() == 1:
        return decide()
    message: list[Any] = [None, None]
    if rank() == 0:
        try:
            message[0] = decide()
        except PipelineError as e:
            message[1] = e
    dist.broadcast_object_list(message, src=0)
    if message[1] is not None:
        raise message[1]
    return message[0]


def gather(value: T) -> list[T]:
    """``value`` of every rank, in rank order (``[value]`` without a group)."""
    import torch.distributed as dist

    if world_size() == 1:
        return [value]
    values: list[Any] = [None] * world_size()
    dist.all_gather_object(values, value)
    return values


def visible_devices() -> list[str]:
    """The GPUs this process may use: ``CUDA_VISIBLE_DEVICES``, else every device CUDA counts."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d for d in listed.split(",") if d.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def engine_devices(devices: Sequence[str], local: int, tensor_parallel: int) -> list[str]:
    """The GPUs of the engine of local rank ``local``: the ``local``-th group of ``tensor_parallel`` devices."""
    group = list(devices[local * tensor_parallel : (local + 1) * tensor_parallel])
    if len(group) < tensor_parallel:
        raise PipelineError(
            f"local rank {local} needs GPUs {local * tensor_parallel}..{(local + 1) * tensor_parallel - 1} for "
            f"--tensor-parallel-size {tensor_parallel}, but {len(devices)} are visible: start "
            f"{len(devices) // tensor_parallel} processes per node"
        )
    return group
