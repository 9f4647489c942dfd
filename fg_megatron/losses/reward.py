"""Reward-model loss: the Bradley-Terry pairwise objective of paper eq. 1.

Per pair ``i`` with scalar rewards ``r_c = r(x, y_c)`` and ``r_r = r(x, y_r)``::

    L_i = -log sigmoid(r_c - r_r - m_i)  +  c * (r_c + r_r)^2

``m_i`` is an optional per-pair margin (TRL's ``margin`` column, Llama-2's
graded preferences); ``c`` is TRL's ``center_rewards_coefficient`` (Eisenstein
et al. 2023), which keeps rewards centred on zero.  TRL adds
``c * mean_i (r_c + r_r)^2`` once per batch; as a per-pair term summed and
divided by the global pair count it is the same number.

Returns per-pair losses and metric *sums* (``samples`` is the count), so any
split of the global batch adds up exactly; the caller normalises once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fg_megatron.losses.errors import LossArgumentError, check_per_sample

# Per-pair means; ``reward_loss`` returns their sums plus "samples".
REWARD_METRIC_KEYS: tuple[str, ...] = (
    "loss",             # the full per-pair loss (with the centering term)
    "accuracy",         # fraction of pairs with r_c > r_r
    "margin",           # r_c - r_r
    "reward_chosen",    # r(x, y_c)
    "reward_rejected",  # r(x, y_r)
)
REWARD_SUM_KEYS: tuple[str, ...] = ("samples",) + REWARD_METRIC_KEYS


@dataclass
class RewardLossOutput:
    losses: Tensor                  # [B] L_i, differentiable
    metric_sums: dict[str, Tensor]  # detached 0-d sums, keys REWARD_SUM_KEYS


def reward_loss(chosen_rewards: Tensor, rejected_rewards: Tensor, margins: Optional[Tensor] = None, *,
                center_coefficient: float = 0.0) -> RewardLossOutput:
    """Bradley-Terry loss of ``[B]`` chosen / rejected rewards (paper eq. 1, TRL's RewardTrainer)."""
    fn = "reward_loss"
    check_per_sample(fn, chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    if margins is not None and tuple(margins.shape) != tuple(chosen_rewards.shape):
        raise LossArgumentError(f"{fn}: margins must be [B]={list(chosen_rewards.shape)}, got {list(margins.shape)}")
    if not center_coefficient >= 0:
        raise LossArgumentError(f"{fn}: center_coefficient must be >= 0 (got {center_coefficient})")
    diff = chosen_rewards - rejected_rewards
    logits = diff if margins is None else diff - margins.to(diff.dtype)
    losses = -F.logsigmoid(logits)
    if center_coefficient > 0:
        losses = losses + center_coefficient * (chosen_rewards + rejected_rewards) ** 2
    with torch.no_grad():
        metric_sums = {
            "samples": torch.tensor(float(diff.shape[0]), dtype=losses.dtype, device=losses.device),
            "loss": losses.detach().sum(),
            "accuracy": (diff > 0).to(losses.dtype).sum(),
            "margin": diff.detach().sum(),
            "reward_chosen": chosen_rewards.detach().sum(),
            "reward_rejected": rejected_rewards.detach().sum(),
        }
    return RewardLossOutput(losses=losses, metric_sums=metric_sums)
