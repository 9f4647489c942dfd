"""Build this rank's model stage from a checkpoint, and save live models as one.

:func:`load_model` accepts an HF directory (converted on the fly: each rank
reads only the HF tensors of its pipeline stage and keeps only its TP shard)
or an fg checkpoint saved for the same TP x PP layout.  :func:`save_model`
writes an fg checkpoint from the live model on all ranks: each (TP rank,
PP stage) of data-parallel replica 0 writes its own shard file into a shared
temporary directory, global rank 0 writes the metadata and renames the
directory into place once every rank reported success.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from fg_megatron.checkpoint import integrity
from fg_megatron.checkpoint.atomic import check_output_dir, commit_dir, temp_dir_for
from fg_megatron.checkpoint.convert import check_hf_tensors, family_of
from fg_megatron.checkpoint.hf import copy_side_files, open_hf_weights, read_hf_config
from fg_megatron.checkpoint.layout import (
    DTYPE_NAMES,
    HF_FILES_DIR,
    CheckpointMeta,
    FgCheckpoint,
    dtype_name,
    is_fg_checkpoint,
    reshard_hint,
    shard_file_name,
    split_for,
    store_hf_config,
    write_meta,
)
from fg_megatron.checkpoint.mapping import CheckpointMismatchError, megatron_from_hf
from fg_megatron.checkpoint.safetensors_io import write_file
from fg_megatron.checkpoint.value_seed import (LM_OUTPUT_NAME, seed_value_tensors, seeded_value_config,
                                               seeds_value_head)
from fg_megatron.models import sharding
from fg_megatron.models.arch import ModelArch
from fg_megatron.models.gpt import (DEFAULT_VOCAB_PAD_MULTIPLE, build_gpt_model, padded_vocab_size,
                                   stage_state_dict)
from fg_megatron.parallel import ParallelContext, first_error, stage_layer_counts, validate_layout


def _hf_stage_tensors(path: Path, ctx: ParallelContext, *, vocab_pad_multiple: int, expect_family: Optional[str],
                      head: Optional[str]) -> tuple[ModelArch, CheckpointMeta, Iterator[tuple[str, Tensor]]]:
    hf_config = read_hf_config(path)
    seeding = seeds_value_head(hf_config, head, str(path))
    family, src_arch, src_adapter = family_of(hf_config)
    if expect_family is not None and family != expect_family:
        raise CheckpointMismatchError(f"{path}: model family is {family!r} (config.json model_type), "
                                      f"expected {expect_family!r}")
    weights = open_hf_weights(path)
    check_hf_tensors(src_adapter, weights)
    config = seeded_value_config(hf_config, path) if seeding else hf_config
    arch = family_of(config)[1] if seeding else src_arch
    dtype = weights.dtype()
    padded = padded_vocab_size(arch.vocab_size, ctx.tp, vocab_pad_multiple)
    split = split_for(arch.num_layers, ctx.pp, ctx.layers_per_stage)
    meta = CheckpointMeta(family=family, hf_config=config, tp=ctx.tp, pp=ctx.pp, num_layers=arch.num_layers,
                          vocab_size=arch.vocab_size, padded_vocab_size=padded,
                          vocab_pad_multiple=vocab_pad_multiple, dtype=dtype_name(dtype),
                          source=str(path.resolve()), layers_per_stage=split)

    def on_this_stage(name: str) -> bool:  # placement by the model being built (a value model ties nothing)
        if seeding and name == LM_OUTPUT_NAME:
            return False
        return any(stage == ctx.pp_rank for stage, _ in sharding.stage_of(name, arch, ctx.pp, split))

    def tensors() -> Iterator[tuple[str, Tensor]]:
        layers = sharding.layers_of_stage(arch.num_layers, ctx.pp, ctx.pp_rank, split)
        full = megatron_from_hf(src_adapter, weights.get, layers=layers, keep=on_this_stage)
        if seeding:
            full = seed_value_tensors(full, last_stage=ctx.pp_rank == ctx.pp - 1, hidden_size=arch.hidden_size,
                                      dtype=dtype)
        for name, tensor in full:
            for stage, local in sharding.stage_of(name, arch, ctx.pp, split):
                if stage == ctx.pp_rank:
                    yield local, sharding.shard(name, tensor, ctx.tp, ctx.tp_rank, padded)

    return arch, meta, tensors()


def _fg_stage_tensors(path: Path, ctx: ParallelContext, *, vocab_pad_multiple: Optional[int],
                      expect_family: Optional[str], head: Optional[str]
                      ) -> tuple[ModelArch, CheckpointMeta, Iterator[tuple[str, Tensor]]]:
    ckpt = FgCheckpoint(path, expect_family=expect_family)
    meta, arch = ckpt.meta, ckpt.arch
    seeding = seeds_value_head(meta.hf_config, head, str(path))
    # Without an explicit split a checkpoint at this pp keeps its own; an explicit one must match.
    split = split_for(arch.num_layers, ctx.pp, ctx.layers_per_stage, meta)
    if (meta.tp, meta.pp, meta.stage_counts) != (ctx.tp, ctx.pp, split):
        raise CheckpointMismatchError(reshard_hint(path, meta, ctx.tp, ctx.pp, ctx.layers_per_stage))
    meta.layers_per_stage = split
    if vocab_pad_multiple not in (None, meta.vocab_pad_multiple):
        raise CheckpointMismatchError(
            f"{path}: saved with vocab_pad_multiple {meta.vocab_pad_multiple}, asked for {vocab_pad_multiple}; "
            f"reshard it with --vocab-pad-multiple {vocab_pad_multiple}"
        )
    meta.source = str(path.resolve())  # save_model copies the side files from here
    names = ckpt.stage_names(ctx.tp_rank, ctx.pp_rank)
    tensors = ((n, ckpt.stage_tensor(ctx.tp_rank, ctx.pp_rank, n)) for n in names)
    if seeding:
        meta.hf_config = seeded_value_config(meta.hf_config, path)
        arch = family_of(meta.hf_config)[1]
        # Stage-local names: the output layer (or the tied embedding copy) is "output_layer.weight".
        tensors = seed_value_tensors(tensors, last_stage=ctx.pp_rank == ctx.pp - 1,
                                     hidden_size=arch.hidden_size, dtype=meta.torch_dtype)
    return arch, meta, tensors


def load_stage_state(model: torch.nn.Module, tensors: Iterator[tuple[str, Tensor]], source: str) -> None:
    """Copy named tensors into the stage's parameters: all present, shapes equal (dtype cast)."""
    targets = stage_state_dict(model)
    seen = set()
    with torch.no_grad():
        for name, tensor in tensors:
            if name not in targets:
                raise CheckpointMismatchError(f"{source}: unexpected tensor {name!r} for this model stage")
            target = targets[name]
            if tuple(tensor.shape) != tuple(target.shape):
                raise CheckpointMismatchError(f"{source}: tensor {name!r} has shape {list(tensor.shape)}, "
                                              f"the model expects {list(target.shape)}")
            target.copy_(tensor)
            seen.add(name)
    missing = sorted(set(targets) - seen)
    if missing:
        raise CheckpointMismatchError(f"{source}: missing tensor {missing[0]!r} ({len(missing)} model tensors "
                                      f"not in the checkpoint)")


