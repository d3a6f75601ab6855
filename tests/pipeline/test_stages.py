"""The generate, rank and reflogps stages on tiny random models (and a fake vLLM)."""

from __future__ import annotations

import dataclasses
import importlib
import math
import sys
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pipeline_data import FAKE_VLLM

from sppo_kernels.pipeline.core import schema, store
from sppo_kernels.pipeline.core.errors import PipelineError
from sppo_kernels.pipeline.core.prompts import Prompt
from sppo_kernels.pipeline.models import chat, judge, sampling
from sppo_kernels.pipeline.models.judge import PairRMScorer, RankOptions
from sppo_kernels.pipeline.models.policy import ModelOptions
from sppo_kernels.pipeline.models.sampling import GenerateOptions
from sppo_kernels.pipeline.stages.generate import run_generate
from sppo_kernels.pipeline.stages.rank import run_rank
from sppo_kernels.pipeline.stages.reflogps import RefLogpsOptions, run_reflogps
from sppo_kernels.pipeline.stages.targets import scores_from_logits

# ---------------------------------------------------------------------------------------------- generate

SMALL = GenerateOptions(num_responses=3, max_new_tokens=6, generation_batch_size=3, generation_shard_size=4)


def test_hf_generation_is_resumable_and_seeded_per_pass(tmp_path: Path, policy: Path, prompts: list[Prompt]) -> None:
    path = run_generate(str(policy), prompts[:6], tmp_path / "a", SMALL)
    rows = store.read_jsonl(path)
    assert [r["id"] for r in rows] == list(range(6))
    for row in rows:
        assert len(row["responses"]) == 3 and set(row["finish_reasons"]) <= {"stop", "length"}
        assert all(1 <= n <= 6 for n in row["num_tokens"])
    assert sum(len(set(r["responses"])) == 3 for r in rows) >= 4  # passes use different seeds
    assert store.stage_summary(tmp_path / "a", "generate")["responses"] == 18

    units = sorted((tmp_path / "a" / "generate_units").glob("unit-*.jsonl"))
    assert len(units) == 6  # 3 passes x 2 shards
    units[3].unlink()  # as if killed before this unit was saved
    schema.marker_path(tmp_path / "a", "generate").unlink()
    assert run_generate(str(policy), prompts[:6], tmp_path / "a", SMALL).read_text() == path.read_text()


def test_unit_seeds_distinct() -> None:
    seeds = {sampling.unit_seed(0, k, j) for k in range(5) for j in range(50)}
    assert len(seeds) == 250 and sampling.unit_seed(0, 1, 2) == sampling.unit_seed(0, 1, 2)


def test_generate_rejects_bad_input(tmp_path: Path, policy: Path, prompts: list[Prompt]) -> None:
    with pytest.raises(PipelineError, match="empty"):
        run_generate(str(policy), [], tmp_path, SMALL)
    with pytest.raises(PipelineError, match="num-responses"):
        run_generate(str(policy), prompts[:2], tmp_path, GenerateOptions(num_responses=1))
    with pytest.raises(PipelineError, match="needs vLLM"):
        run_generate(str(policy), prompts[:2], tmp_path, GenerateOptions(generation_backend="vllm"))


def test_vllm_glue(tmp_path: Path, policy: Path, prompts: list[Prompt], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(FAKE_VLLM))
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    assert sampling.vllm_usable()
    options = GenerateOptions(num_responses=2, generation_shard_size=2, tensor_parallel_size=4)
    rows = store.read_jsonl(run_generate(str(policy), prompts[:3], tmp_path, options))

    (engine,) = importlib.import_module("vllm").ENGINES
    assert engine.kwargs["model"] == str(policy) and engine.kwargs["tensor_parallel_size"] == 4
    assert engine.kwargs["trust_remote_code"] is False and engine.devices == "0,1,2,3"
    assert len(engine.calls) == 4  # 2 passes x 2 shards
    seeds = [params["seed"] for _, params in engine.calls]
    assert len(set(seeds)) == 4
    for _, params in engine.calls:
        assert (params["temperature"], params["top_p"], params["max_tokens"]) == (0.7, 0.9, 2048)
    tokenizer = chat.load_tokenizer(str(policy))
    first_request = engine.calls[0][0][0]["prompt_token_ids"]
    assert first_request == chat.encode_prompt(tokenizer, prompts[0].messages)
    assert first_request.count(tokenizer.bos_token_id) == 1  # token ids in, so vLLM adds no second BOS
    assert rows[0]["responses"][0] == f"answer {seeds[0] % 1000} to {len(first_request)} tokens"
    assert rows[1]["finish_reasons"] == ["length", "length"] and rows[1]["num_tokens"] == [4, 4]


