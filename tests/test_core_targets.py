"""The reference trainer's `sppo` / `sppo_single` and TRL's `sppo_hard`, reproduced with per-sequence targets."""

from __future__ import annotations

import pytest
import torch

import sppo_kernels as sk
from sppo_kernels.reference import reference_sequence_logprobs

ETA = 1000.0


def two_pairs():
    """Two chosen/rejected pairs laid out [chosen_0, chosen_1, rejected_0, rejected_1] with fixed log-probs."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(4, 5, 6, generator=gen, dtype=torch.float64)
    weight = torch.randn(13, 6, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 13, (4, 5), generator=gen)
    labels[:, :2] = -100
    ref = torch.tensor([-9.0, -11.0, -10.0, -12.5], dtype=torch.float64)
    return hidden, weight, labels, ref


def test_sppo_hand_computed_on_two_pairs():
    hidden, weight, labels, ref = two_pairs()
    p_win, p_lose = torch.tensor([0.7, 0.9], dtype=torch.float64), torch.tensor([0.2, 0.4], dtype=torch.float64)
    targets = sk.pair_targets("sppo", p_win=p_win, p_lose=p_lose)
    loss = targets.loss_scale * sk.sppo_loss(hidden, weight, labels, ref, targets.target_probs.double(), eta=ETA)

    logps = reference_sequence_logprobs(hidden, weight, labels).tolist()
    r = [logps[i] - ref[i].item() for i in range(4)]
    # The reference trainer: ((r_w − η(P_win − ½))² + (r_l − η(P_lose − ½))²) / 2, mean over the two pairs.
    pair0 = ((r[0] - ETA * (0.7 - 0.5)) ** 2 + (r[2] - ETA * (0.2 - 0.5)) ** 2) / 2
    pair1 = ((r[1] - ETA * (0.9 - 0.5)) ** 2 + (r[3] - ETA * (0.4 - 0.5)) ** 2) / 2
    assert loss.item() == pytest.approx((pair0 + pair1) / 2, rel=1e-12)


def test_sppo_single_matches_formula():
    hidden, weight, labels, ref = two_pairs()
    p = torch.tensor([0.65, 0.55], dtype=torch.float64)
    targets = sk.pair_targets("sppo_single", p_chosen_beats_rejected=p)
    loss = targets.loss_scale * sk.sppo_loss(hidden, weight, labels, ref, targets.target_probs.double(), eta=ETA)
    r = reference_sequence_logprobs(hidden, weight, labels) - ref
    q = p.double() - 0.5
    want = (((r[:2] - ETA * q) ** 2 + (r[2:] + ETA * q) ** 2) / 2).mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-12)


def test_sppo_hard_matches_trl():
    hidden, weight, labels, ref = two_pairs()
    targets = sk.pair_targets("sppo_hard", num_pairs=2)
    loss = targets.loss_scale * sk.sppo_loss(hidden, weight, labels, ref, targets.target_probs.double(), eta=ETA)
    r = reference_sequence_logprobs(hidden, weight, labels) - ref
    beta = 1 / ETA
    want = ((r[:2] - 0.5 / beta) ** 2 + (r[2:] + 0.5 / beta) ** 2).mean()  # TRL: losses.mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-12)


def test_pair_targets_errors():
    with pytest.raises(ValueError, match="needs p_win and p_lose"):
        sk.pair_targets("sppo", p_win=torch.ones(2))
    with pytest.raises(ValueError, match="p_chosen_beats_rejected"):
        sk.pair_targets("sppo_single")
    with pytest.raises(ValueError, match="num_pairs"):
        sk.pair_targets("sppo_hard")
    with pytest.raises(ValueError, match="loss_type must be one of"):
        sk.pair_targets("dpo")
