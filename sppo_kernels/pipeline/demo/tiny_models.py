"""Tiny random causal LMs, a character tokenizer and preference batches, built offline.

Used by the tests, the runnable examples and ``sppo-train demo``; nothing is downloaded. (Their old import path,
``sppo_kernels.pipeline.demo.tiny_models``, still works.)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from sppo_kernels.integrations.batching import prompt_masked_labels, right_pad

__all__ = [
    "TINY_ARCHS",
    "model_and_tokenizer",
    "pair_batch_from_rows",
    "tiny_causal_lm",
    "tiny_char_tokenizer",
    "tiny_pair_batch",
    "tiny_preference_rows",
]

TINY_ARCHS = ("llama", "gemma2", "qwen2", "mistral")


def tiny_causal_lm(arch: str = "llama", *, vocab_size: int = 128, seed: int = 0, **overrides: Any) -> Any:
    """A randomly initialised float32 ``*ForCausalLM`` (2 layers, hidden 32) built from a config.

    ``gemma2`` keeps its defaults that matter: final-logit soft-cap 30, tied embeddings, eager attention.
    ``overrides`` go to the config (e.g. ``tie_word_embeddings=False``).
    """
    import transformers

    classes = {
        "llama": ("LlamaConfig", "LlamaForCausalLM"),
        "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
        "mistral": ("MistralConfig", "MistralForCausalLM"),
    }
    if arch not in classes:
        raise ValueError(f"arch must be one of {TINY_ARCHS}, got {arch!r}")
    config_name, model_name = classes[arch]
    options: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
        "pad_token_id": 0,
    }
    if arch == "gemma2":
        options.update(head_dim=8, final_logit_softcapping=30.0, attn_implementation="eager")
    options.update(overrides)
    config = getattr(transformers, config_name)(**options)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return getattr(transformers, model_name)(config)


def tiny_pair_batch(
    num_pairs: int = 2, *, vocab_size: int = 128, prompt_len: int = 5, max_len: int = 12, seed: int = 0
) -> dict[str, Tensor]:
    """A right-padded batch of ``num_pairs`` chosen/rejected pairs in TRL's concatenated order [chosen…, rejected…].

    Returns input_ids, attention_mask, labels ([2P, max_len]; labels are -100 on the prompt and padding),
    p_win, p_lose ([P] float32 in [0.1, 0.9]) and target_probs ([2P] = [p_win, p_lose]).
    """
    g = torch.Generator().manual_seed(seed)
    rows = 2 * num_pairs
    input_ids = torch.randint(1, vocab_size, (rows, max_len), generator=g)
    lengths = torch.randint(prompt_len + 2, max_len + 1, (rows,), generator=g)
    positions = torch.arange(max_len)
    attention_mask = (positions < lengths[:, None]).long()
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    labels = input_ids.masked_fill((attention_mask == 0) | (positions < prompt_len), -100)
    p_win = 0.5 + 0.4 * torch.rand(num_pairs, generator=g)
    p_lose = 0.1 + 0.4 * torch.rand(num_pairs, generator=g)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "p_win": p_win,
        "p_lose": p_lose,
        "target_probs": torch.cat([p_win, p_lose]),
    }


def tiny_char_tokenizer() -> Any:
    """A character-level ``PreTrainedTokenizerFast`` (ids < 100: <pad>=0, <eos>=1, <unk>=2, printable ASCII).

    Built offline with ``tokenizers``; fits the default vocabulary of :func:`tiny_causal_lm`.
    """
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    vocab.update({chr(c): 3 + i for i, c in enumerate(range(32, 127))})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def tiny_preference_rows(n: int = 8, *, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` text preference rows with the reference SPPO columns.

    Keys: prompt, chosen, rejected (str), chosen_probs_win (P_win in [0.5, 0.9]), chosen_probs_lose
    (P_lose in [0.1, 0.5]), chosen_probs (P(chosen > rejected)).
    """
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        p_win = 0.5 + 0.4 * torch.rand(1, generator=g).item()
        p_lose = 0.1 + 0.4 * torch.rand(1, generator=g).item()
        rows.append(
            {
                "prompt": f"Q{i}: what is {i} + {i}?",
                "chosen": f" It is {2 * i}.",
                "rejected": f" Maybe {i}{i} or so",
                "chosen_probs_win": p_win,
                "chosen_probs_lose": p_lose,
                "chosen_probs": 0.5 + (p_win - p_lose) / 2,
            }
        )
    return rows


def pair_batch_from_rows(tokenizer: Any, rows: list[dict[str, Any]]) -> dict[str, Tensor]:
    """Tokenise preference rows (see :func:`tiny_preference_rows`) into a right-padded [chosen…, rejected…] batch.

    Plain-text concatenation ``prompt + response + eos``; labels are -100 on the prompt and padding. Returns
    input_ids, attention_mask, labels [2P, T] and target_probs [2P] = [P_win…, P_lose…] (float32).
    """
    sequences, labels = [], []
    for key in ("chosen", "rejected"):
        for row in rows:
            prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
            response = tokenizer(row[key], add_special_tokens=False)["input_ids"]
            sequences.append(prompt + response + [tokenizer.eos_token_id])
            labels.append(prompt_masked_labels(sequences[-1], len(prompt)))
    probs = [row["chosen_probs_win"] for row in rows] + [row["chosen_probs_lose"] for row in rows]
    batch = right_pad(sequences, labels, pad_token_id=tokenizer.pad_token_id)
    return {**batch, "target_probs": torch.tensor(probs, dtype=torch.float32)}


def model_and_tokenizer(path: str | None = None, arch: str = "llama") -> tuple[Any, Any]:
    """A local HF model directory's model and tokenizer, or (``path=None``) a tiny ``arch`` model + char tokenizer."""
    if path is None:
        return tiny_causal_lm(arch), tiny_char_tokenizer()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return AutoModelForCausalLM.from_pretrained(path), tokenizer
