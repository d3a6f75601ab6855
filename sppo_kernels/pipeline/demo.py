"""``sppo-train demo``: a CPU-size replica of the SPPO paper's experiment, offline, in a few minutes.

The paper trains a policy for 3 iterations on disjoint prompt splits with PairRM as the judge, then measures the
win rate of each iteration against a fixed baseline with GPT-4 as the judge (AlpacaEval 2.0). Here:

- the prompts are a small synthetic world (:mod:`sppo_kernels.pipeline.gold`): 48 topics × 16 instructions,
  split into held-out eval prompts and one disjoint split per iteration;
- GPT-4's role is played by a hidden **gold rule** (:func:`sppo_kernels.pipeline.gold.gold_score`: friendly and
  relevant beats dismissive and rambling);
- PairRM's role is played by a tiny PairRM in llm-blender's format, loaded through the real llm-blender code and
  trained for a short time, with llm-blender's own pairwise loss, on pairs labelled by the gold rule: an
  imperfect proxy of the gold judge, as PairRM is of GPT-4;
- the policy is a tiny Llama (or Gemma-2) with a byte-level BPE tokenizer, warm-started by a quick supervised
  fit on responses of a fixed "base behaviour" (so that it answers in text, with every gold feature varying);
- ``sppo-train run`` trains it for 3 SPPO iterations with the proxy PairRM, and its ``evaluate`` stage and the
  gold judge then measure iterations 1–3 against the base policy.

Every asset is built from fixed seeds with deterministic tokenizer vocabularies, so two fresh demos write the
same artefacts apart from timings. Third-party noise goes to ``<out>/demo.log``; the console shows one line per
stage and the model-card tables. See docs/evaluation.md for the settings and measured results.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sppo_kernels.pipeline import chat
from sppo_kernels.pipeline.errors import PipelineError
from sppo_kernels.pipeline.evaluate import EVAL_JSON, PLOT, TABLE, EvalOptions, evaluate, run_policies
from sppo_kernels.pipeline.generate import GenerateOptions
from sppo_kernels.pipeline.gold import GoldJudge, base_response, gold_score, world_prompts
from sppo_kernels.pipeline.rank import RankOptions, apply_transformers5_shims
from sppo_kernels.pipeline.reflogps import RefLogpsOptions
from sppo_kernels.pipeline.run import PipelineOptions, RunOptions, run_pipeline
from sppo_kernels.pipeline.store import atomic_path, write_jsonl
from sppo_kernels.pipeline.train import TrainOptions

END_OF_TURN = "<|end|>"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}" + END_OF_TURN + "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
PAIRRM_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# llm-blender's PairRM collator adds these; having them in the vocabulary avoids an embedding resize at load.
PAIRRM_PREFIXES = ["<|source|>", "<|candidate1|>", "<|candidate2|>", "<|candidate|>"]
JUDGE_TITLES = {
    "pairrm": "proxy judge: the tiny PairRM that guided training",
    "gold": "gold judge: the hidden rule (AlpacaEval's GPT-4 role)",
}


@dataclass(frozen=True)
class DemoConfig:
    """Sizes and settings of the replica (defaults: ``sppo-train demo``; the tests use a smaller one)."""

    seed: int = 0
    iterations: int = 3
    prompts_per_iteration: int = 128
    eval_prompts: int = 256
    # the policy: a tiny causal LM, warm-started on the base behaviour
    policy_hidden_size: int = 64
    policy_layers: int = 2
    policy_vocab_size: int = 640
    warmstart_steps: int = 300
    warmstart_batch_size: int = 32
    warmstart_learning_rate: float = 3e-3
    # the proxy judge: a tiny PairRM trained on gold-labelled pairs of base-behaviour responses
    pairrm_hidden_size: int = 32
    pairrm_layers: int = 2
    pairrm_steps: int = 300
    pairrm_batch_size: int = 32
    pairrm_learning_rate: float = 3e-3
    # SPPO (the reference pipeline; K = 5 and the loss, targets and schedule are the paper's)
    num_responses: int = 5
    max_new_tokens: int = 32
    learning_rate: float = 7e-5
    eta: float = 10.0
    global_batch_size: int = 16
    train: dict[str, Any] = field(default_factory=dict)  # further TrainOptions overrides


# --------------------------------------------------------------------------------------------- the world


def demo_splits(config: DemoConfig) -> tuple[list[str], list[str]]:
    """(training prompts: ``iterations`` consecutive disjoint splits, eval prompts), from a seeded shuffle."""
    prompts = world_prompts()
    order = np.random.default_rng([config.seed, 0]).permutation(len(prompts))
    needed = config.eval_prompts + config.iterations * config.prompts_per_iteration
    if needed > len(prompts):
        raise PipelineError(
            f"the demo world has {len(prompts)} prompts; {config.iterations} iterations of "
            f"{config.prompts_per_iteration} and {config.eval_prompts} eval prompts need {needed}"
        )
    shuffled = [prompts[i] for i in order]
    return shuffled[config.eval_prompts : needed], shuffled[: config.eval_prompts]


def corpus(prompts: Sequence[str], seed: int, per_prompt: int = 4) -> list[str]:
    """Tokenizer training texts: the prompts and ``per_prompt`` base-behaviour responses to each."""
    rng = np.random.default_rng([seed, 2])
    return [*prompts, *(base_response(rng, p) for p in prompts for _ in range(per_prompt))]


# --------------------------------------------------------------------------------------------- the policy


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
    from sppo_kernels.tiny_models import tiny_causal_lm

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


def warm_start(source: str | Path, folder: str | Path, prompts: Sequence[str], config: DemoConfig) -> dict[str, float]:
    """Supervised fit of the policy in ``source`` on fresh base-behaviour responses to ``prompts`` (AdamW, linear
    decay), saved to ``folder``: the demo's "instruction-tuned base model". Returns the first and last losses."""
    import torch
    from transformers import AutoModelForCausalLM

    from sppo_kernels.pipeline.modeling import pad_batch

    tokenizer = chat.load_tokenizer(str(source))
    torch.manual_seed(config.seed)
    model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.warmstart_learning_rate, weight_decay=0.0)
    steps = config.warmstart_steps
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - 0.9 * s / max(1, steps))
    rng = np.random.default_rng([config.seed, 3])
    prompt_ids = {p: chat.encode_prompt(tokenizer, [{"role": "user", "content": p}]) for p in prompts}
    losses = []
    for _ in range(steps):
        rows = []
        for index in rng.integers(0, len(prompts), size=config.warmstart_batch_size):
            prompt = prompts[index]
            response = chat.encode_text(tokenizer, base_response(rng, prompt) + END_OF_TURN)
            rows.append({"input_ids": prompt_ids[prompt] + response, "prompt_length": len(prompt_ids[prompt])})
        input_ids, mask, labels = pad_batch(rows, tokenizer.pad_token_id, torch.device("cpu"))
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    folder = Path(folder)
    with atomic_path(folder) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return {"first_loss": losses[0], "last_loss": float(np.mean(losses[-10:]))}


