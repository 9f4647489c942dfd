"""The one training loop every trainer shares.

A trainer is a small *task* (SFT, DPO, ...) that says what a step's
micro-batches are, what the last pipeline stage computes from them, and which
metrics it reports; this module does the rest: parallel setup, model and
engine, resume, metrics, checkpoints, the final summary.  Read top to bottom.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

import torch
import torch.distributed as dist

from fg_megatron import parallel
from fg_megatron.checkpoint.load import load_model
from fg_megatron.checkpoint.tokenizer import load_tokenizer
from fg_megatron.config import ConfigError, save_config, to_dict
from fg_megatron.parallel import ParallelContext, get_logger
from fg_megatron.schedule import Batch, HeadFn
from fg_megatron.trainers.checkpointing import (existing_checkpoints, fault_point, latest_checkpoint,
                                                load_checkpoint, save_checkpoint)
from fg_megatron.trainers.engine import Engine, build_engine, model_dtype, train_step
from fg_megatron.trainers.metrics import MetricsWriter, summary_table

log = get_logger("train")


@dataclass
class Run:
    """What a task can use: the resolved config, layout, model and tokenizer."""

    cfg: Any
    ctx: ParallelContext
    engine: Engine
    arch: Any
    meta: Any
    tokenizer: Any
    dtype: torch.dtype
    save_dir: Path
    start_step: int = 0


class Task(Protocol):
    name: str
    progress_keys: tuple[str, ...]

    def prepare(self, run: Run) -> None:
        """Work before the first step (e.g. precompute reference log-probs)."""

    def next_microbatches(self, step: int) -> list[Batch]:
        """This rank's micro-batches of global step ``step``."""

    def head_fn(self, step: int, microbatches: list[Batch]) -> HeadFn:
        """What the last stage computes: ``(head, batch) -> (loss, stats)``."""

    def step_metrics(self, step: int, stats: list[dict], microbatches: list[Batch]) -> dict:
        """Global (all-rank) metrics of the step; called on every rank."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def reduce_sums(ctx: ParallelContext, keys: tuple[str, ...], values: Optional[dict]) -> dict[str, float]:
    """Sum ``values`` (given by the ranks that own a share, None elsewhere) over the world."""
    vec = torch.zeros(len(keys), dtype=torch.float64, device=ctx.device)
    if values is not None:
        for i, k in enumerate(keys):
            vec[i] = float(values.get(k, 0.0))
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(vec)
    return {k: vec[i].item() for i, k in enumerate(keys)}


def owns_outputs(ctx: ParallelContext) -> bool:
    """One rank per DP replica holds each micro-batch's outputs: last stage, TP rank 0."""
    return ctx.is_last_stage and ctx.tp_rank == 0


# Fields a resumed run must share with the run it continues (the data order and
# the objective would silently change otherwise).
RESUME_INVARIANTS = ("model.load", "data.train", "data.format", "data.max_prompt_length",
                     "data.max_response_length", "data.chat_template", "train.global_batch_size", "train.seed")


def _dotted(tree: dict, key: str) -> Any:
    for part in key.split("."):
        tree = tree.get(part, {}) if isinstance(tree, dict) else {}
    return tree


def check_save_dir(cfg: Any) -> None:
    """A fresh run never writes into another run's checkpoints."""
    existing = existing_checkpoints(Path(cfg.train.save))
    if existing and not cfg.train.resume:
        raise ConfigError(f"train.save={cfg.train.save} already holds checkpoints ({existing[-1].name}); "
                          f"pass --resume to continue that run, or choose another --save")


def check_resume_config(cfg: Any, saved: Optional[dict], ckpt: Path) -> None:
    if not saved:
        return
    now = to_dict(cfg)
    for key in RESUME_INVARIANTS:
        if _dotted(saved, key) != _dotted(now, key):
            raise ConfigError(f"{ckpt}: {key} was {_dotted(saved, key)!r} in the run being resumed, now "
                              f"{_dotted(now, key)!r}; resume with the same value or start a new --save")
    if _dotted(saved, "train.steps") != cfg.train.steps:
        log.warning("train.steps changed from %s to %s: the checkpoint's learning-rate schedule is kept",
                    _dotted(saved, "train.steps"), cfg.train.steps)


