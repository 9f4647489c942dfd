"""Run micro-batches through megatron-core's forward/backward schedules.

One function serves scoring (forward only), reference log-probs and training
(forward + backward), for any TP x PP layout.  The caller supplies a
``head_fn(head, batch) -> (loss, stats)`` that runs on the last pipeline stage;
megatron-core's step contract (``forward_step -> (output, loss_func)``) is kept
inside this module.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from torch import Tensor

from fg_megatron import platform
from fg_megatron.models.gpt import LMHead

Batch = dict[str, Tensor]
HeadFn = Callable[[LMHead, Batch], tuple[Tensor, dict]]


def _forward_step(head_fn: HeadFn, data_iterator, model):
    batch = to_device(next(data_iterator), platform.default_device())
    output = model(batch["input_ids"], batch["position_ids"], None)
    return output, partial(_loss_func, head_fn, batch)


def _loss_func(head_fn: HeadFn, batch: Batch, head: LMHead):
    loss, stats = head_fn(head, batch)
    # The 2-value contract: the schedule divides ``loss`` in place by the number
    # of micro-batches, so stats must not alias it.
    return loss, stats


def run_microbatches(model, microbatches: list[Batch], head_fn: HeadFn, *,
                     forward_only: bool) -> list[dict]:
    """Forward (and backward unless ``forward_only``) over ``microbatches``.

    ``model`` is this rank's stage (optionally DDP-wrapped).  Every rank of a
    model-parallel group passes the same micro-batches.  Returns, on the last
    pipeline stage, the ``stats`` of each micro-batch (an empty list elsewhere).
    The loss returned by ``head_fn`` is the micro-batch's contribution to the
    global-batch loss times the number of micro-batches (the schedule divides).
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not microbatches:
        return []
    seq_length = max(int(mb["input_ids"].shape[1]) for mb in microbatches)
    micro_batch_size = int(microbatches[0]["input_ids"].shape[0])
    forward_backward = get_forward_backward_func()
    context = torch.no_grad() if forward_only else torch.enable_grad()
    with context:
        stats = forward_backward(
            forward_step_func=partial(_forward_step, head_fn),
            data_iterator=iter(microbatches),
            model=[model],
            num_microbatches=len(microbatches),
            seq_length=seq_length,
            micro_batch_size=micro_batch_size,
            forward_only=forward_only,
        )
    return list(stats or [])


def position_ids_like(input_ids: Tensor) -> Tensor:
    """0..s-1 for every row (right padding keeps real tokens at their positions)."""
    b, s = input_ids.shape
    return torch.arange(s, device=input_ids.device).unsqueeze(0).expand(b, s)


def to_device(batch: Batch, device: torch.device) -> Batch:
    """The batch's tensors on ``device`` (collation builds them on the CPU)."""
    return {k: (v.to(device, non_blocking=True) if isinstance(v, Tensor) else v) for k, v in batch.items()}