# --------------------------------------------------------------------------------------------- the proxy PairRM


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
    from sppo_kernels.pipeline.quiet import silence_third_party

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


def train_pairrm(
    source: str | Path, folder: str | Path, prompts: Sequence[str], config: DemoConfig
) -> dict[str, float]:
    """Train the PairRM in ``source`` on gold-labelled pairs with llm-blender's own pairwise loss (its config's
    ``instructgpt`` loss through ``CrossCompareReranker._forward``), AdamW; save it to ``folder``. Returns the
    first/last losses and the agreement with the gold rule on 512 held-out pairs (both orders, as in ranking)."""
    import safetensors.torch
    import torch

    source, folder = Path(source), Path(folder)
    ranker, collator = load_ranker_from(source)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng([config.seed, 4])
    train_pairs = gold_pairs(prompts, config.pairrm_steps * config.pairrm_batch_size, rng)
    heldout = gold_pairs(prompts, 512, rng)
    optimizer = torch.optim.AdamW(ranker.parameters(), lr=config.pairrm_learning_rate, weight_decay=0.0)

    def forward(batch_pairs: Sequence[tuple[str, str, str, int, int]], with_scores: bool) -> dict[str, Any]:
        items = [
            {"source": x, "candidates": [a, b], **({"scores": [[float(sa)], [float(sb)]]} if with_scores else {})}
            for x, a, b, sa, sb in batch_pairs
        ]
        batch = collator(items)
        ids, mask = batch["candidate_ids"], batch["candidate_attention_mask"]
        scores = batch["scores"]
        return ranker._forward(
            batch["source_ids"],
            batch["source_attention_mask"],
            ids[:, 0],
            mask[:, 0],
            ids[:, 1],
            mask[:, 1],
            None if scores is None else scores[:, 0],
            None if scores is None else scores[:, 1],
        )

    ranker.train()
    losses = []
    for step in range(config.pairrm_steps):
        batch = train_pairs[step * config.pairrm_batch_size : (step + 1) * config.pairrm_batch_size]
        loss = forward(batch, True)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    ranker.eval()
    with torch.no_grad():
        ab = torch.cat([forward(heldout[i : i + 128], False)["logits"] for i in range(0, len(heldout), 128)])
        swapped = [(x, b, a, sb, sa) for x, a, b, sa, sb in heldout]
        ba = torch.cat([forward(swapped[i : i + 128], False)["logits"] for i in range(0, len(swapped), 128)])
    gold = np.sign([sa - sb for _, _, _, sa, sb in heldout])
    agreement = float(np.mean(np.sign((ab - ba).numpy()) == gold))
    with atomic_path(folder) as tmp:
        shutil.copytree(source, tmp)
        safetensors.torch.save_model(ranker, str(tmp / "model.safetensors"))
    return {"first_loss": losses[0], "last_loss": float(np.mean(losses[-10:])), "agreement": agreement}


