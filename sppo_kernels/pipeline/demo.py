"""``sppo-train demo``: the whole pipeline on a CPU in a few minutes, with nothing downloaded.

Everything is built offline and has RANDOM weights: a byte-level BPE tokenizer trained on the bundled prompts,
a tiny Llama or Gemma-2 policy (from :func:`sppo_kernels.tiny_models.tiny_causal_lm`) and a tiny PairRM
(a small DeBERTa-v2 in llm-blender's ranker format, loaded through the real llm-blender code). It is a smoke
run of the machinery, not a model-quality result.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sppo_kernels.pipeline.generate import GenerateOptions
from sppo_kernels.pipeline.prompts import bundled_prompts_path, load_prompts
from sppo_kernels.pipeline.rank import RankOptions, apply_transformers5_shims
from sppo_kernels.pipeline.reflogps import RefLogpsOptions
from sppo_kernels.pipeline.run import PipelineOptions, RunOptions, run_pipeline
from sppo_kernels.pipeline.store import atomic_path
from sppo_kernels.pipeline.train import TrainOptions

END_OF_TURN = "<|end|>"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}" + END_OF_TURN + "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
DEMO_LEARNING_RATE = 1e-4  # the reference's 5e-7 barely moves a random model in a handful of steps


def build_policy_tokenizer(texts: Sequence[str], vocab_size: int = 384) -> Any:
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on ``texts``, with a chat template ending turns in
    ``<|end|>`` (the EOS token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", END_OF_TURN, "<|user|>", "<|assistant|>", "<|system|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token=END_OF_TURN, pad_token="<pad>", model_max_length=4096
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_policy(folder: str | Path, texts: Sequence[str], *, arch: str = "llama", seed: int = 0) -> Path:
    """Save a tiny random policy (``arch``: llama or gemma2) with its tokenizer to ``folder``."""
    from sppo_kernels.tiny_models import tiny_causal_lm

    tokenizer = build_policy_tokenizer(texts)
    ids = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id}
    model = tiny_causal_lm(
        arch,
        vocab_size=len(tokenizer),
        seed=seed,
        eos_token_id=tokenizer.eos_token_id,
        max_position_embeddings=512,
        **ids,
    )
    model.generation_config.update(eos_token_id=tokenizer.eos_token_id, **ids)
    folder = Path(folder)
    with atomic_path(folder) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return folder


def build_pairrm(folder: str | Path, texts: Sequence[str], *, seed: int = 0) -> Path:
    """Save a tiny random PairRM in llm-blender's ranker format to ``folder``.

    Layout: ``config.json`` (ranker config; ``model_name`` is the relative ``backbone`` folder),
    ``model.safetensors`` (the ``CrossCompareReranker``) and ``backbone/`` (DeBERTa-v2 config, weights, a
    WordPiece tokenizer). The comparison head is initialised at unit scale so that scores are O(1).
    """
    import safetensors.torch
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import DebertaV2Config, DebertaV2Model, PreTrainedTokenizerFast

    apply_transformers5_shims()
    from llm_blender.blender.blender_utils import load_ranker
    from llm_blender.pair_ranker.config import RankerConfig

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=512, special_tokens=specials))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=512,
    )
    folder = Path(folder)
    ranker_config = {
        "ranker_type": "pairranker",
        "model_type": "deberta",
        "model_name": "backbone",
        "source_maxlength": 96,
        "candidate_maxlength": 96,
        "n_tasks": 1,
        "drop_out": 0.05,
        "fp16": False,
        "inference_mode": "full",
    }
    with atomic_path(folder) as tmp:
        backbone = tmp / "backbone"
        tokenizer.save_pretrained(backbone)
        torch.manual_seed(seed)
        config = DebertaV2Config(
            vocab_size=len(tokenizer),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=512,
            pad_token_id=tokenizer.pad_token_id,
        )
        DebertaV2Model(config).save_pretrained(backbone)
        ranker, _, _ = load_ranker(RankerConfig.from_dict({**ranker_config, "model_name": str(backbone)}))
        for layer in ranker.head_layer:
            if isinstance(layer, torch.nn.Linear):
                torch.nn.init.normal_(layer.weight, std=layer.in_features**-0.5)
        safetensors.torch.save_model(ranker, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(ranker_config, indent=2) + "\n")
    return folder


def demo_options(ranker: str | Path, iterations: int) -> PipelineOptions:
    """Small settings for the smoke run (K = 5 as in the paper; short responses; 8 sequences per step)."""
    return PipelineOptions(
        run=RunOptions(iterations=iterations),
        generate=GenerateOptions(max_new_tokens=24, generation_batch_size=24, generation_shard_size=24),
        rank=RankOptions(ranker=str(ranker), rank_batch_size=8, rank_shard_size=24),
        reflogps=RefLogpsOptions(max_length=128, max_prompt_length=80, reflogps_batch_size=16),
        train=TrainOptions(learning_rate=DEMO_LEARNING_RATE, global_batch_size=8, micro_batch_size=4, save_steps=2),
    )


def run_demo(out: str | Path, *, arch: str = "llama", iterations: int = 2) -> Path:
    """Build the tiny assets (once) and run ``iterations`` SPPO iterations in ``out``; returns the final model."""
    import torch

    torch.set_num_threads(1)  # tensors this small run fastest on one thread (3x faster on 2 cores)
    started = time.perf_counter()
    out = Path(out)
    prompts_file = bundled_prompts_path()
    texts = [p.text for p in load_prompts(str(prompts_file))]
    print("=== sppo-train demo: SMOKE RUN with tiny RANDOM models (no downloads); not a quality result")
    policy, ranker = out / "assets" / f"policy-{arch}", out / "assets" / "pairrm"
    if not policy.is_dir():
        build_policy(policy, texts, arch=arch)
    if not ranker.is_dir():
        build_pairrm(ranker, texts)
    final = run_pipeline(str(policy), str(prompts_file), out / "run", demo_options(ranker, iterations))
    seconds = time.perf_counter() - started
    print(f"=== demo finished in {seconds:.0f}s (smoke-run learning rate {DEMO_LEARNING_RATE})")
    print(f"    tiny policy and PairRM: {out / 'assets'}")
    for t in range(1, iterations + 1):
        folder = out / "run" / f"iter{t}"
        print(f"    iteration {t}: {folder}  (generations.jsonl, rankings.jsonl, targets.jsonl, train_data.parquet,")
        print("                 metrics.jsonl, loss.png, model/)")
    return final