def setup_run(cfg: Any) -> Run:
    check_save_dir(cfg)
    ctx = parallel.initialize(cfg.parallel.tp, cfg.parallel.pp, seed=cfg.train.seed)
    if cfg.train.global_batch_size % (ctx.dp * cfg.train.micro_batch_size):
        raise ConfigError(f"train.global_batch_size={cfg.train.global_batch_size} must be a multiple of "
                          f"data-parallel size {ctx.dp} x train.micro_batch_size={cfg.train.micro_batch_size}")
    dtype = model_dtype(cfg.model.dtype)
    model, arch, meta = load_model(cfg.model.load, ctx, dtype=dtype,
                                   vocab_pad_multiple=cfg.model.vocab_pad_multiple,
                                   recompute=cfg.model.recompute)
    engine = build_engine(model, ctx, cfg.optim, cfg.train.steps, dtype)
    tokenizer = load_tokenizer(cfg.model.load)
    save_dir = Path(cfg.train.save)
    if ctx.is_main:
        save_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, save_dir / "config.yaml")
    log.info("model %s (%s, %d layers, hidden %d, vocab %d) | tp=%d pp=%d dp=%d | %s",
             cfg.model.load, arch.family, arch.num_layers, arch.hidden_size, arch.vocab_size,
             ctx.tp, ctx.pp, ctx.dp, str(dtype).replace("torch.", ""))
    return Run(cfg=cfg, ctx=ctx, engine=engine, arch=arch, meta=meta, tokenizer=tokenizer, dtype=dtype,
               save_dir=save_dir)


def train(cfg: Any, make_task: Callable[[Run], Task]) -> dict:
    """Run a training job to completion; returns the last step's metrics."""
    run = setup_run(cfg)
    ctx, engine = run.ctx, run.engine
    task = make_task(run)

    if cfg.train.resume:
        ckpt = latest_checkpoint(run.save_dir)
        if ckpt is None:
            log.info("--resume: no checkpoint in %s, starting from step 0", run.save_dir / "checkpoints")
        else:
            state = load_checkpoint(engine, ckpt)
            check_resume_config(cfg, state.get("config"), ckpt)
            task.load_state_dict(state["task"])
            run.start_step = int(state["step"])
            log.info("resumed from %s (step %d)", ckpt, run.start_step)
    task.prepare(run)
    gc.collect()

    writer = MetricsWriter(run.save_dir, enabled=ctx.is_main, tensorboard=cfg.train.tensorboard,
                           total_steps=cfg.train.steps, log_every=cfg.train.log_every,
                           resume_step=run.start_step, keys=task.progress_keys)
    metrics: dict = {}
    history: list[dict] = []
    try:
        for step in range(run.start_step + 1, cfg.train.steps + 1):
            microbatches = task.next_microbatches(step)
            start = time.perf_counter()
            stats, info = train_step(engine, microbatches, task.head_fn(step, microbatches))
            seconds = time.perf_counter() - start
            metrics = task.step_metrics(step, stats, microbatches)
            metrics.update(lr=info["lr"], grad_norm=info["grad_norm"], step_seconds=seconds,
                           tokens_per_second=metrics.pop("tokens", 0.0) / max(seconds, 1e-9))
            writer.write(step, metrics)
            history.append(metrics)
            if step == cfg.train.steps or (cfg.train.save_every and step % cfg.train.save_every == 0):
                save_checkpoint(engine, run.meta, run.arch, run.save_dir, step,
                                {"task": task.state_dict(), "trainer": task.name, "config": to_dict(cfg)},
                                cfg.train.keep_last)
            fault_point("step", step)
    finally:
        writer.close()
    if ctx.is_main and history:
        print(final_summary(task.name, cfg, history), flush=True)
    parallel.shutdown()
    return metrics


def final_summary(name: str, cfg: Any, history: list[dict]) -> str:
    first, last = history[0], history[-1]
    rows = []
    for key in ("loss", "dpo_loss", "ce_loss", "gate_rate", "reward_accuracy", "reward_margin"):
        if key in last:
            rows.append((key, f"{first[key]:.4f} -> {last[key]:.4f}"))
    mean_gate = sum(h.get("gate_rate", 0.0) for h in history) / len(history)
    if "gate_rate" in last:
        rows.append(("mean gate_rate", f"{mean_gate:.3f}"))
    rows.append(("tokens/s (mean)", f"{sum(h['tokens_per_second'] for h in history) / len(history):.0f}"))
    rows.append(("steps", f"{len(history)} (to step {cfg.train.steps})"))
    ckpt = Path(cfg.train.save) / "checkpoints"
    rows.append(("checkpoint", f"{ckpt}/step_{cfg.train.steps:06d}/model"))
    rows.append(("metrics", str(Path(cfg.train.save) / "metrics.jsonl")))
    return summary_table(f"{name} finished", rows)
