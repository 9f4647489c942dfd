"""DPO and its IPO / hinge variants, as TRL's ``DPOTrainer.dpo_loss`` writes them.

Per sample, with sequence log-likelihoods (sum over response tokens) of the
policy ``pi`` and the reference ``pi0`` for the chosen ``y_c`` and rejected
``y_r`` responses::

    h = (logp_pi(y_c) - logp_pi0(y_c)) - (logp_pi(y_r) - logp_pi0(y_r))

    sigmoid: -log sigmoid(beta * h) * (1 - ls) - log sigmoid(-beta * h) * ls
             (Rafailov et al. 2023 eq. 7; ls > 0 is conservative DPO, cDPO)
    ipo:     (h - 1 / (2 * beta)) ** 2          (Azar et al. 2023 eq. 17, beta = tau)
    hinge:   relu(1 - beta * h)                 (SLiC-style, Zhao et al. 2023)

Implicit rewards: ``beta * (logp_pi(y) - logp_pi0(y))``, detached.

TRL feeds IPO token-*mean* log-likelihoods (``average_log_prob`` for ``ipo``);
this function uses whatever it is given, so a trainer that wants TRL's IPO
passes per-token means.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from fg_megatron.losses.errors import LossArgumentError, check_choice, check_per_sample

DPOLossType = Literal["sigmoid", "ipo", "hinge"]
DPO_LOSS_TYPES: tuple[str, ...] = ("sigmoid", "ipo", "hinge")


def dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
             ref_chosen_logps: Tensor, ref_rejected_logps: Tensor, *, beta: float,
             loss_type: DPOLossType = "sigmoid",
             label_smoothing: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample DPO loss and implicit rewards (formulas in the module docstring).

    All inputs are ``[B]`` sequence log-likelihoods; gradients flow into
    whichever of them require grad (normally the two policy ones).

    Returns ``(losses [B], chosen_rewards [B], rejected_rewards [B])``; the
    rewards ``beta * (logp_pi - logp_pi0)`` are detached.
    """
    fn = "dpo_loss"
    check_per_sample(fn, policy_chosen_logps=policy_chosen_logps,
                     policy_rejected_logps=policy_rejected_logps,
                     ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    check_choice(fn, "loss_type", loss_type, DPO_LOSS_TYPES)
    if not beta > 0:
        raise LossArgumentError(f"{fn}: beta must be > 0 (got {beta}); the paper uses 0.1 (0.05 for summarisation)")
    if not 0.0 <= label_smoothing <= 0.5:
        raise LossArgumentError(f"{fn}: label_smoothing must be in [0, 0.5] (got {label_smoothing})")
    if label_smoothing and loss_type != "sigmoid":
        raise LossArgumentError(
            f"{fn}: label_smoothing={label_smoothing} only applies to loss_type='sigmoid' "
            f"(got loss_type={loss_type!r}); set label_smoothing to 0")

    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    h = chosen_logratios - rejected_logratios  # TRL's `logits` (no beta)

    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h) * (1.0 - label_smoothing)
        if label_smoothing:
            losses = losses - F.logsigmoid(-beta * h) * label_smoothing
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:  # hinge
        losses = torch.relu(1.0 - beta * h)

    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards
