"""HF <-> fg checkpoint conversion and TP/PP resharding, streamed.

Every output file is planned before any data is read (names, dtypes and
shapes follow from the architecture; HF shapes from splitting data-less
``meta`` tensors), so its header and byte offsets are fixed and each tensor is
written into its slot as soon as it exists.  All output files are open at
once, so every input tensor is read once.  Peak memory is the largest single
tensor a few times over (its HF pieces or TP shards, the fused/merged whole,
one output shard), never a whole file or model.  Outputs go through
:func:`~fg_megatron.checkpoint.atomic.atomic_output_dir`."""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor

from fg_megatron.checkpoint.atomic import atomic_output_dir
from fg_megatron.checkpoint.hf import (
    CONFIG_FILE,
    DEFAULT_MAX_SHARD_BYTES,
    HFWeights,
    copy_side_files,
    open_hf_weights,
    read_hf_config,
    write_hf_weights,
)
from fg_megatron.checkpoint.layout import (
    HF_FILES_DIR,
    CheckpointMeta,
    FgCheckpoint,
    dtype_name,
    full_shape,
    shard_shape,
    shard_file_name,
    split_for,
    store_hf_config,
    write_meta,
)
from fg_megatron.checkpoint.mapping import CheckpointMismatchError, hf_from_megatron, megatron_from_hf
from fg_megatron.checkpoint.safetensors_io import StreamingWriter, TensorSpec
from fg_megatron.checkpoint.value_seed import (LM_OUTPUT_NAME, VALUE_HEAD_NAME, seed_value_tensors,
                                               seeded_value_config, seeds_value_head)
from fg_megatron.models import arch_from_hf_config, family_module, sharding, state_dict_adapter
from fg_megatron.models.adapter import StateDictAdapter
from fg_megatron.models.arch import ModelArch
from fg_megatron.models.gpt import DEFAULT_VOCAB_PAD_MULTIPLE, padded_vocab_size
from fg_megatron.parallel import stage_layer_counts, validate_layout

log = logging.getLogger("fg_megatron.checkpoint")

# HF tensors that carry no information of their own: derived buffers and, for
# tied models, the output layer (transformers re-ties it to the embedding on load).
_DERIVED_HF = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def family_of(hf_config: dict) -> tuple[str, ModelArch, StateDictAdapter]:
    """(family, architecture, adapter) for an HF config.json dict (its head included)."""
    arch = arch_from_hf_config(hf_config)
    return arch.family, arch, state_dict_adapter(arch)


def expected_hf_shapes(adapter: StateDictAdapter) -> dict[str, tuple[tuple[int, ...], bool]]:
    """HF name -> (shape implied by config.json, optional), by splitting meta tensors."""
    out = {}
    for name, hf_names, keymap in adapter.entries():
        full = torch.empty(full_shape(name, adapter.arch), device="meta")
        for hf_name, piece in zip(hf_names, keymap.split(full, adapter.arch)):
            out[hf_name] = (tuple(piece.shape), keymap.optional)
    return out


def check_hf_tensors(adapter: StateDictAdapter, weights: HFWeights) -> None:
    """The HF checkpoint holds exactly the tensors its config.json implies, with those shapes."""
    source = weights.source
    expected = expected_hf_shapes(adapter)
    names = weights.names()
    ignorable = {"lm_head.weight"} if adapter.arch.tie_word_embeddings else set()
    extra = sorted(n for n in names if n not in expected and n not in ignorable and not _DERIVED_HF.search(n))
    if extra:
        raise CheckpointMismatchError(
            f"{source}: unexpected tensor {extra[0]!r} ({len(extra)} tensors the {adapter.arch.family} "
            f"family does not map)"
        )
    present = set(names)
    missing = [n for n, (_, optional) in expected.items() if n not in present and not optional]
    if missing:
        raise CheckpointMismatchError(f"{source}: missing tensor {missing[0]!r} ({len(missing)} missing)")
    for name, (shape, _) in expected.items():
        if name in present:
            got = weights.spec(name).shape
            if got != shape:
                raise CheckpointMismatchError(f"{source}: tensor {name!r} has shape {list(got)}, "
                                              f"config.json implies {list(shape)}")


