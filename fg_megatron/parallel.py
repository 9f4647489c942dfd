"""torch.distributed + megatron-core parallel_state: TP / PP / DP groups, seeds,
rank-aware logging.

Process groups come from here and are handed to the code that needs them
(``ParallelContext``); math code does not read global parallel state.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import sys
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from fg_megatron import platform


class ParallelLayoutError(ValueError):
    """A parallel layout that cannot work for this world size or model."""


@dataclass
class ParallelContext:
    """The layout of this process in the TP x PP x DP grid, and its groups."""

    world_size: int
    rank: int
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    tp_group: Optional[dist.ProcessGroup]
    pp_group: Optional[dist.ProcessGroup]
    dp_group: Optional[dist.ProcessGroup]
    device: torch.device
    # Transformer layers per pipeline stage as asked for (``parallel.layers_per_stage``);
    # None: an fg checkpoint's own split, else :func:`stage_layer_counts`' default rule.
    layers_per_stage: Optional[tuple[int, ...]] = None

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def is_main(self) -> bool:
        """Global rank 0: the process that prints and writes metrics."""
        return self.rank == 0

    @property
    def last_stage_main_rank(self) -> int:
        """Global rank of (tp 0, dp 0) on the last pipeline stage: it holds losses."""
        from megatron.core import parallel_state as ps

        return ps.get_pipeline_model_parallel_last_rank()


LAYERS_PER_STAGE_FIELD = "parallel.layers_per_stage / --layers-per-stage"


def stage_layer_counts(num_layers: int, pp: int, layers_per_stage: Optional[Sequence[int]] = None) -> list[int]:
    """Transformer layers on each pipeline stage: the one place that decides the split.

    ``layers_per_stage`` given: that list, checked (``pp`` entries, each >= 1, summing to
    ``num_layers``).  None: the default rule, an even split when ``pp`` divides
    ``num_layers``, else the first ``num_layers % pp`` stages hold one layer more than the
    rest (3 layers on 2 stages: ``[2, 1]``; 30 on 4: ``[8, 8, 7, 7]``).  The last stage,
    which also runs the output layer and the loss, is never one of the larger ones.
    """
    if layers_per_stage is not None:
        counts = [int(n) for n in layers_per_stage]
        check_layers_per_stage(pp, counts)
        if sum(counts) != num_layers:
            raise ParallelLayoutError(
                f"layers_per_stage {counts} ({LAYERS_PER_STAGE_FIELD}) sums to {sum(counts)}, but the model "
                f"has {num_layers} layers"
            )
        return counts
    if pp > num_layers:
        raise ParallelLayoutError(
            f"pipeline parallel size {pp} is larger than the model's {num_layers} layers: every stage needs "
            f"at least one layer; use a --pp of at most {num_layers}"
        )
    base, extra = divmod(num_layers, pp)
    return [base + 1 if stage < extra else base for stage in range(pp)]


def check_layers_per_stage(pp: int, layers_per_stage: Sequence[int]) -> None:
    """A per-stage layer list must have one entry per stage, each >= 1 (its sum is checked
    against the model by :func:`stage_layer_counts`)."""
    counts = list(layers_per_stage)
    if len(counts) != pp:
        raise ParallelLayoutError(
            f"layers_per_stage {counts} ({LAYERS_PER_STAGE_FIELD}) has {len(counts)} entries, "
            f"the pipeline parallel size is {pp}: give one layer count per stage"
        )
    if any(n < 1 for n in counts):
        raise ParallelLayoutError(
            f"layers_per_stage {counts} ({LAYERS_PER_STAGE_FIELD}): every stage needs at least one layer"
        )


def stage_layer_offsets(counts: Sequence[int]) -> list[int]:
    """Model-wide index of each stage's first layer (``[2, 1]`` -> ``[0, 2]``)."""
    offsets, total = [], 0
    for n in counts:
        offsets.append(total)
        total += n
    return offsets


def validate_layout(world_size: int, tp: int, pp: int, *, num_kv_heads: Optional[int] = None,
                    num_heads: Optional[int] = None, num_layers: Optional[int] = None,
                    layers_per_stage: Optional[Sequence[int]] = None) -> int:
    """Check a TP x PP layout against the world size and the model; return DP."""
    if tp < 1 or pp < 1:
        raise ParallelLayoutError(f"--tp and --pp must be >= 1 (got tp={tp}, pp={pp})")
    if world_size % (tp * pp) != 0:
        raise ParallelLayoutError(
            f"world size {world_size} is not divisible by tp*pp = {tp}*{pp} = {tp * pp}; "
            f"launch a multiple of {tp * pp} processes or change --tp/--pp"
        )
    if num_kv_heads is not None and num_kv_heads % tp != 0:
        raise ParallelLayoutError(
            f"tensor parallel size {tp} does not divide the model's {num_kv_heads} key/value heads "
            f"(query groups); use a --tp that divides {num_kv_heads}"
        )
    if num_heads is not None and num_heads % tp != 0:
        raise ParallelLayoutError(
            f"tensor parallel size {tp} does not divide the model's {num_heads} attention heads"
        )
    if num_layers is not None:
        stage_layer_counts(num_layers, pp, layers_per_stage)
    elif layers_per_stage is not None:
        check_layers_per_stage(pp, layers_per_stage)
    return world_size // (tp * pp)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DEFAULT_TIMEOUT_MINUTES = 10.0


