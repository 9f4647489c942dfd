"""RLHF PPO pieces (paper eq. 2) and the FlipGuard PPO gate (eq. 7): pure tensor functions.

Every per-token tensor is response-aligned ``[b, T]``: position ``t`` is the
t-th response token of row ``b``; ``mask`` is 1 on real response tokens
(contiguous from ``t = 0``, right padded). ``logp`` / ``ref_logp`` /
``old_logp`` are the response tokens' log-probs under the actor ``pi``, the
frozen reference ``pi0`` and the rollout-time actor. Positions outside the mask
never contribute, whatever they hold (``torch.where``, not products, so a
``-inf`` / NaN in padding cannot leak). The PPO base is DeepSpeed-Chat (the
paper's); deviations are named where they occur.

Per token, with ``L`` = the row's last response token (the EOS action)::

    kl_t   = logp_t - ref_logp_t                       (k1, DeepSpeed-Chat / TRL default)
           = (e^x - 1) - x,  x = ref_logp_t - logp_t   (k3, TRL / Schulman)
    r_t    = -kl_coef * kl_t  +  [t == L] * (clip(R(x,y), +-score_clip) - [no EOS] * missing_eos_penalty)
    delta_t = r_t + gamma * V_{t+1} - V_t,   V_{L+1} = 0 (terminal)
    A_t    = delta_t + gamma * lam * A_{t+1},  returns_t = A_t + V_t                   (GAE)
    rho_t  = exp(logp_t - old_logp_t)
    pg_t   = max(-A_t * rho_t, -A_t * clip(rho_t, 1 - c, 1 + c))                       (clipped policy)
    vf_t   = 0.5 * max((V_t - G_t)^2, (clip(V_t, V_old_t +- c_v) - G_t)^2)            (clipped value)

Score slot: the score goes on the EOS action itself, as OpenRLHF / NeMo-Aligner
do (TRL's "one past EOS" index is the same action under its layout).
DeepSpeed-Chat puts it one slot further (past the last real answer token) and
lets GAE read that slot while the losses mask it; we keep all rewards inside
the mask so rewards, GAE and the losses share one mask. Score clip and the
missing-EOS penalty: the clip is DeepSpeed-Chat's (``clip_reward_value``), the
penalty TRL's; the clip is applied to the RM score first, so the penalty is
never clipped away. Whitening (:func:`whiten`) is off in DeepSpeed-Chat; TRL,
OpenRLHF, NeMo and veRL whiten advantages (TRL's ``shift_mean=False`` form for
rewards). Its variance is the population one (``unbiased=False``, what
all-reduced sums give; TRL / veRL apply Bessel's correction, a factor
``n / (n - 1)``). ``approx_kl`` is TRL's ``0.5 * (logp - old_logp)^2``.

The losses return masked token *sums* and a token ``count`` (megatron-core
divides by the all-reduced count, :mod:`fg_megatron.schedule`); DeepSpeed-Chat's
per-micro-batch token mean is the special case of one micro-batch on one rank.

FlipGuard for PPO: ``gate = 1 if R(x, y_ref) - R(x, y_pol) > epsilon`` (eq. 7,
strict, detached) and ``L = L_ppo - gamma * gate * logp_pi(y_ref|x)``; the CE
term is :func:`fg_megatron.losses.flipguard.constraint_ce` on
``logp_pi(y_ref|x)``. The KD baseline sets the gate to 1 and takes the better
response by ``R`` as the target (:func:`kd_targets_ref`; ties go to ``y_pol``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch import Tensor

from fg_megatron.losses.errors import LossArgumentError, check_choice
from fg_megatron.losses.flipguard import flip_gate

KLEstimator = Literal["k1", "k3"]
KL_ESTIMATORS: tuple[str, ...] = ("k1", "k3")


@dataclass
class PolicyLossOutput:
    """Clipped PPO policy loss over one micro-batch; every field is a 0-d sum over masked tokens."""

    loss: Tensor       # sum_t pg_t, differentiable in logp
    clipfrac: Tensor   # detached: tokens whose clipped branch is strictly larger (the one in use)
    approx_kl: Tensor  # detached: sum 0.5 * (logp - old_logp)^2
    ratio: Tensor      # detached: sum rho_t
    count: Tensor      # int64: masked tokens (divide every sum by the global count)


@dataclass
class ValueLossOutput:
    """Clipped value loss over one micro-batch; every field is a 0-d sum over masked tokens."""

    loss: Tensor       # sum_t vf_t (with the 0.5), differentiable in values
    clipfrac: Tensor   # detached: tokens whose clipped branch is strictly larger
    count: Tensor      # int64: masked tokens


def _check_tokens(fn: str, **tensors: Tensor) -> None:
    """Every tensor is 2-D ``[b, T]`` of one shape."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    first = next(iter(shapes.values()))
    if any(len(s) != 2 or s != first for s in shapes.values()):
        listed = ", ".join(f"{n}={s}" for n, s in shapes.items())
        raise LossArgumentError(f"{fn}: per-token inputs must all be [b, T] of one shape, got {listed}")


