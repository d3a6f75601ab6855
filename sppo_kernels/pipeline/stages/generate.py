"""Stage 1: sample K responses per prompt from the current policy (vLLM on CUDA, else batched HF generate).

Output ``generations.jsonl``, one row per prompt::

    {"id": 3, "messages": [...], "responses": [K str], "finish_reasons": [K "stop"|"length"], "num_tokens": [K int]}

Work is split into units of (pass k, shard of prompts); each unit is saved as it finishes and samples with its
own seed derived from (seed, k, shard), so a killed run resumes without changing any result.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from sppo_kernels.pipeline.core import schema
from sppo_kernels.pipeline.core.errors import PipelineError
from sppo_kernels.pipeline.core.fingerprint import Fingerprint, model_identity, prompts_identity, stage_fingerprint
from sppo_kernels.pipeline.core.prompts import Prompt
from sppo_kernels.pipeline.core.stage import Rows, Stage, run_stage
from sppo_kernels.pipeline.core.store import chunks, write_jsonl
from sppo_kernels.pipeline.models import chat
from sppo_kernels.pipeline.models.policy import ModelOptions, context_length
from sppo_kernels.pipeline.models.sampling import GenerateOptions, PolicySampler, Sampler, engine_name, unit_seed

Unit = tuple[int, int, range]  # (pass k, shard j, prompt positions)


class Generate(Stage):
    """K passes over the prompts, in shards; a unit is one (pass, shard)."""

    name = schema.GENERATE_STAGE

    def __init__(self, model: str, prompts: Sequence[Prompt], folder: str | Path, options: GenerateOptions,
                 model_options: ModelOptions, sampler: Sampler | None) -> None:  # fmt: skip
        if not prompts:
            raise PipelineError("generate: the prompt set is empty")
        super().__init__(folder, options)
        self.model, self.prompts, self.model_options = model, prompts, model_options
        self.sampling = PolicySampler(model, self.options, model_options, sampler)

    @property
    def output(self) -> Path:
        return schema.GENERATIONS.path(self.folder)

    def fingerprint(self) -> Fingerprint:
        inputs = {"model": model_identity(self.model), "prompts": prompts_identity(self.prompts)}
        resolved = dataclasses.replace(self.options, generation_backend=engine_name(self.options))  # "auto" resolved
        return stage_fingerprint(self.name, inputs, resolved, self.model_options)

    @cached_property
    def prompt_ids(self) -> list[list[int]]:
        """The templated prompts' token ids (a prompt that does not fit in the model's context is refused)."""
        context = context_length(self.model, trust_remote_code=self.model_options.trust_remote_code)
        return chat.encode_prompts(self.sampling.tokenizer, self.prompts, context)

    @cached_property
    def units(self) -> list[Unit]:
        """(pass, shard) units; the prompts are encoded first, so one that does not fit is refused before anything
        is written."""
        shards = chunks(range(len(self.prompt_ids)), self.options.generation_shard_size)
        return [(k, j, shard) for k in range(self.options.num_responses) for j, shard in enumerate(shards)]

    def work(self, index: int, unit: Unit) -> Rows:
        k, j, shard = unit
        samples = self.sampling.engine.sample(
            [self.prompt_ids[i] for i in shard], unit_seed(self.options.generation_seed, k, j)
        )
        return [s._asdict() for s in samples]

    def size(self, unit: Unit) -> int:
        return len(unit[2])

    def finish(self, computed: list[Rows]) -> tuple[dict[str, Any], str]:
        rows = [{**p.to_json(), "responses": [], "finish_reasons": [], "num_tokens": []} for p in self.prompts]
        for (_k, _j, shard), samples in zip(self.units, computed, strict=True):
            for i, sample in zip(shard, samples, strict=True):
                rows[i]["responses"].append(sample["text"])
                rows[i]["finish_reasons"].append(sample["finish_reason"])
                rows[i]["num_tokens"].append(sample["num_tokens"])
        write_jsonl(self.output, rows)
        num_tokens = [n for row in rows for n in row["num_tokens"]]
        counts = {
            "prompts": len(rows),
            "responses": len(num_tokens),
            "mean_tokens": float(np.mean(num_tokens)),
            "hit_max_new_tokens": sum(r == "length" for row in rows for r in row["finish_reasons"]),
        }
        report = (
            f"{counts['prompts']} prompts x {self.options.num_responses} responses, mean "
            f"{counts['mean_tokens']:.1f} tokens, {counts['hit_max_new_tokens']} cut at max_new_tokens"
        )
        return counts, report


def run_generate(
    model: str,
    prompts: Sequence[Prompt],
    out_dir: str | Path,
    options: GenerateOptions,
    model_options: ModelOptions | None = None,
    *,
    sampler: Sampler | None = None,
) -> Path:
    """Sample ``num_responses`` responses for every prompt; returns the path of ``generations.jsonl``."""
    return run_stage(Generate(model, prompts, out_dir, options, model_options or ModelOptions(), sampler))