# --------------------------------------------------------------------------------------------- the replica


def replica_options(config: DemoConfig, ranker: str | Path, eval_prompts: str | Path) -> PipelineOptions:
    """The pipeline settings of the replica (see docs/evaluation.md for the choices)."""
    per_iteration = config.prompts_per_iteration
    train = {
        "learning_rate": config.learning_rate,
        "eta": config.eta,
        "global_batch_size": config.global_batch_size,
        "micro_batch_size": config.global_batch_size,
        "gradient_checkpointing": False,
        "save_steps": 10**6,
        **config.train,
    }
    return PipelineOptions(
        run=RunOptions(iterations=config.iterations),
        generate=GenerateOptions(
            num_responses=config.num_responses,
            max_new_tokens=config.max_new_tokens,
            generation_batch_size=64,
            generation_shard_size=per_iteration,
            generation_seed=config.seed,
        ),
        rank=RankOptions(ranker=str(ranker), rank_batch_size=32, rank_shard_size=per_iteration),
        reflogps=RefLogpsOptions(max_length=96, max_prompt_length=32, reflogps_batch_size=64),
        train=TrainOptions(**train),
        evaluate=EvalOptions(eval_prompts=str(eval_prompts), eval_seed=config.seed, eval_shard_size=128),
    )


def run_replica(
    out: str | Path, config: DemoConfig, *, arch: str = "llama", say: Callable[[str], None] = print
) -> list[dict[str, Any]]:
    """Build the assets (once), train ``config.iterations`` SPPO iterations with the proxy PairRM and evaluate
    every iteration against the base policy with the proxy and the gold judge; returns the eval.json rows."""
    import torch

    out = Path(out)
    train_prompts, eval_prompts = demo_splits(config)
    data = out / "data"
    prompts_file, eval_file = data / "train_prompts.jsonl", data / "eval_prompts.jsonl"
    write_jsonl(prompts_file, [{"prompt": p} for p in train_prompts])
    write_jsonl(eval_file, [{"prompt": p} for p in eval_prompts])
    texts = corpus(train_prompts + eval_prompts, config.seed)
    assets = out / "assets"
    policy, ranker = assets / f"policy-{arch}", assets / "pairrm"
    if not policy.is_dir():
        started = time.perf_counter()
        random_policy = build_policy(
            assets / f"random-policy-{arch}",
            texts,
            arch=arch,
            seed=config.seed,
            vocab_size=config.policy_vocab_size,
            hidden_size=config.policy_hidden_size,
            intermediate_size=2 * config.policy_hidden_size,
            num_hidden_layers=config.policy_layers,
        )
        fit = warm_start(random_policy, policy, train_prompts, config)
        shutil.rmtree(random_policy)
        say(
            f"[demo] base policy: tiny {arch} (hidden {config.policy_hidden_size}), warm-started on the base "
            f"behaviour, loss {fit['first_loss']:.2f} -> {fit['last_loss']:.2f}, {time.perf_counter() - started:.0f}s"
        )
    if not ranker.is_dir():
        started = time.perf_counter()
        random_ranker = build_pairrm(
            assets / "random-pairrm",
            texts,
            seed=config.seed,
            hidden_size=config.pairrm_hidden_size,
            layers=config.pairrm_layers,
            source_max_length=32,
            candidate_max_length=48,
        )
        fit = train_pairrm(random_ranker, ranker, train_prompts, config)
        shutil.rmtree(random_ranker)
        say(
            f"[demo] proxy PairRM: trained on {config.pairrm_steps * config.pairrm_batch_size} gold-labelled pairs, "
            f"agrees with the gold rule on {100 * fit['agreement']:.0f}% of held-out pairs, "
            f"{time.perf_counter() - started:.0f}s"
        )
    torch.manual_seed(config.seed)
    options = replica_options(config, ranker, eval_file)
    run_dir = out / "run"
    run_pipeline(str(policy), str(prompts_file), run_dir, options)
    return evaluate(
        run_policies(str(policy), run_dir, config.iterations),
        str(eval_file),
        run_dir,
        options.evaluate,
        options.generate,
        options.model,
        options.rank,
        options.prompts,
        judges={"gold": GoldJudge()},
    )


