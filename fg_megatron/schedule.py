"""Run micro-batches through megatron-core's forward/backward schedules.

The one schedule of the project: training (forward + backward), scoring,
reference passes, values and the generation steps of pipeline-parallel models
all go through :func:`run_microbatches`, for any TP x PP layout (at PP=1,
generation decodes directly from the stage's weights:
:mod:`fg_megatron.generation.direct`).  The model gets the batch's
``attention_mask`` when it has one (generation's padding masks; training and
scoring batches are right-padded and need only the causal mask) and an
optional inference context (the KV cache).

What the last pipeline stage computes is the caller's function of the stage's
output (an ``LMHead``, a ``ValueHead``, ...) and the batch:

- ``forward_only=True``: ``fn(head, batch) -> anything``; the results come back
  in micro-batch order.
- training: ``fn(head, batch) -> (loss_sum, count, stats)``.  This is
  megatron-core's 3-value ``loss_func`` contract with
  ``calculate_per_token_loss=True`` (set by the engine): the schedule neither
  divides by the number of micro-batches nor by DP; ``finalize_model_grads``
  all-reduces the counts over DP and scales every gradient by ``1 / sum(count)``.
  So the gradient is that of ``sum(loss_sum) / sum(count)`` over the global
  batch, whatever the layout or the micro-batch sizes: a task returns sums and
  a count and never normalises itself.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from fg_megatron import platform

Batch = dict[str, Any]
LastStageFn = Callable[[Any, Batch], Any]
LossFn = Callable[[Any, Batch], tuple[Tensor, Tensor, Any]]


def _forward_step(fn: Callable, forward_only: bool, inference_context, data_iterator, model):
    batch = to_device(next(data_iterator), platform.default_device())
    kwargs = {} if inference_context is None else {"inference_context": inference_context}
    output = model(batch["input_ids"], batch["position_ids"], batch.get("attention_mask"), **kwargs)
    return output, partial(_forward_only_func if forward_only else _loss_func, fn, batch)


def _forward_only_func(fn: LastStageFn, batch: Batch, head):
    return torch.zeros((), device=platform.default_device()), fn(head, batch)


def _loss_func(fn: LossFn, batch: Batch, head):
    loss_sum, count, stats = fn(head, batch)
    # megatron accumulates the counts in an int tensor and divides the gradients by their sum.
    count = torch.as_tensor(count, device=loss_sum.device).detach().round().to(torch.int)
    return loss_sum, count, stats


def run_microbatches(model, microbatches: list[Batch], fn: Callable, *, forward_only: bool,
                     inference_context: Optional[Any] = None) -> list:
    """Forward (and backward unless ``forward_only``) over ``microbatches``.

    ``model`` is this rank's stage (DDP-wrapped for training).  Every rank of a
    model-parallel group passes the same micro-batches.  Returns, on the last
    pipeline stage, what ``fn`` returned for each micro-batch (``stats`` when
    training), and an empty list elsewhere.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not microbatches:
        return []
    seq_length = max(int(mb["input_ids"].shape[1]) for mb in microbatches)
    micro_batch_size = int(microbatches[0]["input_ids"].shape[0])
    context = torch.no_grad() if forward_only else torch.enable_grad()
    with context:
        out = get_forward_backward_func()(
            forward_step_func=partial(_forward_step, fn, forward_only, inference_context),
            data_iterator=iter(microbatches),
            model=[model],
            num_microbatches=len(microbatches),
            seq_length=seq_length,
            micro_batch_size=micro_batch_size,
            forward_only=forward_only,
        )
    return list(out or [])


def position_ids_like(input_ids: Tensor) -> Tensor:
    """0..s-1 for every row (right padding keeps real tokens at their positions)."""
    b, s = input_ids.shape
    return torch.arange(s, device=input_ids.device).unsqueeze(0).expand(b, s)


def to_device(batch: Batch, device: torch.device) -> Batch:
    """The batch's tensors on ``device`` (collation builds them on the CPU)."""
    return {k: (v.to(device, non_blocking=True) if isinstance(v, Tensor) else v) for k, v in batch.items()}
