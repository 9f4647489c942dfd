"""Vocab-parallel per-token and per-sequence log-likelihood from hidden states.

Everything that needs ``log p(token | prefix)`` calls :func:`token_logprobs`
with the :class:`~fg_megatron.models.gpt.LMHead` of the last pipeline stage.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from fg_megatron.models.gpt import LMHead

IMPLS = ("auto", "triton", "torch", "megatron")


def _megatron_token_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, *, vocab_start: int,
                             vocab_size: int, tp_group: Optional[dist.ProcessGroup]) -> Tensor:
    """Reference path: shard-local logits + megatron-core's vocab-parallel cross entropy.

    Materialises ``[N, V/tp]`` logits; kept as the outside reference for tests.
    """
    from megatron.core import tensor_parallel

    hidden = tensor_parallel.copy_to_tensor_model_parallel_region(hidden, group=tp_group)
    logits = hidden.float() @ weight.float().t()  # [N, V/tp]
    rows = torch.arange(weight.shape[0], device=weight.device) + vocab_start
    logits = logits.masked_fill((rows >= vocab_size)[None, :], float("-inf"))
    # vocab_parallel_cross_entropy overwrites its input: hand it the only copy.
    nll = tensor_parallel.vocab_parallel_cross_entropy(logits[:, None, :], targets[:, None], 0.0)
    return -nll[:, 0]


def token_logprobs(head: LMHead, targets: Tensor, mask: Optional[Tensor] = None, *,
                   tp_group: Optional[dist.ProcessGroup] = None, impl: str = "auto") -> Tensor:
    """``log p(targets[b, t] | tokens <= t)`` as ``[b, s]`` fp32; 0 where ``mask`` is 0.

    ``head.hidden`` is ``[s, b, h]`` (megatron's layout); ``targets`` and ``mask``
    are ``[b, s]``.  Padded vocabulary rows never take probability mass.
    """
    if impl not in IMPLS:
        raise ValueError(f"logprob impl must be one of {IMPLS}, got {impl!r}")
    s, b, h = head.hidden.shape
    hidden = head.hidden.transpose(0, 1).reshape(b * s, h)
    flat_targets = targets.reshape(b * s)
    if mask is None:
        mask = torch.ones_like(targets, dtype=torch.bool)
    flat_mask = mask.reshape(b * s).bool()
    logp = _megatron_token_logprobs(hidden, head.weight, flat_targets, vocab_start=head.vocab_start,
                                    vocab_size=head.vocab_size, tp_group=tp_group)
    logp = torch.where(flat_mask, logp, torch.zeros_like(logp))
    return logp.view(b, s)


def sequence_logprobs(token_logp: Tensor, mask: Tensor) -> Tensor:
    """Sum over the masked positions of each row: ``[b, s] -> [b]``."""
    return (token_logp * mask.to(token_logp.dtype)).sum(dim=-1)


def full_logits(head: LMHead, tp_group: Optional[dist.ProcessGroup] = None) -> Tensor:
    """``[b, s, V]`` logits gathered over TP, padding rows dropped. For parity tests
    and sampling only: the training path never builds these."""
    from megatron.core import tensor_parallel

    hidden = tensor_parallel.copy_to_tensor_model_parallel_region(head.hidden, group=tp_group)
    local = hidden @ head.weight.t()  # [s, b, V/tp]
    gathered = tensor_parallel.gather_from_tensor_model_parallel_region(local, group=tp_group)
    return gathered[..., : head.vocab_size].transpose(0, 1).contiguous()