def judge_tables(markdown: str) -> dict[str, list[str]]:
    """The table lines of each judge in an eval.md file."""
    tables: dict[str, list[str]] = {}
    judge = None
    for line in markdown.splitlines():
        if line.startswith("judge: "):
            judge = line[len("judge: ") :].split(",")[0]
            tables[judge] = []
        elif line.startswith("|") and judge is not None:
            tables[judge].append(line)
    return tables


def run_demo(out: str | Path, *, arch: str = "llama", iterations: int = 3, config: DemoConfig | None = None) -> Path:
    """``sppo-train demo``: the replica with the console story; returns the folder holding eval.json."""
    import dataclasses

    import torch

    from sppo_kernels.pipeline.quiet import silence_third_party, story_console

    config = dataclasses.replace(config or DemoConfig(), iterations=iterations)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tensors this small run fastest on one thread
    try:
        with story_console(out / "demo.log") as console:

            def say(line: str) -> None:
                print(line, file=console, flush=True)

            say(
                f"=== sppo-train demo: SPPO on a CPU-size replica of the paper's experiment ({config.iterations} "
                "iterations, tiny models, hidden gold judge, nothing downloaded); third-party output: "
                f"{out / 'demo.log'}"
            )
            silence_third_party()
            run_replica(out, config, arch=arch, say=say)
            run_dir = out / "run"
            tables = judge_tables((run_dir / TABLE).read_text(encoding="utf-8"))
            for judge in ("pairrm", "gold"):
                say(f"\n{JUDGE_TITLES[judge]}")
                say("\n".join(tables[judge]))
            say(f"\n=== demo finished in {time.perf_counter() - started:.0f}s")
            say(f"    results: {run_dir / EVAL_JSON} (tables: {run_dir / TABLE}, plot: {run_dir / PLOT})")
            say(f"    iterations: {run_dir}/iter<t>/ (model/ = the policy after iteration t)")
            say(f"    assets: {out / 'assets'}; third-party output: {out / 'demo.log'}")
    finally:
        torch.set_num_threads(threads)
    return run_dir
