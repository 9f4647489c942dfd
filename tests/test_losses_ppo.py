"""PPO pieces and the FlipGuard PPO gate against hand arithmetic and torch autograd.

CPU only, float64, no process group. Padded positions hold -inf / NaN / large
garbage on purpose: nothing outside the mask may leak into a result.
"""

from __future__ import annotations

import math

import pytest
import torch

from fg_megatron.losses import (LossArgumentError, constraint_ce, gae, kd_targets_ref, kl_per_token, masked_mean,
                                masked_moments, policy_loss, ppo_flip_gate, token_rewards, value_loss, whiten)

NAN, INF = float("nan"), float("inf")


def t64(values, **kw):
    return torch.tensor(values, dtype=torch.float64, **kw)


# Two rows, T = 3: row 0 has 3 response tokens, row 1 has 2 (right padded).
MASK = t64([[1, 1, 1], [1, 1, 0]])
LOGP = t64([[-1.0, -2.0, -0.5], [-0.3, -1.2, -INF]])
REF = t64([[-1.5, -1.0, -0.5], [-0.1, -1.2, NAN]])
# logp - ref_logp = [[0.5, -1.0, 0.0], [-0.2, 0.0, pad]]


def test_kl_k1_k3_by_hand():
    k1 = kl_per_token(LOGP, REF, MASK, "k1")
    assert torch.allclose(k1, t64([[0.5, -1.0, 0.0], [-0.2, 0.0, 0.0]]), atol=1e-15)
    k3 = kl_per_token(LOGP, REF, MASK, "k3")
    # (e^x - 1) - x with x = ref - logp = [[-0.5, 1.0, 0.0], [0.2, 0.0]]
    expected = [[math.exp(-0.5) - 1 + 0.5, math.exp(1.0) - 1 - 1.0, 0.0], [math.exp(0.2) - 1 - 0.2, 0.0, 0.0]]
    assert torch.allclose(k3, t64(expected), atol=1e-15)
    assert float(k3[0, 0]) == pytest.approx(0.10653065971263342) and bool((k3 >= 0).all())


def test_token_rewards_k1_with_clip_and_missing_eos_penalty():
    scores = t64([7.0, -2.0])
    rewards, kl = token_rewards(LOGP, REF, MASK, scores, kl_coef=0.1, score_clip=5.0,
                                eos_reached=torch.tensor([True, False]), missing_eos_penalty=1.0)
    # KL part: -0.1 * [[0.5, -1, 0], [-0.2, 0]]; score 7 -> clip 5 on row 0's 3rd token,
    # -2 -> (no clip) - 1 (no EOS) = -3 on row 1's 2nd (last) token; the padding stays 0.
    assert torch.allclose(rewards, t64([[-0.05, 0.1, 5.0], [0.02, -3.0, 0.0]]), atol=1e-15)
    assert torch.allclose(kl, t64([[0.5, -1.0, 0.0], [-0.2, 0.0, 0.0]]), atol=1e-15)
    # No clip, no penalty: the raw score lands on the last token.
    rewards, _ = token_rewards(LOGP, REF, MASK, scores, kl_coef=0.1)
    assert torch.allclose(rewards, t64([[-0.05, 0.1, 7.0], [0.02, -2.0, 0.0]]), atol=1e-15)
    # eos_reached without a penalty changes nothing; a clip larger than the score changes nothing.
    same, _ = token_rewards(LOGP, REF, MASK, scores, kl_coef=0.1, score_clip=10.0,
                            eos_reached=torch.tensor([False, False]))
    assert torch.equal(same, rewards)


def test_token_rewards_k3_and_detached():
    logp = LOGP.clone().requires_grad_(True)
    rewards, kl = token_rewards(logp, REF, MASK, t64([1.0, 0.5]), kl_coef=0.5, estimator="k3")
    k0, k1_, k2 = math.exp(-0.5) - 0.5, math.exp(1.0) - 2.0, 0.0  # row 0: (e^x - 1) - x
    k10 = math.exp(0.2) - 1.2
    expected = [[-0.5 * k0, -0.5 * k1_, -0.5 * k2 + 1.0], [-0.5 * k10, 0.5, 0.0]]
    assert torch.allclose(rewards, t64(expected), atol=1e-15)
    assert not rewards.requires_grad and not kl.requires_grad