def _json_or_none(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _cast(tensor: Tensor, dtype: Optional[torch.dtype]) -> Tensor:
    return tensor if dtype is None or tensor.dtype == dtype else tensor.to(dtype)


def _shard_stream(full: Iterator[tuple[str, Tensor]], arch: ModelArch, *, tp: int, pp: int, padded_vocab: int,
                  dtype: Optional[torch.dtype], layers_per_stage: Sequence[int]
                  ) -> Iterator[tuple[tuple[int, int], str, Tensor]]:
    """((tp_rank, pp_rank), stage-local name, shard) for every output file."""
    for name, tensor in full:
        tensor = _cast(tensor, dtype)
        for stage, local in sharding.stage_of(name, arch, pp, layers_per_stage):
            for tp_rank in range(tp):
                yield (tp_rank, stage), local, sharding.shard(name, tensor, tp, tp_rank, padded_vocab)


def _write_fg_shards(out: Path, names: list[str], full: Iterator[tuple[str, Tensor]], arch: ModelArch, *,
                     tp: int, pp: int, padded_vocab: int, dtype: torch.dtype, layers_per_stage: Sequence[int]) -> int:
    """Stream the full megatron tensors ``names`` (arriving from ``full``) into one
    file per (TP rank, PP stage), planned up front from the architecture's shapes."""
    plan: dict[tuple[int, int], list[TensorSpec]] = defaultdict(list)
    for name in names:
        shape = shard_shape(name, full_shape(name, arch), tp, padded_vocab)
        for stage, local in sharding.stage_of(name, arch, pp, layers_per_stage):
            for tp_rank in range(tp):
                plan[(tp_rank, stage)].append(TensorSpec(local, dtype, shape))
    writers = {}
    try:
        for pp_rank in range(pp):
            for tp_rank in range(tp):
                meta = {"fg_tp_rank": str(tp_rank), "fg_pp_rank": str(pp_rank)}
                writers[(tp_rank, pp_rank)] = StreamingWriter(out / shard_file_name(tp_rank, pp_rank),
                                                              plan[(tp_rank, pp_rank)], meta)
        for key, local, piece in _shard_stream(full, arch, tp=tp, pp=pp, padded_vocab=padded_vocab, dtype=dtype,
                                               layers_per_stage=layers_per_stage):
            writers[key].write(local, piece)
        for writer in writers.values():
            writer.close()
    finally:
        for writer in writers.values():
            writer.abort()
    return sum(w.nbytes for w in writers.values())


def hf_to_fg(hf_dir: Path, out: Path, *, tp: int = 1, pp: int = 1, dtype: Optional[torch.dtype] = None,
             vocab_pad_multiple: int = DEFAULT_VOCAB_PAD_MULTIPLE, force: bool = False,
             head: Optional[str] = None, layers_per_stage: Optional[Sequence[int]] = None) -> CheckpointMeta:
    """Convert an HF model directory into an fg checkpoint for a TP x PP layout.

    ``head`` None keeps the model's own head; ``"value"`` on a causal LM seeds a value
    model from it (:mod:`~fg_megatron.checkpoint.value_seed`); ``"lm"`` on a value model
    is an error.  ``layers_per_stage`` (one count per stage) None is the default split of
    :func:`~fg_megatron.parallel.stage_layer_counts`."""
    hf_dir, out = Path(hf_dir), Path(out)
    hf_config = read_hf_config(hf_dir)
    seeding = seeds_value_head(hf_config, head, str(hf_dir))
    family, arch, src_adapter = family_of(hf_config)  # reads the source's tensors
    out_config = seeded_value_config(hf_config, hf_dir) if seeding else hf_config
    if seeding:
        arch = family_of(out_config)[1]  # the model written: no output layer, a value head
    validate_layout(tp * pp, tp, pp, num_kv_heads=arch.num_query_groups, num_heads=arch.num_attention_heads,
                    num_layers=arch.num_layers, layers_per_stage=layers_per_stage)
    split = stage_layer_counts(arch.num_layers, pp, layers_per_stage)
    weights = open_hf_weights(hf_dir)
    check_hf_tensors(src_adapter, weights)
    out_dtype = dtype or weights.dtype()
    padded = padded_vocab_size(arch.vocab_size, tp, vocab_pad_multiple)
    meta = CheckpointMeta(family=family, hf_config=out_config, tp=tp, pp=pp, num_layers=arch.num_layers,
                          vocab_size=arch.vocab_size, padded_vocab_size=padded,
                          vocab_pad_multiple=vocab_pad_multiple, dtype=dtype_name(out_dtype),
                          source=str(hf_dir.resolve()), layers_per_stage=split)

    present = set(weights.names())
    names = [name for name, hf_names, _ in src_adapter.entries() if any(h in present for h in hf_names)]
    full = megatron_from_hf(src_adapter, weights.get, keep=lambda name: not seeding or name != LM_OUTPUT_NAME)
    if seeding:
        names = [n for n in names if n != LM_OUTPUT_NAME] + [VALUE_HEAD_NAME]
        full = seed_value_tensors(full, last_stage=True, hidden_size=arch.hidden_size, dtype=out_dtype)
    with atomic_output_dir(out, force, inputs=[hf_dir]) as tmp:
        nbytes = _write_fg_shards(tmp, names, full, arch, tp=tp, pp=pp, padded_vocab=padded, dtype=out_dtype,
                                  layers_per_stage=split)
        copy_side_files(hf_dir, tmp / HF_FILES_DIR)
        store_hf_config(tmp, out_config)
        write_meta(tmp, meta)
    log.info("wrote %s: %s (%s head) tp=%d pp=%d (layers per stage %s) %s, %.1f MB", out, family, arch.head, tp,
             pp, split, meta.dtype, nbytes / 1e6)
    return meta


def reshard(ckpt: Path, out: Path, *, tp: int, pp: int, dtype: Optional[torch.dtype] = None,
            vocab_pad_multiple: Optional[int] = None, force: bool = False,
            layers_per_stage: Optional[Sequence[int]] = None) -> CheckpointMeta:
    """Rewrite an fg checkpoint for another TP x PP layout (and optionally dtype).

    ``layers_per_stage`` None keeps the source's split when ``pp`` is unchanged, else
    takes the default split of :func:`~fg_megatron.parallel.stage_layer_counts`."""
    ckpt, out = Path(ckpt), Path(out)
    src = FgCheckpoint(ckpt)
    arch = src.arch
    validate_layout(tp * pp, tp, pp, num_kv_heads=arch.num_query_groups, num_heads=arch.num_attention_heads,
                    num_layers=arch.num_layers, layers_per_stage=layers_per_stage)
    split = split_for(arch.num_layers, pp, layers_per_stage, src.meta)
    multiple = vocab_pad_multiple or src.meta.vocab_pad_multiple
    padded = padded_vocab_size(arch.vocab_size, tp, multiple)
    out_dtype = dtype or src.meta.torch_dtype
    names = src.present_full_names()
    meta = CheckpointMeta(**{**vars(src.meta), "tp": tp, "pp": pp, "padded_vocab_size": padded,
                             "vocab_pad_multiple": multiple, "dtype": dtype_name(out_dtype),
                             "source": str(ckpt.resolve()), "layers_per_stage": split})
    with atomic_output_dir(out, force, inputs=[ckpt]) as tmp:
        full = ((name, src.full_tensor(name)) for name in names)
        nbytes = _write_fg_shards(tmp, names, full, arch, tp=tp, pp=pp, padded_vocab=padded, dtype=out_dtype,
                                  layers_per_stage=split)
        copy_side_files(ckpt / HF_FILES_DIR, tmp / HF_FILES_DIR)
        write_meta(tmp, meta)
    log.info("wrote %s: tp=%d pp=%d (layers per stage %s) %s, %.1f MB", out, tp, pp, split, meta.dtype,
             nbytes / 1e6)
    return meta


def export_layout(meta: CheckpointMeta, layout: Optional[str]) -> Optional[str]:
    """The HF layout to write: ``layout``, or the family's default (None for one-layout families)."""
    layouts = getattr(family_module(meta.family), "EXPORT_LAYOUTS", ())
    if layout is not None and layout not in layouts:
        have = ", ".join(layouts) if layouts else "only its one HF layout"
        raise CheckpointMismatchError(f"--layout {layout}: the {meta.family} family has {have}")
    return layout or (layouts[0] if layouts else None)


def hf_config_for_export(meta: CheckpointMeta, arch: ModelArch, dtype: torch.dtype,
                         layout: Optional[str] = None) -> dict:
    family = family_module(meta.family)
    if layout is None:
        config = family.hf_config_from_arch(arch, meta.hf_config)
    else:
        config = family.hf_config_from_arch(arch, meta.hf_config, layout)
    # transformers >= 5 writes "dtype", older versions "torch_dtype": update whichever
    # is there; add "dtype" only when the weights were cast.
    keys = [k for k in ("dtype", "torch_dtype") if k in config]
    if not keys and dtype != meta.torch_dtype:
        keys = ["dtype"]
    for key in keys:
        config[key] = dtype_name(dtype)
    return config


def fg_to_hf(ckpt: Path, out: Path, *, dtype: Optional[torch.dtype] = None, force: bool = False,
             max_shard_bytes: Optional[int] = None, layout: Optional[str] = None) -> list[Path]:
    """Export an fg checkpoint as an HF directory (weights, config.json, tokenizer files).

    ``layout`` picks one of the family's HF layouts (``EXPORT_LAYOUTS``; chatglm:
    ``glm`` by default, or ``chatglm`` for the original one)."""
    ckpt, out = Path(ckpt), Path(out)
    src = FgCheckpoint(ckpt)
    out_dtype = dtype or src.meta.torch_dtype
    layout = export_layout(src.meta, layout)
    adapter = state_dict_adapter(src.arch, layout)

    def hf_tensors(planning: bool) -> Iterator[tuple[str, Tensor]]:
        get = src.full_meta if planning else src.full_tensor
        for name, tensor in hf_from_megatron(adapter, get):
            yield name, _cast(tensor, out_dtype)

    specs = [TensorSpec.of(name, t) for name, t in hf_tensors(True)]
    with atomic_output_dir(out, force, inputs=[ckpt]) as tmp:
        files = write_hf_weights(tmp, specs, hf_tensors(False), max_shard_bytes or DEFAULT_MAX_SHARD_BYTES)
        copy_side_files(ckpt / HF_FILES_DIR, tmp, skip=(CONFIG_FILE,))
        config = hf_config_for_export(src.meta, src.arch, out_dtype, layout)
        stored = ckpt / HF_FILES_DIR / CONFIG_FILE  # the source's own file: keep its bytes when unchanged
        if stored.is_file() and _json_or_none(stored) == config:
            shutil.copyfile(stored, tmp / CONFIG_FILE)
        else:
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    log.info("wrote %s: %d weight files", out, len(files))
    return [out / f.name for f in files]
