"""The one training loop every trainer shares.

A trainer is a small *task* (SFT, RM, DPO, ...) that loads the models it needs
as named parts (:mod:`.parts`), runs one iteration at a time (one optimizer
step, or several, of one model or several) and reports that iteration's
metrics; this module does the rest: parallel setup, tokenizer, resume,
metrics, checkpoints of every trainable part, the final summary.  Read top to
bottom.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
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
from fg_megatron.data import DataFormatError
from fg_megatron.logprobs import LogprobOp, build_logprob_op
from fg_megatron.parallel import ParallelContext, first_error, get_logger
from fg_megatron.trainers import errors, resume, rundir
from fg_megatron.trainers.checkpointing import (fault_point, latest_checkpoint, load_checkpoint, save_checkpoint,
                                                verify_checkpoint)
from fg_megatron.trainers.engine import NonFiniteLossError, model_dtype
from fg_megatron.trainers.guard import DivergenceError, DivergenceGuard, weight_norm
from fg_megatron.trainers.metrics import MetricsWriter, summary_table
from fg_megatron.trainers.parts import ModelPart, free_part, load_part
from fg_megatron.trainers.throughput import device_peak_tflops, throughput_metrics

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
    resume_from: Optional[Path] = None  # the checkpoint --resume continues (verified, config checked)
    history: list[dict] = field(default_factory=list)  # config changes of earlier resumes (resume.py)
    lock: Optional[rundir.RunLock] = None  # rank 0's hold on save_dir
    rebuild_schedule: bool = False  # the resume changed optim.*: the lr schedule follows the new values

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

    def resolve_steps(self, rows: int) -> None:
        """With ``train.epochs``: set ``train.steps`` to ceil(epochs * rows / global_batch_size)
        once the task has read its ``rows`` training samples (before loading a trainable model)."""
        train = self.cfg.train
        if train.epochs is None:
            return
        steps = math.ceil(train.epochs * rows / train.global_batch_size)
        if train.steps is not None and train.steps != steps:  # resumed: the checkpoint's count
            raise ConfigError(f"train.epochs={train.epochs}: {rows} rows / train.global_batch_size="
                              f"{train.global_batch_size} give {steps} steps, the run being resumed has "
                              f"{train.steps}")
        train.steps = steps
        log.info("train.epochs=%d: %d rows / global batch %d -> train.steps=%d", train.epochs, rows,
                 train.global_batch_size, steps)

    def check_context(self, dataset: Any, *, extra: int = 0, budget: str = "") -> None:
        """Every sample of ``dataset`` (``extra`` more tokens each: a generation budget named
        ``budget``) fits the positions of every loaded model; the first that does not is a
        data error naming its file and line (the run's length limits truncate, this refuses).  Logs the
        dataset's summary first (rows, format, token lengths, truncation), so every trainer prints it."""
        dataset.log_summary(log)  # rows, format, token lengths, what truncation did (rank 0 prints)
        name, limit = min(((n, p.arch.max_position_embeddings) for n, p in self.parts.items()), key=lambda x: x[1])
        data = self.cfg.data
        for i, item in enumerate(dataset.items):
            if item.length + extra > limit:
                path, line = dataset.records[i].source.rsplit(":", 1)
                size = f"{item.length} tokens + {budget}={extra}" if extra else f"{item.length} tokens"
                total = "" if data.max_length is None else f", data.max_length={data.max_length}"
                raise DataFormatError(path, int(line), f"{size} after truncation to data.max_prompt_length="
                                      f"{data.max_prompt_length}, data.max_response_length={data.max_response_length}"
                                      f"{total}: more than the {limit} positions of {name} (max_position_embeddings); "
                                      f"lower those limits (or set data.max_length) to truncate further")


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


def _claim_save_dir(cfg: Any, ctx: ParallelContext) -> Optional[rundir.RunLock]:
    """Rank 0 locks train.save and refuses (or, with --overwrite, clears) an earlier run's
    output; every rank raises the same one-line error if that fails."""
    save_dir = Path(cfg.train.save)
    lock, message = None, None
    if ctx.is_main:
        try:
            lock = rundir.RunLock.acquire(save_dir)
            left = rundir.earlier_output(save_dir)
            if left and cfg.train.overwrite:
                log.info("--overwrite: deleting the earlier run's %s in %s", ", ".join(left), save_dir)
                rundir.delete_earlier_output(save_dir)
            elif left and not cfg.train.resume:
                raise rundir.RunDirectoryError(
                    f"train.save={save_dir} holds an earlier run's output ({', '.join(left)}); pass --resume to "
                    f"continue it, --overwrite to delete it and start afresh, or choose another --save")
        except rundir.RunDirectoryError as exc:
            message = str(exc)
            if lock is not None:
                lock.release()
    message = first_error(message)
    if message is not None:
        raise rundir.RunDirectoryError(message)
    return lock


class RunFinished(Exception):
    """--resume of a run whose latest checkpoint is already at train.steps: nothing to do."""


def _check_resume(run: Run) -> None:
    """Before any model is loaded: verify the checkpoint --resume continues and check the new
    config against the one it was trained with (:mod:`.resume`)."""
    ckpt = latest_checkpoint(run.save_dir)
    if ckpt is None:
        log.info("--resume: no checkpoint in %s, starting from step 0", run.save_dir / "checkpoints")
        return
    state = json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))
    train, saved = run.cfg.train, (state.get("config") or {}).get("train", {})
    step = int(state["step"])
    if train.epochs is not None:
        if saved.get("epochs") != train.epochs:
            raise ConfigError(f"train.epochs={train.epochs}: the run in {run.save_dir} was trained with "
                              f"train.epochs={saved.get('epochs')} ({saved.get('steps')} steps, at step {step}); "
                              f"resume with the same value, or pass --steps M to extend it")
        train.steps = int(saved["steps"])  # what the epochs resolved to (data and batch cannot change)
    # a refused config change is reported first, even on a finished run
    changes = resume.resume_changes(state.get("config") or {}, run.cfg, ckpt, step)
    steps = train.steps
    if steps == step:
        raise RunFinished(f"run in {run.save_dir} already finished at step {step} (train.steps={steps}); "
                          f"pass --steps M to extend it")
    if steps < step:
        raise ConfigError(f"--steps {steps}: the run in {run.save_dir} is already at step {step} ({ckpt.name}); "
                          f"pass --steps {step + 1} or more to extend it, or start a new --save")
    verify_checkpoint(ckpt, run.ctx)
    run.history = list(state.get("config_history", [])) + changes
    for change in run.history:
        if change["step"] == step:
            log.info("resume at step %d: %s %r -> %r", step, change["field"], change["old"], change["new"])
    run.resume_from = ckpt
    run.rebuild_schedule = resume.rebuilds_schedule(run.history, step)


