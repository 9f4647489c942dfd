"""The DPO-family objective with an optional FlipGuard / KD constraint, plus its metrics.

Per sample (``flipguard.md``; paper eq. 4, 9, 12)::

    L_i = L_dpo_i + CE_i,      CE_i = -gamma * gate_i * logp_pi(y_c|x_i)  [/ n_tokens_i for ce_reduction=mean]

and the batch loss is ``mean_i L_i`` over the *global* batch.

Micro-batches and data parallelism: :func:`preference_loss` returns the
per-sample losses ``losses`` and ``loss = sum_i L_i / num_samples`` (default:
the plain mean of the samples given), plus metric *sums*; it never averages
over an unknown batch itself.  The trainers hand megatron-core
``losses.sum()`` with the count ``B`` (the schedule's 3-value loss contract,
:mod:`fg_megatron.schedule`): megatron-core divides the gradients once by the
all-reduced count, so they are exactly those of
``(1 / global_batch_size) * sum_i L_i`` whatever the layout.  For logging, add
the ``metric_sums`` of all micro-batches (:func:`reduce_metric_sums`),
all-reduce the stacked values over DP, then call :func:`metrics_from_sums`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import torch
from torch import Tensor

from fg_megatron.losses.dpo import DPOLossType, dpo_loss
from fg_megatron.losses.errors import LossArgumentError, check_choice, check_per_sample
from fg_megatron.losses.flipguard import (CE_REDUCTIONS, CONSTRAINTS, CEReduction, Constraint,
                                          constraint_ce, constraint_gate, flip_gate)

# Every metric is a per-sample mean; ``metric_sums`` holds the sums under the
# same names plus "samples" (the count), so sums from any split of the batch
# add up exactly.
METRIC_KEYS: tuple[str, ...] = (
    "loss",              # dpo_loss + ce_loss
    "dpo_loss",          # the DPO / IPO / hinge term
    "ce_loss",           # the constraint term as it enters the loss: -gamma * gate * logp (or /n_tokens)
    "gate_rate",         # fraction of samples gated (live proxy of the negative-flip rate)
    "chosen_drop_rate",  # fraction with logp_pi0(y_c) - logp_pi(y_c) > epsilon, whatever the constraint
    "rewards_chosen",    # beta * (logp_pi(y_c) - logp_pi0(y_c))
    "rewards_rejected",  # beta * (logp_pi(y_r) - logp_pi0(y_r))
    "reward_margin",     # rewards_chosen - rewards_rejected
    "reward_accuracy",   # fraction with margin > 0
    "logps_chosen",      # logp_pi(y_c|x), sequence sum
    "logps_rejected",    # logp_pi(y_r|x), sequence sum
)
METRIC_SUM_KEYS: tuple[str, ...] = ("samples",) + METRIC_KEYS


@dataclass
class PreferenceLossOutput:
    """What one call of :func:`preference_loss` produces (``B`` = samples in the call)."""

    loss: Tensor               # scalar, differentiable: sum_i L_i / num_samples
    losses: Tensor             # [B] L_i, differentiable
    dpo_losses: Tensor         # [B] L_dpo_i, differentiable
    ce_losses: Tensor          # [B] CE_i, differentiable (zeros for constraint=none)
    gate: Tensor               # [B] 0/1, detached: which samples got the CE term
    chosen_rewards: Tensor     # [B] detached
    rejected_rewards: Tensor   # [B] detached
    metric_sums: dict[str, Tensor]  # detached 0-d sums, keys METRIC_SUM_KEYS

    @property
    def metrics(self) -> dict[str, Tensor]:
        """Per-sample means over this call's samples (detached 0-d tensors)."""
        return metrics_from_sums(self.metric_sums)