def init_distributed(timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES) -> None:
    """Initialise torch.distributed from torchrun's environment (or as a 1-process
    world when started with plain ``python``): gloo on CPU, NCCL on GPU."""
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    if platform.cuda_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))


def sequence_parallel_error(tp: int, pad_multiple: int) -> Optional[str]:
    """Why ``model.sequence_parallel`` cannot run here (None: it can).

    megatron-core scatters the sequence over the TP ranks outside the tensor-parallel regions:
    it needs TP > 1, its local layer spec asserts under it (only the Transformer Engine spec
    supports it, and TE needs CUDA, hence NCCL), and every micro-batch's length must split
    evenly over TP (``data.pad_multiple``)."""
    if tp < 2:
        return f"model.sequence_parallel needs tensor parallelism (parallel.tp > 1, got {tp}); drop it at tp=1"
    if not platform.is_transformer_engine_usable():
        here = ("NCCL here, but Transformer Engine is not installed" if platform.cuda_available()
                else "gloo on this machine: no CUDA GPU")
        return (f"model.sequence_parallel needs the NCCL backend and Transformer Engine ({here}): megatron-core's "
                f"local layer spec asserts under it; set model.sequence_parallel=false")
    if pad_multiple % tp:
        return (f"model.sequence_parallel splits each sequence over parallel.tp={tp} ranks: data.pad_multiple="
                f"{pad_multiple} must be a multiple of {tp}")
    return None


def initialize(tp: int = 1, pp: int = 1, *, seed: int = 1234, num_kv_heads: Optional[int] = None,
               num_heads: Optional[int] = None, num_layers: Optional[int] = None,
               timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES,
               layers_per_stage: Optional[Sequence[int]] = None) -> ParallelContext:
    """Set up torch.distributed and megatron-core's TP/PP/DP groups.

    The layout is validated before any collective is issued, so a bad layout is
    a one-line error on every rank.  A collective that waits longer than
    ``timeout_minutes`` (a rank stalled or dead) fails on the ranks waiting for it.
    ``layers_per_stage`` (one count per stage) is kept on the context for the models
    loaded later; None leaves the split to :func:`stage_layer_counts` (or to an fg
    checkpoint's own).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    validate_layout(world_size, tp, pp, num_kv_heads=num_kv_heads, num_heads=num_heads,
                    num_layers=num_layers, layers_per_stage=layers_per_stage)
    platform.adapt_megatron_for_cpu()
    init_distributed(timeout_minutes)
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        # megatron-core's distributed-optimizer checkpoint path moves its state over
        # gloo groups; on CPU the default groups already are gloo.
        create_gloo_process_groups=dist.get_backend() == "nccl",
        distributed_timeout_minutes=timeout_minutes,  # megatron's own groups would wait 30 minutes
    )
    ctx = context_from_megatron()
    if layers_per_stage is not None:
        ctx.layers_per_stage = tuple(int(n) for n in layers_per_stage)
    platform.seed_everything(seed, ctx.tp_rank)
    configure_logging(ctx)
    return ctx


def context_from_megatron() -> ParallelContext:
    from megatron.core import parallel_state as ps

    return ParallelContext(
        world_size=dist.get_world_size(),
        rank=dist.get_rank(),
        tp=ps.get_tensor_model_parallel_world_size(),
        pp=ps.get_pipeline_model_parallel_world_size(),
        dp=ps.get_data_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        tp_group=ps.get_tensor_model_parallel_group(),
        pp_group=ps.get_pipeline_model_parallel_group(),
        dp_group=ps.get_data_parallel_group(),
        device=platform.default_device(),
    )


def gather_to_main(ctx: ParallelContext, items: list, owner: bool) -> Optional[list]:
    """Concatenate ``items`` of the ranks where ``owner`` is true, on global rank 0
    (None elsewhere).  Every rank must call it."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return list(items) if owner else []
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, list(items) if owner else [])
    if not ctx.is_main:
        return None
    return [item for part in gathered for item in (part or [])]


def first_error(message: Optional[str]) -> Optional[str]:
    """The first non-None ``message`` over all ranks (lowest rank first), on every rank:
    lets a check that fails on some ranks stop every rank with the same line.  Every
    rank must call it."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return message
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, message)
    return next((m for m in gathered if m is not None), None)


def shutdown() -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


class _RankZeroFilter(logging.Filter):
    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        return self.rank == 0 or record.levelno >= logging.ERROR


def configure_logging(ctx: Optional[ParallelContext] = None, level: int = logging.INFO) -> None:
    """INFO from rank 0 only; errors from every rank, tagged with the rank."""
    rank = ctx.rank if ctx is not None else int(os.environ.get("RANK", "0"))
    logger = logging.getLogger("fg_megatron")
    logger.setLevel(level)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"[fg rank{rank}] %(message)s"))
    handler.addFilter(_RankZeroFilter(rank))
    logger.addHandler(handler)
    logger.propagate = False


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(f"fg_megatron.{name}")
