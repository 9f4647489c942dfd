"""Loss functions against hand arithmetic, TRL's published formulas and torch autograd.

CPU only, no process group. References:
- TRL ``DPOTrainer.dpo_loss`` (sigmoid with label smoothing, ipo, hinge), re-typed
  literally in :func:`trl_dpo_loss` below.
- FlipGuard (Zhu et al., EMNLP 2024) eq. 9 (gate, strict ``>``) and eq. 12
  (CE on the chosen response), as restated in docs/flipguard.md.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fg_megatron.losses import (LossArgumentError, constraint_ce, constraint_gate, dpo_loss, flip_gate,
                                metrics_from_sums, preference_loss, reduce_metric_sums, sft_loss)

LN2 = math.log(2.0)


def trl_dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                 beta, loss_type, label_smoothing):
    """TRL's DPOTrainer.dpo_loss (sigmoid / hinge / ipo branches), written out as published."""
    pi_logratios = policy_chosen_logps - policy_rejected_logps
    ref_logratios = reference_chosen_logps - reference_rejected_logps
    logits = pi_logratios - ref_logratios
    if loss_type == "sigmoid":
        losses = (-F.logsigmoid(beta * logits) * (1 - label_smoothing)
                  - F.logsigmoid(-beta * logits) * label_smoothing)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    chosen_rewards = beta * (policy_chosen_logps - reference_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - reference_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


def t64(values):
    return torch.tensor(values, dtype=torch.float64)


# Two hand samples. Sample 0: chosen logratio -10-(-11) = +1, rejected -12-(-11) = -1, h = 2.
# Sample 1: chosen -6-(-5) = -1, rejected -3-(-4) = +1, h = -2.
PC, PR, RC, RR = t64([-10.0, -6.0]), t64([-12.0, -3.0]), t64([-11.0, -5.0]), t64([-11.0, -4.0])


def softplus(x: float) -> float:
    return math.log(1.0 + math.exp(x))  # -log sigmoid(-x)


# ---------------------------------------------------------------- DPO family

def test_dpo_sigmoid_hand_values():
    losses, rc, rr = dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type="sigmoid")
    # -log sigmoid(0.1 * 2) = log(1 + e^-0.2); -log sigmoid(0.1 * -2) = log(1 + e^0.2)
    assert losses.tolist() == pytest.approx([softplus(-0.2), softplus(0.2)], abs=1e-12)
    assert losses.tolist() == pytest.approx([0.5981388693815918, 0.7981388693815918], abs=1e-12)
    assert rc.tolist() == pytest.approx([0.1, -0.1], abs=1e-12)
    assert rr.tolist() == pytest.approx([-0.1, 0.1], abs=1e-12)


def test_dpo_sigmoid_label_smoothing_hand_values():
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type="sigmoid", label_smoothing=0.25)
    # 0.75 * (-log sigmoid(0.2)) + 0.25 * (-log sigmoid(-0.2)), and the mirror for h = -2
    expected = [0.75 * softplus(-0.2) + 0.25 * softplus(0.2), 0.75 * softplus(0.2) + 0.25 * softplus(-0.2)]
    assert losses.tolist() == pytest.approx(expected, abs=1e-12)


def test_dpo_ipo_hand_values():
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type="ipo")
    # (h - 1/(2*0.1))^2 = (2 - 5)^2 = 9 and (-2 - 5)^2 = 49: beta is not applied to h
    assert losses.tolist() == pytest.approx([9.0, 49.0], abs=1e-12)


def test_dpo_hinge_hand_values():
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type="hinge")
    assert losses.tolist() == pytest.approx([1 - 0.1 * 2, 1 + 0.1 * 2], abs=1e-12)  # 0.8, 1.2
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta=1.0, loss_type="hinge")
    assert losses.tolist() == pytest.approx([0.0, 3.0], abs=1e-12)  # relu(1 - 2) = 0, relu(1 + 2) = 3


@pytest.mark.parametrize("loss_type,ls", [("sigmoid", 0.0), ("sigmoid", 0.1), ("sigmoid", 0.5),
                                          ("ipo", 0.0), ("hinge", 0.0)])
