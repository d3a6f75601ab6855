"""``sppo-train demo``: a CPU-size replica of the SPPO paper's experiment, offline, in a few minutes.

The paper trains a policy for 3 iterations on disjoint prompt splits with PairRM as the judge, then measures the
win rate of each iteration against a fixed baseline with GPT-4 as the judge (AlpacaEval 2.0). Here:

- the prompts are a small synthetic world (:mod:`sppo_kernels.pipeline.demo.gold`): 48 topics × 16 instructions,
  split into held-out eval prompts and one disjoint split per iteration;
- GPT-4's role is played by a hidden **gold rule** (:func:`sppo_kernels.pipeline.demo.gold.gold_score`: friendly and
  relevant beats dismissive and rambling);
- PairRM's role is played by a tiny PairRM in llm-blender's format, loaded through the real llm-blender code and
  trained for a short time, with llm-blender's own pairwise loss, on pairs labelled by the gold rule: an
  imperfect proxy of the gold judge, as PairRM is of GPT-4;
- the policy is a tiny Llama (or Gemma-2) with a byte-level BPE tokenizer, warm-started by a quick supervised
  fit on responses of a fixed "base behaviour" (so that it answers in text, with every gold feature varying);
- ``sppo-train run`` trains it for 3 SPPO iterations with the proxy PairRM, and its ``evaluate`` stage and the
  gold judge then measure iterations 1–3 against the base policy.

Every asset is built from fixed seeds with deterministic tokenizer vocabularies, so two fresh demos on the same
machine write the same artefacts apart from timings; on another machine (another CPU instruction set, other
library builds) the numbers differ by a point or two. Third-party noise goes to ``<out>/demo.log``; the console
shows one line per stage and the model-card tables. See docs/evaluation.md for the settings and the results, as
measured on a named machine.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sppo_kernels.pipeline.core import schema
from sppo_kernels.pipeline.core.errors import PipelineError
from sppo_kernels.pipeline.core.store import atomic_path, write_jsonl
from sppo_kernels.pipeline.demo.assets import END_OF_TURN, build_pairrm, build_policy, gold_pairs, load_ranker_from
from sppo_kernels.pipeline.demo.gold import GoldJudge, base_response, world_prompts
from sppo_kernels.pipeline.evaluation.evaluate import EvalOptions, evaluate_run
from sppo_kernels.pipeline.evaluation.report import judge_table
from sppo_kernels.pipeline.models import chat
from sppo_kernels.pipeline.models.judge import RankOptions
from sppo_kernels.pipeline.models.sampling import GenerateOptions
from sppo_kernels.pipeline.run import run_pipeline
from sppo_kernels.pipeline.stages.reflogps import RefLogpsOptions
from sppo_kernels.pipeline.stages.train import TrainOptions
from sppo_kernels.pipeline.table import PipelineOptions, RunOptions

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


def warm_start(source: str | Path, folder: str | Path, prompts: Sequence[str], config: DemoConfig) -> dict[str, float]:
    """Supervised fit of the policy in ``source`` on fresh base-behaviour responses to ``prompts`` (AdamW, linear
    decay), saved to ``folder``: the demo's "instruction-tuned base model". Returns the first and last losses."""
    import torch
    from transformers import AutoModelForCausalLM

    from sppo_kernels.pipeline.models.policy import pad_batch

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


def base_policy(assets: Path, texts: Sequence[str], prompts: Sequence[str], config: DemoConfig, arch: str,
                say: Callable[[str], None]) -> Path:  # fmt: skip
    """The demo's base policy in ``assets`` (built and warm-started once)."""
    policy = assets / f"policy-{arch}"
    if policy.is_dir():
        return policy
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
    fit = warm_start(random_policy, policy, prompts, config)
    shutil.rmtree(random_policy)
    say(
        f"[demo] base policy: tiny {arch} (hidden {config.policy_hidden_size}), warm-started on the base "
        f"behaviour, loss {fit['first_loss']:.2f} -> {fit['last_loss']:.2f}, {time.perf_counter() - started:.0f}s"
    )
    return policy


