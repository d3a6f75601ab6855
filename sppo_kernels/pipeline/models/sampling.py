"""Generation engines: sample one response per prompt from a policy, reproducibly for a given seed.

vLLM when it is importable and CUDA is present (fed token ids, so it adds no second BOS), else batched Hugging
Face ``generate`` with left padding. :class:`GenerateOptions` holds the sampling settings (the SPPO paper's by
default) and how the generate stage splits its work; the evaluation samples with the same engines.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, NamedTuple, Protocol

import numpy as np

from sppo_kernels.pipeline.core import distributed
from sppo_kernels.pipeline.core.distributed import engine_devices, visible_devices
from sppo_kernels.pipeline.core.errors import PipelineError
from sppo_kernels.pipeline.core.options import at_least, between, opt
from sppo_kernels.pipeline.core.store import chunks
from sppo_kernels.pipeline.models import chat
from sppo_kernels.pipeline.models.policy import ModelOptions, default_device, load_whole_model


@dataclass
class GenerateOptions:
    """Sampling settings (defaults: the SPPO paper's)."""

    num_responses: int = opt(5, "responses per prompt (K)", check=at_least(2))
    temperature: float = opt(0.7, "sampling temperature (0: greedy decoding)", check=at_least(0))
    top_p: float = opt(0.9, "nucleus sampling threshold", check=between(0, 1, low_open=True))
    max_new_tokens: int = opt(2048, "maximum tokens per response", check=at_least(1))
    generation_seed: int = opt(
        0, "base seed; pass k and shard j sample with a seed derived from (seed, k, j)", check=at_least(0)
    )
    generation_backend: str = opt(
        "auto", "auto: vLLM when importable and CUDA is present, else HF", ("auto", "vllm", "hf")
    )
    # HF samples depend on the batch (padding, random stream) and on the shard (its seed): both fingerprinted
    generation_batch_size: int = opt(16, "prompts per HF generate call", check=at_least(1))
    generation_shard_size: int = opt(256, "prompts per saved unit of work", check=at_least(1))
    tensor_parallel_size: int = opt(1, "vLLM tensor-parallel size", check=at_least(1), fingerprinted=False)
    gpu_memory_utilization: float = opt(
        0.9, "vLLM GPU memory fraction", check=between(0, 1, low_open=True), fingerprinted=False
    )


class Sample(NamedTuple):
    """One sampled response."""

    text: str
    finish_reason: str  # "stop" (ended with end-of-turn) or "length" (hit max_new_tokens)
    num_tokens: int


class Sampler(Protocol):
    """A generation engine: continue each prompt (token ids) once, reproducibly for a given seed."""

    def sample(self, prompt_ids: Sequence[list[int]], seed: int) -> list[Sample]: ...


def unit_seed(seed: int, pass_index: int, shard_index: int) -> int:
    """The sampling seed of one (pass, shard) unit: distinct across passes and shards, stable across runs."""
    return int(np.random.SeedSequence([seed, pass_index, shard_index]).generate_state(1)[0] & 0x7FFFFFFF)


def vllm_usable() -> bool:
    """True when vLLM is importable and a CUDA device is present."""
    import torch

    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


class VLLMSampler:
    """vLLM engine fed with token ids (so vLLM adds no second BOS); one request seed per unit.

    Under a launcher, each process runs one engine on its own ``tensor_parallel_size`` GPUs: the local rank's
    group of the visible devices, set as ``CUDA_VISIBLE_DEVICES`` before the engine (its own process) starts.
    """

    def __init__(self, model: str, options: GenerateOptions, *, trust_remote_code: bool = False) -> None:
        import vllm

        devices = engine_devices(visible_devices(), distributed.local_rank(), options.tensor_parallel_size)
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
        self._vllm = vllm
        self.options = options
        self.llm = vllm.LLM(
            model=model,
            tensor_parallel_size=options.tensor_parallel_size,
            gpu_memory_utilization=options.gpu_memory_utilization,
            seed=options.generation_seed,
            trust_remote_code=trust_remote_code,
        )

    def sample(self, prompt_ids: Sequence[list[int]], seed: int) -> list[Sample]:
        """One response per prompt."""
        params = self._vllm.SamplingParams(
            temperature=self.options.temperature,
            top_p=self.options.top_p,
            max_tokens=self.options.max_new_tokens,
            seed=seed,
        )
        requests = [{"prompt_token_ids": list(ids)} for ids in prompt_ids]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        samples = []
        for output in outputs:
            completion = output.outputs[0]
            finish = "length" if completion.finish_reason == "length" else "stop"
            samples.append(Sample(completion.text, finish, len(completion.token_ids)))
        return samples


class HFSampler:
    """Batched ``model.generate`` with left padding, on CUDA (bf16) when present, else CPU (fp32)."""

    def __init__(self, model: str, options: GenerateOptions, *, tokenizer: Any, model_options: ModelOptions) -> None:
        self.options = options
        self.tokenizer = tokenizer
        self.device = default_device()
        self.model = load_whole_model(model, model_options, device=self.device, what="generation")
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = tokenizer.eos_token_id
        self.eos_ids = set(eos) if isinstance(eos, list) else {eos}

    def _batch(self, prompt_ids: Sequence[list[int]]) -> list[Sample]:
        import torch

        pad = self.tokenizer.pad_token_id
        width = max(len(ids) for ids in prompt_ids)
        input_ids = torch.tensor([[pad] * (width - len(ids)) + list(ids) for ids in prompt_ids], device=self.device)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompt_ids], device=self.device)
        # temperature 0 = greedy decoding (as in vLLM), used by the evaluation's --eval-sampling greedy
        sampling = {"temperature": self.options.temperature, "top_p": self.options.top_p, "top_k": 0}  # no top-k cut
        with torch.no_grad():
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                do_sample=self.options.temperature > 0,
                **(sampling if self.options.temperature > 0 else {}),
                max_new_tokens=self.options.max_new_tokens,
                pad_token_id=pad,
            )
        samples = []
        for row in out[:, width:].tolist():
            end = next((i for i, token in enumerate(row) if token in self.eos_ids), None)
            tokens = row if end is None else row[:end]
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            samples.append(Sample(text, "length" if end is None else "stop", len(row) if end is None else end + 1))
        return samples

    def sample(self, prompt_ids: Sequence[list[int]], seed: int) -> list[Sample]:
        """One response per prompt, in batches of ``generation_batch_size``."""
        import torch

        torch.manual_seed(seed)
        samples: list[Sample] = []
        for batch in chunks(prompt_ids, self.options.generation_batch_size):
            samples += self._batch(batch)
        return samples


