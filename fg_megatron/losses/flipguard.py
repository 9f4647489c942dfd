"""The FlipGuard constraint (Zhu et al., EMNLP 2024): gate and cross-entropy term.

DPO form (paper eq. 9 and 12), per sample with chosen response ``y_c``::

    gate = 1  if  logp_pi0(y_c|x) - logp_pi(y_c|x) > epsilon  else 0     (detached)
    CE   = -gamma * gate * logp_pi(y_c|x)

``logp`` is the sequence log-likelihood (sum over response tokens). The gate
always compares these sums, as eq. 9 does; ``ce_reduction`` only changes the
CE term (``sum``: eq. 12 as written; ``mean``: divided by the response's
token count).

``constraint`` selects the gate: ``none`` (no CE term), ``kd`` (the paper's
"naive distillation" ablation: every sample gated) or ``flipguard`` (eq. 9).
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from torch import Tensor

from fg_megatron.losses.errors import LossArgumentError, check_choice, check_per_sample

Constraint = Literal["none", "kd", "flipguard"]
CONSTRAINTS: tuple[str, ...] = ("none", "kd", "flipguard")
CEReduction = Literal["sum", "mean"]
CE_REDUCTIONS: tuple[str, ...] = ("sum", "mean")


def flip_gate(policy_chosen_logps: Tensor, ref_chosen_logps: Tensor, epsilon: float) -> Tensor:
    """Eq. 9: ``1.0`` where ``logp_pi0(y_c|x) - logp_pi(y_c|x) > epsilon`` (strict), else ``0.0``.

    A sample whose difference equals ``epsilon`` exactly is *not* gated (so at
    policy = reference with ``epsilon = 0`` nothing is). Computed on detached
    values: the gate is a selector, it never carries gradient. Returns ``[B]``
    in the dtype of ``policy_chosen_logps``.
    """
    check_per_sample("flip_gate", policy_chosen_logps=policy_chosen_logps, ref_chosen_logps=ref_chosen_logps)
    diff = ref_chosen_logps.detach() - policy_chosen_logps.detach()
    return (diff > epsilon).to(policy_chosen_logps.dtype)


def constraint_gate(constraint: Constraint, policy_chosen_logps: Tensor, ref_chosen_logps: Tensor,
                    epsilon: float) -> Tensor:
    """The ``[B]`` 0/1 gate for ``constraint``: zeros (``none``), ones (``kd``) or :func:`flip_gate`."""
    check_choice("constraint_gate", "constraint", constraint, CONSTRAINTS)
    if constraint == "flipguard":
        return flip_gate(policy_chosen_logps, ref_chosen_logps, epsilon)
    check_per_sample("constraint_gate", policy_chosen_logps=policy_chosen_logps, ref_chosen_logps=ref_chosen_logps)
    fill = 1.0 if constraint == "kd" else 0.0
    return torch.full_like(policy_chosen_logps, fill, requires_grad=False)


def constraint_ce(policy_chosen_logps: Tensor, chosen_token_counts: Optional[Tensor], gate: Tensor, *,
                  gamma: float, reduction: CEReduction = "sum") -> Tensor:
    """Per-sample CE term ``-gamma * gate * logp_pi(y_c|x)`` (eq. 12), ``[B]``.

    ``reduction="sum"`` uses the sequence log-likelihood as is; ``"mean"``
    divides it by ``chosen_token_counts`` (response tokens per sample, > 0),
    i.e. the per-token mean NLL. ``gate`` is detached here as well, so a
    caller's soft or differentiable gate cannot leak gradient.
    """
    fn = "constraint_ce"
    check_per_sample(fn, policy_chosen_logps=policy_chosen_logps, gate=gate)
    check_choice(fn, "reduction", reduction, CE_REDUCTIONS)
    if gamma < 0:
        raise LossArgumentError(
            f"{fn}: gamma must be >= 0 (got {gamma}); the paper uses 0.01 (0.005 for summarisation)")
    logp = policy_chosen_logps
    if reduction == "mean":
        if chosen_token_counts is None:
            raise LossArgumentError(f"{fn}: reduction='mean' needs chosen_token_counts (response tokens per sample)")
        check_per_sample(fn, policy_chosen_logps=policy_chosen_logps, chosen_token_counts=chosen_token_counts)
        if bool((chosen_token_counts <= 0).any()):
            raise LossArgumentError(
                f"{fn}: chosen_token_counts must be > 0 for reduction='mean' (got {chosen_token_counts.tolist()}); "
                f"a chosen response with no tokens is a data error")
        logp = logp / chosen_token_counts.to(logp.dtype)
    return -gamma * gate.detach().to(logp.dtype) * logp
