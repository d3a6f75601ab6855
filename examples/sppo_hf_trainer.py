"""SPPO with a plain ``transformers.Trainer`` (no TRL): ``SPPOTrainer`` computes the fused loss.

Each dataset row is one sequence with its own win-rate target; the reference log-probs are precomputed into a
``ref_logps`` column, so no second model is held during training.

    python examples/sppo_hf_trainer.py [--model ./my-model] [--steps 4] [--out runs/hf-trainer]
"""

from __future__ import annotations

import argparse
import tempfile

from datasets import Dataset
from transformers import TrainingArguments

from sppo_kernels.integrations import hf
from sppo_kernels.integrations.trainer import SPPOTrainer
from sppo_kernels.pipeline.demo.tiny_models import model_and_tokenizer, pair_batch_from_rows, tiny_preference_rows


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="local HF model directory (default: a tiny random Llama)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", default=None, help="output directory (default: a temporary one)")
    args = parser.parse_args(argv)

    model, tokenizer = model_and_tokenizer(args.model)
    batch = pair_batch_from_rows(tokenizer, tiny_preference_rows(8))
    ref_logps = hf.model_reference_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    lengths = batch["attention_mask"].sum(1).tolist()
    rows = [
        {
            "input_ids": batch["input_ids"][i, :n].tolist(),
            "labels": batch["labels"][i, :n].tolist(),
            "target_probs": batch["target_probs"][i].item(),
            "ref_logps": ref_logps[i].item(),
        }
        for i, n in enumerate(lengths)
    ]
    with tempfile.TemporaryDirectory() as scratch:
        training_args = TrainingArguments(
            output_dir=args.out or scratch,
            max_steps=args.steps,
            per_device_train_batch_size=4,
            learning_rate=1e-3,
            optim="rmsprop",
            lr_scheduler_type="linear",
            warmup_steps=1,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
        )
        trainer = SPPOTrainer(model=model, args=training_args, train_dataset=Dataset.from_list(rows), eta=1000.0)
        result = trainer.train()
    print(f"SPPOTrainer: {result.global_step} steps, mean loss {result.training_loss:.1f}")
    return result.training_loss


if __name__ == "__main__":
    main()
