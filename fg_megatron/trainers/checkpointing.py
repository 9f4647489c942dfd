"""Training checkpoints: save every N steps and at the end, resume exactly.

Layout of ``SAVE/checkpoints/``::

    latest                       name of the newest complete checkpoint
    step_000040/
        model/                   the primary trained model (the policy; the reward model of
                                 train_rm; PPO's actor) as an fg checkpoint that
                                 ``convert_checkpoint.py fg-to-hf`` exports
        optim_tp00_pp00.*        its optimizer state per (TP rank, PP stage), from DP replica 0
        optim_params_tp00_pp00.* distributed optimizer only: its DP-sharded state, gathered
        critic/                  every other trainable part, by name, the same way:
            model/               (PPO's critic)
            optim_tp00_pp00.*
        rng_rank00000.*          RNG states of each rank
        trainer_state.json       step, data position, each part's scheduler, the run's config
        SHA256SUMS               sha256 of every file above (``sha256sum -c`` format), written last

Frozen parts (references, reward models) are not saved: they are reloaded from
their own checkpoints.  A checkpoint is written into ``.step_000040.tmp`` and renamed when every rank
has finished; ``latest`` is replaced atomically afterwards.  A run killed while
saving leaves ``latest`` pointing at the previous checkpoint, which stays
loadable; leftover ``.tmp`` directories are removed by the next save.

Integrity: a save first checks that every parameter of every trainable part is
finite (a diverged model is never saved, so ``latest`` never names one), and
ends with the checksum manifest; ``--resume`` verifies every file against it
before using any (:mod:`fg_megatron.checkpoint.integrity`).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from fg_megatron import platform
from fg_megatron.checkpoint import integrity
from fg_megatron.checkpoint.layout import FgCheckpoint
from fg_megatron.checkpoint.load import load_stage_state, save_model
from fg_megatron.checkpoint.mapping import CheckpointMismatchError
from fg_megatron.checkpoint.state_io import load_state, save_state
from fg_megatron.parallel import first_error, get_logger
from fg_megatron.trainers.engine import Engine, apply_optim_config
from fg_megatron.trainers.parts import ModelPart

log = get_logger("checkpoint")


class NonFiniteCheckpointError(RuntimeError):
    """A trainable model holds NaN/inf parameters: it is not saved."""

LATEST = "latest"


def _step_name(step: int) -> str:
    return f"step_{step:06d}"


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def rng_state() -> dict[str, Any]:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": get_cuda_rng_tracker().get_states(),
    }
    if platform.cuda_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and platform.cuda_available():
        torch.cuda.set_rng_state(state["cuda"])


def fault_point(name: str, step: int) -> None:
    """Test hook: ``FG_FAULT=name:step`` kills the process here (as a SIGKILL would);
    ``FG_FAULT=stall:step:rank`` stops that rank here (as a SIGSTOP or a hung collective would)."""
    fault = os.environ.get("FG_FAULT", "")
    if fault == f"{name}:{step}":
        os._exit(137)
    if fault == f"stall:{step}:{os.environ.get('RANK', '0')}" and name == "step":
        os.kill(os.getpid(), signal.SIGSTOP)


def part_dir(step_dir: Path, part: ModelPart, primary: str) -> Path:
    """Where a trainable part's files live inside a step directory."""
    return step_dir if part.name == primary else step_dir / part.name


def _save_part(part: ModelPart, where: Path, step: int, trainer: Optional[str]) -> None:
    engine = part.engine
    ctx = engine.ctx
    save_model(part.module, part.arch, part.meta, where / "model", ctx,
               extra={"step": step, "trainer": trainer, "part": part.name})
    model_tag = f"tp{ctx.tp_rank:02d}_pp{ctx.pp_rank:02d}"
    if ctx.dp_rank == 0:  # the replicated optimizer's state (or the distributed one's common part)
        save_state(engine.optimizer.state_dict(), where / f"optim_{model_tag}")
    if _distributed_optimizer(engine):
        # Adam moments and fp32 main params live sharded over DP; gathered on DP rank 0.
        param_state = engine.optimizer.get_parameter_state_dp_zero()
        if ctx.dp_rank == 0:
            save_state(param_state, where / f"optim_params_{model_tag}")


def save_checkpoint(parts: dict[str, ModelPart], primary: str, save_dir: Path, step: int,
                    trainer_state: dict, keep_last: int = 2) -> Path:
    """Write a complete checkpoint of step ``step`` (every trainable part); call on every rank."""
    trainable = [p for p in parts.values() if p.trainable]
    ctx = trainable[0].engine.ctx
    root = Path(save_dir) / "checkpoints"
    bad = first_error(_first_nonfinite(trainable, ctx))
    if bad is not None:
        latest = latest_checkpoint(save_dir)
        raise NonFiniteCheckpointError(
            f"step {step}: {bad}; the model diverged and was not saved (latest checkpoint: "
            f"{latest.name if latest else 'none'}); lower optim.lr")
    final = root / _step_name(step)
    tmp = root / f".{_step_name(step)}.tmp"
    if ctx.is_main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        shutil.rmtree(final, ignore_errors=True)
        tmp.mkdir()
        for part in trainable:
            part_dir(tmp, part, primary).mkdir(exist_ok=True)
    _barrier()
    for i, part in enumerate(trainable):
        _save_part(part, part_dir(tmp, part, primary), step, trainer_state.get("trainer"))
        if i == 0:
            fault_point("save", step)
    save_state(rng_state(), tmp / f"rng_rank{ctx.rank:05d}")
    if ctx.is_main:
        state = dict(trainer_state, step=step, primary=primary,
                     schedulers={p.name: p.engine.scheduler.state_dict() for p in trainable},
                     layout={"tp": ctx.tp, "pp": ctx.pp, "dp": ctx.dp, "world_size": ctx.world_size})
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1), encoding="utf-8")
    _barrier()
    _write_checksums(tmp, ctx)
    if ctx.is_main:
        os.rename(tmp, final)
        pointer = root / f".{LATEST}.tmp"
        pointer.write_text(_step_name(step), encoding="utf-8")
        os.replace(pointer, root / LATEST)
        _prune(root, keep_last, final)
    _barrier()
    return final