def engine_name(options: GenerateOptions) -> str:
    """``vllm`` or ``hf``: the engine that ``generation_backend`` picks here."""
    backend = options.generation_backend
    return "vllm" if backend == "vllm" or (backend == "auto" and vllm_usable()) else "hf"


def make_sampler(model: str, options: GenerateOptions, *, tokenizer: Any, model_options: ModelOptions) -> Sampler:
    """The engine chosen by ``generation_backend``."""
    if engine_name(options) == "vllm":
        if importlib.util.find_spec("vllm") is None:
            raise PipelineError("--generation-backend vllm needs vLLM (pip install 'sppo-kernels[vllm]')")
        return VLLMSampler(model, options, trust_remote_code=model_options.trust_remote_code)
    return HFSampler(model, options, tokenizer=tokenizer, model_options=model_options)


class PolicySampler:
    """A policy's tokenizer and generation engine, each built at its first use: a stage whose units are all
    finished loads neither. ``sampler``: an engine to use instead of building one (tests)."""

    def __init__(self, model: str, options: GenerateOptions, model_options: ModelOptions,
                 sampler: Sampler | None = None) -> None:  # fmt: skip
        self.model, self.options, self.model_options, self.given = model, options, model_options, sampler

    @cached_property
    def tokenizer(self) -> Any:
        return chat.load_tokenizer(self.model, trust_remote_code=self.model_options.trust_remote_code)

    @cached_property
    def engine(self) -> Sampler:
        if self.given is not None:
            return self.given
        return make_sampler(self.model, self.options, tokenizer=self.tokenizer, model_options=self.model_options)