def test_gae_by_hand():
    # gamma 0.9, lambda 0.8 (gamma * lambda = 0.72).
    rewards = t64([[0.1, -0.2, 1.0], [0.0, 2.0, 5.0]])  # row 1: the 5.0 is padding
    values = t64([[0.5, 0.4, 0.3], [1.0, 0.5, 99.0]])
    adv, ret = gae(rewards, values, MASK, gamma=0.9, lam=0.8)
    # Row 0: d2 = 1.0 - 0.3 = 0.7;  d1 = -0.2 + 0.9*0.3 - 0.4 = -0.33;  d0 = 0.1 + 0.9*0.4 - 0.5 = -0.04
    #        A2 = 0.7;  A1 = -0.33 + 0.72*0.7 = 0.174;  A0 = -0.04 + 0.72*0.174 = 0.08528
    # Row 1 (V after the last token is 0, not 99): d1 = 2.0 - 0.5 = 1.5;  d0 = 0.9*0.5 - 1.0 = -0.55
    #        A1 = 1.5;  A0 = -0.55 + 0.72*1.5 = 0.53
    assert torch.allclose(adv, t64([[0.08528, 0.174, 0.7], [0.53, 1.5, 0.0]]), atol=1e-12)
    assert torch.allclose(ret, t64([[0.58528, 0.574, 1.0], [1.53, 2.0, 0.0]]), atol=1e-12)
    # gamma = lambda = 1 with only a final reward: A_t = R - V_t (Monte Carlo), returns = R.
    adv1, ret1 = gae(t64([[0.0, 0.0, 3.0]]), t64([[1.0, 2.0, 0.5]]), t64([[1, 1, 1]]), gamma=1.0, lam=1.0)
    assert torch.allclose(adv1, t64([[2.0, 1.0, 2.5]])) and torch.allclose(ret1, t64([[3.0, 3.0, 3.0]]))


def test_gae_is_detached():
    values = t64([[0.5, 0.4, 0.3], [1.0, 0.5, 0.0]], requires_grad=True)
    adv, ret = gae(t64([[0.1, -0.2, 1.0], [0.0, 2.0, 0.0]]), values, MASK, gamma=1.0, lam=0.95)
    assert not adv.requires_grad and not ret.requires_grad


def test_whiten_by_hand_and_statistics():
    x = t64([[1.0, 2.0, 3.0], [7.0, 9.0, NAN]])
    mask = t64([[1, 1, 1], [0, 0, 0]])
    # mean 2, population variance 2/3
    assert torch.allclose(whiten(x, mask), t64([[-1.0, 0.0, 1.0], [0, 0, 0]]) / math.sqrt(2 / 3 + 1e-8),
                          atol=1e-15)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, generator=g, dtype=torch.float64) * 3 + 5
    lengths = torch.tensor([6, 2, 4, 1])
    mask = (torch.arange(6) < lengths[:, None]).to(torch.float64)
    w = whiten(x, mask, eps=0.0)
    keep = mask.bool()
    assert abs(float(w[keep].mean())) < 1e-12
    assert abs(float(w[keep].var(unbiased=False)) - 1.0) < 1e-12
    assert bool((w[~keep] == 0).all())
    assert abs(float(masked_mean(w, mask))) < 1e-12


