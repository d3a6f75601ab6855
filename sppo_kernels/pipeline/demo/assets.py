"""The demo's tiny offline assets: a policy (a tiny causal LM with a byte-level BPE tokenizer and a chat template)
and a PairRM in llm-blender's ranker format (a tiny DeBERTa-v2 with a deterministic WordPiece vocabulary), both
built from fixed seeds, nothing downloaded. The tests build their models with these too."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sppo_kernels.pipeline.core.store import atomic_path
from sppo_kernels.pipeline.demo.gold import base_response, gold_score
from sppo_kernels.pipeline.models.judge import apply_transformers5_shims

END_OF_TURN = "<|end|>"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}" + END_OF_TURN + "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
PAIRRM_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# llm-blender's PairRM collator adds these; having them in the vocabulary avoids an embedding resize at load.
PAIRRM_PREFIXES = ["<|source|>", "<|candidate1|>", "<|candidate2|>", "<|candidate|>"]


def build_policy_tokenizer(texts: Sequence[str], vocab_size: int = 384) -> Any:
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on ``texts`` (deterministic), with a chat template
    ending turns in ``<|end|>`` (the EOS token)."""
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


def build_policy(
    folder: str | Path,
    texts: Sequence[str],
    *,
    arch: str = "llama",
    seed: int = 0,
    vocab_size: int = 384,
    **model_options: Any,
) -> Path:
    """Save a tiny random policy (``arch``: llama or gemma2) with its tokenizer to ``folder``; ``model_options``
    go to the model config (e.g. ``hidden_size``)."""
    from sppo_kernels.pipeline.demo.tiny_models import tiny_causal_lm

    tokenizer = build_policy_tokenizer(texts, vocab_size)
    ids = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id}
    model = tiny_causal_lm(
        arch,
        vocab_size=len(tokenizer),
        seed=seed,
        eos_token_id=tokenizer.eos_token_id,
        max_position_embeddings=512,
        **ids,
        **model_options,
    )
    model.generation_config.update(eos_token_id=tokenizer.eos_token_id, **ids)
    folder = Path(folder)
    with atomic_path(folder) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return folder


def wordpiece_vocab(texts: Sequence[str], vocab_size: int) -> dict[str, int]:
    """A deterministic WordPiece vocabulary: the special tokens, every character (alone and as ``##c``), then
    the most frequent words (ties by spelling). ``tokenizers``' WordPiece trainer is not used: its result depends
    on hash-map order, which changes from process to process."""
    from tokenizers import normalizers, pre_tokenizers

    normalizer = normalizers.BertNormalizer(lowercase=True)
    splitter = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(piece for piece, _ in splitter.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({c for word in counts for c in word})
    tokens = [*PAIRRM_SPECIALS, *chars, *(f"##{c}" for c in chars)]
    words = [w for w, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0])) if len(w) > 1]
    tokens += words[: max(0, vocab_size - len(tokens))]
    return {token: index for index, token in enumerate(tokens)}


def build_pairrm(
    folder: str | Path,
    texts: Sequence[str],
    *,
    seed: int = 0,
    vocab_size: int = 512,
    hidden_size: int = 32,
    layers: int = 2,
    source_max_length: int = 96,
    candidate_max_length: int = 96,
) -> Path:
    """Save a tiny random PairRM in llm-blender's ranker format to ``folder``.

    Layout: ``config.json`` (ranker config; ``model_name`` is the relative ``backbone`` folder),
    ``model.safetensors`` (the ``CrossCompareReranker``) and ``backbone/`` (DeBERTa-v2 config, weights, a
    WordPiece tokenizer with a deterministic vocabulary that already holds llm-blender's prefix tokens). The
    comparison head is initialised at unit scale so that scores are O(1).
    """
    import safetensors.torch
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import DebertaV2Config, DebertaV2Model, PreTrainedTokenizerFast

    apply_transformers5_shims()
    from llm_blender.blender.blender_utils import load_ranker
    from llm_blender.pair_ranker.config import RankerConfig

    tok = Tokenizer(models.WordPiece(wordpiece_vocab(texts, vocab_size), unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
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
    tokenizer.add_tokens(PAIRRM_PREFIXES)
    folder = Path(folder)
    ranker_config = {
        "ranker_type": "pairranker",
        "model_type": "deberta",
        "model_name": "backbone",
        "source_maxlength": source_max_length,
        "candidate_maxlength": candidate_max_length,
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
            hidden_size=hidden_size,
            num_hidden_layers=layers,
            num_attention_heads=2,
            intermediate_size=2 * hidden_size,
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


def gold_pairs(prompts: Sequence[str], count: int, rng: np.random.Generator) -> list[tuple[str, str, str, int, int]]:
    """``count`` (prompt, a, b, gold(a), gold(b)) of two base-behaviour responses with different gold scores."""
    pairs = []
    while len(pairs) < count:
        prompt = prompts[int(rng.integers(len(prompts)))]
        a, b = base_response(rng, prompt), base_response(rng, prompt)
        score_a, score_b = gold_score(prompt, a), gold_score(prompt, b)
        if score_a != score_b:
            pairs.append((prompt, a, b, score_a, score_b))
    return pairs


def load_ranker_from(folder: Path) -> tuple[Any, Any]:
    """The ``CrossCompareReranker`` and collator of a PairRM folder, through llm-blender's ``load_ranker``."""
    from sppo_kernels.pipeline.demo.console import silence_third_party

    silence_third_party()
    apply_transformers5_shims()
    from llm_blender.blender.blender_utils import load_ranker
    from llm_blender.pair_ranker.config import RankerConfig

    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    ranker, _, collator = load_ranker(
        RankerConfig.from_dict(
            {**config, "model_name": str(folder / config["model_name"]), "load_checkpoint": str(folder)}
        )
    )
    return ranker, collator