def _first_nonfinite(trainable: list[ModelPart], ctx) -> Optional[str]:
    for part in trainable:
        for name, param in part.module.named_parameters():
            if not bool(torch.isfinite(param).all()):
                return (f"parameter {name} of {part.name} (tp rank {ctx.tp_rank}, pp stage {ctx.pp_rank}) "
                        f"holds NaN/inf")
    return None


def _split_over_ranks(items: list, ctx) -> list:
    return items[ctx.rank::ctx.world_size]


def _write_checksums(step_dir: Path, ctx) -> None:
    """Hash every file of the checkpoint (the ranks share the work) and write the manifest."""
    names = [integrity.files_under(step_dir) if ctx.is_main else None]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(names, src=0)
    mine = integrity.digests(step_dir, _split_over_ranks(names[0], ctx))
    gathered = [mine]
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
    if ctx.is_main:
        integrity.write_manifest(step_dir, {k: v for part in gathered for k, v in part.items()})
    _barrier()


def verify_checkpoint(path: Path, ctx) -> None:
    """Check every file of checkpoint ``path`` against its manifest (the ranks share the work);
    a checkpoint saved before checksums existed is loaded with a warning."""
    if not (Path(path) / integrity.MANIFEST).is_file():
        log.warning("%s has no %s (saved by an older version): its files are not verified", path,
                    integrity.MANIFEST)
        return
    message = first_error(integrity.check_share(Path(path), ctx.rank, ctx.world_size))
    if message is not None:
        raise integrity.ChecksumMismatchError(message)


def _distributed_optimizer(engine: Engine) -> bool:
    return bool(engine.model.ddp_config.use_distributed_optimizer)


def _prune(root: Path, keep_last: int, current: Path) -> None:
    """Keep the newest ``keep_last`` checkpoints up to ``current`` (which ``latest`` names)."""
    if keep_last <= 0:
        return
    steps = sorted(p for p in root.glob("step_*") if p.is_dir() and p.name <= current.name)
    for old in steps[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(save_dir: Path) -> Optional[Path]:
    pointer = Path(save_dir) / "checkpoints" / LATEST
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text(encoding="utf-8").strip()
    if not (path / "trainer_state.json").is_file():
        raise CheckpointMismatchError(f"{pointer}: points to {path.name}, which is not a complete checkpoint")
    return path


def _load_part(part: ModelPart, where: Path) -> None:
    engine = part.engine
    ctx = engine.ctx
    ckpt = FgCheckpoint(where / "model")
    if ckpt.meta.stage_counts != part.meta.stage_counts:
        raise CheckpointMismatchError(
            f"{where / 'model'}: saved with layers per stage {ckpt.meta.stage_counts}, the {part.name} model of "
            f"this run has {part.meta.stage_counts}; resume with the same parallel.layers_per_stage")
    names = ckpt.stage_names(ctx.tp_rank, ctx.pp_rank)
    load_stage_state(part.module, ((n, ckpt.stage_tensor(ctx.tp_rank, ctx.pp_rank, n)) for n in names),
                     str(where / "model"))
    model_tag = f"tp{ctx.tp_rank:02d}_pp{ctx.pp_rank:02d}"
    engine.optimizer.load_state_dict(load_state(where / f"optim_{model_tag}"))
    if _distributed_optimizer(engine):
        param_state = load_state(where / f"optim_params_{model_tag}") if ctx.dp_rank == 0 else None
        engine.optimizer.load_parameter_state_from_dp_zero(param_state)


def load_checkpoint(parts: dict[str, ModelPart], primary: str, path: Path, *, verify: bool = True,
                    rebuild_schedule: bool = False) -> dict:
    """Restore every trainable part (model, optimizer, scheduler) and the RNG from ``path``;
    return the trainer state.  ``verify=False``: the caller has verified the checksums;
    ``rebuild_schedule``: the parts' own optim settings replace the saved ones
    (:func:`~fg_megatron.trainers.engine.apply_optim_config`)."""
    trainable = [p for p in parts.values() if p.trainable]
    ctx = trainable[0].engine.ctx
    path = Path(path)
    if verify:
        verify_checkpoint(path, ctx)
    state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    layout = state.get("layout", {})
    if (layout.get("tp"), layout.get("pp"), layout.get("dp")) != (ctx.tp, ctx.pp, ctx.dp):
        raise CheckpointMismatchError(
            f"{path}: saved with tp={layout.get('tp')} pp={layout.get('pp')} dp={layout.get('dp')}, "
            f"resuming with tp={ctx.tp} pp={ctx.pp} dp={ctx.dp}; resume with the same layout "
            f"(or start a new run from {path / 'model'} resharded with convert_checkpoint.py reshard)")
    schedulers = state.get("schedulers", {})
    saved = sorted(schedulers)
    if saved != sorted(p.name for p in trainable):
        raise CheckpointMismatchError(f"{path}: holds the trainable models {saved}, this run trains "
                                      f"{sorted(p.name for p in trainable)}")
    for part in trainable:
        _load_part(part, part_dir(path, part, primary))
        if rebuild_schedule:
            apply_optim_config(part.engine, schedulers[part.name])
        else:
            part.engine.scheduler.load_state_dict(schedulers[part.name])
    set_rng_state(load_state(path / f"rng_rank{ctx.rank:05d}"))
    return state
