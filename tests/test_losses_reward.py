"""The reward-model loss (paper eq. 1) against hand-computed values and TRL's RewardTrainer formulas."""

import math

import pytest
import torch

from fg_megatron.losses import LossArgumentError, reward_loss


def _trl_loss(rc, rr, margin=None, center=0.0):
    """TRL RewardTrainer.compute_loss: one batch, mean over pairs plus the centering term."""
    logits = rc - rr if margin is None else rc - rr - margin
    loss = -torch.nn.functional.logsigmoid(logits).mean()
    if center:
        loss = loss + center * torch.mean((rc + rr) ** 2)
    return loss


def test_hand_computed_pairs():
    rc = torch.tensor([1.0, 0.0, -2.0])
    rr = torch.tensor([0.0, 0.0, 1.0])
    out = reward_loss(rc, rr)
    expected = [math.log(1 + math.exp(-1.0)), math.log(2.0), math.log(1 + math.exp(3.0))]
    assert torch.allclose(out.losses, torch.tensor(expected), atol=1e-7)
    sums = out.metric_sums
    assert sums["samples"] == 3 and sums["accuracy"] == 1.0  # ties are not correct
    assert abs(float(sums["margin"]) - (1.0 + 0.0 - 3.0)) < 1e-7
    assert float(sums["reward_chosen"]) == -1.0 and float(sums["reward_rejected"]) == 1.0


def test_zero_rewards_give_ln2():
    z = torch.zeros(5)
    assert torch.allclose(reward_loss(z, z).losses, torch.full((5,), math.log(2.0)))


@pytest.mark.parametrize("margin,center", [(None, 0.0), ([0.5, -1.0, 2.0, 0.0], 0.0), (None, 0.01),
                                           ([1.0, 1.0, 0.0, 0.5], 0.3)])
def test_matches_trl_and_autograd(margin, center):
    g = torch.Generator().manual_seed(0)
    rc = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    rr = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    m = None if margin is None else torch.tensor(margin, dtype=torch.float64)
    ours = reward_loss(rc, rr, m, center_coefficient=center).losses.mean()
    ref = _trl_loss(rc, rr, m, center)
    assert abs(float(ours) - float(ref)) < 1e-12
    g1 = torch.autograd.grad(ours, (rc, rr))
    g2 = torch.autograd.grad(ref, (rc, rr))
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, atol=1e-12)


def test_sums_add_up_over_splits():
    g = torch.Generator().manual_seed(1)
    rc, rr = torch.randn(8, generator=g), torch.randn(8, generator=g)
    whole = reward_loss(rc, rr, center_coefficient=0.1)
    parts = [reward_loss(rc[i:i + 3], rr[i:i + 3], center_coefficient=0.1) for i in (0, 3, 6)]
    for key, value in whole.metric_sums.items():
        assert abs(float(value) - sum(float(p.metric_sums[key]) for p in parts)) < 1e-5, key


def test_bad_arguments():
    with pytest.raises(LossArgumentError, match="per-sample"):
        reward_loss(torch.zeros(3), torch.zeros(2))
    with pytest.raises(LossArgumentError, match="margins"):
        reward_loss(torch.zeros(3), torch.zeros(3), torch.zeros(2))
    with pytest.raises(LossArgumentError, match="center_coefficient"):
        reward_loss(torch.zeros(3), torch.zeros(3), center_coefficient=-1.0)
