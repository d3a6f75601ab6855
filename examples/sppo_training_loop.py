"""SPPO in a hand-written PyTorch loop with the fused loss: no trainer, no logits.

python examples/sppo_training_loop.py                      # tiny random Llama, offline
python examples/sppo_training_loop.py --arch gemma2        # tiny Gemma-2 (soft-cap 30)
python examples/sppo_training_loop.py --model ./my-model   # a local HF model directory
"""

from __future__ import annotations

import argparse

import torch

from sppo_kernels.integrations import hf
from sppo_kernels.pipeline.demo.tiny_models import model_and_tokenizer, pair_batch_from_rows, tiny_preference_rows


def main(argv: list[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="local HF model directory (default: a tiny random model)")
    parser.add_argument("--arch", default="llama", choices=["llama", "gemma2", "qwen2", "mistral"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--eta", type=float, default=1000.0)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args(argv)

    model, tokenizer = model_and_tokenizer(args.model, args.arch)
    batch = pair_batch_from_rows(tokenizer, tiny_preference_rows(4))
    inputs = (batch["input_ids"], batch["attention_mask"], batch["labels"])

    # π_t's log-probs, once, before training (the reference SPPO recomputes them every step).
    ref_logps = hf.model_reference_logprobs(model, *inputs)
    optimizer = torch.optim.RMSprop(model.parameters(), lr=args.lr)
    losses = []
    for step in range(args.steps):
        loss = hf.model_sppo_loss(model, *inputs, batch["target_probs"], ref_logps=ref_logps, eta=args.eta)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        print(f"step {step}: sppo loss {loss.item():.1f}")
    return losses


if __name__ == "__main__":
    main()