def test_moments_of_halves_add_up():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 5, generator=g, dtype=torch.float64)
    mask = (torch.arange(5) < torch.tensor([5, 3, 1, 4])[:, None]).to(torch.float64)
    whole = masked_moments(x, mask)
    a, b = masked_moments(x[:2], mask[:2]), masked_moments(x[2:], mask[2:])
    assert all(m.dtype == torch.float64 and m.dim() == 0 for m in whole)
    assert float(whole[2]) == 13.0
    for w, p, q in zip(whole, a, b):
        assert abs(float(w) - float(p + q)) < 1e-12
    summed = tuple(p + q for p, q in zip(a, b))  # what an all-reduce over two ranks gives
    assert torch.allclose(whiten(x[:2], mask[:2], moments=summed), whiten(x, mask)[:2], atol=1e-14)
    assert not torch.allclose(whiten(x[:2], mask[:2]), whiten(x, mask)[:2], atol=1e-3)  # own moments differ


def test_whiten_without_mean_shift():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 4, generator=g, dtype=torch.float64) + 2.0
    mask = (torch.arange(4) < torch.tensor([4, 2, 3])[:, None]).to(torch.float64)
    mean = float(x[mask.bool()].mean())
    shifted, kept = whiten(x, mask), whiten(x, mask, shift_mean=False)
    assert torch.allclose((kept - shifted)[mask.bool()], torch.full((9,), mean, dtype=torch.float64))
    assert bool((kept[~mask.bool()] == 0).all())


# Policy loss: clip 0.2; tokens (A, r): (1, 1.1) inside, (1, 1.5) clipped, (1, 0.5) unclipped is
# the max, (-1, 1.5) unclipped is the max, (-1, 0.5) clipped, (-2, 0.9) inside; two padded tokens.
ADV = t64([[1.0, 1.0, 1.0, -1.0], [-1.0, -2.0, 7.0, NAN]])
RATIO = [[1.1, 1.5, 0.5, 1.5], [0.5, 0.9, 1.0, 1.0]]
PMASK = t64([[1, 1, 1, 1], [1, 1, 0, 0]])
OLD = t64([[-1.0, -2.0, -0.3, -4.0], [-0.7, -1.1, -2.0, -INF]])


def test_policy_loss_by_hand():
    logp = (OLD + torch.log(t64(RATIO))).clone()
    logp[1, 3] = 0.0
    logp.requires_grad_(True)
    out = policy_loss(logp, OLD, ADV, PMASK, clip_range=0.2)
    # per token: -1.1, max(-1.5, -1.2) = -1.2, max(-0.5, -0.8) = -0.5, max(1.5, 1.2) = 1.5,
    #            max(0.5, 0.8) = 0.8, 1.8
    assert float(out.loss.detach()) == pytest.approx(-1.1 - 1.2 - 0.5 + 1.5 + 0.8 + 1.8, abs=1e-12)
    assert float(out.clipfrac) == 2.0 and int(out.count) == 6 and out.count.dtype == torch.int64
    assert float(out.ratio) == pytest.approx(1.1 + 1.5 + 0.5 + 1.5 + 0.5 + 0.9, abs=1e-12)
    logr = [math.log(r) for r in (1.1, 1.5, 0.5, 1.5, 0.5, 0.9)]
    assert float(out.approx_kl) == pytest.approx(0.5 * sum(v * v for v in logr), abs=1e-12)
    assert not (out.clipfrac.requires_grad or out.approx_kl.requires_grad or out.ratio.requires_grad)
    (grad,) = torch.autograd.grad(out.loss, logp)
    # d/dlogp of -A*r is -A*r where the unclipped branch is in use, 0 where the clipped one is
    assert torch.allclose(grad, t64([[-1.1, 0.0, -0.5, 1.5], [0.0, 1.8, 0.0, 0.0]]), atol=1e-12)