def load_model(path: Path | str, ctx: ParallelContext, *, dtype: Optional[torch.dtype] = None,
               vocab_pad_multiple: Optional[int] = None, family: Optional[str] = None,
               use_te: Optional[bool] = None, recompute: str = "none", sequence_parallel: bool = False,
               head: Optional[str] = None) -> tuple[torch.nn.Module, ModelArch, CheckpointMeta]:
    """This rank's pipeline stage, loaded from an HF directory or an fg checkpoint.

    ``dtype`` defaults to the checkpoint's; ``vocab_pad_multiple`` to 128 for HF
    directories and to the stored value for fg checkpoints; ``family``, when
    given, is the family the caller expects.  ``head`` None is the checkpoint's own
    head; ``"value"`` on a causal LM seeds a value model from it exactly as
    ``hf-to-fg --head value`` does (the returned meta carries the
    ``*ForSequenceClassification`` config, so :func:`save_model` writes a value
    checkpoint); ``"lm"`` on a value model is a :class:`CheckpointMismatchError`.
    """
    path = Path(path)
    if is_fg_checkpoint(path):
        # A model saved by a training run (step_N/model) is covered by that step's SHA256SUMS.
        problem = first_error(integrity.check_share(path, ctx.rank, ctx.world_size))
        if problem is not None:
            raise integrity.ChecksumMismatchError(problem)
        arch, meta, tensors = _fg_stage_tensors(path, ctx, vocab_pad_multiple=vocab_pad_multiple,
                                                expect_family=family, head=head)
    elif (path / "config.json").is_file():
        arch, meta, tensors = _hf_stage_tensors(path, ctx, vocab_pad_multiple=vocab_pad_multiple
                                                or DEFAULT_VOCAB_PAD_MULTIPLE, expect_family=family, head=head)
    else:
        raise CheckpointMismatchError(f"{path}: neither an fg checkpoint (fg_checkpoint.json) nor an HF model "
                                      f"directory (config.json)")
    validate_layout(ctx.world_size, ctx.tp, ctx.pp, num_kv_heads=arch.num_query_groups,
                    num_heads=arch.num_attention_heads, num_layers=arch.num_layers,
                    layers_per_stage=meta.layers_per_stage)
    model = build_gpt_model(arch, tp=ctx.tp, pp=ctx.pp, pp_rank=ctx.pp_rank, dtype=dtype or meta.torch_dtype,
                            vocab_pad_multiple=meta.vocab_pad_multiple, use_te=use_te, recompute=recompute,
                            sequence_parallel=sequence_parallel, layers_per_stage=meta.layers_per_stage)
    load_stage_state(model, tensors, str(path))
    if dtype is not None:
        meta.dtype = dtype_name(dtype)
    return model, arch, meta


