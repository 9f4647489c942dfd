"""Where each megatron tensor lives in a TP x PP layout, and how to cut / join it.

All families share megatron-core's local-spec names, so one rule table serves
them all.  Full names use the model-wide layer index; stage names use the
index within the pipeline stage, as the stage's ``state_dict`` does.  Which
layers a stage holds comes from :func:`fg_megatron.parallel.stage_layer_counts`
(an explicit per-stage list, or its default rule).
"""

from __future__ import annotations

import bisect
import re
from typing import Optional, Sequence

import torch
from torch import Tensor

from fg_megatron.models.arch import ModelArch
from fg_megatron.parallel import stage_layer_counts, stage_layer_offsets

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")

# suffix -> (kind) ; kinds: "col" split dim 0, "row" split dim 1, "glu" gate/up
# halves each split dim 0, "vocab" padded then split dim 0, "rep" replicated.
_LAYER_RULES = {
    "self_attention.linear_qkv.weight": "col",
    "self_attention.linear_qkv.bias": "col",
    "self_attention.linear_proj.weight": "row",
    "mlp.linear_fc1.weight": "glu",
    "mlp.linear_fc2.weight": "row",
    "input_layernorm.weight": "rep",
    "pre_mlp_layernorm.weight": "rep",
}
_GLOBAL_RULES = {
    "embedding.word_embeddings.weight": "vocab",
    "output_layer.weight": "vocab",
    "decoder.final_layernorm.weight": "rep",
    "value_head.weight": "rep",  # [1, h]: every TP rank scores the full (replicated) hidden state
}


def shard_kind(name: str) -> str:
    m = _LAYER.match(name)
    rules, key = (_LAYER_RULES, m.group(2)) if m else (_GLOBAL_RULES, name)
    if key not in rules:
        raise KeyError(f"no sharding rule for tensor {name!r}")
    return rules[key]


def pad_vocab(tensor: Tensor, padded_rows: int) -> Tensor:
    if tensor.shape[0] == padded_rows:
        return tensor
    pad = tensor.new_zeros((padded_rows - tensor.shape[0],) + tuple(tensor.shape[1:]))
    return torch.cat([tensor, pad], dim=0)


def shard(name: str, full: Tensor, tp: int, tp_rank: int, padded_vocab: Optional[int] = None) -> Tensor:
    """This TP rank's piece of a full (TP=1, unpadded) megatron tensor."""
    kind = shard_kind(name)
    if kind == "rep" or tp == 1 and kind != "vocab":
        return full
    if kind == "vocab":
        if padded_vocab is None:
            raise ValueError(f"{name}: padded vocabulary size needed to shard")
        # This rank's rows of the padded tensor, without padding the whole tensor first.
        rows = padded_vocab // tp
        return pad_vocab(full[tp_rank * rows:(tp_rank + 1) * rows], rows).contiguous()
    if kind == "col":
        return torch.chunk(full, tp, dim=0)[tp_rank].contiguous()
    if kind == "row":
        return torch.chunk(full, tp, dim=1)[tp_rank].contiguous()
    gate, up = torch.chunk(full, 2, dim=0)
    return torch.cat([torch.chunk(gate, tp, dim=0)[tp_rank], torch.chunk(up, tp, dim=0)[tp_rank]], dim=0)


def merge(name: str, shards: Sequence[Tensor], vocab_size: Optional[int] = None) -> Tensor:
    """The full tensor from all TP ranks' pieces (padding rows dropped)."""
    kind = shard_kind(name)
    if kind == "rep":
        return shards[0]
    if kind == "vocab":
        full = torch.cat(list(shards), dim=0)
        if vocab_size is None:
            raise ValueError(f"{name}: vocabulary size needed to unpad")
        return full[:vocab_size].contiguous()
    if len(shards) == 1:
        return shards[0]
    if kind == "col":
        return torch.cat(list(shards), dim=0)
    if kind == "row":
        return torch.cat(list(shards), dim=1)
    halves = [torch.chunk(s, 2, dim=0) for s in shards]
    return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)


def layers_of_stage(num_layers: int, pp: int, pp_rank: int,
                    layers_per_stage: Optional[Sequence[int]] = None) -> range:
    """Model-wide indices of the layers stage ``pp_rank`` holds (``layers_per_stage`` None:
    the default split of :func:`~fg_megatron.parallel.stage_layer_counts`)."""
    counts = stage_layer_counts(num_layers, pp, layers_per_stage)
    start = stage_layer_offsets(counts)[pp_rank]
    return range(start, start + counts[pp_rank])


def stage_of(name: str, arch: ModelArch, pp: int,
             layers_per_stage: Optional[Sequence[int]] = None) -> list[tuple[int, str]]:
    """[(pp_rank, stage-local name)] where a full tensor is stored.

    A tied output layer under PP lives on the last stage as ``output_layer.weight``
    (megatron-core keeps a copy there and all-reduces its gradient).
    """
    m = _LAYER.match(name)
    if m:
        layer = int(m.group(1))
        offsets = stage_layer_offsets(stage_layer_counts(arch.num_layers, pp, layers_per_stage))
        if not 0 <= layer < arch.num_layers:
            raise KeyError(f"tensor {name!r}: the model has {arch.num_layers} layers")
        stage = bisect.bisect_right(offsets, layer) - 1
        return [(stage, f"decoder.layers.{layer - offsets[stage]}.{m.group(2)}")]
    if name == "embedding.word_embeddings.weight":
        places = [(0, name)]
        if arch.tie_word_embeddings and pp > 1:
            places.append((pp - 1, "output_layer.weight"))
        return places
    if name in ("decoder.final_layernorm.weight", "output_layer.weight", "value_head.weight"):
        return [(pp - 1, name)]
    raise KeyError(f"no stage rule for tensor {name!r}")


def full_name(stage_name: str, arch: ModelArch, pp: int, pp_rank: int,
              layers_per_stage: Optional[Sequence[int]] = None) -> str:
    """Inverse of :func:`stage_of` for a stage-local name (tied copies map to the embedding)."""
    m = _LAYER.match(stage_name)
    if m:
        start = layers_of_stage(arch.num_layers, pp, pp_rank, layers_per_stage).start
        return f"decoder.layers.{int(m.group(1)) + start}.{m.group(2)}"
    if stage_name == "output_layer.weight" and arch.tie_word_embeddings:
        return "embedding.word_embeddings.weight"
    return stage_name