def test_policy_loss_at_ratio_one():
    g = torch.Generator().manual_seed(3)
    old = torch.randn(3, 5, generator=g, dtype=torch.float64)
    adv = torch.randn(3, 5, generator=g, dtype=torch.float64)
    mask = (torch.arange(5) < torch.tensor([5, 3, 1])[:, None]).to(torch.float64)
    logp = old.clone().requires_grad_(True)
    out = policy_loss(logp, old, adv, mask, clip_range=0.2)
    assert float(out.loss.detach()) == pytest.approx(-float((adv * mask).sum()), abs=1e-14)
    assert float(out.ratio) == 9.0 and float(out.clipfrac) == 0.0 and float(out.approx_kl) == 0.0
    (grad,) = torch.autograd.grad(out.loss, logp)
    assert torch.allclose(grad, -adv * mask, atol=1e-14)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_policy_loss_matches_direct_formula(seed):
    g = torch.Generator().manual_seed(seed)
    old = torch.randn(4, 7, generator=g, dtype=torch.float64)
    logp = (old + 0.4 * torch.randn(4, 7, generator=g, dtype=torch.float64)).requires_grad_(True)
    adv = torch.randn(4, 7, generator=g, dtype=torch.float64)
    mask = (torch.arange(7) < torch.tensor([7, 4, 2, 5])[:, None]).to(torch.float64)
    out = policy_loss(logp, old, adv, mask, clip_range=0.2)
    ratio = torch.exp(logp - old)
    direct = (torch.max(-adv * ratio, -adv * torch.clamp(ratio, 0.8, 1.2)) * mask).sum()
    assert abs(float(out.loss.detach()) - float(direct.detach())) < 1e-12
    g1, = torch.autograd.grad(out.loss, logp)
    g2, = torch.autograd.grad(direct, logp)
    assert torch.allclose(g1, g2, atol=1e-12)
    clipped = ((-adv * torch.clamp(ratio, 0.8, 1.2) > -adv * ratio) & mask.bool()).sum()
    assert float(out.clipfrac) == float(clipped) and float(clipped) > 0


def test_value_loss_by_hand():
    # clip 0.2; (V, V_old, R): (1.0, 0.5, 2.0) clipped max, (1.0, 0.5, 0.0) unclipped max,
    # (0.6, 0.5, 1.0) inside, (-0.5, 0.0, 0.5) unclipped max, (-0.5, 0.0, -1.0) clipped max.
    values = t64([[1.0, 1.0, 0.6], [-0.5, -0.5, NAN]], requires_grad=True)
    old = t64([[0.5, 0.5, 0.5], [0.0, 0.0, 3.0]])
    ret = t64([[2.0, 0.0, 1.0], [0.5, -1.0, INF]])
    mask = t64([[1, 1, 1], [1, 1, 0]])
    out = value_loss(values, old, ret, mask, clip_range=0.2)
    # 0.5 * [max(1, 1.69), max(1, 0.49), 0.16, max(1, 0.49), max(0.25, 0.64)]
    assert float(out.loss.detach()) == pytest.approx(0.5 * (1.69 + 1.0 + 0.16 + 1.0 + 0.64), abs=1e-12)
    assert float(out.clipfrac) == 2.0 and int(out.count) == 5
    (grad,) = torch.autograd.grad(out.loss, values)
    # V - R where the unclipped branch is in use (or both agree), 0 where the clamped V is
    assert torch.allclose(grad, t64([[0.0, 1.0, -0.4], [-1.0, 0.0, 0.0]]), atol=1e-12)


def test_ppo_flip_gate_strict():
    ref = t64([1.0, 0.1, 0.5, -1.0, 0.35], requires_grad=True)
    pol = t64([0.5, 0.0, 0.5, -1.25, 0.25])
    gate = ppo_flip_gate(ref, pol, 0.1)
    # differences 0.5, 0.1 (== epsilon: not gated), 0, 0.25, 0.0999...98
    assert gate.tolist() == [1.0, 0.0, 0.0, 1.0, 0.0]
    assert gate.dtype == torch.float64 and not gate.requires_grad
    assert ppo_flip_gate(pol, ref, 0.1).tolist() == [0.0] * 5  # the order matters: R(y_ref) first
    assert ppo_flip_gate(torch.tensor([3, 1]), torch.tensor([1, 1]), 0.1).tolist() == [1.0, 0.0]


def test_kd_targets_ties_go_to_policy():
    ref = t64([1.0, 0.1, 0.5, -1.0])
    pol = t64([0.5, 0.2, 0.5, -1.25])
    assert kd_targets_ref(ref, pol).tolist() == [True, False, False, True]
    assert kd_targets_ref(ref, pol).dtype == torch.bool