def setup_run(cfg: Any) -> Run:
    resume.check_allow_change(cfg)
    if cfg.model.sequence_parallel:  # refused before any process group or model exists
        problem = parallel.sequence_parallel_error(cfg.parallel.tp, cfg.data.pad_multiple)
        if problem is not None:
            raise ConfigError(problem)
    rundir.check_writable(Path(cfg.train.save))
    ctx = parallel.initialize(cfg.parallel.tp, cfg.parallel.pp, seed=cfg.train.seed,
                              timeout_minutes=cfg.parallel.timeout_minutes,
                              layers_per_stage=cfg.parallel.layers_per_stage)
    if cfg.train.global_batch_size % (ctx.dp * cfg.train.micro_batch_size):
        raise ConfigError(f"train.global_batch_size={cfg.train.global_batch_size} must be a multiple of "
                          f"data-parallel size {ctx.dp} x train.micro_batch_size={cfg.train.micro_batch_size}")
    lock = _claim_save_dir(cfg, ctx)
    try:
        run = Run(cfg=cfg, ctx=ctx, tokenizer=load_tokenizer(resolve_path(cfg.model.load)),
                  dtype=model_dtype(cfg.model.dtype), save_dir=Path(cfg.train.save),
                  logprobs=build_logprob_op(cfg.model.logprob_impl, ctx.tp_group), lock=lock)
        if cfg.train.resume:
            _check_resume(run)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return run


def _log_new_schedule(run: Run, state: dict) -> None:
    """One line when the resume changed the run's length: each trainable part's lr schedule
    now decays to the new end, continuing at the checkpoint's optimizer step count."""
    old_steps = next((h["old"] for h in run.history
                      if h["step"] == run.start_step and h["field"] == "train.steps"), None)
    if old_steps is None or not run.rebuild_schedule:
        return
    parts = []
    for name, part in run.parts.items():
        if part.trainable:
            saved = state["schedulers"][name]
            parts.append(f"{name} {saved.get('lr_decay_steps')} -> {part.engine.scheduler.lr_decay_steps} "
                         f"optimizer steps, continuing at {saved.get('num_steps')}")
    log.info("train.steps %s -> %s: lr schedule rebuilt to decay to the new end (%s)", old_steps,
             run.cfg.train.steps, "; ".join(parts))


def _weight_norms(run: Run) -> dict[str, float]:
    return {name: weight_norm(part.module, run.ctx) for name, part in run.parts.items() if part.trainable}


def _latest_name(save_dir: Path) -> str:
    try:
        latest = latest_checkpoint(save_dir)
    except Exception:  # a damaged pointer must not hide the error being reported
        latest = None
    return latest.name if latest is not None else "none"