# ---------------------------------------------------------------------------------------------- rank


def test_pairrm_through_llm_blender(ranker: Path, prompts: list[Prompt]) -> None:
    texts = [p.text for p in prompts[:3]]
    candidates = [[f"{t} answer {k}" * (k + 1) for k in range(4)] for t in texts]
    scorer = PairRMScorer(str(ranker), device="cpu", batch_size=2)
    logits = scorer.compare(texts, candidates)
    assert logits.shape == (3, 4, 4) and logits.dtype == np.float32
    assert np.all(np.diagonal(logits, axis1=1, axis2=2) == 0) and np.abs(logits).max() > 1e-3
    blender_scores = scorer.blender.rank(texts, candidates, return_scores=True, batch_size=3, disable_tqdm=True)
    np.testing.assert_allclose(scores_from_logits(logits), blender_scores, rtol=1e-4, atol=1e-5)
    one_by_one = PairRMScorer(str(ranker), device="cpu", batch_size=1).compare(texts, candidates)
    np.testing.assert_allclose(one_by_one, logits, rtol=1e-4, atol=1e-5)


def test_missing_ranker_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="cannot load the PairRM ranker"):
        PairRMScorer(str(tmp_path / "no-such-ranker"))


class LengthJudge:
    """A plug-in judge: the longer response wins, logit = length difference."""

    def compare(self, prompts: Sequence[str], candidates: Sequence[Sequence[str]]) -> np.ndarray:
        lengths = np.array([[len(c) for c in cands] for cands in candidates], dtype=np.float32)
        return lengths[:, :, None] - lengths[:, None, :]


def _write_generations(path: Path, k: int = 3) -> None:
    rows = [
        {
            "id": i,
            "messages": [{"role": "user", "content": f"question {i}"}],
            "responses": ["x" * (i + j + 1) for j in range(k)],
            "finish_reasons": ["stop"] * k,
            "num_tokens": [1] * k,
        }
        for i in range(5)
    ]
    store.write_jsonl(path, rows)


def test_rank_stage_with_plugged_judge(tmp_path: Path) -> None:
    _write_generations(tmp_path / "generations.jsonl")
    path = run_rank(tmp_path / "generations.jsonl", tmp_path, RankOptions(rank_shard_size=2), scorer=LengthJudge())
    rows = store.read_jsonl(path)
    assert [r["id"] for r in rows] == list(range(5))
    assert np.argmax(scores_from_logits(np.array(rows[0]["logits"]))) == 2
    assert len(list((tmp_path / "rank_units").glob("unit-*.jsonl"))) == 3


def test_rank_stage_errors(tmp_path: Path) -> None:
    store.write_jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(PipelineError, match="no generations"):
        run_rank(tmp_path / "empty.jsonl", tmp_path, RankOptions(), scorer=LengthJudge())
    _write_generations(tmp_path / "g.jsonl")
    rows = store.read_jsonl(tmp_path / "g.jsonl")
    rows[1]["responses"].pop()
    store.write_jsonl(tmp_path / "g.jsonl", rows)
    with pytest.raises(PipelineError, match="same number"):
        run_rank(tmp_path / "g.jsonl", tmp_path, RankOptions(), scorer=LengthJudge())


