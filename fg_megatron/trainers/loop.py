"""The one training loop every trainer shares.

A trainer is a small *task* (SFT, RM, DPO, ...) that loads the models it needs
as named parts (:mod:`.parts`), runs one iteration at a time (one optimizer
step, or several, of one model or several) and reports that iteration's
metrics; this module does the rest: parallel setup, tokenizer, resume,
metrics, checkpoints of every trainable part, the final summary.  Read top to
bottom.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

import torch
import torch.distributed as dist

from fg_megatron import parallel
from fg_megatron.checkpoint.tokenizer import load_tokenizer
from fg_megatron.config import ConfigError, save_config, to_dict
from fg_megatron.config.cli import resolve_path
from fg_megatron.logprobs import LogprobOp, build_logprob_op
from fg_megatron.parallel import ParallelContext, get_logger
from fg_megatron.trainers.checkpointing import (existing_checkpoints, fault_point, latest_checkpoint,
                                                load_checkpoint, save_checkpoint)
from fg_megatron.trainers.engine import model_dtype
from fg_megatron.trainers.metrics import MetricsWriter, summary_table
from fg_megatron.trainers.parts import ModelPart, free_part, load_part

log = get_logger("train")


@dataclass
class Run:
    """What a task can use: the resolved config, layout, tokenizer, log-prob operation
    and the run's named models."""

    cfg: Any
    ctx: ParallelContext
    tokenizer: Any
    dtype: torch.dtype
    save_dir: Path
    logprobs: LogprobOp  # built once: implementation and TP group fixed
    parts: dict[str, ModelPart] = field(default_factory=dict)
    primary: Optional[str] = None  # the first trainable part: saved as step_N/model
    start_step: int = 0

    def load(self, name: str, path: str, *, trainable: bool, head: Optional[str] = None,
             total_steps: Optional[int] = None, optim: Any = None) -> ModelPart:
        """Add part ``name`` from ``path``; trainable parts use ``optim`` (default ``cfg.optim``)
        and a schedule of ``total_steps`` optimizer steps (default ``train.steps``)."""
        if name in self.parts:
            raise ValueError(f"model {name!r} is already loaded")
        part = load_part(name, resolve_path(path), self.ctx, dtype=self.dtype, model_cfg=self.cfg.model,
                         trainable=trainable, head=head, optim=optim or self.cfg.optim,
                         total_steps=total_steps or self.cfg.train.steps)
        self.parts[name] = part
        if trainable and self.primary is None:
            self.primary = name
        return part

    def free(self, name: str) -> None:
        free_part(self.parts, name)


class Task(Protocol):
    name: str
    progress_keys: tuple[str, ...]  # shown in the progress lines
    summary_keys: tuple[str, ...]  # shown first -> last in the final summary

    def prepare(self, run: Run) -> None:
        """Work before the first iteration (e.g. precompute reference log-probs)."""

    def step(self, step: int) -> dict:
        """Run iteration ``step`` (optimizer steps of any parts) on every rank; return its
        global metrics (``tokens``: tokens processed, for tokens/s)."""

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


def reduce_stats(ctx: ParallelContext, keys: tuple[str, ...], stats: list[dict]) -> dict[str, float]:
    """Sums of ``keys`` over every micro-batch's stats of every DP replica."""
    mine = {k: sum(float(s[k]) for s in stats) for k in keys} if owns_outputs(ctx) else None
    return reduce_sums(ctx, keys, mine)


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
    ctx = parallel.initialize(cfg.parallel.tp, cfg.parallel.pp, seed=cfg.train.seed,
                              layers_per_stage=cfg.parallel.layers_per_stage)
    if cfg.train.global_batch_size % (ctx.dp * cfg.train.micro_batch_size):
        raise ConfigError(f"train.global_batch_size={cfg.train.global_batch_size} must be a multiple of "
                          f"data-parallel size {ctx.dp} x train.micro_batch_size={cfg.train.micro_batch_size}")
    return Run(cfg=cfg, ctx=ctx, tokenizer=load_tokenizer(resolve_path(cfg.model.load)),
               dtype=model_dtype(cfg.model.dtype), save_dir=Path(cfg.train.save),
               logprobs=build_logprob_op(cfg.model.logprob_impl, ctx.tp_group))


def train(cfg: Any, make_task: Callable[[Run], Task]) -> dict:
    """Run a training job to completion; returns the last iteration's metrics."""
    run = setup_run(cfg)
    ctx = run.ctx
    task = make_task(run)  # loads the models and validates the data: bad input stops here
    if run.primary is None:
        raise RuntimeError(f"{task.name}: the task loaded no trainable model")
    if ctx.is_main:  # written only once the models and data have been accepted
        run.save_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run.save_dir / "config.yaml")

    if cfg.train.resume:
        ckpt = latest_checkpoint(run.save_dir)
        if ckpt is None:
            log.info("--resume: no checkpoint in %s, starting from step 0", run.save_dir / "checkpoints")
        else:
            state = load_checkpoint(run.parts, run.primary, ckpt)
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
            start = time.perf_counter()
            metrics = task.step(step)
            seconds = time.perf_counter() - start
            metrics.update(step_seconds=seconds, tokens_per_second=metrics.pop("tokens", 0.0) / max(seconds, 1e-9))
            writer.write(step, metrics)
            history.append(metrics)
            if step == cfg.train.steps or (cfg.train.save_every and step % cfg.train.save_every == 0):
                save_checkpoint(run.parts, run.primary, run.save_dir, step,
                                {"task": task.state_dict(), "trainer": task.name, "config": to_dict(cfg)},
                                cfg.train.keep_last)
            fault_point("step", step)
    finally:
        writer.close()
    if ctx.is_main and history:
        print(final_summary(task, cfg, history), flush=True)
    parallel.shutdown()
    return metrics


def final_summary(task: Task, cfg: Any, history: list[dict]) -> str:
    last = history[-1]
    rows = []
    for key in task.summary_keys:
        seen = [h[key] for h in history if key in h]  # eval metrics appear every few steps only
        if seen:
            rows.append((key, f"{seen[0]:.4f} -> {seen[-1]:.4f}"))
    if "gate_rate" in task.summary_keys and "gate_rate" in last:
        rows.append(("mean gate_rate", f"{sum(h['gate_rate'] for h in history) / len(history):.3f}"))
    rows.append(("tokens/s (mean)", f"{sum(h['tokens_per_second'] for h in history) / len(history):.0f}"))
    rows.append(("steps", f"{len(history)} (to step {cfg.train.steps})"))
    ckpt = Path(cfg.train.save) / "checkpoints"
    rows.append(("checkpoint", f"{ckpt}/step_{cfg.train.steps:06d}/model"))
    rows.append(("metrics", str(Path(cfg.train.save) / "metrics.jsonl")))
    return summary_table(f"{task.name} finished", rows)