def preference_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
                    ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
                    chosen_token_counts: Optional[Tensor] = None, *, beta: float,
                    constraint: Constraint, gamma: float, epsilon: float,
                    loss_type: DPOLossType = "sigmoid", label_smoothing: float = 0.0,
                    ce_reduction: CEReduction = "sum",
                    num_samples: Optional[float] = None,
                    rejected_token_counts: Optional[Tensor] = None) -> PreferenceLossOutput:
    """DPO (+ FlipGuard / KD) loss for a batch of ``[B]`` sequence log-likelihoods.

    ``L_i = dpo_loss_i + constraint_ce_i`` where the gate is ``constraint_gate``
    (``none``: 0, ``kd``: 1, ``flipguard``: eq. 9 on the detached current
    policy). ``chosen_token_counts`` (``[B]``, response tokens of ``y_c``) is
    needed for ``ce_reduction="mean"`` only. ``loss = sum_i L_i / num_samples``
    (default ``num_samples = B``: the plain mean); see the module docstring for
    the value that gives exact global-batch means under micro-batching.
    With ``loss_type="ipo"`` and both token counts given, the IPO term uses
    per-token average log-likelihoods as TRL does.
    """
    fn = "preference_loss"
    check_per_sample(fn, policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
                     ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    check_choice(fn, "constraint", constraint, CONSTRAINTS)
    check_choice(fn, "ce_reduction", ce_reduction, CE_REDUCTIONS)
    batch = policy_chosen_logps.shape[0]
    if num_samples is None:
        num_samples = batch
    if not num_samples > 0:
        raise LossArgumentError(f"{fn}: num_samples must be > 0 (got {num_samples})")

    dpo_inputs = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    if loss_type == "ipo" and chosen_token_counts is not None and rejected_token_counts is not None:
        # TRL's IPO compares per-token average log-likelihoods; the gate and the CE
        # term below keep the sequence sums of eq. 9 / 12.
        nc, nr = chosen_token_counts.to(policy_chosen_logps.dtype), rejected_token_counts.to(policy_chosen_logps.dtype)
        dpo_inputs = (policy_chosen_logps / nc, policy_rejected_logps / nr, ref_chosen_logps / nc,
                      ref_rejected_logps / nr)
    dpo_losses, chosen_rewards, rejected_rewards = dpo_loss(
        *dpo_inputs, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
    if dpo_inputs[0] is not policy_chosen_logps:  # logged rewards keep their meaning: sequence sums
        chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
        rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    gate = constraint_gate(constraint, policy_chosen_logps, ref_chosen_logps, epsilon)
    if constraint == "none":
        # Nothing is added, not even 0 * logp: the loss is bit-identical to plain DPO.
        ce_losses = torch.zeros_like(dpo_losses)
    else:
        ce_losses = constraint_ce(policy_chosen_logps, chosen_token_counts, gate, gamma=gamma,
                                  reduction=ce_reduction)
    losses = dpo_losses + ce_losses
    loss = losses.sum() / num_samples

    with torch.no_grad():
        margin = chosen_rewards - rejected_rewards
        metric_sums = {
            "samples": torch.tensor(float(batch), dtype=losses.dtype, device=losses.device),
            "loss": losses.detach().sum(),
            "dpo_loss": dpo_losses.detach().sum(),
            "ce_loss": ce_losses.detach().sum(),
            "gate_rate": gate.sum(),
            "chosen_drop_rate": flip_gate(policy_chosen_logps, ref_chosen_logps, epsilon).sum(),
            "rewards_chosen": chosen_rewards.sum(),
            "rewards_rejected": rejected_rewards.sum(),
            "reward_margin": margin.sum(),
            "reward_accuracy": (margin > 0).to(losses.dtype).sum(),
            "logps_chosen": policy_chosen_logps.detach().sum(),
            "logps_rejected": policy_rejected_logps.detach().sum(),
        }
    return PreferenceLossOutput(loss=loss, losses=losses, dpo_losses=dpo_losses, ce_losses=ce_losses,
                                gate=gate, chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards,
                                metric_sums=metric_sums)


def reduce_metric_sums(parts: Iterable[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Add the ``metric_sums`` of several micro-batches key by key."""
    parts = list(parts)
    if not parts:
        raise LossArgumentError("reduce_metric_sums: no metric sums given (no micro-batch ran on this rank?)")
    return {k: torch.stack([p[k] for p in parts]).sum() for k in METRIC_SUM_KEYS}


def metrics_from_sums(metric_sums: dict[str, Tensor]) -> dict[str, Tensor]:
    """Per-sample means: each metric sum divided by ``metric_sums["samples"]``."""
    samples = metric_sums["samples"]
    return {k: metric_sums[k] / samples for k in METRIC_KEYS}
