"""Wall time of each ``sppo-train`` stage with 1 and with N processes (``torchrun``, CPU: gloo, one thread per
process) on the demo's models and settings, and whether the artefacts are the same bytes.

    sppo-train demo --out /tmp/demo                   # builds the tiny policy and PairRM (and runs the demo)
    python benchmarks/stage_scaling.py --demo /tmp/demo --out /tmp/scaling

It runs one iteration (the base policy, the demo's settings, its first ``--prompts`` training prompts: 384, three
demo iterations' worth, by default) stage by stage, then an evaluation of
the base policy and the demo's iteration-1 policy, once per process count, in the same run. Training is not
expected to give the same bytes (ZeRO partitions its reductions by process count); the other artefacts are.
Times include starting the processes (Python, torch and the model load: a few seconds per stage; ``targets``
runs in one process both times and shows that cost).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

from sppo_kernels.pipeline.core import schema
from sppo_kernels.pipeline.core.options import to_argv
from sppo_kernels.pipeline.core.prompts import PromptOptions
from sppo_kernels.pipeline.core.store import stage_summary
from sppo_kernels.pipeline.demo.replica import DemoConfig, replica_options
from sppo_kernels.pipeline.table import STAGES

REPO = Path(__file__).resolve().parents[1]


def launch(processes: int, argv: list[str]) -> float:
    """Seconds that ``torchrun --nproc_per_node <processes> sppo-train ARGV`` takes; fails loudly."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    result = subprocess.run([*command, "-m", "sppo_kernels.pipeline.cli", *argv], env=env, capture_output=True,
                            text=True, check=False)  # fmt: skip
    if result.returncode != 0:
        raise SystemExit(f"failed: {' '.join(argv[:1])}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return time.perf_counter() - started


def replay(demo: Path, out: Path, processes: int, most: int, prompts: int) -> dict[str, tuple[float, float]]:
    """One iteration on the first ``prompts`` of the demo's training prompts and an evaluation in ``out`` with
    ``processes`` processes per stage (training micro-batches sized for ``most`` processes in every replay).
    Returns, per stage, (wall seconds of the command, seconds of the stage itself from its marker: the work after
    Python, torch and the launcher have started)."""
    run = demo / schema.DEMO_RUN
    eval_prompts = demo / schema.DEMO_DATA / "eval_prompts.jsonl"
    config = DemoConfig()
    micro = {"micro_batch_size": config.global_batch_size // most}
    options = replica_options(dataclasses.replace(config, train=micro), demo / schema.DEMO_ASSETS / "pairrm",
                              eval_prompts)  # fmt: skip
    reflogps = dataclasses.replace(options.reflogps, reflogps_shard_size=128)  # several units, as the other stages
    options = dataclasses.replace(options, prompts=PromptOptions(max_prompts=prompts), reflogps=reflogps)
    policy = str(demo / schema.DEMO_ASSETS / "policy-llama")
    folder = schema.iteration_dir(out, 1)
    seconds = {}
    for spec in STAGES:
        inputs = {i.name: policy if i.artefact is None else str(i.artefact.path(folder)) for i in spec.inputs}
        if spec.name == schema.GENERATE_STAGE:
            inputs["prompts"] = str(demo / schema.DEMO_DATA / "train_prompts.jsonl")
        wall = launch(1 if spec.name == schema.TARGETS_STAGE else processes, spec.argv(inputs, folder, options))
        seconds[spec.name] = wall, stage_summary(folder, spec.name)["seconds"]
    flags = [flag for group in ("generate", "rank", "evaluate") for flag in to_argv(getattr(options, group))]
    models = [policy, str(schema.iteration_dir(run, 1) / schema.MODEL_DIR)]  # the demo's: the same in every replay
    wall = launch(processes, ["eval", "--models", *models, "--out", str(out / "eval"), *flags])
    seconds["eval"] = wall, stage_summary(out / "eval" / schema.EVAL_DIR, f"{schema.EVALUATE_STAGE}-pairrm")["seconds"]
    return seconds


def same_bytes(a: Path, b: Path) -> list[str]:
    """The artefacts of two replays that differ."""
    folder = Path(schema.iteration_name(1))
    names = [folder / artefact.name for artefact in (schema.GENERATIONS, schema.RANKINGS, schema.TARGETS,
                                                     schema.TRAIN_DATA)]  # fmt: skip
    names.append(Path("eval") / schema.EVAL_JSON.name)
    return [str(n) for n in names if (a / n).read_bytes() != (b / n).read_bytes()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", type=Path, required=True, help="a folder written by `sppo-train demo --out`")
    parser.add_argument("--out", type=Path, required=True, help="an empty folder for the replays")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=384, help="training prompts of the iteration (demo: 128)")
    args = parser.parse_args()
    times = {
        n: replay(args.demo, args.out / f"{n}-processes", n, args.processes, args.prompts) for n in (1, args.processes)
    }
    n = args.processes
    print(f"| stage | wall, 1 process | wall, {n} | speed-up | stage, 1 process | stage, {n} | speed-up |")
    print("|---" * 7 + "|")
    for stage, (wall_one, own_one) in times[1].items():
        wall_many, own_many = times[n][stage]
        print(f"| {stage} | {wall_one:.1f} s | {wall_many:.1f} s | {wall_one / wall_many:.2f}x | {own_one:.2f} s | "
              f"{own_many:.2f} s | {own_one / own_many:.2f}x |")  # fmt: skip
    differ = same_bytes(args.out / "1-processes", args.out / f"{args.processes}-processes")
    print("artefacts: " + ("the same bytes" if not differ else f"DIFFER: {differ}"))


if __name__ == "__main__":
    main()
