"""Bad input gets a clear error naming the argument, at the public boundary."""

from __future__ import annotations

import pytest
import torch

import sppo_kernels as sk

B, T, H, V = 2, 6, 8, 11


@pytest.fixture
def good():
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, V, (B, T), generator=gen)
    labels[:, :2] = -100
    return {
        "hidden": torch.randn(B, T, H, generator=gen),
        "weight": torch.randn(V, H, generator=gen),
        "labels": labels,
        "ref_logps": torch.full((B,), -10.0),
        "target_probs": torch.tensor([0.3, 0.8]),
    }


def call(args: dict, **options):
    return sk.sppo_loss(
        args["hidden"], args["weight"], args["labels"], args["ref_logps"], args["target_probs"],
        backend=options.pop("backend", "chunked"), **options,
    )  # fmt: skip


CASES = [
    ("hidden", torch.randint(0, 3, (B, T, H)), TypeError, "hidden must be a floating-point"),
    ("hidden", torch.randn(B, T, H + 1), ValueError, "hidden size"),
    ("hidden", torch.randn(B * T, H), ValueError, "padded"),
    ("weight", torch.randn(V, H, dtype=torch.float64), TypeError, "weight dtype"),
    ("weight", torch.randn(V * H), ValueError, "weight must be"),
    ("labels", torch.zeros(B, T + 1, dtype=torch.long), ValueError, "labels must be"),
    ("labels", torch.zeros(B, T), TypeError, "labels must be int64"),
    ("labels", torch.full((B, T), V), ValueError, r"labels must lie in \[0, 11\)"),
    ("labels", torch.full((B, T), -5), ValueError, "ignore_index=-100; found -5"),
    ("ref_logps", torch.zeros(B + 1), ValueError, "ref_logps must be"),
    ("ref_logps", torch.tensor([0.0, float("nan")]), ValueError, "ref_logps must be finite"),
    ("target_probs", torch.tensor([0.5, 1.5]), ValueError, "target_probs must lie in"),
    ("target_probs", torch.tensor([0.5, float("nan")]), ValueError, "target_probs must lie in"),
    ("target_probs", torch.tensor([0, 1]), TypeError, "target_probs must be a floating-point"),
    ("hidden", torch.randn(0, T, H), ValueError, "empty batch"),
]


@pytest.mark.parametrize(("name", "value", "error", "match"), CASES, ids=[c[3] for c in CASES])
def test_bad_tensor(good, name, value, error, match):
    if name == "hidden" and value.shape[0] == 0:
        good["labels"] = good["labels"][:0]
    with pytest.raises(error, match=match):
        call(good | {name: value})


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"eta": 0.0}, "eta must be finite and > 0"),
        ({"eta": -1.0}, "eta"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"softcap": -30.0}, "softcap"),
        ({"reduction": "avg"}, "reduction must be one of"),
        ({"backend": "cuda"}, "backend must be one of"),
        ({"bias": torch.randn(V + 1)}, "bias must be"),
        ({"bias": torch.randn(V, dtype=torch.float16)}, "bias dtype"),
    ],
)
def test_bad_option(good, options, match):
    with pytest.raises(ValueError if "dtype" not in match else TypeError, match=match):
        call(good, **options)


def test_wrong_types(good):
    with pytest.raises(TypeError, match="temperature must be a real number"):
        call(good, temperature="1")
    with pytest.raises(TypeError, match=r"hidden must be a torch\.Tensor"):
        call(good | {"hidden": [[1.0]]})
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        call(good, ignore_index=None)


@pytest.mark.parametrize(
    ("cu_seqlens", "error", "match"),
    [
        (torch.tensor([0, 5, 11]), ValueError, "end at N = 12"),
        (torch.tensor([1, 5, 12]), ValueError, "start at 0"),
        (torch.tensor([0, 7, 5, 12]), ValueError, "non-decreasing"),
        (torch.tensor([12]), ValueError, r"cu_seqlens must be \[B\+1\]"),
        (torch.tensor([0.0, 12.0]), TypeError, "cu_seqlens must be int32 or int64"),
    ],
)
def test_malformed_cu_seqlens(good, cu_seqlens, error, match):
    hidden, labels = good["hidden"].reshape(B * T, H), good["labels"].reshape(B * T)
    with pytest.raises(error, match=match):
        sk.sequence_logprobs(hidden, good["weight"], labels, cu_seqlens=cu_seqlens)


def test_packed_labels_shape(good):
    with pytest.raises(ValueError, match=r"labels must be \[N\]"):
        sk.sequence_logprobs(good["hidden"].reshape(B * T, H), good["weight"], good["labels"],
                             cu_seqlens=torch.tensor([0, 12]))  # fmt: skip


def test_triton_needs_cuda_or_interpreter(good, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="Triton needs CUDA tensors, or TRITON_INTERPRET=1"):
        call(good, backend="triton")


def test_triton_rejects_float64(good):
    args = good | {"hidden": good["hidden"].double(), "weight": good["weight"].double()}
    with pytest.raises(TypeError, match="not float64"):
        call(args, backend="triton")


def test_value_checks_can_be_turned_off(good):
    sk.set_value_checks(False)
    try:
        loss = call(good | {"target_probs": torch.tensor([0.5, 1.5])})
    finally:
        sk.set_value_checks(True)
    assert torch.isfinite(loss)


def test_module_rejects_bad_options():
    with pytest.raises(ValueError, match="eta"):
        sk.SPPOLoss(eta=0)
    with pytest.raises(ValueError, match="backend"):
        sk.SPPOLoss(backend="gpu")
