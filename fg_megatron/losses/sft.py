"""Supervised fine-tuning loss: next-token NLL on the masked (response) tokens.

    nll_sum    = -sum_{b,t} mask[b,t] * log p(token[b,t] | prefix)
    num_tokens =  sum_{b,t} mask[b,t]

Both are returned so the caller can normalise by the token count of the whole
global batch (sum ``nll_sum`` and ``num_tokens`` over micro-batches and DP
ranks, then divide once): a per-micro-batch mean would weight short and long
micro-batches equally.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fg_megatron.losses.errors import LossArgumentError


def sft_loss(token_logps: Tensor, loss_mask: Tensor) -> tuple[Tensor, Tensor]:
    """``(nll_sum, num_tokens)`` from ``[b, s]`` per-token log-probs and a ``[b, s]`` 0/1 mask.

    ``nll_sum`` is a differentiable scalar in ``token_logps``'s dtype;
    ``num_tokens`` a detached int64 scalar. Masked-out positions contribute
    nothing even if their log-prob is not finite.
    """
    if token_logps.dim() != 2 or tuple(loss_mask.shape) != tuple(token_logps.shape):
        raise LossArgumentError(
            f"sft_loss: token_logps and loss_mask must both be [b, s] (got {tuple(token_logps.shape)} "
            f"and {tuple(loss_mask.shape)})")
    keep = loss_mask.bool()
    # where(), not a product: 0 * -inf at a padded position would be NaN.
    nll_sum = -torch.where(keep, token_logps, torch.zeros_like(token_logps)).sum()
    num_tokens = keep.sum().to(torch.int64)
    return nll_sum, num_tokens