def test_flipguard_ce_on_the_reference_response():
    gamma = 0.01
    logp_ref = t64([-10.0, -4.0, -6.0], requires_grad=True)  # logp_pi(y_ref|x), sequence sums
    gate = ppo_flip_gate(t64([1.0, 0.0, 0.3]), t64([0.5, 0.0, 0.1]), 0.1)  # [1, 0, 1]
    ce = constraint_ce(logp_ref, None, gate, gamma=gamma, reduction="sum")
    assert torch.allclose(ce, t64([0.1, 0.0, 0.06]), atol=1e-15)  # -gamma * gate * logp_pi(y_ref)
    (grad,) = torch.autograd.grad(ce.sum(), logp_ref)
    assert torch.allclose(grad, t64([-gamma, 0.0, -gamma]))
    mean = constraint_ce(logp_ref, torch.tensor([5, 2, 3]), gate, gamma=gamma, reduction="mean")
    assert torch.allclose(mean, t64([0.02, 0.0, 0.02]), atol=1e-15)
    # KD baseline: gate 1 and the better response by R as the target.
    logp_pol = t64([-3.0, -8.0, -1.0])
    target = torch.where(kd_targets_ref(t64([1.0, 0.0, 0.1]), t64([0.5, 0.0, 0.3])), logp_ref.detach(), logp_pol)
    kd = constraint_ce(target, None, torch.ones(3, dtype=torch.float64), gamma=gamma)
    assert torch.allclose(kd, t64([0.1, 0.08, 0.01]), atol=1e-15)


def test_bad_arguments():
    m = MASK
    with pytest.raises(LossArgumentError, match="kl_per_token: per-token"):
        kl_per_token(LOGP, REF[:1], m)
    with pytest.raises(LossArgumentError, match="estimator"):
        kl_per_token(LOGP, REF, m, "k2")
    with pytest.raises(LossArgumentError, match="token_rewards: scores"):
        token_rewards(LOGP, REF, m, t64([1.0]), kl_coef=0.1)
    with pytest.raises(LossArgumentError, match="token_rewards: missing_eos_penalty needs eos_reached"):
        token_rewards(LOGP, REF, m, t64([1.0, 2.0]), kl_coef=0.1, missing_eos_penalty=1.0)
    with pytest.raises(LossArgumentError, match="token_rewards: kl_coef"):
        token_rewards(LOGP, REF, m, t64([1.0, 2.0]), kl_coef=-0.1)
    with pytest.raises(LossArgumentError, match="token_rewards: every row"):
        token_rewards(LOGP, REF, t64([[1, 1, 1], [0, 0, 0]]), t64([1.0, 2.0]), kl_coef=0.1)
    with pytest.raises(LossArgumentError, match="gae: mask must be contiguous"):
        gae(LOGP, REF, t64([[1, 0, 1], [1, 1, 0]]), gamma=1.0, lam=0.95)
    with pytest.raises(LossArgumentError, match="gae: lam"):
        gae(LOGP, REF, m, gamma=1.0, lam=1.5)
    with pytest.raises(LossArgumentError, match="policy_loss: clip_range"):
        policy_loss(LOGP, REF, REF, m, clip_range=0.0)
    with pytest.raises(LossArgumentError, match="value_loss: per-token"):
        value_loss(LOGP, REF, REF[:, :2], m, clip_range=0.2)
    with pytest.raises(LossArgumentError, match="whiten: the moments count no token"):
        whiten(LOGP, torch.zeros_like(m))
    with pytest.raises(LossArgumentError, match="masked_mean: mask has no nonzero"):
        masked_mean(LOGP, torch.zeros_like(m))
    with pytest.raises(LossArgumentError, match="ppo_flip_gate: reward_ref and reward_pol"):
        ppo_flip_gate(t64([1.0, 2.0]), t64([1.0]), 0.1)
