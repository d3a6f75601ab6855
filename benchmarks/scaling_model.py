"""A throughput model on paper of one SPPO iteration (no measurement): the work of each stage of the model card's
setup, the rates it assumes, and the time in three layouts. ``python benchmarks/scaling_model.py`` prints the
tables of docs/scaling.md; every assumption is a named constant below, with its source there.

Layouts: "one device" (generation, ranking and reference log-probs on one GPU, training on all: sppo-train before
data-parallel stages), "ours" (every stage on every GPU), "reference" (uclaml/SPPO's scripts: one vLLM engine and
one PairRM worker per GPU, PairRM at batch size 1, reference log-probs recomputed inside training, one node).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

# The model card's iteration: Gemma-2-9B-It, ~20k UltraFeedback prompts, K = 5 responses, a chosen/rejected pair.
PARAMS = 9.24e9  # Gemma-2-9B parameters (embedding included)
PROMPTS = 20_000
K = 5
PROMPT_TOKENS = 150  # mean templated prompt length (assumption)
RESPONSE_TOKENS = 500  # mean sampled response length (assumption; max_tokens 2048)
TRAINED_PER_PROMPT = 2  # chosen and rejected
# Rates per H100-80GB SXM (assumptions; sources in docs/scaling.md)
PEAK_BF16 = 989e12  # dense bf16 FLOP/s, datasheet
DECODE_TOKENS_PER_S = 5_000  # vLLM output tokens/s for a 9B model at high concurrency
PAIRRM_PARAMS = 0.435e9  # DeBERTa-v3-large backbone of PairRM
PAIRRM_TOKENS = 384  # source 128 + two candidates of 128 tokens (PairRM's maximum lengths)
PAIRRM_FLOPS = 50e12  # PairRM in float32 (llm-blender's default), batched: effective FLOP/s
PAIRRM_BATCH1_S = 0.010  # one pair forward at batch size 1 (latency-bound), seconds
FORWARD_MFU = 0.45  # reference log-probs: forward only, long sequences
TRAIN_MFU = 0.40  # ZeRO-3 with activation checkpointing (8 × params × tokens FLOPs)
REFERENCE_MAX_GPUS = 8  # uclaml/SPPO's scripts assume one node of 8 GPUs (its issues #13, #24)


@dataclass(frozen=True)
class Work:
    """What one iteration does, per stage."""

    generated_tokens: float
    judged_pairs: float
    scored_tokens: float
    trained_tokens: float


def iteration_work() -> Work:
    sequences = PROMPTS * TRAINED_PER_PROMPT * (PROMPT_TOKENS + RESPONSE_TOKENS)
    return Work(PROMPTS * K * RESPONSE_TOKENS, PROMPTS * K * (K - 1), sequences, sequences)


def stage_seconds(work: Work, gpus: int, layout: str) -> dict[str, float]:
    """Wall seconds of each stage on ``gpus`` GPUs in ``layout`` ("one device", "ours" or "reference"; the
    reference's scripts run on one node of at most 8 GPUs)."""
    if layout == "reference":
        gpus = min(gpus, REFERENCE_MAX_GPUS)
    spread = 1 if layout == "one device" else gpus
    generate = work.generated_tokens / (DECODE_TOKENS_PER_S * spread)
    pair_flops = 2 * PAIRRM_PARAMS * PAIRRM_TOKENS
    if layout == "reference":  # batch size 1: latency-bound
        rank = work.judged_pairs * PAIRRM_BATCH1_S / gpus
    else:
        rank = work.judged_pairs * pair_flops / (PAIRRM_FLOPS * spread)
    forward = 2 * PARAMS * work.scored_tokens / (PEAK_BF16 * FORWARD_MFU)
    train = 8 * PARAMS * work.trained_tokens / (PEAK_BF16 * TRAIN_MFU * gpus)
    if layout == "reference":  # π_t's forward inside every training step, on every GPU
        return {"generate": generate, "rank": rank, "reflogps": 0.0, "train": train + forward / gpus}
    return {"generate": generate, "rank": rank, "reflogps": forward / spread, "train": train}


def table(gpus: int) -> str:
    work = iteration_work()
    layouts = ("one device", "ours", "reference")
    times = {layout: stage_seconds(work, gpus, layout) for layout in layouts}
    lines = [f"| stage ({gpus} GPUs) | " + " | ".join(layouts) + " |", "|---" * (len(layouts) + 1) + "|"]
    for stage in ("generate", "rank", "reflogps", "train"):
        lines.append(f"| {stage} | " + " | ".join(f"{times[layout][stage] / 60:.1f} min" for layout in layouts) + " |")
    totals = (f"**{sum(times[layout].values()) / 60:.1f} min**" for layout in layouts)
    lines.append("| **iteration** | " + " | ".join(totals) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, nargs="+", default=[8, 32])
    args = parser.parse_args()
    work = iteration_work()
    print(
        f"work: {work.generated_tokens / 1e6:.0f}M tokens generated, {work.judged_pairs / 1e3:.0f}k pairs judged, "
        f"{work.scored_tokens / 1e6:.0f}M tokens scored, {work.trained_tokens / 1e6:.0f}M tokens trained\n"
    )
    for gpus in args.gpus:
        print(table(gpus), end="\n\n")


if __name__ == "__main__":
    main()
