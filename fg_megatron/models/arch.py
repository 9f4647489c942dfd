"""The architecture facts a model family hands to the GPT builder.

``ModelArch`` is family-neutral: each family reads its HF ``config.json`` into
one, and :mod:`fg_megatron.models.gpt` builds a megatron-core ``GPTModel`` from
it.  ``head`` says what the last stage ends in: ``lm`` (the output layer of a
``*ForCausalLM``) or ``value`` (the scalar ``score`` of a
``*ForSequenceClassification`` with one label: a reward model or a critic);
:func:`head_from_hf_config` is the one place that reads it from a config.json.

RoPE inverse frequencies are computed here (default, linear, llama3) so a
checkpoint's ``rope_scaling`` is honoured exactly rather than through
megatron-core's hard-coded llama3 constants.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch


class ModelConfigError(ValueError):
    """An HF config that this family cannot represent."""


LM_HEAD, VALUE_HEAD = "lm", "value"
HEADS = (LM_HEAD, VALUE_HEAD)
_SEQ_CLS_SUFFIX = "ForSequenceClassification"


@dataclass(frozen=True)
class ModelArch:
    family: str
    vocab_size: int  # the tokenizer/HF vocabulary, before padding
    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_query_groups: int  # key/value heads
    head_dim: int
    norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None  # HF rope parameters beyond theta, or None
    rotary_percent: float = 1.0  # fraction of each head's dims that rotate
    rotary_interleaved: bool = False  # (even, odd) pairs rotate together (GLM)
    sliding_window: Optional[int] = None  # Mistral: tokens each position sees, itself included
    head: str = LM_HEAD  # "lm" (output layer over the vocabulary) or "value" (one scalar per token)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rotary_percent)


def rope_parameters(hf_config: dict) -> tuple[float, Optional[dict]]:
    """(theta, scaling dict or None) from a config.json in either the transformers<5
    (``rope_theta`` + ``rope_scaling``) or >=5 (``rope_parameters``) spelling."""
    params = hf_config.get("rope_parameters")
    if isinstance(params, dict):
        theta = float(params.get("rope_theta", hf_config.get("rope_theta", 10000.0)))
        scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")}
    else:
        theta = float(hf_config.get("rope_theta", 10000.0))
        scaling = dict(hf_config.get("rope_scaling") or {})
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default" or not scaling:
        return theta, None
    scaling["rope_type"] = rope_type
    scaling.pop("type", None)
    return theta, scaling


def rope_inv_freq(arch: ModelArch) -> torch.Tensor:
    """Inverse frequencies (fp32, ``rotary_dim // 2``) exactly as transformers computes them."""
    dim = arch.rotary_dim
    inv_freq = 1.0 / (arch.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = arch.rope_scaling
    if scaling is None:
        return inv_freq
    rope_type = scaling["rope_type"]
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"])
    if rope_type == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling["low_freq_factor"])
        high = float(scaling["high_freq_factor"])
        old_ctx = float(scaling["original_max_position_embeddings"])
        low_wavelen = old_ctx / low
        high_wavelen = old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    raise ModelConfigError(
        f"rope_scaling type {rope_type!r} is not supported (supported: default, linear, llama3)"
    )


def require(hf_config: dict, key: str, source: str = "config.json") -> Any:
    if key not in hf_config:
        raise ModelConfigError(f"{source}: missing field {key!r}")
    return hf_config[key]


def num_labels(hf_config: dict) -> int:
    """transformers' ``num_labels``: the field when present, else ``len(id2label)``, else its default 2."""
    if hf_config.get("num_labels") is not None:
        return int(hf_config["num_labels"])
    id2label = hf_config.get("id2label")
    return len(id2label) if isinstance(id2label, dict) else 2


def head_from_hf_config(hf_config: dict, source: str = "config.json") -> str:
    """``value`` when ``architectures`` names a ``*ForSequenceClassification`` class, else ``lm``.

    A value head is one scalar per token, so the classifier must have exactly one label."""
    names = hf_config.get("architectures") or []
    seq_cls = [a for a in names if isinstance(a, str) and a.endswith(_SEQ_CLS_SUFFIX)]
    if not seq_cls:
        return LM_HEAD
    n = num_labels(hf_config)
    if n != 1:
        field_name = "num_labels" if hf_config.get("num_labels") is not None else "id2label"
        raise ModelConfigError(f"{source}: {seq_cls[0]} needs exactly one label for a reward/value head, "
                               f"field {field_name!r} gives {n}")
    return VALUE_HEAD
