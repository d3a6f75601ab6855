"""Fixtures of the integration tests: tiny offline models and batches."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from sppo_kernels.pipeline.demo.tiny_models import tiny_causal_lm, tiny_pair_batch


@pytest.fixture(params=["llama", "gemma2"])
def arch(request: pytest.FixtureRequest) -> str:
    """Llama (plain head) and Gemma-2 (soft-cap 30, tied embeddings)."""
    return request.param


@pytest.fixture
def model(arch: str) -> torch.nn.Module:
    """A fresh tiny float32 model of ``arch`` in train mode (dropout is 0 in these configs)."""
    return tiny_causal_lm(arch, seed=3)


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    """Two chosen/rejected pairs, right-padded, prompts masked with -100."""
    return tiny_pair_batch(2, seed=5)