@pytest.mark.parametrize("beta", [0.05, 0.1, 1.0])
def test_dpo_matches_trl_formulas(loss_type, ls, beta):
    g = torch.Generator().manual_seed(7)
    pc, pr, rc, rr = (-20 * torch.rand(64, generator=g, dtype=torch.float64) for _ in range(4))
    got = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=ls)
    ref = trl_dpo_loss(pc, pr, rc, rr, beta, loss_type, ls)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # fp32 inputs too (what token_logprobs returns)
    got32 = dpo_loss(pc.float(), pr.float(), rc.float(), rr.float(), beta=beta, loss_type=loss_type,
                     label_smoothing=ls)
    torch.testing.assert_close(got32[0].double(), ref[0], rtol=1e-5, atol=1e-5)


def test_dpo_rewards_detached_and_loss_differentiable():
    pc, pr = PC.clone().requires_grad_(), PR.clone().requires_grad_()
    losses, rc, rr = dpo_loss(pc, pr, RC, RR, beta=0.1)
    assert losses.requires_grad and not rc.requires_grad and not rr.requires_grad


# ---------------------------------------------------------------- FlipGuard gate and CE term

def test_flip_gate_eq9_strict():
    ref = t64([-3.0, -3.0, -3.0, -3.0])
    pol = t64([-3.5, -4.0, -2.0, -3.25])  # logp_pi0 - logp_pi = 0.5, 1.0, -1.0, 0.25 (exact in binary)
    assert flip_gate(pol, ref, 0.5).tolist() == [0.0, 1.0, 0.0, 0.0]  # 0.5 > 0.5 is false: not gated
    assert flip_gate(pol, ref, 0.0).tolist() == [1.0, 1.0, 0.0, 1.0]
    assert flip_gate(pol, ref, 0.25).tolist() == [1.0, 1.0, 0.0, 0.0]
    assert flip_gate(pol, ref, -1.0).tolist() == [1.0, 1.0, 0.0, 1.0]  # -1 > -1 is false
    assert flip_gate(ref, ref, 0.0).tolist() == [0.0, 0.0, 0.0, 0.0]  # policy = reference


def test_flip_gate_carries_no_gradient():
    pol = t64([-3.5, -4.0]).requires_grad_()
    ref = t64([-3.0, -3.0]).requires_grad_()
    gate = flip_gate(pol, ref, 0.0)
    assert not gate.requires_grad and gate.grad_fn is None


def test_constraint_gate_kinds():
    pol, ref = t64([-3.5, -2.0, -3.0]), t64([-3.0, -3.0, -3.0])
    assert constraint_gate("none", pol, ref, 0.0).tolist() == [0.0, 0.0, 0.0]
    assert constraint_gate("kd", pol, ref, 0.0).tolist() == [1.0, 1.0, 1.0]  # even where pi beats pi0
    assert constraint_gate("flipguard", pol, ref, 0.0).tolist() == [1.0, 0.0, 0.0]


def test_constraint_ce_hand_values():
    logp, counts, gate = t64([-4.0, -6.0, -1.5]), torch.tensor([8, 3, 2]), t64([1.0, 0.0, 1.0])
    # sum: -0.01 * 1 * -4 = 0.04; gate 0 -> 0; -0.01 * -1.5 = 0.015
    assert constraint_ce(logp, None, gate, gamma=0.01, reduction="sum").tolist() == pytest.approx(
        [0.04, 0.0, 0.015], abs=1e-15)
    # mean: -0.01 * (-4 / 8) = 0.005; 0; -0.01 * (-1.5 / 2) = 0.0075
    assert constraint_ce(logp, counts, gate, gamma=0.01, reduction="mean").tolist() == pytest.approx(
        [0.005, 0.0, 0.0075], abs=1e-15)


