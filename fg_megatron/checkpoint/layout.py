"""The fg checkpoint on disk.

    CKPT/
      fg_checkpoint.json             metadata (CheckpointMeta): format version,
                                     family, HF config.json, tp, pp, layers per
                                     stage, vocabulary padding, dtype, layers,
                                     provenance, extra
      model_tp00_pp00.safetensors    one file per (TP rank, PP stage): exactly the
      model_tp01_pp00.safetensors    stage's megatron ``state_dict`` names (stage-
      ...                            local layer indices, no ``_extra_state``)
      hf/                            the source's config.json, tokenizer files,
                                     generation_config.json: a checkpoint is
                                     self-contained and exports back to HF

:class:`FgCheckpoint` opens one read-only, checks every shard file against the
tensors its layout must hold (names and shapes from the architecture), and
hands out stage tensors or whole (TP-merged, unpadded) megatron tensors.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor

from fg_megatron.checkpoint.mapping import CheckpointMismatchError, read_json_object
from fg_megatron.checkpoint.safetensors_io import SafetensorsFile, TensorSpec
from fg_megatron.models import arch_from_hf_config, sharding, state_dict_adapter
from fg_megatron.models.adapter import StateDictAdapter
from fg_megatron.models.arch import ModelArch
from fg_megatron.models.gpt import padded_vocab_size
from fg_megatron.parallel import ParallelLayoutError, stage_layer_counts

FORMAT_NAME = "fg_megatron"
FORMAT_VERSION = 1
META_FILE = "fg_checkpoint.json"
HF_FILES_DIR = "hf"
DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    for name, d in DTYPE_NAMES.items():
        if d == dtype:
            return name
    raise ValueError(f"dtype {dtype} is not supported for checkpoints (use one of {', '.join(DTYPE_NAMES)})")


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPE_NAMES:
        raise ValueError(f"dtype {name!r} is not supported (use one of {', '.join(DTYPE_NAMES)})")
    return DTYPE_NAMES[name]


def shard_file_name(tp_rank: int, pp_rank: int) -> str:
    return f"model_tp{tp_rank:02d}_pp{pp_rank:02d}.safetensors"


@dataclass
class CheckpointMeta:
    """Everything needed to rebuild the model and find its tensors."""

    family: str
    hf_config: dict  # the HF config.json this model was imported from
    tp: int
    pp: int
    num_layers: int
    vocab_size: int  # real vocabulary (HF)
    padded_vocab_size: int  # rows of the embedding / output layer as stored
    vocab_pad_multiple: int
    dtype: str  # one of DTYPE_NAMES
    source: Optional[str] = None  # the HF dir or checkpoint it was made from (side files come from there)
    extra: dict = field(default_factory=dict)  # trainers' own state (step, config, ...)
    # Transformer layers on each pipeline stage; absent (checkpoints written before uneven
    # stages existed): the even split, the only one those could hold.
    layers_per_stage: Optional[list[int]] = None
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION

    @property
    def torch_dtype(self) -> torch.dtype:
        return parse_dtype(self.dtype)

    @property
    def stage_counts(self) -> list[int]:
        """The layers each stage of this checkpoint holds (the recorded split, else the even one)."""
        return stage_layer_counts(self.num_layers, self.pp, self.layers_per_stage)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False) + "\n"


def is_fg_checkpoint(path: Path) -> bool:
    return (Path(path) / META_FILE).is_file()


def read_meta(path: Path) -> CheckpointMeta:
    meta_path = Path(path) / META_FILE
    raw = read_json_object(meta_path, f"{path}: not an fg checkpoint (no {META_FILE})")
    if raw.get("format") != FORMAT_NAME:
        raise CheckpointMismatchError(f"{meta_path}: field 'format' must be {FORMAT_NAME!r}")
    if raw.get("format_version") != FORMAT_VERSION:
        raise CheckpointMismatchError(
            f"{meta_path}: format_version {raw.get('format_version')!r} is not supported "
            f"(this fg_megatron reads version {FORMAT_VERSION})"
        )
    known = {f.name for f in fields(CheckpointMeta)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise CheckpointMismatchError(f"{meta_path}: unknown field {unknown[0]!r}")
    for name in ("family", "hf_config", "tp", "pp", "num_layers", "vocab_size", "padded_vocab_size",
                 "vocab_pad_multiple", "dtype"):
        if name not in raw:
            raise CheckpointMismatchError(f"{meta_path}: missing field {name!r}")
    meta = CheckpointMeta(**raw)
    if meta.dtype not in DTYPE_NAMES:
        raise CheckpointMismatchError(f"{meta_path}: field 'dtype' is {meta.dtype!r}, expected one of "
                                      f"{', '.join(DTYPE_NAMES)}")
    split = meta.layers_per_stage
    if split is not None and (not isinstance(split, list) or not all(type(n) is int for n in split)):
        raise CheckpointMismatchError(f"{meta_path}: field 'layers_per_stage' must be a list of integers, "
                                      f"got {split!r}")
    try:
        counts = meta.stage_counts
    except ParallelLayoutError as exc:
        raise CheckpointMismatchError(f"{meta_path}: {exc}") from None
    if split is None and len(set(counts)) > 1:
        raise CheckpointMismatchError(f"{meta_path}: no field 'layers_per_stage', and pp {meta.pp} does not "
                                      f"divide the {meta.num_layers} layers evenly")
    return meta


def write_meta(path: Path, meta: CheckpointMeta) -> None:
    (Path(path) / META_FILE).write_text(meta.to_json())


def store_hf_config(path: Path, hf_config: dict) -> None:
    """Make the ``hf/config.json`` copied into a checkpoint being written say ``hf_config`` (the metadata's).

    Side files are copied from the source; a model that changed head on the way (a value
    model seeded from an LM) must not keep the LM's config there.  An equal file keeps its bytes."""
    target = Path(path) / HF_FILES_DIR / "config.json"
    if not target.is_file():
        return
    try:
        if json.loads(target.read_text(encoding="utf-8")) == hf_config:
            return
    except ValueError:
        pass
    target.write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")


def full_shape(name: str, arch: ModelArch) -> tuple[int, ...]:
    """Shape of a full (TP=1, unpadded) megatron tensor of the local layer spec."""
    h, hd = arch.hidden_size, arch.head_dim
    qkv_rows = (arch.num_attention_heads + 2 * arch.num_query_groups) * hd
    suffix = name.split(".", 3)[-1] if name.startswith("decoder.layers.") else name
    shapes = {
        "embedding.word_embeddings.weight": (arch.vocab_size, h),
        "output_layer.weight": (arch.vocab_size, h),
        "decoder.final_layernorm.weight": (h,),
        "value_head.weight": (1, h),
        "input_layernorm.weight": (h,),
        "pre_mlp_layernorm.weight": (h,),
        "self_attention.linear_qkv.weight": (qkv_rows, h),
        "self_attention.linear_qkv.bias": (qkv_rows,),
        "self_attention.linear_proj.weight": (h, arch.num_attention_heads * hd),
        "mlp.linear_fc1.weight": (2 * arch.ffn_hidden_size, h),
        "mlp.linear_fc2.weight": (h, arch.ffn_hidden_size),
    }
    if suffix not in shapes:
        raise KeyError(f"no shape rule for megatron tensor {name!r}")
    return shapes[suffix]


def full_names(adapter: StateDictAdapter) -> list[tuple[str, bool]]:
    """(full megatron name, optional) for every tensor the family maps."""
    return [(name, keymap.optional) for name, _, keymap in adapter.entries()]


def shard_shape(name: str, shape: tuple[int, ...], tp: int, padded_vocab: int) -> tuple[int, ...]:
    """Shape of one TP rank's piece of a full tensor (what :func:`sharding.shard` returns)."""
    kind = sharding.shard_kind(name)
    if kind == "vocab":
        return (padded_vocab // tp,) + tuple(shape[1:])
    if kind in ("col", "glu"):
        return (shape[0] // tp,) + tuple(shape[1:])
    if kind == "row":
        return (shape[0], shape[1] // tp) + tuple(shape[2:])
    return tuple(shape)


def stage_specs(arch: ModelArch, adapter: StateDictAdapter, *, tp: int, pp: int, pp_rank: int,
                padded_vocab: int, dtype: torch.dtype,
                layers_per_stage: Optional[Sequence[int]] = None) -> dict[str, tuple[TensorSpec, bool]]:
    """Stage-local name -> (spec, optional) of the tensors each shard file of a stage holds
    (the same for every TP rank)."""
    out = {}
    for name, optional in full_names(adapter):
        for stage, local in sharding.stage_of(name, arch, pp, layers_per_stage):
            if stage == pp_rank:
                shape = shard_shape(name, full_shape(name, arch), tp, padded_vocab)
                out[local] = (TensorSpec(local, dtype, shape), optional)
    return out


def split_for(num_layers: int, pp: int, requested: Optional[Sequence[int]],
              saved: Optional[CheckpointMeta] = None) -> list[int]:
    """The layers per stage a model is built (or a checkpoint written) with: ``requested``
    when given; else the split ``saved`` (the fg checkpoint it comes from) records, when it
    has the same pipeline size; else :func:`~fg_megatron.parallel.stage_layer_counts`'
    default rule."""
    if requested is None and saved is not None and saved.pp == pp:
        return saved.stage_counts
    return stage_layer_counts(num_layers, pp, requested)


def _split_text(counts: Sequence[int]) -> str:
    return ",".join(str(n) for n in counts)


def reshard_hint(path: Path, meta: CheckpointMeta, tp: int, pp: int,
                 layers_per_stage: Optional[Sequence[int]] = None) -> str:
    """The error for a checkpoint saved at another layout, with the command that converts it.
    ``layers_per_stage`` is the split this run asked for (None: the default one)."""
    out = f"{str(path).rstrip('/')}_tp{tp}_pp{pp}"
    saved, now, flag = f"tp={meta.tp} pp={meta.pp}", f"tp={tp} pp={pp}", ""
    if layers_per_stage is not None and list(layers_per_stage) != meta.stage_counts:
        saved += f" layers_per_stage={_split_text(meta.stage_counts)}"
        now += f" layers_per_stage={_split_text(layers_per_stage)}"
        flag = f" --layers-per-stage {_split_text(layers_per_stage)}"
    return (f"fg checkpoint {path} was saved with {saved} but this run uses {now}; "
            f"convert it first: python tools/convert_checkpoint.py reshard --ckpt {path} --out {out} "
            f"--tp {tp} --pp {pp}{flag}")


class FgCheckpoint:
    """A validated, read-only fg checkpoint."""

    def __init__(self, path: Path, expect_family: Optional[str] = None) -> None:
        self.path = Path(path)
        self.meta = meta = read_meta(self.path)
        if expect_family is not None and meta.family != expect_family:
            raise CheckpointMismatchError(
                f"{self.path}: checkpoint family is {meta.family!r}, expected {expect_family!r}"
            )
        meta_file = self.path / META_FILE
        self.arch: ModelArch = arch_from_hf_config(meta.hf_config, meta.family, f"{meta_file}: hf_config")
        self.adapter: StateDictAdapter = state_dict_adapter(self.arch)
        for field_name, value in (("num_layers", self.arch.num_layers), ("vocab_size", self.arch.vocab_size)):
            if getattr(meta, field_name) != value:
                raise CheckpointMismatchError(f"{meta_file}: {field_name} {getattr(meta, field_name)} disagrees "
                                              f"with its hf_config ({value})")
        padded = padded_vocab_size(meta.vocab_size, meta.tp, meta.vocab_pad_multiple)
        if meta.padded_vocab_size != padded:
            raise CheckpointMismatchError(f"{meta_file}: padded_vocab_size {meta.padded_vocab_size} should be "
                                          f"{padded} for vocab_size {meta.vocab_size}, tp {meta.tp}, "
                                          f"vocab_pad_multiple {meta.vocab_pad_multiple}")
        self._files: dict[tuple[int, int], SafetensorsFile] = {}
        expected = [shard_file_name(t, p) for p in range(meta.pp) for t in range(meta.tp)]
        missing = [f for f in expected if not (self.path / f).is_file()]
        if missing:
            raise CheckpointMismatchError(
                f"{self.path}: missing shard file {missing[0]} (tp={meta.tp} pp={meta.pp} needs {len(expected)} "
                f"files, {len(missing)} missing)"
            )
        for p in range(meta.pp):
            for t in range(meta.tp):
                self._check_file(t, p)

    def file(self, tp_rank: int, pp_rank: int) -> SafetensorsFile:
        key = (tp_rank, pp_rank)
        if key not in self._files:
            self._files[key] = SafetensorsFile(self.path / shard_file_name(tp_rank, pp_rank))
        return self._files[key]

    def _check_file(self, tp_rank: int, pp_rank: int) -> None:
        meta = self.meta
        handle = self.file(tp_rank, pp_rank)
        expected = stage_specs(self.arch, self.adapter, tp=meta.tp, pp=meta.pp, pp_rank=pp_rank,
                               padded_vocab=meta.padded_vocab_size, dtype=meta.torch_dtype,
                               layers_per_stage=meta.stage_counts)
        present = set(handle.names())
        for name, (spec, optional) in expected.items():
            if name not in present:
                if optional:
                    continue
                raise CheckpointMismatchError(f"{handle.path}: missing tensor {name!r}")
            got = handle.spec(name)
            if got.shape != spec.shape:
                raise CheckpointMismatchError(f"{handle.path}: tensor {name!r} has shape {list(got.shape)}, "
                                              f"expected {list(spec.shape)}")
            if got.dtype != spec.dtype:
                raise CheckpointMismatchError(f"{handle.path}: tensor {name!r} is {got.dtype}, the metadata "
                                              f"says {meta.dtype}")
        extra = sorted(present - set(expected))
        if extra:
            raise CheckpointMismatchError(f"{handle.path}: unexpected tensor {extra[0]!r} "
                                          f"({len(extra)} unexpected in total)")

    def stage_names(self, tp_rank: int, pp_rank: int) -> list[str]:
        return self.file(tp_rank, pp_rank).names()

    def stage_tensor(self, tp_rank: int, pp_rank: int, name: str) -> Tensor:
        return self.file(tp_rank, pp_rank).get(name)

    def present_full_names(self) -> list[str]:
        """Full megatron names stored in this checkpoint (optional ones only if present)."""
        out = []
        for name, _ in full_names(self.adapter):
            stage, local = self._place(name)
            if local in self.file(0, stage):
                out.append(name)
        return out

    def _place(self, name: str) -> tuple[int, str]:
        """(stage, stage-local name) of the stored copy of a full tensor."""
        return sharding.stage_of(name, self.arch, self.meta.pp, self.meta.stage_counts)[0]

    def _locate(self, name: str) -> Optional[tuple[int, str]]:
        stage, local = self._place(name)
        return (stage, local) if local in self.file(0, stage) else None

    def full_tensor(self, name: str) -> Optional[Tensor]:
        """The whole megatron tensor (TP shards merged, vocabulary padding dropped), or None."""
        where = self._locate(name)
        if where is None:
            return None
        stage, local = where
        kind = sharding.shard_kind(name)
        if kind == "rep" or self.meta.tp == 1:
            whole = self.stage_tensor(0, stage, local)
            return whole[: self.meta.vocab_size] if kind == "vocab" else whole
        # Same result as sharding.merge, but each shard is copied into place as it
        # is read, so memory holds the whole tensor plus one shard, not all shards too.
        tp = self.meta.tp
        spec = self.file(0, stage).spec(local)
        shape = list(spec.shape)
        if kind == "row":
            shape[1] *= tp
        else:
            shape[0] *= tp
        full = torch.empty(shape, dtype=spec.dtype)
        n = spec.shape[1] if kind == "row" else spec.shape[0]
        for rank in range(tp):
            piece = self.stage_tensor(rank, stage, local)
            if kind == "row":
                full[:, rank * n:(rank + 1) * n] = piece
            elif kind == "glu":  # each shard is [gate_r; up_r]; the whole is [gate; up]
                half = n // 2
                full[rank * half:(rank + 1) * half] = piece[:half]
                full[(tp + rank) * half:(tp + rank + 1) * half] = piece[half:]
            else:  # col, vocab
                full[rank * n:(rank + 1) * n] = piece
            del piece
        return full[: self.meta.vocab_size] if kind == "vocab" else full

    def full_meta(self, name: str) -> Optional[Tensor]:
        """Data-less stand-in for :meth:`full_tensor` (for planning output files)."""
        if self._locate(name) is None:
            return None
        return torch.empty(full_shape(name, self.arch), dtype=self.meta.torch_dtype, device="meta")