def train(cfg: Any, make_task: Callable[[Run], Task]) -> dict:
    """Run a training job to completion; returns the last iteration's metrics."""
    if cfg.train.epochs is not None and not getattr(make_task, "counts_epochs", False):
        raise ConfigError(f"train.epochs: {getattr(make_task, 'name', 'this trainer')} counts train.steps; "
                          f"set train.steps instead")
    try:
        run = setup_run(cfg)
    except RunFinished as exc:  # exit 0: models are never loaded
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(str(exc), flush=True)
        parallel.shutdown()
        return {}
    try:
        return _train(run, make_task)
    finally:
        if run.lock is not None:
            run.lock.release()


def _train(run: Run, make_task: Callable[[Run], Task]) -> dict:
    cfg, ctx = run.cfg, run.ctx
    task = make_task(run)  # loads the models and validates the data: bad input stops here
    if run.primary is None:
        raise RuntimeError(f"{task.name}: the task loaded no trainable model")
    if run.resume_from is not None:
        state = load_checkpoint(run.parts, run.primary, run.resume_from, verify=False,
                                rebuild_schedule=run.rebuild_schedule)
        task.load_state_dict(state["task"])
        run.start_step = int(state["step"])
        log.info("resumed from %s (step %d)", run.resume_from, run.start_step)
        _log_new_schedule(run, state)
    if ctx.is_main:  # written only once the models, data and resume have been accepted
        run.save_dir.mkdir(parents=True, exist_ok=True)
        # with train.epochs, train.steps is derived: config.yaml keeps it null so that it loads again
        written = cfg if cfg.train.epochs is None else dataclasses.replace(
            cfg, train=dataclasses.replace(cfg.train, steps=None))
        save_config(written, run.save_dir / "config.yaml", run.history)
    task.prepare(run)
    gc.collect()

    peak = cfg.train.peak_tflops or device_peak_tflops(run.dtype)
    log.info("mfu: peak %s", f"{peak:g} TFLOP/s per GPU" if peak else "unknown (set train.peak_tflops)")
    guard = DivergenceGuard(cfg.train.divergence_factor)
    guard.start(_weight_norms(run))
    writer = MetricsWriter(run.save_dir, enabled=ctx.is_main, tensorboard=cfg.train.tensorboard,
                           total_steps=cfg.train.steps, log_every=cfg.train.log_every,
                           resume_step=run.start_step, keys=task.progress_keys,
                           report_to=cfg.train.report_to, run_config=to_dict(cfg))
    metrics: dict = {}
    history: list[dict] = []
    try:
        for step in range(run.start_step + 1, cfg.train.steps + 1):
            errors.RUN_PROGRESS.update(step=step, save=str(run.save_dir))
            start = time.perf_counter()
            try:
                metrics = task.step(step)
            except NonFiniteLossError as exc:
                raise NonFiniteLossError(f"step {step}: {exc}; latest checkpoint: {_latest_name(run.save_dir)}") from None
            seconds = time.perf_counter() - start
            # the exact count stays next to the rate: tokens/s x seconds does not round-trip in floats
            tokens = metrics.pop("tokens", 0.0)
            metrics.update(step_seconds=seconds, tokens=tokens, tokens_per_second=tokens / max(seconds, 1e-9))
            metrics.update(throughput_metrics(metrics.get("flops"), seconds, ctx.world_size, peak))
            norms = _weight_norms(run)
            metrics["weight_norm"] = norms[run.primary]
            writer.write(step, metrics)
            history.append(metrics)
            try:
                guard.check(step, norms, metrics)
            except DivergenceError as exc:
                raise DivergenceError(f"{exc}; stopped before saving step {step}, latest checkpoint: "
                                      f"{_latest_name(run.save_dir)} (lower optim.lr, or raise "
                                      f"train.divergence_factor; 0 disables the guard)") from None
            if step == cfg.train.steps or (cfg.train.save_every and step % cfg.train.save_every == 0):
                save_checkpoint(run.parts, run.primary, run.save_dir, step,
                                {"task": task.state_dict(), "trainer": task.name, "config": to_dict(cfg),
                                 "config_history": run.history},
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
    for key, label, fmt in (("tflops", "TFLOP/s per GPU (mean)", ".3g"), ("mfu", "MFU (mean)", ".1%")):
        if key in last:
            rows.append((label, f"{sum(h[key] for h in history) / len(history):{fmt}}"))
    rows.append(("steps", f"{len(history)} (to step {cfg.train.steps})"))
    ckpt = Path(cfg.train.save) / "checkpoints"
    rows.append(("checkpoint", f"{ckpt}/step_{cfg.train.steps:06d}/model"))
    rows.append(("metrics", str(Path(cfg.train.save) / "metrics.jsonl")))
    return summary_table(f"{task.name} finished", rows)
