"""Pure loss functions: tensors in, tensors out; no process groups, no global state.

One module per loss:
    sft         ``sft_loss``: response-token NLL sum and token count
    dpo         ``dpo_loss``: sigmoid (with label smoothing) / ipo / hinge, as TRL
    flipguard   ``flip_gate`` (eq. 9), ``constraint_gate`` (none / kd / flipguard),
                ``constraint_ce`` (eq. 12)
    preference  ``preference_loss``: DPO + constraint, metrics, exact micro-batch sums
    reward      ``reward_loss``: Bradley-Terry pairwise loss (eq. 1), margin, centering
    ppo         per-token KL rewards, masked GAE, whitening, clipped policy / value
                losses (token sums + count), ``ppo_flip_gate`` (eq. 7), ``kd_targets_ref``

Normalisation over a global batch is megatron-core's (the trainers hand it
sums and a count): these functions return per-sample losses and metric sums,
so any TP / PP / DP / micro-batch split gives the same loss.
"""

from fg_megatron.losses.dpo import DPO_LOSS_TYPES, DPOLossType, dpo_loss
from fg_megatron.losses.errors import LossArgumentError
from fg_megatron.losses.flipguard import (CE_REDUCTIONS, CONSTRAINTS, CEReduction, Constraint,
                                          constraint_ce, constraint_gate, flip_gate)
from fg_megatron.losses.preference import (METRIC_KEYS, METRIC_SUM_KEYS, PreferenceLossOutput,
                                           metrics_from_sums, preference_loss, reduce_metric_sums)
from fg_megatron.losses.ppo import (KL_ESTIMATORS, KLEstimator, PolicyLossOutput, ValueLossOutput, gae,
                                    kd_targets_ref, kl_per_token, masked_mean, masked_moments, policy_loss,
                                    ppo_flip_gate, token_rewards, value_loss, whiten)
from fg_megatron.losses.reward import REWARD_METRIC_KEYS, REWARD_SUM_KEYS, RewardLossOutput, reward_loss
from fg_megatron.losses.sft import sft_loss

__all__ = [
    "CE_REDUCTIONS", "CONSTRAINTS", "CEReduction", "Constraint", "DPO_LOSS_TYPES", "DPOLossType",
    "LossArgumentError", "METRIC_KEYS", "METRIC_SUM_KEYS", "PreferenceLossOutput", "constraint_ce",
    "constraint_gate", "dpo_loss", "flip_gate", "metrics_from_sums", "preference_loss",
    "reduce_metric_sums", "sft_loss", "REWARD_METRIC_KEYS", "REWARD_SUM_KEYS", "RewardLossOutput",
    "reward_loss", "KL_ESTIMATORS", "KLEstimator", "PolicyLossOutput", "ValueLossOutput", "gae",
    "kd_targets_ref", "kl_per_token", "masked_mean", "masked_moments", "policy_loss", "ppo_flip_gate",
    "token_rewards", "value_loss", "whiten",
]
