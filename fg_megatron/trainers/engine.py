"""The optimisation machinery of one trainable model: megatron-core DDP,
megatron-core's optimizer (AdamW, distributed where the backend allows), the
lr/wd scheduler, and one optimizer step over a list of micro-batches.

Loss normalisation lives in megatron-core: the model's config gets
``calculate_per_token_loss=True``, so DDP sums gradients over DP (scaling
factor 1) and ``finalize_model_grads`` divides them by the global count the
loss functions return (see :mod:`fg_megatron.schedule`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from fg_megatron import platform
from fg_megatron.config import OptimConfig
from fg_megatron.parallel import ParallelContext, get_logger
from fg_megatron.schedule import Batch, LossFn, run_microbatches

log = get_logger("engine")


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm became NaN/inf: the step was not applied."""


@dataclass
class Engine:
    ctx: ParallelContext
    model: Any  # megatron-core DistributedDataParallel around this rank's stage
    optimizer: Any  # megatron-core MegatronOptimizer
    scheduler: Any  # megatron-core OptimizerParamScheduler
    total_steps: int
    optim: Optional[OptimConfig] = None  # what the optimizer and scheduler were built from

    @property
    def module(self):
        """The unwrapped GPTModel stage."""
        return self.model.module

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])


def distributed_optimizer_supported(ctx: ParallelContext) -> bool:
    """megatron-core's distributed optimizer needs reduce-scatter / all-gather-into-tensor,
    which gloo lacks; it is used with NCCL and DP > 1."""
    return ctx.dp > 1 and dist.get_backend() == "nccl"


def build_engine(model, ctx: ParallelContext, optim: OptimConfig, total_steps: int,
                 dtype: torch.dtype = torch.float32) -> Engine:
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    use_dist_opt = optim.use_distributed_optimizer and distributed_optimizer_supported(ctx)
    if optim.use_distributed_optimizer and ctx.dp > 1 and not use_dist_opt:
        log.info("distributed optimizer needs NCCL; using the replicated optimizer on %s",
                 dist.get_backend())
    tconfig = model.config
    # Losses are sums with a count; megatron-core divides once by the global count.
    tconfig.calculate_per_token_loss = True
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=use_dist_opt,
        # With calculate_per_token_loss DDP sums over DP; finalize_model_grads divides
        # by the all-reduced count.
        average_in_collective=False,
    )
    ddp = DistributedDataParallel(config=tconfig, ddp_config=ddp_config, module=model)
    tconfig.no_sync_func = ddp.no_sync
    tconfig.finalize_model_grads_func = finalize_model_grads
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=optim.lr,
        min_lr=optim.min_lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1,
        adam_beta2=optim.adam_beta2,
        adam_eps=optim.adam_eps,
        clip_grad=optim.clip_grad,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        params_dtype=dtype,
        use_distributed_optimizer=use_dist_opt,
        log_num_zeros_in_grad=False,
        initial_loss_scale=optim.initial_loss_scale,
        loss_scale_window=optim.loss_scale_window,
    )
    optimizer = get_megatron_optimizer(opt_config, [ddp], use_gloo_process_groups=use_dist_opt)
    # fp16: the optimizer divides every gradient by its loss scale, so the schedules must
    # multiply the loss by it (Megatron-LM's training loop sets the same hook).
    tconfig.grad_scale_func = optimizer.scale_loss if opt_config.fp16 else None
    decay_steps = max(total_steps, 1)
    warmup = optim.warmup_steps
    if warmup >= decay_steps:
        warmup = decay_steps - 1
        log.info("optim.warmup_steps=%d >= train.steps=%d: warming up for %d steps", optim.warmup_steps,
                 total_steps, warmup)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if warmup > 0 else optim.lr,
        max_lr=optim.lr,
        min_lr=optim.min_lr if optim.lr_schedule != "constant" else optim.lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=decay_steps,
        lr_decay_style=optim.lr_schedule,
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=decay_steps,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=True,
        override_opt_param_scheduler=False,
    )
    return Engine(ctx=ctx, model=ddp, optimizer=optimizer, scheduler=scheduler,
                  total_steps=total_steps, optim=optim)


def apply_optim_config(engine: Engine, scheduler_state: dict) -> None:
    """After loading a checkpoint, make the run's own ``optim`` settings rule: a resume that
    was allowed to change ``optim.*`` gets the new peak/min lr, Adam betas and eps in every
    parameter group (a checkpoint's groups carry the old ones) and an lr schedule rebuilt
    from the new settings, continuing at the checkpoint's step count."""
    optim = engine.optim
    for opt in getattr(engine.optimizer, "chained_optimizers", [engine.optimizer]):
        for group in opt.param_groups:
            group.update(max_lr=optim.lr, min_lr=optim.min_lr, betas=(optim.adam_beta1, optim.adam_beta2),
                         eps=optim.adam_eps)
        opt.config.clip_grad = optim.clip_grad
    scheduler = engine.scheduler
    # megatron-core's scheduler keeps its constructor's values (the new config) when overriding
    # and takes only the step count from the saved state.
    scheduler.override_opt_param_scheduler = True
    scheduler.use_checkpoint_opt_param_scheduler = False
    scheduler.load_state_dict(scheduler_state)


def train_step(engine: Engine, microbatches: list[Batch], loss_fn: LossFn) -> tuple[list, dict]:
    """Forward/backward over this rank's micro-batches, then one optimizer step.

    ``loss_fn(head, batch) -> (loss_sum, count, stats)`` runs on the last stage
    (:func:`fg_megatron.schedule.run_microbatches`).  Returns (per-micro-batch
    stats from the last stage, {"grad_norm", "lr", "skipped"}).
    A non-finite gradient norm raises :class:`NonFiniteLossError` before any
    parameter changes.
    """
    engine.model.zero_grad_buffer()
    engine.optimizer.zero_grad()
    stats = run_microbatches(engine.model, microbatches, loss_fn, forward_only=False)
    lr = engine.lr()
    applied, grad_norm = _guarded_optimizer_step(engine.optimizer)
    if applied:
        engine.scheduler.step(increment=1)
    return stats, {"grad_norm": grad_norm, "lr": lr, "skipped": not applied}


def _guarded_optimizer_step(optimizer) -> tuple[bool, float]:
    """megatron-core's optimizer step with a finiteness check between the grad-norm
    reduction and any parameter change (its fp32 path would apply NaN updates).

    The norm is reduced over all model-parallel ranks and the grads are already
    DP-averaged, so every rank takes the same decision.
    """
    if optimizer.prepare_grads():  # fp16 loss-scale overflow: megatron skips the step
        return False, float("nan")
    grad_norm = float(optimizer.get_grad_norm())
    if not math.isfinite(grad_norm):
        raise NonFiniteLossError(
            f"gradient norm is {grad_norm}: the loss or its gradient is NaN/inf; the step was "
            "not applied (lower optim.lr or check the data)")
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        clip = opt.config.clip_grad
        # megatron-core's clip_grad_by_total_norm_fp32 asserts CUDA tensors; same math here.
        coeff = clip / (grad_norm + 1.0e-6)
        if clip > 0.0 and coeff < 1.0:
            with torch.no_grad():
                for param in opt.get_parameters():
                    if param.grad is not None:
                        param.grad.mul_(coeff)
    return bool(optimizer.step_with_ready_grads()), grad_norm


def model_dtype(name: str) -> torch.dtype:
    """``auto`` is bf16 on GPU and fp32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if platform.cuda_available() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def unwrap(model) -> Optional[torch.nn.Module]:
    return getattr(model, "module", model)
