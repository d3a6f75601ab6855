"""SPPO under DeepSpeed ZeRO-3 with the fused loss: the partitioned lm_head is gathered for the op and again in
the backward, so ``engine.backward`` gives the unpartitioned gradient.

    torchrun --nproc_per_node 2 examples/sppo_deepspeed_zero3.py    # 2 ranks (CPU: gloo; GPU: nccl)
    deepspeed examples/sppo_deepspeed_zero3.py --model ./my-model   # the DeepSpeed launcher works too
"""

from __future__ import annotations

import argparse

import deepspeed
import torch
import torch.distributed as dist

from sppo_kernels.integrations import hf
from sppo_kernels.pipeline.demo.tiny_models import model_and_tokenizer, pair_batch_from_rows, tiny_preference_rows


def main(argv: list[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="local HF model directory (default: a tiny random Gemma-2)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    args = parser.parse_args(argv)

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model, tokenizer = model_and_tokenizer(args.model, arch="gemma2")
    rows = tiny_preference_rows(2 * world)[2 * rank : 2 * rank + 2]  # this rank's shard: 2 pairs
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": torch.cuda.is_available()},
    }
    optimizer = torch.optim.RMSprop(model.parameters(), lr=1e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    batch = {k: v.to(engine.device) for k, v in pair_batch_from_rows(tokenizer, rows).items()}
    inputs = (batch["input_ids"], batch["attention_mask"], batch["labels"])

    ref_logps = hf.model_reference_logprobs(engine, *inputs)  # π_t, before the first update
    losses = []
    for step in range(args.steps):
        loss = hf.model_sppo_loss(engine, *inputs, batch["target_probs"], ref_logps=ref_logps, eta=1000.0)
        engine.backward(loss)  # outside any gathering context: the lm_head is re-gathered inside
        engine.step()
        losses.append(loss.item())
        if rank == 0:
            print(f"step {step}: rank-0 sppo loss {loss.item():.1f}", flush=True)
    return losses


if __name__ == "__main__":
    main()
