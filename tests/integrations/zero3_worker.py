"""One rank of the ZeRO-3 check (torchrun, 2 processes, gloo on CPU, through ``no_shm_launch.py``).

Each rank trains on its own batch. The partitioned run must give the loss and the gradient of every parameter
of the plain, unpartitioned model (materialised logits, gradients averaged over ranks) in every step: one step
per op backend with ``hf.model_sppo_loss`` and the backward outside every gathering context (as ``engine.backward`` or
a Trainer runs it) -- ``cpu`` forms the gradient in the forward, ``chunked`` re-reads the saved weight in the
backward, ``torch`` is plain autograd -- then one step with ``gathered_lm_head`` used by hand and the backward
inside it. After each backward no parameter may be left gathered. Prints ``ZERO3-OK <arch>``.
"""

from __future__ import annotations

import copy
import sys

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
from deepspeed.utils import safe_get_full_grad
from integration_helpers import assert_close_grads, grads, plain_sequence_logprobs, plain_sppo_loss

import sppo_kernels as sk
from sppo_kernels.integrations import hf
from sppo_kernels.integrations.zero3 import gathered_lm_head
from sppo_kernels.pipeline.demo.tiny_models import tiny_causal_lm, tiny_pair_batch

ETA, TEMPERATURE = 10.0, 0.8
BACKENDS = ("cpu", "chunked", "torch")
CONFIG = {
    "train_micro_batch_size_per_gpu": 4,
    "gradient_accumulation_steps": 1,
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "zero_allow_untested_optimizer": True,
}


def check(arch: str, rank: int, world: int) -> None:
    model = tiny_causal_lm(arch, seed=1)
    plain = copy.deepcopy(model)
    batch = tiny_pair_batch(2, seed=10 + rank)
    ref_logps = torch.randn(4, generator=torch.Generator().manual_seed(rank)) - 20.0
    inputs = (batch["input_ids"], batch["attention_mask"], batch["labels"])

    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=CONFIG)
    assert hf.lm_head_params(engine)[0].numel() == 0, "lm_head should be partitioned"

    plain_logps = plain_sequence_logprobs(plain, *inputs, temperature=TEMPERATURE)
    want_loss = plain_sppo_loss(plain_logps, ref_logps, batch["target_probs"], ETA)
    want_loss.backward()
    want = grads(plain)
    for g in want.values():
        dist.all_reduce(g)
        g /= world

    for backend in (*BACKENDS, "inside"):
        if backend != "inside":
            loss = hf.model_sppo_loss(
                engine,
                *inputs,
                batch["target_probs"],
                ref_logps=ref_logps,
                eta=ETA,
                temperature=TEMPERATURE,
                backend=backend,
            )
            engine.backward(loss)
        else:
            hidden = hf.final_hidden_states(engine, batch["input_ids"], batch["attention_mask"])
            with gathered_lm_head(engine) as (weight, bias):
                loss = sk.sppo_loss(
                    hidden,
                    weight,
                    batch["labels"],
                    ref_logps,
                    batch["target_probs"],
                    bias=bias,
                    eta=ETA,
                    softcap=hf.logit_softcap(engine),
                    temperature=TEMPERATURE,
                )
                engine.backward(loss)
        gathered = [n for n, p in engine.module.named_parameters() if p.ds_status != ZeroParamStatus.NOT_AVAILABLE]
        assert not gathered, f"{backend}: still gathered after backward: {gathered}"
        got = {n: safe_get_full_grad(p) for n, p in engine.module.named_parameters()}
        assert torch.allclose(loss.detach(), want_loss.detach(), rtol=1e-5), (backend, loss.item(), want_loss.item())
        assert_close_grads({n: g for n, g in got.items() if n in want}, want)
        engine.step()  # lr = 0: the weights stay, the gradients are cleared
    print(f"ZERO3-OK {arch} rank={rank} loss={loss.item():.3f}", flush=True)


def main() -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for arch in sys.argv[1:]:
        check(arch, rank, world)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
