"""Vocab-parallel per-token and per-sequence log-likelihood from hidden states.

Everything that needs ``log p(token | prefix)`` calls :func:`token_logprobs`
with the :class:`~fg_megatron.models.gpt.LMHead` of the last pipeline stage.
The work is done by the fused sequence log-likelihood of ``kernels/``
(the package ``fg_megatron_kernels``; math, TP combination and memory profile
in ``kernels/seq_loglik.py``), chosen by ``impl`` (``--logprob-impl``):
``auto`` (Triton on CUDA, chunked torch elsewhere), ``triton``, ``torch``, or
``megatron`` (the outside reference on materialised logits).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from fg_megatron_kernels.seq_loglik import seq_loglik
from torch import Tensor

from fg_megatron.models.gpt import LMHead

IMPLS = ("auto", "triton", "torch", "megatron")


class LogprobImplError(ValueError):
    """An unknown ``--logprob-impl`` / ``model.logprob_impl`` value."""


def resolve_impl(impl: str) -> str:
    """``auto`` -> ``triton`` on CUDA, ``torch`` elsewhere; other names are checked and kept.

    ``triton`` without CUDA runs under the Triton interpreter (slow: tests and
    parity checks only); ``megatron`` is megatron-core's vocab-parallel cross
    entropy on materialised ``[tokens, V/tp]`` logits (the outside reference).
    """
    if impl not in IMPLS:
        raise LogprobImplError(f"logprob impl must be one of {', '.join(IMPLS)}; got {impl!r}")
    if impl == "auto":
        return "triton" if torch.cuda.is_available() else "torch"
    return impl


def _default_tp_group(tp_group: Optional[dist.ProcessGroup]) -> Optional[dist.ProcessGroup]:
    """``None`` means megatron's TP group when parallel state is set up (as megatron-core's
    own functions read it): a sharded weight never silently misses its other shards."""
    if tp_group is not None or not dist.is_initialized():
        return tp_group
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_group() if ps.model_parallel_is_initialized() else None


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
    ``impl`` (see :func:`resolve_impl`): ``torch`` / ``triton`` never build the
    ``[tokens, vocab]`` logits (kernels/seq_loglik.py); ``megatron`` does.
    Differentiable w.r.t. ``head.hidden`` and ``head.weight``; every value <= 0.
    """
    impl = resolve_impl(impl)
    tp_group = _default_tp_group(tp_group)
    s, b, h = head.hidden.shape
    if targets.shape != (b, s) or (mask is not None and mask.shape != (b, s)):
        raise ValueError(f"targets and mask must be [b, s] = [{b}, {s}] to match hidden [s, b, h] = "
                         f"{list(head.hidden.shape)}; got {list(targets.shape)} and "
                         f"{None if mask is None else list(mask.shape)}")
    if mask is None:
        mask = torch.ones_like(targets, dtype=torch.bool)
    # Tokens in megatron's [s, b] order: hidden flattens without a copy.
    hidden = head.hidden.reshape(s * b, h)
    flat_targets = targets.t().reshape(s * b)
    flat_mask = mask.t().reshape(s * b).bool()
    if impl == "megatron":
        logp = _megatron_token_logprobs(hidden, head.weight, flat_targets, vocab_start=head.vocab_start,
                                        vocab_size=head.vocab_size, tp_group=tp_group)
        logp = torch.where(flat_mask, logp, torch.zeros_like(logp))
    else:
        logp = seq_loglik(hidden, head.weight, flat_targets, flat_mask, vocab_start=head.vocab_start,
                          vocab_size=head.vocab_size, tp_group=tp_group, impl=impl)
    return logp.view(s, b).t().contiguous()


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


@dataclass(frozen=True)
class LogprobOp:
    """The log-likelihood operation of a run: implementation and TP group fixed once
    (:func:`build_logprob_op`) and handed to every task, so no step re-resolves them."""

    impl: str  # resolved: "torch", "triton" or "megatron"
    tp_group: Optional[dist.ProcessGroup]

    def tokens(self, head: LMHead, targets: Tensor, mask: Tensor) -> Tensor:
        """Per-token log-probs ``[b, s]`` (see :func:`token_logprobs`)."""
        return token_logprobs(head, targets, mask, tp_group=self.tp_group, impl=self.impl)

    def sequences(self, head: LMHead, targets: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Per-row sums of the masked log-probs ``[b]`` and the masked token counts ``[b]``."""
        return sequence_logprobs(self.tokens(head, targets, mask), mask), mask.sum(dim=-1)


def build_logprob_op(impl: str, tp_group: Optional[dist.ProcessGroup] = None) -> LogprobOp:
    """``impl`` resolved (``auto`` -> Triton on CUDA, torch elsewhere) with the run's TP group."""
    return LogprobOp(impl=resolve_impl(impl), tp_group=_default_tp_group(tp_group))