def test_preference_loss_flipguard_hand_values():
    # Three samples, beta 0.1, gamma 0.02, epsilon 0.5:
    #   0: chosen logratio -10-(-9) = -1, rejected -12-(-11) = -1, h = 0;  pi0 - pi on chosen = 1 > 0.5 -> gated
    #   1: chosen -4-(-3.5) = -0.5, rejected -7-(-6) = -1, h = 0.5;        pi0 - pi = 0.5, not > 0.5 -> not gated
    #   2: chosen -2-(-3) = +1, rejected -5-(-5) = 0, h = 1;               pi0 - pi = -1 -> not gated
    pc, pr = t64([-10.0, -4.0, -2.0]), t64([-12.0, -7.0, -5.0])
    rc, rr = t64([-9.0, -3.5, -3.0]), t64([-11.0, -6.0, -5.0])
    out = preference_loss(pc, pr, rc, rr, beta=0.1, constraint="flipguard", gamma=0.02, epsilon=0.5)
    dpo = [LN2, softplus(-0.05), softplus(-0.1)]
    ce = [-0.02 * -10.0, 0.0, 0.0]  # 0.2 on the gated sample only
    assert out.gate.tolist() == [1.0, 0.0, 0.0]
    assert out.dpo_losses.tolist() == pytest.approx(dpo, abs=1e-12)
    assert out.ce_losses.tolist() == pytest.approx(ce, abs=1e-12)
    assert out.loss.item() == pytest.approx((sum(dpo) + sum(ce)) / 3, abs=1e-12)
    m = {k: v.item() for k, v in out.metrics.items()}
    assert m["loss"] == pytest.approx((sum(dpo) + 0.2) / 3, abs=1e-12)
    assert m["dpo_loss"] == pytest.approx(sum(dpo) / 3, abs=1e-12)
    assert m["ce_loss"] == pytest.approx(0.2 / 3, abs=1e-12)
    assert m["gate_rate"] == pytest.approx(1 / 3, abs=1e-12)
    assert m["rewards_chosen"] == pytest.approx((-0.1 - 0.05 + 0.1) / 3, abs=1e-12)
    assert m["rewards_rejected"] == pytest.approx((-0.1 - 0.1 + 0.0) / 3, abs=1e-12)
    assert m["reward_margin"] == pytest.approx((0.0 + 0.05 + 0.1) / 3, abs=1e-12)
    assert m["reward_accuracy"] == pytest.approx(2 / 3, abs=1e-12)  # margin 0 is not > 0
    assert m["logps_chosen"] == pytest.approx(-16.0 / 3, abs=1e-12)
    assert m["logps_rejected"] == pytest.approx(-24.0 / 3, abs=1e-12)
    assert all(not v.requires_grad for v in out.metric_sums.values())
    assert not out.gate.requires_grad