def _all_ok(ok: bool, ctx: ParallelContext) -> bool:
    """True when ``ok`` on every rank (the world group); no hang if one rank failed."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=ctx.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def stage_state(model: torch.nn.Module) -> dict[str, Tensor]:
    """The stage's tensors as saved: local-spec names, without megatron-core's ``_extra_state``."""
    return {k: v.detach() for k, v in stage_state_dict(model).items()}


def save_model(model: torch.nn.Module, arch: ModelArch, meta: CheckpointMeta, path: Path | str,
               ctx: ParallelContext, *, force: bool = False, extra: Optional[dict] = None,
               side_files_from: Optional[Path | str] = None) -> Path:
    """Write an fg checkpoint of the live model; call on every rank.

    ``meta`` is the one :func:`load_model` returned (family, HF config, padding, layers
    per stage); its layout and dtype are updated from ``ctx`` and the model.  Tokenizer and
    config side files are copied from ``side_files_from`` (default: ``meta.source``).
    """
    path = Path(path)
    model = getattr(model, "module", model)  # unwrap DDP-style wrappers
    check_output_dir(path, force)  # every rank sees the same filesystem: same answer, no collective
    tmp = temp_dir_for(path, tag="save")
    if ctx.is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # left over from a crashed save
        tmp.mkdir(parents=True)
    _all_ok(True, ctx)  # barrier: the directory exists
    state = stage_state(model)
    if meta.dtype in DTYPE_NAMES:
        # bf16 / fp16 training keeps some parameters (norm weights) in fp32: one dtype per checkpoint.
        want = meta.torch_dtype
        state = {k: (t.to(want) if t.is_floating_point() else t) for k, t in state.items()}
    dtypes = {t.dtype for t in state.values()}
    error: Optional[BaseException] = None
    try:
        if ctx.dp_rank == 0:
            write_file(tmp / shard_file_name(ctx.tp_rank, ctx.pp_rank), state,
                       {"fg_tp_rank": str(ctx.tp_rank), "fg_pp_rank": str(ctx.pp_rank)})
    except Exception as exc:  # reported after the collective so no rank hangs
        error = exc
    if not _all_ok(error is None, ctx):
        if ctx.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        if error is not None:
            raise error
        raise RuntimeError(f"save_model: another rank failed writing its shard of {path}; nothing was saved")
    if ctx.is_main:
        try:
            out_meta = CheckpointMeta(**{**vars(meta), "tp": ctx.tp, "pp": ctx.pp,
                                         "layers_per_stage": stage_layer_counts(arch.num_layers, ctx.pp,
                                                                                meta.layers_per_stage),
                                         "padded_vocab_size": padded_vocab_size(arch.vocab_size, ctx.tp,
                                                                                meta.vocab_pad_multiple),
                                         "dtype": dtype_name(next(iter(dtypes))),
                                         "extra": dict(extra if extra is not None else meta.extra)})
            write_meta(tmp, out_meta)
            src = side_files_from or meta.source
            if src and Path(src).is_dir():
                src = Path(src)
                copy_side_files(src / HF_FILES_DIR if is_fg_checkpoint(src) else src, tmp / HF_FILES_DIR)
            store_hf_config(tmp, out_meta.hf_config)  # a seeded value model must not keep the LM's config
            FgCheckpoint(tmp)  # validate names, shapes and dtypes before the rename
            commit_dir(tmp, path)
        except Exception as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            error = exc
    if not _all_ok(error is None, ctx):
        if error is not None:
            raise error
        raise RuntimeError(f"save_model: rank 0 failed to finish {path}; nothing was saved")
    return path