def _check_rows(fn: str, batch: int, **tensors: Tensor) -> None:
    for name, t in tensors.items():
        if tuple(t.shape) != (batch,):
            raise LossArgumentError(f"{fn}: {name} must be [b]=[{batch}] (one value per row), got {list(t.shape)}")


def _check_contiguous(fn: str, mask: Tensor) -> None:
    m = mask.bool()
    if m.shape[1] > 1 and bool((m[:, 1:] & ~m[:, :-1]).any()):
        raise LossArgumentError(f"{fn}: mask must be contiguous from t=0 and right padded (response-aligned)")


def _check_clip(fn: str, name: str, value: float) -> None:
    if not value > 0:
        raise LossArgumentError(f"{fn}: {name} must be > 0 (got {value}); DeepSpeed-Chat / TRL use 0.2")


def _zero_out(x: Tensor, keep: Tensor) -> Tensor:
    return torch.where(keep, x, torch.zeros_like(x))


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x`` over positions where ``mask`` is nonzero (0-d; error if none)."""
    _check_tokens("masked_mean", x=x, mask=mask)
    keep = mask.bool()
    count = keep.sum()
    if int(count) == 0:
        raise LossArgumentError("masked_mean: mask has no nonzero entry")
    return _zero_out(x, keep).sum() / count.to(x.dtype)


def kl_per_token(logp: Tensor, ref_logp: Tensor, mask: Tensor, estimator: KLEstimator = "k1") -> Tensor:
    """``[b, T]`` per-token KL estimate of ``pi`` against ``pi0`` (k1 or k3), zero outside ``mask``.

    Differentiable in its inputs; :func:`token_rewards` detaches it.
    """
    fn = "kl_per_token"
    _check_tokens(fn, logp=logp, ref_logp=ref_logp, mask=mask)
    check_choice(fn, "estimator", estimator, KL_ESTIMATORS)
    keep = mask.bool()
    d = _zero_out(logp - ref_logp, keep)
    kl = d if estimator == "k1" else torch.expm1(-d) + d  # k3 with x = -d: (e^x - 1) - x
    return _zero_out(kl, keep)


def token_rewards(logp: Tensor, ref_logp: Tensor, mask: Tensor, scores: Tensor, *, kl_coef: float,
                  estimator: KLEstimator = "k1", score_clip: Optional[float] = None,
                  eos_reached: Optional[Tensor] = None,
                  missing_eos_penalty: Optional[float] = None) -> tuple[Tensor, Tensor]:
    """``(rewards, kl)``, both detached ``[b, T]`` zero outside ``mask``, from ``[b]`` RM ``scores``.

    ``rewards = -kl_coef * kl`` at every response token, plus the (clipped,
    penalised) score at each row's last response token. ``eos_reached`` is a
    ``[b]`` bool (needed with ``missing_eos_penalty``); every row needs at
    least one response token.
    """
    fn = "token_rewards"
    _check_tokens(fn, logp=logp, ref_logp=ref_logp, mask=mask)
    _check_contiguous(fn, mask)
    _check_rows(fn, logp.shape[0], scores=scores)
    if not kl_coef >= 0:
        raise LossArgumentError(f"{fn}: kl_coef must be >= 0 (got {kl_coef}); DeepSpeed-Chat uses 0.1")
    if score_clip is not None:
        _check_clip(fn, "score_clip", score_clip)
    if missing_eos_penalty is not None:
        if eos_reached is None:
            raise LossArgumentError(f"{fn}: missing_eos_penalty needs eos_reached ([b] bool: row ended with EOS)")
        _check_rows(fn, logp.shape[0], eos_reached=eos_reached)
        if not missing_eos_penalty >= 0:
            raise LossArgumentError(f"{fn}: missing_eos_penalty must be >= 0 (got {missing_eos_penalty}); "
                                    f"it is subtracted from the score")
    lengths = mask.bool().sum(dim=1)
    if bool((lengths == 0).any()):
        raise LossArgumentError(f"{fn}: every row needs >= 1 response token (lengths {lengths.tolist()}); "
                                f"drop empty responses before scoring")
    with torch.no_grad():
        kl = kl_per_token(logp.detach(), ref_logp.detach(), mask, estimator)
        score = scores.detach().to(kl.dtype)
        if score_clip is not None:
            score = score.clamp(-score_clip, score_clip)
        if missing_eos_penalty is not None:
            score = score - missing_eos_penalty * (~eos_reached.bool()).to(score.dtype)
        rewards = -kl_coef * kl
        # The EOS action (OpenRLHF / NeMo-Aligner / TRL); DeepSpeed-Chat adds it one slot past the last token.
        rewards.scatter_add_(1, (lengths - 1).unsqueeze(1), score.unsqueeze(1))
    return rewards, kl


def gae(rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Masked GAE: ``(advantages, returns)``, detached ``[b, T]``, zero outside ``mask``.

    ``V`` past a row's last response token is 0 (the episode ends there).
    """
    fn = "gae"
    _check_tokens(fn, rewards=rewards, values=values, mask=mask)
    _check_contiguous(fn, mask)
    for name, value in (("gamma", gamma), ("lam", lam)):
        if not 0 <= value <= 1:
            raise LossArgumentError(f"{fn}: {name} must be in [0, 1] (got {value}); DeepSpeed-Chat uses 1.0 / 0.95")
    with torch.no_grad():
        keep = mask.bool()
        r, v = _zero_out(rewards.detach(), keep), _zero_out(values.detach(), keep)
        m = keep.to(v.dtype)
        advantages = torch.zeros_like(v)
        last = torch.zeros_like(v[:, 0])
        for t in reversed(range(v.shape[1])):
            next_v = v[:, t + 1] if t + 1 < v.shape[1] else torch.zeros_like(last)
            last = (r[:, t] + gamma * next_v - v[:, t] + gamma * lam * last) * m[:, t]
            advantages[:, t] = last
        returns = _zero_out(advantages + v, keep)
    return advantages, returns