def rand_batch(b=16, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    vals = [-(5 + 30 * torch.rand(b, generator=g, dtype=dtype)) for _ in range(4)]
    counts = torch.randint(1, 40, (b,), generator=g)
    return (*vals, counts)


def test_kd_gates_every_sample_and_none_adds_nothing():
    pc, pr, rc, rr, n = rand_batch()
    kw = dict(beta=0.1, gamma=0.05, epsilon=0.0)
    kd = preference_loss(pc, pr, rc, rr, n, constraint="kd", **kw)
    assert kd.gate.tolist() == [1.0] * 16
    torch.testing.assert_close(kd.ce_losses, -0.05 * pc, rtol=0, atol=1e-15)

    pcg = pc.clone().requires_grad_()
    none = preference_loss(pcg, pr, rc, rr, n, constraint="none", **kw)
    plain, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert none.gate.tolist() == [0.0] * 16
    assert torch.equal(none.ce_losses, torch.zeros(16, dtype=torch.float64))
    assert torch.equal(none.loss.detach(), plain.mean())  # bit-identical, not just close
    none.loss.backward()
    pcp = pc.clone().requires_grad_()
    dpo_loss(pcp, pr, rc, rr, beta=0.1)[0].mean().backward()
    assert torch.equal(pcg.grad, pcp.grad)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_step0_policy_equals_reference(dtype, tol):
    pc, pr, _, _, n = rand_batch(b=32, seed=3, dtype=dtype)
    rc, rr = pc.clone(), pr.clone()
    gamma = 0.05
    outs = {c: preference_loss(pc, pr, rc, rr, n, beta=0.1, constraint=c, gamma=gamma, epsilon=0.0)
            for c in ("none", "kd", "flipguard")}
    for c, out in outs.items():
        m = out.metrics
        assert torch.equal(out.chosen_rewards, torch.zeros_like(pc))
        assert torch.equal(out.rejected_rewards, torch.zeros_like(pr))
        assert abs(m["dpo_loss"].item() - LN2) < tol, c
        assert m["reward_accuracy"].item() == 0.0
    assert outs["flipguard"].metrics["gate_rate"].item() == 0.0  # difference 0 is not > epsilon = 0
    assert abs(outs["flipguard"].loss.item() - LN2) < tol
    assert abs(outs["none"].loss.item() - LN2) < tol
    # KD: loss - ln 2 = -gamma * mean(logp_chosen)
    kd_excess = outs["kd"].loss.item() - LN2
    assert kd_excess == pytest.approx(-gamma * pc.double().mean().item(), abs=tol * 10)
    assert outs["kd"].metrics["gate_rate"].item() == 1.0


def test_step0_ipo_and_hinge_values():
    pc, pr, _, _, _ = rand_batch(b=8, seed=4)
    for loss_type, expected in (("ipo", (1 / (2 * 0.1)) ** 2), ("hinge", 1.0)):
        out = preference_loss(pc, pr, pc.clone(), pr.clone(), beta=0.1, constraint="none", gamma=0.0,
                              epsilon=0.0, loss_type=loss_type)
        assert out.loss.item() == pytest.approx(expected, abs=1e-12)  # ipo 25, hinge 1


def test_ce_reduction_mean_divides_by_token_counts():
    pc, pr, rc, rr, n = rand_batch(b=12, seed=5)
    out = preference_loss(pc, pr, rc, rr, n, beta=0.1, constraint="kd", gamma=0.01, epsilon=0.0,
                          ce_reduction="mean")
    expected = [-0.01 * (pc[i].item() / int(n[i])) for i in range(12)]
    assert out.ce_losses.tolist() == pytest.approx(expected, abs=1e-15)
    s = preference_loss(pc, pr, rc, rr, n, beta=0.1, constraint="kd", gamma=0.01, epsilon=0.0)
    assert s.ce_losses.tolist() == pytest.approx([-0.01 * pc[i].item() for i in range(12)], abs=1e-15)


# ---------------------------------------------------------------- gradients

def literal_total_loss(pc, pr, rc, rr, n, gate_list, beta, gamma, loss_type, ls, reduction):
    """mean_i [L_dpo_i - gamma * gate_i * logp_i(/n_i)] with the gate as fixed Python numbers."""
    h = (pc - rc) - (pr - rr)
    if loss_type == "sigmoid":
        dpo = -(1 - ls) * torch.log(torch.sigmoid(beta * h)) - ls * torch.log(torch.sigmoid(-beta * h))
    elif loss_type == "ipo":
        dpo = (h - 1 / (2 * beta)) ** 2
    else:
        dpo = torch.clamp(1 - beta * h, min=0)
    logp = pc / n.double() if reduction == "mean" else pc
    gate = torch.tensor(gate_list, dtype=pc.dtype)
    return (dpo - gamma * gate * logp).mean()


@pytest.mark.parametrize("loss_type,ls", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0), ("hinge", 0.0)])
@pytest.mark.parametrize("constraint", ["none", "kd", "flipguard"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_gradient_matches_autograd_of_literal_formula(loss_type, ls, constraint, reduction):
    pc, pr, rc, rr, n = rand_batch(b=16, seed=11)
    beta, gamma, eps = 0.1, 0.03, 0.5
    diff = (rc - pc).tolist()
    gate_list = {"none": [0.0] * 16, "kd": [1.0] * 16,
                 "flipguard": [1.0 if d > eps else 0.0 for d in diff]}[constraint]
    if constraint == "flipguard":
        assert 0 < sum(gate_list) < 16  # the batch mixes gated and ungated samples

    leaves = [t.clone().requires_grad_() for t in (pc, pr, rc, rr)]
    out = preference_loss(*leaves, n, beta=beta, constraint=constraint, gamma=gamma, epsilon=eps,
                          loss_type=loss_type, label_smoothing=ls, ce_reduction=reduction)
    assert out.gate.tolist() == gate_list
    out.loss.backward()

    ref_leaves = [t.clone().requires_grad_() for t in (pc, pr, rc, rr)]
    ref = literal_total_loss(*ref_leaves, n, gate_list, beta, gamma, loss_type, ls, reduction)
    ref.backward()
    torch.testing.assert_close(out.loss.detach(), ref.detach(), rtol=1e-12, atol=1e-12)
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-14)


def test_gated_sample_gradient_is_dpo_plus_ce_only():
    # One gated sample (pi0 - pi on chosen = 2 > 0), sigmoid loss; reference log-probs require grad too,
    # so any path through the gate (it depends on ref and policy chosen log-probs) would show up there.
    beta, gamma, ls = 0.1, 0.05, 0.1
    pc, pr, rc, rr = (t64([v]).requires_grad_() for v in (-12.0, -9.0, -10.0, -8.5))
    out = preference_loss(pc, pr, rc, rr, beta=beta, constraint="flipguard", gamma=gamma, epsilon=0.0,
                          label_smoothing=ls)
    assert out.gate.tolist() == [1.0]
    out.loss.backward()
    h = (-12.0 + 10.0) - (-9.0 + 8.5)  # -2 - (-0.5) = -1.5
    sig = 1 / (1 + math.exp(-beta * h))  # sigmoid(beta * h)
    # d/dh [-(1-ls) log sig(beta h) - ls log sig(-beta h)] = -(1-ls) beta (1 - sig) + ls beta sig
    d_dpo_dh = -(1 - ls) * beta * (1 - sig) + ls * beta * sig
    assert pc.grad.item() == pytest.approx(d_dpo_dh - gamma, abs=1e-14)  # dh/dpc = 1; CE: -gamma
    assert rc.grad.item() == pytest.approx(-d_dpo_dh, abs=1e-14)  # DPO only: the gate adds nothing
    assert pr.grad.item() == pytest.approx(-d_dpo_dh, abs=1e-14)
    assert rr.grad.item() == pytest.approx(d_dpo_dh, abs=1e-14)


# ---------------------------------------------------------------- micro-batch / DP exactness

def test_microbatch_and_dp_splits_give_global_mean():
    pc, pr, rc, rr, n = rand_batch(b=14, seed=21)
    kw = dict(beta=0.1, constraint="flipguard", gamma=0.02, epsilon=0.0, ce_reduction="mean")
    full_leaf = pc.clone().requires_grad_()
    full = preference_loss(full_leaf, pr, rc, rr, n, **kw)
    full.loss.backward()

    # DP = 2 replicas of 7 samples each, M = 3 unequal micro-batches per replica (3, 3, 1).
    # Megatron divides each micro-batch loss by M; DP averages the replicas' gradients.
    G, D, M = 14, 2, 3
    leaf = pc.clone().requires_grad_()
    sums, total = [], 0.0
    for rank in range(D):
        for lo, hi in ((0, 3), (3, 6), (6, 7)):
            idx = slice(rank * 7 + lo, rank * 7 + hi)
            out = preference_loss(leaf[idx], pr[idx], rc[idx], rr[idx], n[idx], num_samples=G / (M * D), **kw)
            (out.loss / M / D).backward()
            total += (out.loss / M / D).item()
            sums.append(out.metric_sums)
    torch.testing.assert_close(leaf.grad, full_leaf.grad, rtol=1e-12, atol=1e-15)
    assert total == pytest.approx(full.loss.item(), abs=1e-12)
    merged = metrics_from_sums(reduce_metric_sums(sums))
    for k, v in full.metrics.items():
        assert merged[k].item() == pytest.approx(v.item(), abs=1e-12), k


# ---------------------------------------------------------------- SFT

def test_sft_loss_hand_values():
    lp = t64([[math.log(0.5), math.log(0.25), -math.inf], [math.log(0.1), math.log(0.8), math.log(0.3)]])
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    nll, ntok = sft_loss(lp, mask)
    assert ntok.item() == 4 and ntok.dtype == torch.int64
    # -(ln .5 + ln .25 + ln .8 + ln .3); the padded -inf is ignored
    assert nll.item() == pytest.approx(-(math.log(0.5) + math.log(0.25) + math.log(0.8) + math.log(0.3)), abs=1e-12)


def test_sft_loss_matches_torch_cross_entropy_and_grad():
    g = torch.Generator().manual_seed(2)
    b, s, v = 3, 7, 11
    logits = torch.randn(b, s, v, generator=g, dtype=torch.float64)
    targets = torch.randint(0, v, (b, s), generator=g)
    mask = torch.rand(b, s, generator=g) > 0.3
    token_logps = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0].requires_grad_()
    nll, ntok = sft_loss(token_logps, mask)
    labels = targets.masked_fill(~mask, -100)
    ref = F.cross_entropy(logits.reshape(-1, v), labels.reshape(-1), ignore_index=-100, reduction="sum")
    assert nll.item() == pytest.approx(ref.item(), abs=1e-12)
    assert ntok.item() == int(mask.sum())
    nll.backward()
    torch.testing.assert_close(token_logps.grad, -mask.double(), rtol=0, atol=0)


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("call,match", [
    (lambda: dpo_loss(PC, PR, RC, RR[:1], beta=0.1), r"1-D \[B\].*ref_rejected_logps=\(1,\)"),
    (lambda: dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type="kto"), r"loss_type='kto'"),
    (lambda: dpo_loss(PC, PR, RC, RR, beta=0.0), r"beta must be > 0 \(got 0.0\)"),
    (lambda: dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type="ipo", label_smoothing=0.1),
     r"label_smoothing=0.1 only applies to loss_type='sigmoid'"),
    (lambda: dpo_loss(PC, PR, RC, RR, beta=0.1, label_smoothing=0.7), r"\[0, 0.5\] \(got 0.7\)"),
    (lambda: constraint_ce(PC, None, t64([1.0, 1.0]), gamma=0.1, reduction="mean"), r"needs chosen_token_counts"),
    (lambda: constraint_ce(PC, torch.tensor([3, 0]), t64([1.0, 1.0]), gamma=0.1, reduction="mean"),
     r"> 0 .*\[3, 0\]"),
    (lambda: constraint_ce(PC, None, t64([1.0, 1.0]), gamma=-1.0), r"gamma must be >= 0 \(got -1.0\)"),
    (lambda: preference_loss(PC, PR, RC, RR, beta=0.1, constraint="focal", gamma=0.1, epsilon=0.0),
     r"constraint='focal'"),
    (lambda: preference_loss(PC, PR, RC, RR, beta=0.1, constraint="kd", gamma=0.1, epsilon=0.0,
                             ce_reduction="token"), r"ce_reduction='token'"),
    (lambda: sft_loss(PC, PC), r"\[b, s\]"),
])
def test_bad_arguments_raise_one_line_errors(call, match):
    with pytest.raises(LossArgumentError, match=match) as info:
        call()
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)


