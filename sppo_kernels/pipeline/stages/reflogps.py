"""Stage 4: tokenise the training sequences and store their log-probs under π_t, computed once.

π_t is the policy at the start of the iteration, the model the responses were sampled from. Storing
``ref_logp`` with the data means training keeps no second model in memory (the reference trainer keeps a
ZeRO-3 copy of π_t and recomputes these every step).

Output ``train_data.parquet`` (a ``datasets`` table), one row per sequence, with the columns of
:data:`~sppo_kernels.pipeline.core.schema.TRAIN_DATA`: those it shares with ``targets.jsonl`` (``id``, ``role``,
``response_index``, ``target``, ``loss_scale``), then ``input_ids``, ``prompt_length``, ``truncated`` and
``ref_logp``. The log-probs come from :func:`sppo_kernels.integrations.hf.model_reference_logprobs`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from sppo_kernels.integrations import hf
from sppo_kernels.pipeline.core import schema
from sppo_kernels.pipeline.core.errors import PipelineError
from sppo_kernels.pipeline.core.fingerprint import Fingerprint, file_identity, model_identity, stage_fingerprint
from sppo_kernels.pipeline.core.options import at_least, opt
from sppo_kernels.pipeline.core.stage import Rows, Stage, run_stage
from sppo_kernels.pipeline.core.store import atomic_path, chunks, read_rows
from sppo_kernels.pipeline.models import chat
from sppo_kernels.pipeline.models.policy import (
    ModelOptions,
    default_device,
    load_whole_model,
    pad_batch,
)

CARRIED = tuple(column for column in schema.TRAIN_DATA.columns if column in schema.TARGETS.columns)


@dataclass
class RefLogpsOptions:
    """Tokenisation limits and batching for the reference log-probs."""

    max_length: int = opt(
        1024, "maximum prompt+response tokens; longer responses are cut and marked truncated", check=at_least(2)
    )
    max_prompt_length: int = opt(512, "maximum prompt tokens; longer prompts keep their last tokens", check=at_least(1))
    drop_truncated: bool = opt(False, "drop sequences whose response was cut (by max_length or max_new_tokens)")
    # the batch changes log-probs by rounding only; units are keyed by their content
    reflogps_batch_size: int = opt(8, "sequences per forward pass", check=at_least(1), fingerprinted=False)
    reflogps_shard_size: int = opt(1024, "sequences per saved unit of work", check=at_least(1), fingerprinted=False)

    def check(self) -> None:
        """Rules across options (see :func:`~sppo_kernels.pipeline.core.options.validated`)."""
        if self.max_prompt_length >= self.max_length:
            raise PipelineError(
                f"--max-prompt-length ({self.max_prompt_length}) must be < --max-length ({self.max_length})"
            )


def tokenize_targets(rows: Sequence[dict[str, Any]], tokenizer: Any, options: RefLogpsOptions) -> list[dict[str, Any]]:
    """Training rows (the columns of ``train_data.parquet`` but ``ref_logp``) for the rows of ``targets.jsonl``."""
    out = []
    for row in rows:
        encoded = chat.encode_sequence(
            tokenizer,
            row["messages"],
            row["response"],
            complete=row["complete"],
            max_length=options.max_length,
            max_prompt_length=options.max_prompt_length,
        )
        out.append(
            {
                **{key: row[key] for key in CARRIED},
                "input_ids": encoded.input_ids,
                "prompt_length": encoded.prompt_length,
                "truncated": encoded.truncated,
            }
        )
    return out


def rows_reference_logprobs(
    model: Any, rows: Sequence[dict[str, Any]], pad_id: int, device: torch.device, backend: str = "auto"
) -> list[float]:
    """Summed response log-probs (float, no gradient) under ``model`` of training rows (``input_ids``,
    ``prompt_length``), via :func:`hf.model_reference_logprobs`."""
    input_ids, mask, labels = pad_batch(rows, pad_id, device)
    logps = hf.model_reference_logprobs(model, input_ids, mask, labels, backend=backend)
    return logps.float().cpu().tolist()


class RefLogps(Stage):
    """Shards of tokenised training sequences; a unit is one shard's log-probs under π_t."""

    name = schema.REFLOGPS_STAGE

    def __init__(self, model: str, targets: str | Path, folder: str | Path, options: RefLogpsOptions,
                 model_options: ModelOptions) -> None:  # fmt: skip
        super().__init__(folder, options)
        self.model, self.targets, self.model_options = model, targets, model_options

    @property
    def output(self) -> Path:
        return schema.TRAIN_DATA.path(self.folder)

    def fingerprint(self) -> Fingerprint:
        inputs = {"model": model_identity(self.model), "targets": file_identity(self.targets)}
        return stage_fingerprint(self.name, inputs, self.options, self.model_options)

    @cached_property
    def tokenizer(self) -> Any:
        return chat.load_tokenizer(self.model, trust_remote_code=self.model_options.trust_remote_code)

    @cached_property
    def tokenized(self) -> list[dict[str, Any]]:
        """Every training row of the targets (without ``ref_logp``)."""
        return tokenize_targets(read_rows(self.targets, schema.TARGETS.required), self.tokenizer, self.options)

    @cached_property
    def rows(self) -> list[dict[str, Any]]:
        """The rows that are scored and written: truncated ones are dropped with ``drop_truncated``."""
        rows = [row for row in self.tokenized if not (self.options.drop_truncated and row["truncated"])]
        if not rows:
            raise PipelineError(f"{self.targets}: no sequences left to train on (all truncated and dropped?)")
        return rows

    @cached_property
    def units(self) -> list[Sequence[dict[str, Any]]]:
        return chunks(self.rows, self.options.reflogps_shard_size)

    @cached_property
    def policy(self) -> Any:
        """π_t, loaded at the first unit: a fully resumed stage loads no model."""
        return load_whole_model(self.model, self.model_options, device=self.device, what=self.name)

    @cached_property
    def device(self) -> torch.device:
        return default_device()

    def work(self, index: int, shard: Sequence[dict[str, Any]]) -> Rows:
        logps = []
        for batch in chunks(shard, self.options.reflogps_batch_size):
            logps += rows_reference_logprobs(
                self.policy, batch, self.tokenizer.pad_token_id, self.device, self.model_options.kernel_backend
            )
        return [{"ref_logp": value} for value in logps]

    def size(self, shard: Sequence[dict[str, Any]]) -> int:
        return len(shard)

    @property
    def progress_label(self) -> str:
        return "ref logps"

    def finish(self, computed: list[Rows]) -> tuple[dict[str, Any], str]:
        import datasets

        rows, truncated = self.rows, sum(row["truncated"] for row in self.tokenized)
        for row, result in zip(rows, (r for shard in computed for r in shard), strict=True):
            row["ref_logp"] = result["ref_logp"]
        with atomic_path(self.output) as tmp:
            datasets.Dataset.from_list(rows).to_parquet(str(tmp))
        counts = {
            "sequences": len(rows),
            "truncated": truncated,
            "mean_ref_logp": sum(row["ref_logp"] for row in rows) / len(rows),
        }
        dropped = ", dropped" if self.options.drop_truncated else ""
        report = f"{len(rows)} sequences ({truncated} truncated{dropped}), mean log-prob {counts['mean_ref_logp']:.2f}"
        return counts, report


def run_reflogps(
    model_path: str,
    targets_path: str | Path,
    out_dir: str | Path,
    options: RefLogpsOptions,
    model_options: ModelOptions | None = None,
) -> Path:
    """Tokenise ``targets.jsonl`` and add π_t's log-probs; returns the path of ``train_data.parquet``."""
    return run_stage(RefLogps(model_path, targets_path, out_dir, options, model_options or ModelOptions()))
