"""HF <-> megatron-core state-dict adapters: a declarative name map with ``{}``
layer slots plus explicit fuse/split functions (torchtitan's state-dict adapter).

Megatron names here are the *full* (TP=1, whole-model layer index) names of the
local layer spec; TP sharding and PP stage placement are generic and live in
:mod:`fg_megatron.models.sharding`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor

from fg_megatron.models.arch import VALUE_HEAD, ModelArch

Fuse = Callable[[Sequence[Tensor], ModelArch], Tensor]
Split = Callable[[Tensor, ModelArch], Sequence[Tensor]]


def _identity_fuse(tensors: Sequence[Tensor], arch: ModelArch) -> Tensor:
    return tensors[0]


def _identity_split(tensor: Tensor, arch: ModelArch) -> Sequence[Tensor]:
    return [tensor]


@dataclass(frozen=True)
class KeyMap:
    """One megatron tensor made from one or more HF tensors."""

    megatron: str  # may contain "{}" for the layer index
    hf: tuple[str, ...]
    fuse: Fuse = _identity_fuse
    split: Split = _identity_split
    optional: bool = False  # e.g. biases a given config does not have


@dataclass
class StateDictAdapter:
    """The full mapping for one family and one architecture."""

    arch: ModelArch
    global_maps: list[KeyMap] = field(default_factory=list)  # embeddings, final norm, head
    layer_maps: list[KeyMap] = field(default_factory=list)  # per transformer layer

    def entries(self, layers: Optional[Sequence[int]] = None,
                include_globals: bool = True) -> Iterator[tuple[str, tuple[str, ...], KeyMap]]:
        """(megatron name, HF names, map) for the given layers (all by default)."""
        if include_globals:
            for m in self.global_maps:
                yield m.megatron, m.hf, m
        for i in range(self.arch.num_layers) if layers is None else layers:
            for m in self.layer_maps:
                yield m.megatron.format(i), tuple(h.format(i) for h in m.hf), m

    def hf_names(self) -> list[str]:
        return [h for _, hs, _ in self.entries() for h in hs]


# --- fuse / split helpers shared by families --------------------------------


def fuse_qkv_grouped(q: Tensor, k: Tensor, v: Tensor, arch: ModelArch) -> Tensor:
    """Megatron's fused QKV: per query group, its q heads, then its k head, then v.

    Works for weights ``[heads*hd, h]`` and biases ``[heads*hd]``.
    """
    ng = arch.num_query_groups
    hd = arch.head_dim
    qpg = arch.num_attention_heads // ng
    tail = q.shape[1:]
    q = q.reshape(ng, qpg * hd, *tail)
    k = k.reshape(ng, hd, *tail)
    v = v.reshape(ng, hd, *tail)
    return torch.cat([q, k, v], dim=1).reshape(ng * (qpg + 2) * hd, *tail)


def split_qkv_grouped(qkv: Tensor, arch: ModelArch) -> tuple[Tensor, Tensor, Tensor]:
    ng = arch.num_query_groups
    hd = arch.head_dim
    qpg = arch.num_attention_heads // ng
    tail = qkv.shape[1:]
    grouped = qkv.reshape(ng, (qpg + 2) * hd, *tail)
    q, k, v = torch.split(grouped, [qpg * hd, hd, hd], dim=1)
    return (q.reshape(ng * qpg * hd, *tail).contiguous(), k.reshape(ng * hd, *tail).contiguous(),
            v.reshape(ng * hd, *tail).contiguous())


def fuse_cat0(tensors: Sequence[Tensor], arch: ModelArch) -> Tensor:
    return torch.cat(list(tensors), dim=0)


def split_halves0(tensor: Tensor, arch: ModelArch) -> Sequence[Tensor]:
    return [t.contiguous() for t in torch.chunk(tensor, 2, dim=0)]


def causal_lm_global_maps(arch: ModelArch) -> list[KeyMap]:
    """Embedding, final norm and head of transformers' ``*ForCausalLM`` layout (``model.embed_tokens``,
    ``model.norm``, untied ``lm_head``) or, for a value head, ``*ForSequenceClassification``'s
    (``score`` instead of ``lm_head``); shared by Llama, Mistral and GLM."""
    maps = [
        KeyMap("embedding.word_embeddings.weight", ("model.embed_tokens.weight",)),
        KeyMap("decoder.final_layernorm.weight", ("model.norm.weight",)),
    ]
    if arch.head == VALUE_HEAD:
        maps.append(KeyMap("value_head.weight", ("score.weight",)))
    elif not arch.tie_word_embeddings:
        maps.append(KeyMap("output_layer.weight", ("lm_head.weight",)))
    return maps


def qkv_map(megatron: str, q: str, k: str, v: str, optional: bool = False) -> KeyMap:
    return KeyMap(
        megatron, (q, k, v),
        fuse=lambda ts, arch: fuse_qkv_grouped(ts[0], ts[1], ts[2], arch),
        split=lambda t, arch: split_qkv_grouped(t, arch),
        optional=optional,
    )