def proxy_pairrm(assets: Path, texts: Sequence[str], prompts: Sequence[str], config: DemoConfig,
                 say: Callable[[str], None]) -> Path:  # fmt: skip
    """The demo's proxy judge in ``assets`` (built and trained on gold-labelled pairs once)."""
    ranker = assets / "pairrm"
    if ranker.is_dir():
        return ranker
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
    fit = train_pairrm(random_ranker, ranker, prompts, config)
    shutil.rmtree(random_ranker)
    say(
        f"[demo] proxy PairRM: trained on {config.pairrm_steps * config.pairrm_batch_size} gold-labelled pairs, "
        f"agrees with the gold rule on {100 * fit['agreement']:.0f}% of held-out pairs, "
        f"{time.perf_counter() - started:.0f}s"
    )
    return ranker


def run_replica(
    out: str | Path, config: DemoConfig, *, arch: str = "llama", say: Callable[[str], None] = print
) -> list[dict[str, Any]]:
    """Build the assets (once), train ``config.iterations`` SPPO iterations with the proxy PairRM and evaluate
    every iteration against the base policy with the proxy and the gold judge; returns the eval.json rows."""
    import torch

    out = Path(out)
    train_prompts, eval_prompts = demo_splits(config)
    data = out / schema.DEMO_DATA
    prompts_file, eval_file = data / "train_prompts.jsonl", data / "eval_prompts.jsonl"
    write_jsonl(prompts_file, [{"prompt": p} for p in train_prompts])
    write_jsonl(eval_file, [{"prompt": p} for p in eval_prompts])
    texts = corpus(train_prompts + eval_prompts, config.seed)
    assets = out / schema.DEMO_ASSETS
    policy = base_policy(assets, texts, train_prompts, config, arch, say)
    ranker = proxy_pairrm(assets, texts, train_prompts, config, say)
    torch.manual_seed(config.seed)
    options = replica_options(config, ranker, eval_file)
    run_dir = out / schema.DEMO_RUN
    run_pipeline(str(policy), str(prompts_file), run_dir, options)
    return evaluate_run(run_dir, str(policy), options, scorer=GoldJudge())


def run_demo(out: str | Path, *, arch: str = "llama", iterations: int = 3, config: DemoConfig | None = None) -> Path:
    """``sppo-train demo``: the replica with the console story; returns the folder holding eval.json."""
    import torch

    from sppo_kernels.pipeline.demo.console import silence_third_party, story_console

    config = dataclasses.replace(config or DemoConfig(), iterations=iterations)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tensors this small run fastest on one thread
    log, run_dir = out / schema.DEMO_LOG, out / schema.DEMO_RUN
    try:
        with story_console(log) as console:

            def say(line: str) -> None:
                print(line, file=console, flush=True)

            say(
                f"=== sppo-train demo: SPPO on a CPU-size replica of the paper's experiment ({config.iterations} "
                f"iterations, tiny models, hidden gold judge, nothing downloaded); third-party output: {log}"
            )
            silence_third_party()
            rows = run_replica(out, config, arch=arch, say=say)
            for judge in ("pairrm", "gold"):
                say(f"\n{JUDGE_TITLES[judge]}")
                say("\n".join(judge_table(rows, judge)))
            say(f"\n=== demo finished in {time.perf_counter() - started:.0f}s")
            say(
                f"    results: {schema.EVAL_JSON.path(run_dir)} (tables: {run_dir / schema.EVAL_TABLE}, plot: "
                f"{run_dir / schema.EVAL_PLOT})"
            )
            say(f"    iterations: {run_dir}/iter<t>/ ({schema.MODEL_DIR}/ = the policy after iteration t)")
            say(f"    assets: {out / schema.DEMO_ASSETS}; third-party output: {log}")
    finally:
        torch.set_num_threads(threads)
    return run_dir
