"""SPPO with TRL: ``SPPODPOTrainer`` is ``trl.DPOTrainer`` with the ``sppo`` / ``sppo_single`` / ``sppo_hard``
losses on the fused op. The dataset carries the reference SPPO columns (``chosen_probs_win``,
``chosen_probs_lose``, ``chosen_probs``); eta = 1 / beta.

    python examples/sppo_trl.py [--model ./my-model] [--loss-type sppo] [--lora] [--steps 4]
"""

from __future__ import annotations

import argparse
import tempfile

from datasets import Dataset
from trl import DPOConfig

from sppo_kernels.integrations.trl import SPPODPOTrainer
from sppo_kernels.pipeline.demo.tiny_models import model_and_tokenizer, tiny_preference_rows


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="local HF model directory (default: a tiny random Gemma-2)")
    parser.add_argument("--loss-type", default="sppo", choices=["sppo", "sppo_single", "sppo_hard"])
    parser.add_argument("--lora", action="store_true", help="train a LoRA adapter (reference = adapters off)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", default=None, help="output directory (default: a temporary one)")
    args = parser.parse_args(argv)

    model, tokenizer = model_and_tokenizer(args.model, arch="gemma2")
    peft_config = None
    if args.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=8, target_modules=["q_proj", "v_proj"])
    with tempfile.TemporaryDirectory() as scratch:
        config = DPOConfig(
            output_dir=args.out or scratch,
            loss_type=[args.loss_type],
            beta=0.001,  # eta = 1000, as in the SPPO paper
            precompute_ref_log_probs=True,  # π_t's log-probs once, with the fused op
            max_steps=args.steps,
            per_device_train_batch_size=2,
            learning_rate=1e-3,
            optim="rmsprop",
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            bf16=False,
        )
        trainer = SPPODPOTrainer(
            model=model,
            args=config,
            train_dataset=Dataset.from_list(tiny_preference_rows(8)),
            processing_class=tokenizer,
            peft_config=peft_config,
        )
        result = trainer.train()
    print(f"SPPODPOTrainer ({args.loss_type}): {result.global_step} steps, mean loss {result.training_loss:.1f}")
    return result.training_loss


if __name__ == "__main__":
    main()
