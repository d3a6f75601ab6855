"""Chat-template tokenisation shared by generation, ref log-probs and training.

The chat template already contains the BOS token and the end-of-turn token, so every text here is tokenised
with ``add_special_tokens=False`` (no double BOS/EOS). The prompt is the template with
``add_generation_prompt=True``, so the assistant header belongs to the prompt, never to the response labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sppo_kernels.pipeline.core.errors import PipelineError
from sppo_kernels.pipeline.core.prompts import Message, Prompt

MAX_CHARS_PER_TOKEN = 64  # a prompt longer than this many characters per context token is refused untokenised


def load_tokenizer(model: str, *, trust_remote_code: bool = False) -> Any:
    """The model's tokenizer; it must have a chat template and gets a pad token if it lacks one."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise PipelineError(f"cannot load a tokenizer from {model!r}: {e}") from e
    if not getattr(tokenizer, "chat_template", None):
        raise PipelineError(f"the tokenizer of {model!r} has no chat template; SPPO needs an instruction model")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def prompt_text(tokenizer: Any, messages: Sequence[Message]) -> str:
    """The templated prompt, up to and including the assistant header."""
    return tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without added special tokens."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_prompt(tokenizer: Any, messages: Sequence[Message]) -> list[int]:
    """Token ids of the templated prompt (what generation continues)."""
    return encode_text(tokenizer, prompt_text(tokenizer, messages))


def encode_prompts(tokenizer: Any, prompts: Sequence[Prompt], context: int | None) -> list[list[int]]:
    """Token ids of each templated prompt, refusing (one line, naming the prompt) any that does not fit in the
    model's ``context`` (tokens), before anything is generated; absurdly long texts are refused untokenised."""
    encoded = []
    for prompt in prompts:
        chars = sum(len(m["content"]) for m in prompt.messages)
        if context is not None and chars > MAX_CHARS_PER_TOKEN * context:
            raise PipelineError(f"prompt {prompt.id} has {chars} characters, far more than the model's context")
        encoded.append(encode_prompt(tokenizer, prompt.messages))
        if context is not None and len(encoded[-1]) >= context:
            raise PipelineError(
                f"prompt {prompt.id} has {len(encoded[-1])} tokens; the model's context is {context} "
                "(max_position_embeddings): shorten or drop it"
            )
    return encoded


@dataclass(frozen=True)
class Encoded:
    """A prompt+response sequence: ``input_ids`` (list of int), the first ``prompt_length`` are the prompt."""

    input_ids: list[int]
    prompt_length: int
    truncated: bool


def encode_sequence(
    tokenizer: Any,
    messages: Sequence[Message],
    response: str,
    *,
    complete: bool,
    max_length: int,
    max_prompt_length: int,
) -> Encoded:
    """Tokenise prompt + response for training.

    A ``complete`` response (generation stopped at end-of-turn) is followed by the template's closing tokens;
    a response cut by max_new_tokens is not (it never ended). Prompts longer than ``max_prompt_length`` keep
    their last tokens; a response that does not fit in ``max_length`` is cut and marked ``truncated``, as is an
    incomplete one.
    """
    if max_prompt_length >= max_length:
        raise PipelineError(f"max_prompt_length ({max_prompt_length}) must be < max_length ({max_length})")
    prompt = prompt_text(tokenizer, messages)
    if complete:
        full = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": response}], tokenize=False)
        if not full.startswith(prompt):
            raise PipelineError(
                "the chat template renders the prompt differently with and without the reply; "
                "cannot locate the response tokens"
            )
        response_ids = encode_text(tokenizer, full[len(prompt) :])
    else:
        response_ids = encode_text(tokenizer, response)
    prompt_ids = encode_text(tokenizer, prompt)[-max_prompt_length:]
    room = max_length - len(prompt_ids)
    truncated = not complete or len(response_ids) > room
    return Encoded(prompt_ids + response_ids[:room], len(prompt_ids), truncated)
