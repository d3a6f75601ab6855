"""Stage 4: tokenise the training sequences and store their log-probs under π_t, computed once.

π_t is the policy at the start of the iteration, the model the responses were sampled from. Storing
``ref_logp`` with the data means training keeps no second model in memory (the reference trainer keeps a
ZeRO-3 copy of π_t and recomputes these every step).

Output ``train_data.parquet`` (a ``datasets`` table), one row per sequence, with the columns of
:data:`~sppo_kernels.pipeline.schema.TRAIN_DATA`: those it shares with ``targets.jsonl`` (``id``, ``role``,
``response_index``, ``target``, ``loss_scale``), then ``input_ids``, ``prompt_length``, ``truncated`` and
``ref_logp``. The log-probs come from :func:`sppo_kernels.integrations.hf.model_reference_logprobs`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sppo_kernels.integrations import hf
from sppo_kernels.pipeline import chat, schema
from sppo_kernels.pipeline.errors import PipelineError
from sppo_kernels.pipeline.fingerprint import file_identity, model_identity, stage_fingerprint
from sppo_kernels.pipeline.modeling import (
    ModelOptions,
    default_device,
    default_dtype,
    load_causal_lm,
    pad_batch,
)
from sppo_kernels.pipeline.options import at_least, opt
from sppo_kernels.pipeline.store import atomic_path, begin_stage, chunks, finish_stage, read_rows, run_units

STAGE = "reflogps"
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
        """Rules across options (see :func:`~sppo_kernels.pipeline.options.validated`)."""
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


sequence_logps = rows_reference_logprobs  # the old name, kept as an alias


def run_reflogps(
    model_path: str,
    targets_path: str | Path,
    out_dir: str | Path,
    options: RefLogpsOptions,
    model_options: ModelOptions | None = None,
) -> Path:
    """Tokenise ``targets.jsonl`` and add π_t's log-probs; returns the path of ``train_data.parquet``."""
    import datasets

    model_options = model_options or ModelOptions()
    out_dir = Path(out_dir)
    started = time.perf_counter()
    inputs = {"model": model_identity(model_path), "targets": file_identity(targets_path)}
    fp = stage_fingerprint(STAGE, inputs, options, model_options)
    path = schema.TRAIN_DATA.path(out_dir)
    if begin_stage(out_dir, STAGE, fp) is not None:
        return path
    tokenizer = chat.load_tokenizer(model_path, trust_remote_code=model_options.trust_remote_code)
    rows = tokenize_targets(read_rows(targets_path, schema.TARGETS.required), tokenizer, options)
    truncated = sum(row["truncated"] for row in rows)
    if options.drop_truncated:
        rows = [row for row in rows if not row["truncated"]]
    if not rows:
        raise PipelineError(f"{targets_path}: no sequences left to train on (all truncated and dropped?)")
    device = default_device()
    model = None

    def work(_index: int, shard: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        nonlocal model
        if model is None:  # loaded lazily: a fully resumed stage loads no model
            model = load_causal_lm(model_path, model_options, device=device, dtype=default_dtype(device))
            model.to(device).eval()
        logps = []
        for batch in chunks(shard, options.reflogps_batch_size):
            logps += rows_reference_logprobs(model, batch, tokenizer.pad_token_id, device, model_options.backend)
        return [{"ref_logp": value} for value in logps]

    shards = chunks(rows, options.reflogps_shard_size)
    units = schema.units_dir(out_dir, STAGE)
    results = run_units(units, shards, work, fingerprint=fp, desc="ref logps", total=len(rows), weight=len)
    for row, result in zip(rows, (r for shard in results for r in shard), strict=True):
        row["ref_logp"] = result["ref_logp"]
    with atomic_path(path) as tmp:
        datasets.Dataset.from_list(rows).to_parquet(str(tmp))
    counts = {
        "sequences": len(rows),
        "truncated": truncated,
        "mean_ref_logp": sum(row["ref_logp"] for row in rows) / len(rows),
    }
    dropped = ", dropped" if options.drop_truncated else ""
    report = f"{len(rows)} sequences ({truncated} truncated{dropped}), mean log-prob {counts['mean_ref_logp']:.2f}"
    finish_stage(out_dir, STAGE, counts, fingerprint=fp, started=started, options=options, report=report, output=path)
    return path
