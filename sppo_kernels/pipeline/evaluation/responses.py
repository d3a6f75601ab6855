"""The evaluation's generation step: one response per eval prompt from one policy, as a resumable stage.

Every policy samples with the same engine settings and the same per-shard seeds (``eval_seed``), so the
responses differ only by the policy. Outputs in the policy's evaluation folder: ``outputs.jsonl`` and
AlpacaEval's ``model_outputs.json`` (instruction, output, generator, dataset).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

from sppo_kernels.pipeline.core import schema
from sppo_kernels.pipeline.core.errors import PipelineError
from sppo_kernels.pipeline.core.fingerprint import (
    Fingerprint,
    model_identity,
    prompts_identity,
    stage_fingerprint,
)
from sppo_kernels.pipeline.core.prompts import Prompt
from sppo_kernels.pipeline.core.stage import Rows, Stage
from sppo_kernels.pipeline.core.store import chunks, write_json, write_jsonl
from sppo_kernels.pipeline.models import chat
from sppo_kernels.pipeline.models.policy import ModelOptions
from sppo_kernels.pipeline.models.sampling import GenerateOptions, PolicySampler, Sampler, unit_seed

# The generation options that change an evaluated response (the HF batch size too: padding changes samples).
SAMPLING_FIELDS = ("temperature", "top_p", "max_new_tokens", "generation_backend", "generation_batch_size")


def sampling_settings(sampling: GenerateOptions, *, seed: int, shard_size: int, dataset: str) -> dict[str, Any]:
    """Everything besides the model and the prompts that changes the evaluated responses (a fingerprint input,
    compared setting by setting)."""
    return {"seed": seed, "shard_size": shard_size, "dataset": dataset} | {
        name: getattr(sampling, name) for name in SAMPLING_FIELDS
    }


class Responses(Stage):
    """Shards of eval prompts; a unit is one shard, sampled with the seed derived from (seed, shard)."""

    name = schema.GENERATE_STAGE
    quiet = True

    def __init__(self, model: str, prompts: Sequence[Prompt], folder: Path, sampling: GenerateOptions,
                 model_options: ModelOptions, *, seed: int, shard_size: int, generator: str, dataset: str,
                 sampler: Sampler | None = None) -> None:  # fmt: skip
        super().__init__(folder, sampling)
        self.model, self.prompts, self.model_options = model, prompts, model_options
        self.sampling = PolicySampler(model, self.options, model_options, sampler)
        self.seed, self.shard_size, self.generator, self.dataset = seed, shard_size, generator, dataset

    @property
    def output(self) -> Path:
        return schema.EVAL_OUTPUTS.path(self.folder)

    def fingerprint(self) -> Fingerprint:
        settings = sampling_settings(self.options, seed=self.seed, shard_size=self.shard_size, dataset=self.dataset)
        inputs = {"model": model_identity(self.model), "prompts": prompts_identity(self.prompts), "settings": settings}
        return stage_fingerprint("eval-generate", inputs, self.model_options)

    @cached_property
    def prompt_ids(self) -> list[list[int]]:
        return [chat.encode_prompt(self.sampling.tokenizer, p.messages) for p in self.prompts]

    @cached_property
    def units(self) -> list[range]:
        return chunks(range(len(self.prompts)), self.shard_size)

    def work(self, index: int, shard: range) -> Rows:
        samples = self.sampling.engine.sample([self.prompt_ids[i] for i in shard], unit_seed(self.seed, 0, index))
        if len(samples) != len(shard):
            raise PipelineError(f"the generation engine returned {len(samples)} responses for {len(shard)} prompts")
        return [
            {
                "id": self.prompts[i].id,
                "instruction": self.prompts[i].text,
                "output": s.text,
                "num_tokens": s.num_tokens - (s.finish_reason == "stop"),  # the end-of-turn token is not counted
                "finish_reason": s.finish_reason,
            }
            for i, s in zip(shard, samples, strict=True)
        ]

    def size(self, shard: range) -> int:
        return len(shard)

    def unit_ids(self, shard: range) -> list[int]:
        return [self.prompts[i].id for i in shard]

    @property
    def progress_label(self) -> str:
        return f"eval generate {self.folder.name}"

    def finish(self, computed: list[Rows]) -> tuple[dict[str, Any], str]:
        rows = [row for shard in computed for row in shard]
        write_jsonl(self.output, rows)
        alpaca = [
            {
                "instruction": r["instruction"],
                "output": r["output"],
                "generator": self.generator,
                "dataset": self.dataset,
            }
            for r in rows
        ]
        write_json(self.folder / schema.MODEL_OUTPUTS, alpaca)
        return {"model": self.model, "prompts": len(rows)}, f"{len(rows)} responses of {self.model}"
