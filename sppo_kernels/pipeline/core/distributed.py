"""The process layout of a stage: one process, or one of several started by a launcher (torchrun, DeepSpeed's
launcher) that joined a ``torch.distributed`` process group. Every helper works without a group (one process)."""

from __future__ import annotations


def _group_ready() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


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
