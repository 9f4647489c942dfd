"""The divergence guard: stop a run whose model is being wrecked, before it is saved.

A non-finite gradient norm already stops a step before it is applied
(:mod:`.engine`).  A *finite* but absurd learning rate does not: Adam moves
every weight by about ``lr`` whatever the gradient, so ``lr=1e4`` turns a model
into noise with finite losses and a gradient norm that collapses to 0.  After
every step the guard looks at three signals, each the same on every rank:

- the weight norm of every trainable part: NaN/inf, or a change by more than
  ``train.divergence_factor`` in one step (healthy steps move it by well under 1%);
- the gradient norm collapsing to under 1e-6 of its largest value so far;
- the loss exceeding ``divergence_factor`` times its largest value over the last
  ``LOSS_WINDOW`` steps (and by more than ``LOSS_FLOOR``, so losses near 0 do not trip it).

A trip raises :class:`DivergenceError` (one line, exit 2); the loop calls the
guard before the step's checkpoint, so the last saved checkpoint is healthy.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Optional

import torch
import torch.distributed as dist

from fg_megatron.parallel import ParallelContext

LOSS_WINDOW = 20
LOSS_FLOOR = 1.0
GRAD_COLLAPSE = 1e-6


class DivergenceError(RuntimeError):
    """Training diverged: the step's model is not saved."""


def weight_norm(module: torch.nn.Module, ctx: ParallelContext) -> float:
    """L2 norm of a model's parameters over every TP shard and PP stage, each counted once
    (TP-replicated tensors on TP rank 0 only, the last stage's copy of tied embeddings not at
    all), identical on every rank and for every layout."""
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
    from megatron.core.transformer.module import param_is_not_shared

    total = torch.zeros((), dtype=torch.float64, device=ctx.device)
    for param in module.parameters():
        if param_is_not_shared(param) and param_is_not_tensor_parallel_duplicate(param):
            total += param.detach().double().pow(2).sum()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total)
    return math.sqrt(total.item() / ctx.dp)  # every DP replica holds the same weights


class DivergenceGuard:
    def __init__(self, factor: float) -> None:
        self.factor = factor
        self.norms: dict[str, float] = {}
        self.losses: deque[float] = deque(maxlen=LOSS_WINDOW)
        self.max_grad_norm = 0.0

    def start(self, norms: dict[str, float]) -> None:
        """The weight norms the run starts (or resumes) from."""
        self.norms = dict(norms)

    def check(self, step: int, norms: dict[str, float], metrics: dict) -> None:
        """Raise :class:`DivergenceError` if step ``step`` diverged; else remember its values."""
        problem = self._problem(norms, metrics)
        if problem is not None:
            raise DivergenceError(f"step {step}: {problem}")
        self.norms = dict(norms)
        loss = metrics.get("loss")
        if loss is not None and math.isfinite(loss):
            self.losses.append(float(loss))
        grad_norm = metrics.get("grad_norm")
        if grad_norm is not None and math.isfinite(grad_norm):
            self.max_grad_norm = max(self.max_grad_norm, float(grad_norm))

    def _problem(self, norms: dict[str, float], metrics: dict) -> Optional[str]:
        for name, norm in norms.items():
            if not math.isfinite(norm):
                return f"the weights of {name} hold NaN/inf (weight norm {norm})"
        if not self.factor:
            return None
        setting = f"train.divergence_factor={self.factor:g}"
        for name, norm in norms.items():
            before = self.norms.get(name)
            if before and not 1 / self.factor <= norm / before <= self.factor:
                return (f"the weight norm of {name} went from {before:.4g} to {norm:.4g} in one step "
                        f"({norm / before:.3g}x; {setting})")
        grad_norm = metrics.get("grad_norm")
        if (grad_norm is not None and math.isfinite(grad_norm) and self.max_grad_norm > 0
                and grad_norm < GRAD_COLLAPSE * self.max_grad_norm):
            return (f"the gradient norm collapsed to {grad_norm:.3g} (it was up to {self.max_grad_norm:.4g}): "
                    f"the model is saturated")
        loss = metrics.get("loss")
        if loss is not None and math.isfinite(loss) and self.losses:
            peak = max(abs(v) for v in self.losses)
            if loss > self.factor * peak and loss - peak > LOSS_FLOOR:
                return (f"the loss jumped to {loss:.4g}, over {self.factor:g}x its recent maximum {peak:.4g} "
                        f"({setting})")
        return None