def test_ipo_uses_per_token_means_like_trl():
    """TRL's IPO works on length-averaged log-probs; gate and CE keep the sums."""
    import torch

    from fg_megatron.losses import preference_loss

    pc = torch.tensor([-10.0, -6.0], dtype=torch.float64)
    pr = torch.tensor([-12.0, -4.0], dtype=torch.float64)
    rc = torch.tensor([-11.0, -5.0], dtype=torch.float64)
    rr = torch.tensor([-11.0, -5.0], dtype=torch.float64)
    nc = torch.tensor([5, 3])
    nr = torch.tensor([4, 2])
    beta = 0.1
    out = preference_loss(pc, pr, rc, rr, nc, beta=beta, constraint="flipguard", gamma=0.5, epsilon=0.0,
                          loss_type="ipo", rejected_token_counts=nr)
    # TRL: logits = (pc/nc - rc/nc) - (pr/nr - rr/nr); loss = (logits - 1/(2*beta))**2
    logits = (pc / nc - rc / nc) - (pr / nr - rr / nr)
    expected_dpo = (logits - 1 / (2 * beta)) ** 2
    assert torch.allclose(out.dpo_losses, expected_dpo, atol=1e-12)
    # gate on sums: sample 0: -11 - (-10) = -1 (not gated); sample 1: -5 - (-6) = 1 > 0 (gated)
    assert out.gate.tolist() == [0.0, 1.0]
    assert torch.allclose(out.ce_losses, torch.tensor([0.0, -0.5 * -6.0], dtype=torch.float64))


def test_chosen_drop_rate_is_the_flipguard_gate_for_every_constraint():
    """A comparable regression signal: the same fraction whatever the constraint."""
    import torch

    from fg_megatron.losses import preference_loss

    pc = torch.tensor([-1.0, -3.0, -2.0, -5.0])
    rc = torch.tensor([-2.0, -2.0, -2.0, -4.0])  # drops: 1.0 (sample 1), 1.0 (sample 3); sample 2 exactly 0
    pr = torch.tensor([-3.0, -3.0, -3.0, -3.0])
    for constraint in ("none", "kd", "flipguard"):
        out = preference_loss(pc, pr, rc, pr, beta=0.1, constraint=constraint, gamma=0.01, epsilon=0.0)
        assert out.metrics["chosen_drop_rate"].item() == 0.5, constraint
    out = preference_loss(pc, pr, rc, pr, beta=0.1, constraint="flipguard", gamma=0.01, epsilon=0.0)
    assert out.metrics["gate_rate"].item() == out.metrics["chosen_drop_rate"].item()