def test_transformers5_shims_are_idempotent() -> None:
    judge.apply_transformers5_shims()
    judge.apply_transformers5_shims()
    import llm_blender.pair_ranker.collator as collator

    ids, mask = collator.encode_texts(["a b", "c"], _bert_like_tokenizer(), max_length=6)
    assert ids.shape == mask.shape == (2, 6) and mask[1].sum() < mask[0].sum()


def _bert_like_tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1, "a": 2, "b": 3, "c": 4}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


# ---------------------------------------------------------------------------------------------- reflogps


def _write_targets(path: Path) -> None:
    rows = [
        {
            "id": i // 2,
            "messages": [{"role": "user", "content": f"Tell me about topic number {i // 2}."}],
            "response": "It is a fine topic." * (1 + i % 3),
            "response_index": i % 2,
            "role": ("chosen", "rejected")[i % 2],
            "target": 0.7 if i % 2 == 0 else 0.3,
            "loss_scale": 1.0,
            "score": 0.0,
            "complete": i != 3,
        }
        for i in range(6)
    ]
    store.write_jsonl(path, rows)


def _logps_from_full_logits(model_dir: Path, rows: list[dict]) -> list[float]:
    """Independent check: the model's own logits (soft-capped for Gemma-2), log-softmax, gather, sum."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for row in rows:
        ids = torch.tensor([row["input_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
        targets = ids[0, 1:]
        out.append(float(logp[torch.arange(len(targets)), targets][row["prompt_length"] - 1 :].sum()))
    return out


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_reflogps_match_full_logits(tmp_path: Path, arch: str, request: pytest.FixtureRequest) -> None:
    import datasets

    model_dir = request.getfixturevalue("policy" if arch == "llama" else "gemma_policy")
    _write_targets(tmp_path / "targets.jsonl")
    options = RefLogpsOptions(max_length=40, max_prompt_length=24, reflogps_batch_size=4, reflogps_shard_size=4)
    path = run_reflogps(str(model_dir), tmp_path / "targets.jsonl", tmp_path, options)
    rows = datasets.Dataset.from_parquet(str(path), keep_in_memory=True).to_list()
    assert len(rows) == 6 and list(rows[0]) == list(schema.TRAIN_DATA.columns)
    assert [r["truncated"] for r in rows][3] is True
    np.testing.assert_allclose([r["ref_logp"] for r in rows], _logps_from_full_logits(model_dir, rows), rtol=1e-4)
    summary = store.stage_summary(tmp_path, "reflogps")
    assert summary["sequences"] == 6

    drop = dataclasses.replace(options, drop_truncated=True)
    dropped = run_reflogps(str(model_dir), tmp_path / "targets.jsonl", tmp_path / "d", drop)
    kept = datasets.Dataset.from_parquet(str(dropped), keep_in_memory=True)
    assert not any(kept["truncated"]) and len(kept) == 6 - summary["truncated"]


def test_reflogps_errors(tmp_path: Path, policy: Path) -> None:
    with pytest.raises(PipelineError, match="missing file"):
        run_reflogps(str(policy), tmp_path / "none.jsonl", tmp_path, RefLogpsOptions())
    store.write_jsonl(tmp_path / "t.jsonl", [{"id": 0}])
    with pytest.raises(PipelineError, match=r"row 1 lacks \['messages'"):
        run_reflogps(str(policy), tmp_path / "t.jsonl", tmp_path, RefLogpsOptions())


def test_a_model_larger_than_one_gpu_is_refused_before_loading(policy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors import safe_open

    from sppo_kernels.pipeline.models import policy as policy_module

    with safe_open(str(policy / "model.safetensors"), "pt") as f:
        numel = sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())  # noqa: SIM118
    size = policy_module.weights_bytes(str(policy), torch.bfloat16)
    assert size == 2 * numel and policy_module.weights_bytes("owner/hub-model", torch.bfloat16) is None
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda _device: types.SimpleNamespace(total_memory=size))
    monkeypatch.setattr(policy_module, "load_causal_lm", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(PipelineError, match=r"reflogps: the weights of .* take .* GiB in bfloat16, more than 90% of"):
        policy_module.load_whole_model(str(policy), ModelOptions(), device=torch.device("cuda", 0), what="reflogps")
