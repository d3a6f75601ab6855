"""The model options of every stage that loads the policy, model loading, and right-padded token batches.

The log-probs and the loss themselves come from the model-level recipe, :mod:`sppo_kernels.integrations.hf`.
"""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import sppo_kernels as sk
from sppo_kernels.integrations.batching import prompt_masked_labels, right_pad
from sppo_kernels.pipeline.core import distributed
from sppo_kernels.pipeline.core.errors import PipelineError
from sppo_kernels.pipeline.core.options import opt


@dataclass
class ModelOptions:
    """How policy checkpoints are loaded and which kernel computes their log-probs (all model stages).

    ``kernel_backend`` is the ``backend`` of ``sppo_kernels``' functions (the command line also has a generation
    backend, hence the qualifier)."""

    trust_remote_code: bool = opt(False, "allow model repositories to run their own Python code", fingerprinted=False)
    attn_implementation: str | None = opt(
        None,
        "attention kernel (default: flash_attention_2 if installed on CUDA, eager for soft-capped "
        "attention without it, else sdpa)",
    )
    kernel_backend: str = opt(  # every backend computes the same log-probs up to rounding: not fingerprinted
        "auto", "sppo_kernels backend for the log-probs and the loss", sk.BACKENDS, fingerprinted=False
    )


ONE_GPU_FRACTION = 0.9  # of a GPU's memory that one whole copy of a model's weights may take


def default_device() -> torch.device:
    """``cuda:<LOCAL_RANK>`` when CUDA is present (one GPU per process of a launcher), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", distributed.local_rank() % torch.cuda.device_count())
    return torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs, fp32 on the CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def pick_attn_implementation(config: Any, requested: str | None, device: torch.device) -> str:
    """flash-attn 2 when installed on CUDA; Gemma-2's soft-capped attention needs eager without it; else sdpa."""
    if requested:
        return requested
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    if getattr(config, "attn_logit_softcapping", None):
        return "eager"
    return "sdpa"


def context_length(path: str, *, trust_remote_code: bool = False) -> int | None:
    """The model's context in tokens (``max_position_embeddings`` of its config), or None when it has none."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise PipelineError(f"cannot load a model config from {path!r}: {e}") from e
    length = getattr(config, "max_position_embeddings", None)
    return length if isinstance(length, int) and length > 0 else None


def load_causal_lm(path: str, options: ModelOptions, *, device: torch.device, dtype: torch.dtype) -> Any:
    """``AutoModelForCausalLM`` in ``dtype`` (not moved: the caller or DeepSpeed places it)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=options.trust_remote_code)
    except OSError as e:
        raise PipelineError(f"cannot load a model config from {path!r}: {e}") from e
    return AutoModelForCausalLM.from_pretrained(
        path,
        dtype=dtype,
        trust_remote_code=options.trust_remote_code,
        attn_implementation=pick_attn_implementation(config, options.attn_implementation, device),
    )


def weights_bytes(path: str, dtype: torch.dtype) -> int | None:
    """The bytes a local model folder's weights take in ``dtype``: from the safetensors headers (other formats:
    their file sizes); None for a hub name (nothing is downloaded to find out)."""
    folder = Path(path)
    if not folder.is_dir():
        return None
    total = 0
    for file in sorted(folder.glob("*.safetensors")):
        with open(file, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        total += sum(math.prod(t["shape"]) for key, t in header.items() if key != "__metadata__") * dtype.itemsize
    return total + sum(file.stat().st_size for pattern in ("*.bin", "*.pt", "*.pth") for file in folder.glob(pattern))


def load_whole_model(path: str, options: ModelOptions, *, device: torch.device, what: str) -> Any:
    """A whole copy of the model on ``device``, in eval mode (bf16 on GPUs, fp32 on the CPU). On a GPU, a model
    whose weights exceed :data:`ONE_GPU_FRACTION` of its memory is refused before loading (``what``: the stage)."""
    dtype = default_dtype(device)
    size = weights_bytes(path, dtype) if device.type == "cuda" else None
    if size is not None:
        memory = torch.cuda.get_device_properties(device).total_memory
        if size > ONE_GPU_FRACTION * memory:
            raise PipelineError(
                f"{what}: the weights of {path} take {size / 2**30:.1f} GiB in {str(dtype).removeprefix('torch.')}, "
                f"more than {ONE_GPU_FRACTION:.0%} of the {memory / 2**30:.1f} GiB of {device}; this stage runs one "
                "whole copy of the model per GPU (ZeRO-3 inference is not implemented): use GPUs with more memory"
            )
    return load_causal_lm(path, options, device=device, dtype=dtype).to(device).eval()


def pad_batch(rows: Sequence[dict[str, Any]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` [B, T] (int64) on ``device`` from rows with
    ``input_ids`` and ``prompt_length``; labels are -100 on prompt and padding (HF convention, unshifted)."""
    ids = [row["input_ids"] for row in rows]
    labels = [prompt_masked_labels(row["input_ids"], row["prompt_length"]) for row in rows]
    batch = right_pad(ids, labels, pad_token_id=pad_id)
    return tuple(batch[key].to(device) for key in ("input_ids", "attention_mask", "labels"))  # type: ignore[return-value]
