"""A fake ``vllm`` for the tests (CPU machines cannot install vLLM): the API the pipeline uses (``LLM``,
``SamplingParams``, ``LLM.generate`` on token-id requests), answering deterministically from the request seed.

Every engine records what it was asked in ``ENGINES`` (in-process tests) and, when ``FAKE_VLLM_LOG`` names a
folder, in ``<folder>/engine-<pid>.json``: its constructor arguments, the ``CUDA_VISIBLE_DEVICES`` it started
with, its launcher rank and every ``generate`` call (number of requests, sampling parameters)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ENGINES: list[LLM] = []


class SamplingParams:
    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs


class LLM:
    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.devices = os.environ.get("CUDA_VISIBLE_DEVICES")
        self.rank = int(os.environ.get("RANK", "0"))
        self.calls: list[tuple[list[dict], dict]] = []
        ENGINES.append(self)

    def generate(self, requests: list[dict], params: SamplingParams, use_tqdm: bool = True) -> list[Any]:
        self.calls.append((requests, params.kwargs))
        self._log()
        seed = params.kwargs["seed"]
        return [
            SimpleNamespace(
                outputs=[
                    SimpleNamespace(
                        text=f"answer {seed % 1000} to {len(r['prompt_token_ids'])} tokens",
                        finish_reason="length" if i % 2 else "stop",
                        token_ids=list(range(3 + i)),
                    )
                ]
            )
            for i, r in enumerate(requests)
        ]

    def _log(self) -> None:
        folder = os.environ.get("FAKE_VLLM_LOG")
        if folder:
            record = {
                "kwargs": self.kwargs,
                "devices": self.devices,
                "rank": self.rank,
                "calls": [{"requests": len(r), "seed": p["seed"]} for r, p in self.calls],
            }
            (Path(folder) / f"engine-{os.getpid()}.json").write_text(json.dumps(record))
