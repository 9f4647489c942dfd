"""The named models of a run.

A run holds one or more *parts* by name (``policy``, ``reference``, ``reward``,
``critic``, ...).  A trainable part owns megatron-core DDP, an optimizer and a
scheduler (:class:`~fg_megatron.trainers.engine.Engine`); a frozen part is the
bare model stage in eval mode with no gradients and no optimizer state, and can
be freed once it has served (a precomputed reference).  Every part runs
through the one schedule, :func:`fg_megatron.schedule.run_microbatches`.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from fg_megatron.checkpoint.layout import CheckpointMeta
from fg_megatron.checkpoint.load import load_model
from fg_megatron.checkpoint.mapping import CheckpointMismatchError
from fg_megatron.models.arch import ModelArch
from fg_megatron.parallel import ParallelContext, get_logger
from fg_megatron.schedule import Batch, LossFn, run_microbatches
from fg_megatron.trainers.engine import Engine, build_engine, train_step

log = get_logger("train")


@dataclass
class ModelPart:
    name: str
    module: torch.nn.Module  # this rank's GPTModel stage (unwrapped)
    arch: ModelArch
    meta: CheckpointMeta  # what save_model needs to write it back as a checkpoint
    engine: Optional[Engine] = None  # trainable parts only

    @property
    def trainable(self) -> bool:
        return self.engine is not None

    @property
    def runnable(self) -> torch.nn.Module:
        """What the schedule runs: the DDP wrapper of a trainable part, else the stage."""
        return self.engine.model if self.engine is not None else self.module

    def forward(self, microbatches: list[Batch], fn: Callable[[Any, Batch], Any]) -> list:
        """Forward only; ``fn(head, batch)`` per micro-batch on the last stage."""
        return run_microbatches(self.runnable, microbatches, fn, forward_only=True)

    def train_step(self, microbatches: list[Batch], loss_fn: LossFn) -> tuple[list, dict]:
        """One optimizer step of this part (see :func:`~fg_megatron.trainers.engine.train_step`)."""
        if self.engine is None:
            raise RuntimeError(f"model {self.name!r} is frozen: it has no optimizer")
        return train_step(self.engine, microbatches, loss_fn)


def load_part(name: str, path: str, ctx: ParallelContext, *, dtype: torch.dtype, model_cfg: Any,
              trainable: bool, head: Optional[str] = None, optim: Any = None,
              total_steps: int = 1) -> ModelPart:
    """Load ``path`` as part ``name``: with DDP + optimizer + scheduler when ``trainable``
    (``optim``: an OptimConfig; ``total_steps``: the scheduler's length), else frozen."""
    model, arch, meta = load_model(path, ctx, dtype=dtype, vocab_pad_multiple=model_cfg.vocab_pad_multiple,
                                   recompute=model_cfg.recompute if trainable else "none",
                                   sequence_parallel=model_cfg.sequence_parallel, head=head)
    engine = None
    if trainable:
        engine = build_engine(model, ctx, optim, total_steps, dtype)
    else:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
    log.info("%s: %s (%s%s, %d layers, hidden %d, vocab %d) | tp=%d pp=%d dp=%d | %s%s", name, path, arch.family,
             "" if arch.head == "lm" else f" {arch.head} head", arch.num_layers, arch.hidden_size, arch.vocab_size,
             ctx.tp, ctx.pp, ctx.dp, str(dtype).replace("torch.", ""), "" if trainable else " | frozen")
    return ModelPart(name=name, module=model, arch=arch, meta=meta, engine=engine)


def check_same_vocabulary(part: ModelPart, other: ModelPart, source: str) -> None:
    """Parts that score the same token ids must share family and vocabulary."""
    if (part.arch.vocab_size, part.arch.family) != (other.arch.vocab_size, other.arch.family):
        raise CheckpointMismatchError(
            f"{source}: {part.name} is {part.arch.family} with vocabulary {part.arch.vocab_size}, which does not "
            f"match {other.name} ({other.arch.family}, {other.arch.vocab_size})")


def free_part(parts: dict[str, ModelPart], name: str) -> None:
    """Drop a part that has served (e.g. a reference whose log-probs are precomputed)."""
    part = parts.get(name)
    if part is None:
        return
    if part.trainable:
        raise RuntimeError(f"model {name!r} is trainable and cannot be freed")
    del parts[name], part
    gc.collect()
