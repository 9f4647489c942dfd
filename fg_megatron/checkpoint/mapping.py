"""Tensor-level conversion: HF names <-> full megatron names <-> per-rank shards.

Everything here works one tensor (or one fuse group) at a time so callers can
stream checkpoints larger than memory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

from torch import Tensor

from fg_megatron.models import sharding
from fg_megatron.models.adapter import StateDictAdapter


class CheckpointMismatchError(ValueError):
    """A checkpoint that does not fit the model or layout it is loaded into."""


def read_json_object(path: Path, missing: str) -> dict:
    """A checkpoint's JSON metadata file; ``missing`` is the error when it is absent."""
    if not path.is_file():
        raise CheckpointMismatchError(missing)
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointMismatchError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from exc
    if not isinstance(value, dict):
        raise CheckpointMismatchError(f"{path}: expected a JSON object")
    return value


def megatron_from_hf(adapter: StateDictAdapter, get_hf: Callable[[str], Optional[Tensor]],
                     layers: Optional[Sequence[int]] = None,
                     include_globals: bool = True,
                     keep: Optional[Callable[[str], bool]] = None) -> Iterator[tuple[str, Tensor]]:
    """Full megatron tensors from HF tensors; ``get_hf`` returns None for absent keys.

    ``keep(name)`` False skips a megatron tensor before any of its HF tensors is read.
    """
    for name, hf_names, keymap in adapter.entries(layers, include_globals):
        if keep is not None and not keep(name):
            continue
        tensors = [get_hf(h) for h in hf_names]
        missing = [h for h, t in zip(hf_names, tensors) if t is None]
        if missing:
            if keymap.optional and len(missing) == len(hf_names):
                continue
            raise CheckpointMismatchError(f"HF checkpoint is missing tensor {missing[0]!r}")
        full = keymap.fuse(tensors, adapter.arch)
        del tensors  # the inputs need not outlive the fused tensor while the caller holds it
        yield name, full


def hf_from_megatron(adapter: StateDictAdapter, get_full: Callable[[str], Optional[Tensor]],
                     layers: Optional[Sequence[int]] = None,
                     include_globals: bool = True) -> Iterator[tuple[str, Tensor]]:
    """HF tensors from full megatron tensors."""
    for name, hf_names, keymap in adapter.entries(layers, include_globals):
        full = get_full(name)
        if full is None:
            if keymap.optional:
                continue
            raise CheckpointMismatchError(f"fg checkpoint is missing tensor {name!r}")
        for hf_name, tensor in zip(hf_names, keymap.split(full, adapter.arch)):
            yield hf_name, tensor


def stage_shards(full: Iterable[tuple[str, Tensor]], adapter: StateDictAdapter, *, tp: int, tp_rank: int,
                 pp: int, pp_rank: int, padded_vocab: int,
                 layers_per_stage: Optional[Sequence[int]] = None) -> Iterator[tuple[str, Tensor]]:
    """(stage-local name, shard) for one (TP rank, PP stage) from full megatron tensors."""
    for name, tensor in full:
        for stage, local_name in sharding.stage_of(name, adapter.arch, pp, layers_per_stage):
            if stage == pp_rank:
                yield local_name, sharding.shard(name, tensor, tp, tp_rank, padded_vocab)