def masked_moments(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(sum, sum_sq, count)`` of ``x`` over the mask: detached 0-d float64 (all-reduce them over DP)."""
    _check_tokens("masked_moments", x=x, mask=mask)
    with torch.no_grad():
        keep = mask.bool()
        x64 = _zero_out(x.detach().to(torch.float64), keep)
        return x64.sum(), (x64 * x64).sum(), keep.sum().to(torch.float64)


def whiten(x: Tensor, mask: Tensor, *, moments: Optional[tuple[Tensor, Tensor, Tensor]] = None,
           shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """``(x - mean) / sqrt(var + eps)`` over the mask (population variance), zero outside it.

    ``moments`` (from :func:`masked_moments`, possibly summed over ranks)
    replace this tensor's own. ``shift_mean=False`` adds the mean back (TRL's
    whitening of rewards). Mean and variance are constants (no gradient).
    """
    fn = "whiten"
    _check_tokens(fn, x=x, mask=mask)
    s, s2, n = masked_moments(x, mask) if moments is None else moments
    if not float(n) > 0:
        raise LossArgumentError(f"{fn}: the moments count no token (count={float(n)}); nothing to whiten")
    mean = s / n
    var = (s2 / n - mean * mean).clamp(min=0.0)
    out = (x - mean.to(x.dtype)) * torch.rsqrt(var + eps).to(x.dtype)
    if not shift_mean:
        out = out + mean.to(x.dtype)
    return _zero_out(out, mask.bool())


def policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, *,
                clip_range: float) -> PolicyLossOutput:
    """Clipped surrogate summed over masked tokens; ``old_logp`` and ``advantages`` are constants."""
    fn = "policy_loss"
    _check_tokens(fn, logp=logp, old_logp=old_logp, advantages=advantages, mask=mask)
    _check_clip(fn, "clip_range", clip_range)
    keep = mask.bool()
    diff = _zero_out(logp - old_logp.detach(), keep)
    ratio = torch.exp(diff)
    adv = _zero_out(advantages.detach().to(logp.dtype), keep)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = _zero_out(torch.maximum(unclipped, clipped), keep).sum()
    with torch.no_grad():
        return PolicyLossOutput(
            loss=loss,
            clipfrac=((clipped > unclipped) & keep).to(logp.dtype).sum(),
            approx_kl=(0.5 * diff * diff).sum(),
            ratio=_zero_out(ratio, keep).sum(),
            count=keep.sum().to(torch.int64))


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, *,
               clip_range: float) -> ValueLossOutput:
    """Clipped value loss (with the 0.5) summed over masked tokens; ``old_values``, ``returns`` constants."""
    fn = "value_loss"
    _check_tokens(fn, values=values, old_values=old_values, returns=returns, mask=mask)
    _check_clip(fn, "clip_range", clip_range)
    keep = mask.bool()
    v = _zero_out(values, keep)
    old = _zero_out(old_values.detach().to(values.dtype), keep)
    ret = _zero_out(returns.detach().to(values.dtype), keep)
    v_clipped = old + (v - old).clamp(-clip_range, clip_range)  # == clamp(V, V_old - c, V_old + c)
    unclipped, clipped = (v - ret) ** 2, (v_clipped - ret) ** 2
    loss = 0.5 * _zero_out(torch.maximum(unclipped, clipped), keep).sum()
    with torch.no_grad():
        return ValueLossOutput(loss=loss, clipfrac=((clipped > unclipped) & keep).to(values.dtype).sum(),
                               count=keep.sum().to(torch.int64))


def _float_scores(fn: str, reward_ref: Tensor, reward_pol: Tensor) -> tuple[Tensor, Tensor]:
    if reward_ref.dim() != 1 or tuple(reward_ref.shape) != tuple(reward_pol.shape):
        raise LossArgumentError(f"{fn}: reward_ref and reward_pol must both be [b] RM scores "
                                f"(got {list(reward_ref.shape)} and {list(reward_pol.shape)})")
    dtype = torch.promote_types(reward_ref.dtype, reward_pol.dtype)
    dtype = dtype if dtype.is_floating_point else torch.float32
    return reward_ref.detach().to(dtype), reward_pol.detach().to(dtype)


def ppo_flip_gate(reward_ref: Tensor, reward_pol: Tensor, epsilon: float) -> Tensor:
    """Eq. 7: ``1.0`` where ``R(x, y_ref) - R(x, y_pol) > epsilon`` (strict), else ``0.0``; detached ``[b]``.

    :func:`flip_gate` with the RM scores in place of log-likelihoods: the
    rollout ``y_pol`` plays the policy's part, ``pi0``'s ``y_ref`` the reference's.
    """
    ref, pol = _float_scores("ppo_flip_gate", reward_ref, reward_pol)
    return flip_gate(policy_chosen_logps=pol, ref_chosen_logps=ref, epsilon=epsilon)


def kd_targets_ref(reward_ref: Tensor, reward_pol: Tensor) -> Tensor:
    """``[b]`` bool: True where ``R(x, y_ref) > R(x, y_pol)`` (CE on ``y_ref``), else ``y_pol`` (ties too)."""
    ref, pol = _float_scores("kd_targets_ref", reward_ref, reward_pol)
    return ref > pol
