"""ChatGLM3 / GLM on a megatron-core GPTModel, from either of its two HF layouts.

- ``glm``: transformers' native port (``GlmForCausalLM``, ``model_type: glm``):
  ``model.layers.N.self_attn.{q,k,v}_proj``, fused ``mlp.gate_up_proj``.
- ``chatglm``: THUDM's original checkpoints (``model_type: chatglm``, remote
  code): ``transformer.encoder.layers.N.self_attention.query_key_value`` with
  rows ``[all Q | all K | all V]``, ``mlp.dense_h_to_4h`` = ``[gate; up]``.

Both are one architecture: RMSNorm, SwiGLU (gate first), multi-query attention
with bias on Q/K/V only, RoPE on the first half of each head with interleaved
(even, odd) pairs and base ``10000 * rope_ratio``, untied output layer.  The
layout a checkpoint came from is kept in ``ModelArch.extra["layout"]`` (it
follows from the stored ``config.json``), so an fg checkpoint can be written
back in it bit for bit; transformers' ``glm`` layout is the default export.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch
from torch import Tensor

from fg_megatron.models.adapter import (KeyMap, StateDictAdapter, causal_lm_global_maps, fuse_qkv_grouped, qkv_map,
                                        split_qkv_grouped)
from fg_megatron.models.arch import VALUE_HEAD, ModelArch, ModelConfigError, require, rope_parameters

log = logging.getLogger("fg_megatron.models.chatglm")

GLM, CHATGLM = "glm", "chatglm"
EXPORT_LAYOUTS = (GLM, CHATGLM)  # the first is what fg-to-hf writes by default
MODEL_TYPES = {GLM: GLM, CHATGLM: CHATGLM}  # config.json model_type -> layout
INV_FREQ = "transformer.rotary_pos_emb.inv_freq"

# ChatGLMConfig's defaults (configuration_chatglm.py) for keys a config.json may omit.
_CHATGLM_DEFAULTS = {
    "kv_channels": 128, "seq_length": 2048, "layernorm_epsilon": 1e-5, "rmsnorm": True,
    "apply_residual_connection_post_layernorm": False, "post_layer_norm": True, "add_bias_linear": False,
    "add_qkv_bias": False, "multi_query_attention": False, "multi_query_group_num": 1, "rope_ratio": 1,
}
# GlmConfig's defaults (transformers) for keys a config.json may omit.
_GLM_DEFAULTS = {"num_key_value_heads": 2, "head_dim": 128, "rms_norm_eps": 1.5625e-07, "attention_bias": True,
                 "max_position_embeddings": 131072, "tie_word_embeddings": False, "hidden_act": "silu"}
# Original-config fields that change the computation in ways this family does not implement:
# field -> (the only accepted value, why).
_CHATGLM_FIXED = {
    "rmsnorm": (True, "LayerNorm ChatGLM variants are not supported"),
    "apply_residual_connection_post_layernorm": (False, "post-norm residuals are not supported"),
    "post_layer_norm": (True, "a model without the final layer norm is not supported"),
    "add_bias_linear": (False, "biases on the dense / MLP layers are not supported"),
}


def source_layout(hf_config: dict) -> str:
    """``glm`` or ``chatglm``: which HF layout a config.json describes."""
    model_type = hf_config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ModelConfigError(f"config.json: model_type {model_type!r} is not a GLM layout "
                               f"(expected one of {', '.join(MODEL_TYPES)})")
    return MODEL_TYPES[model_type]


def _chatglm(hf_config: dict, key: str):
    return hf_config[key] if hf_config.get(key) is not None else _CHATGLM_DEFAULTS[key]


def _arch_from_chatglm(hf_config: dict, family: str) -> ModelArch:
    src = "config.json (chatglm)"
    for key, (want, why) in _CHATGLM_FIXED.items():
        got = _chatglm(hf_config, key)
        if bool(got) != want:
            raise ModelConfigError(f"{src}: {key}={str(got).lower()} ({why}; expected {str(want).lower()})")
    if hf_config.get("pre_seq_len") is not None:
        raise ModelConfigError(f"{src}: pre_seq_len={hf_config['pre_seq_len']} (P-tuning prefix encoders) is not "
                               f"supported; merge or drop the prefix first")
    if hf_config.get("quantization_bit"):
        raise ModelConfigError(f"{src}: quantization_bit={hf_config['quantization_bit']} is not supported; "
                               f"use the unquantised checkpoint")
    heads = int(require(hf_config, "num_attention_heads", src))
    groups = int(_chatglm(hf_config, "multi_query_group_num")) if _chatglm(hf_config, "multi_query_attention") \
        else heads
    if groups < 1 or heads % groups:
        raise ModelConfigError(f"{src}: multi_query_group_num {groups} does not divide num_attention_heads {heads}")
    ratio = float(_chatglm(hf_config, "rope_ratio"))
    return ModelArch(
        family=family,
        vocab_size=int(require(hf_config, "padded_vocab_size", src)),
        hidden_size=int(require(hf_config, "hidden_size", src)),
        ffn_hidden_size=int(require(hf_config, "ffn_hidden_size", src)),
        num_layers=int(require(hf_config, "num_layers", src)),
        num_attention_heads=heads,
        num_query_groups=groups,
        head_dim=int(_chatglm(hf_config, "kv_channels")),
        norm_eps=float(_chatglm(hf_config, "layernorm_epsilon")),
        max_position_embeddings=int(_chatglm(hf_config, "seq_length")),
        # ChatGLM's modeling code never ties the output layer (it has no get_output_embeddings).
        tie_word_embeddings=False,
        qkv_bias=bool(_chatglm(hf_config, "add_qkv_bias")),
        rope_theta=10000.0 * ratio,
        rotary_percent=0.5,
        rotary_interleaved=True,
        extra={"layout": CHATGLM},
    )


def _glm(hf_config: dict, key: str):
    return hf_config[key] if hf_config.get(key) is not None else _GLM_DEFAULTS[key]


def _partial_rotary_factor(hf_config: dict) -> float:
    params = hf_config.get("rope_parameters")
    if isinstance(params, dict) and params.get("partial_rotary_factor") is not None:
        return float(params["partial_rotary_factor"])
    return float(hf_config.get("partial_rotary_factor") or 0.5)


def _arch_from_glm(hf_config: dict, family: str) -> ModelArch:
    src = "config.json (glm)"
    act = _glm(hf_config, "hidden_act")
    if act != "silu":
        raise ModelConfigError(f"{src}: hidden_act {act!r} is not supported (only 'silu')")
    hidden = int(require(hf_config, "hidden_size", src))
    heads = int(require(hf_config, "num_attention_heads", src))
    head_dim = hf_config.get("head_dim", _GLM_DEFAULTS["head_dim"]) or hidden // heads
    theta, scaling = rope_parameters(hf_config)
    factor = _partial_rotary_factor(hf_config)
    if not 0 < factor <= 1 or int(head_dim * factor) % 2:
        raise ModelConfigError(f"{src}: partial_rotary_factor {factor} with head_dim {head_dim} does not give an "
                               f"even number of rotary dims")
    return ModelArch(
        family=family,
        vocab_size=int(require(hf_config, "vocab_size", src)),
        hidden_size=hidden,
        ffn_hidden_size=int(require(hf_config, "intermediate_size", src)),
        num_layers=int(require(hf_config, "num_hidden_layers", src)),
        num_attention_heads=heads,
        num_query_groups=int(_glm(hf_config, "num_key_value_heads")),
        head_dim=int(head_dim),
        norm_eps=float(_glm(hf_config, "rms_norm_eps")),
        max_position_embeddings=int(_glm(hf_config, "max_position_embeddings")),
        tie_word_embeddings=bool(_glm(hf_config, "tie_word_embeddings")),
        qkv_bias=bool(_glm(hf_config, "attention_bias")),
        rope_theta=theta,
        rope_scaling=scaling,
        rotary_percent=factor,
        rotary_interleaved=True,
        extra={"layout": GLM},
    )


def arch_from_hf_config(hf_config: dict, family: str = "chatglm") -> ModelArch:
    """The architecture of a ``glm`` or original ``chatglm`` config.json."""
    if source_layout(hf_config) == CHATGLM:
        return _arch_from_chatglm(hf_config, family)
    return _arch_from_glm(hf_config, family)


# --- state-dict adapters ---------------------------------------------------------


def _qkv_from_chatglm(tensors: Sequence[Tensor], arch: ModelArch) -> Tensor:
    """``[all Q | all K | all V]`` rows -> megatron's per-group ``[q heads, k, v]`` rows."""
    q_rows = arch.num_attention_heads * arch.head_dim
    kv_rows = arch.num_query_groups * arch.head_dim
    q, k, v = torch.split(tensors[0], [q_rows, kv_rows, kv_rows], dim=0)
    return fuse_qkv_grouped(q, k, v, arch)


def _qkv_to_chatglm(tensor: Tensor, arch: ModelArch) -> list[Tensor]:
    return [torch.cat(split_qkv_grouped(tensor, arch), dim=0)]


def chatglm_inv_freq(arch: ModelArch, dtype: torch.dtype, device: Optional[torch.device | str] = None) -> Tensor:
    """The ``rotary_pos_emb.inv_freq`` buffer original checkpoints carry, by ChatGLM's own formula
    (``RotaryEmbedding(kv_channels // 2, dtype=torch_dtype)``: base 10000 whatever ``rope_ratio``,
    computed in the checkpoint's dtype).  ChatGLM's forward never reads its values (it recomputes
    the frequencies with ``rope_ratio``); it is written back so the original layout round-trips."""
    dim = arch.head_dim // 2
    n = (dim + 1) // 2
    if device is not None and torch.device(device).type == "meta":
        return torch.empty((n,), dtype=dtype, device="meta")
    return 1.0 / (10000 ** (torch.arange(0, dim, 2).to(dtype=dtype) / dim))


def _final_norm_from_chatglm(tensors: Sequence[Tensor], arch: ModelArch) -> Tensor:
    norm, inv_freq = tensors
    if not inv_freq.is_meta and not torch.equal(inv_freq, chatglm_inv_freq(arch, inv_freq.dtype)):
        log.warning("%s differs from ChatGLM's formula; its values are unused by ChatGLM and are written back "
                    "from the formula on export", INV_FREQ)
    return norm


def _final_norm_to_chatglm(tensor: Tensor, arch: ModelArch) -> list[Tensor]:
    return [tensor, chatglm_inv_freq(arch, tensor.dtype, tensor.device)]


def _chatglm_adapter(arch: ModelArch) -> StateDictAdapter:
    L = "transformer.encoder.layers.{}"
    global_maps = [
        KeyMap("embedding.word_embeddings.weight", ("transformer.embedding.word_embeddings.weight",)),
        # The rotary buffer rides with the final norm: it has no megatron tensor of its own.
        KeyMap("decoder.final_layernorm.weight", ("transformer.encoder.final_layernorm.weight", INV_FREQ),
               fuse=_final_norm_from_chatglm, split=_final_norm_to_chatglm),
        KeyMap("output_layer.weight", ("transformer.output_layer.weight",)),
    ]
    layer_maps = [
        KeyMap("decoder.layers.{}.input_layernorm.weight", (f"{L}.input_layernorm.weight",)),
        KeyMap("decoder.layers.{}.self_attention.linear_qkv.weight", (f"{L}.self_attention.query_key_value.weight",),
               fuse=_qkv_from_chatglm, split=_qkv_to_chatglm),
    ]
    if arch.qkv_bias:
        layer_maps.append(KeyMap("decoder.layers.{}.self_attention.linear_qkv.bias",
                                 (f"{L}.self_attention.query_key_value.bias",),
                                 fuse=_qkv_from_chatglm, split=_qkv_to_chatglm))
    layer_maps += [
        KeyMap("decoder.layers.{}.self_attention.linear_proj.weight", (f"{L}.self_attention.dense.weight",)),
        KeyMap("decoder.layers.{}.pre_mlp_layernorm.weight", (f"{L}.post_attention_layernorm.weight",)),
        # dense_h_to_4h is [gate; up] like megatron's fc1: no permutation.
        KeyMap("decoder.layers.{}.mlp.linear_fc1.weight", (f"{L}.mlp.dense_h_to_4h.weight",)),
        KeyMap("decoder.layers.{}.mlp.linear_fc2.weight", (f"{L}.mlp.dense_4h_to_h.weight",)),
    ]
    return StateDictAdapter(arch, global_maps, layer_maps)


def _glm_adapter(arch: ModelArch) -> StateDictAdapter:
    L = "model.layers.{}"
    global_maps = causal_lm_global_maps(arch)
    attn = f"{L}.self_attn"
    layer_maps = [
        KeyMap("decoder.layers.{}.input_layernorm.weight", (f"{L}.input_layernorm.weight",)),
        qkv_map("decoder.layers.{}.self_attention.linear_qkv.weight",
                f"{attn}.q_proj.weight", f"{attn}.k_proj.weight", f"{attn}.v_proj.weight"),
    ]
    if arch.qkv_bias:
        layer_maps.append(qkv_map("decoder.layers.{}.self_attention.linear_qkv.bias",
                                  f"{attn}.q_proj.bias", f"{attn}.k_proj.bias", f"{attn}.v_proj.bias"))
    layer_maps += [
        KeyMap("decoder.layers.{}.self_attention.linear_proj.weight", (f"{attn}.o_proj.weight",)),
        KeyMap("decoder.layers.{}.pre_mlp_layernorm.weight", (f"{L}.post_attention_layernorm.weight",)),
        # gate_up_proj is chunked (gate, up) in GlmMLP: already megatron's [gate; up].
        KeyMap("decoder.layers.{}.mlp.linear_fc1.weight", (f"{L}.mlp.gate_up_proj.weight",)),
        KeyMap("decoder.layers.{}.mlp.linear_fc2.weight", (f"{L}.mlp.down_proj.weight",)),
    ]
    return StateDictAdapter(arch, global_maps, layer_maps)


def check_layout(layout: str) -> str:
    if layout not in EXPORT_LAYOUTS:
        raise ModelConfigError(f"unknown GLM checkpoint layout {layout!r} (choose from {', '.join(EXPORT_LAYOUTS)})")
    return layout


def state_dict_adapter(arch: ModelArch, layout: Optional[str] = None) -> StateDictAdapter:
    """HF <-> megatron name map for ``layout`` (default: the layout ``arch`` was read from)."""
    layout = check_layout(layout or arch.extra.get("layout", GLM))
    if layout == CHATGLM and arch.head == VALUE_HEAD:
        raise ModelConfigError("a GLM value model cannot be written in the original chatglm layout (it has no "
                               "value head); export it in the glm layout (GlmForSequenceClassification)")
    if layout == CHATGLM and arch.tie_word_embeddings:
        raise ModelConfigError("a GLM model with tied embeddings cannot be written in the original chatglm "
                               "layout (ChatGLM always has a separate output layer)")
    return _chatglm_adapter(arch) if layout == CHATGLM else _glm_adapter(arch)


# --- config.json both ways -------------------------------------------------------

_SHARED_KEYS = ("hidden_size", "num_attention_heads", "attention_dropout", "use_cache", "eos_token_id",
                "pad_token_id", "bos_token_id")


def glm_config_from_chatglm(original: dict) -> dict:
    """transformers' ``GlmConfig`` dict for an original ChatGLM config.json (what its
    conversion script writes, with ``rope_ratio`` honoured)."""
    arch = _arch_from_chatglm(original, "chatglm")
    out = {
        "architectures": ["GlmForCausalLM"],
        "model_type": GLM,
        "vocab_size": arch.vocab_size,
        "intermediate_size": arch.ffn_hidden_size,
        "num_hidden_layers": arch.num_layers,
        "num_key_value_heads": arch.num_query_groups,
        "head_dim": arch.head_dim,
        "max_position_embeddings": arch.max_position_embeddings,
        "rms_norm_eps": arch.norm_eps,
        "attention_bias": arch.qkv_bias,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": arch.rope_theta, "partial_rotary_factor": 0.5},
    }
    out.update({k: original[k] for k in _SHARED_KEYS if k in original})
    dtype = original.get("torch_dtype", original.get("dtype"))
    if dtype is not None:
        out["dtype"] = dtype
    return out


def chatglm_config_from_glm(config: dict) -> dict:
    """An original-layout ChatGLM config.json for a transformers ``glm`` config."""
    arch = _arch_from_glm(config, "chatglm")
    if arch.rope_scaling is not None or arch.rotary_percent != 0.5:
        raise ModelConfigError("config.json (glm): only default RoPE on half of each head can be written in the "
                               "original chatglm layout")
    out = {
        "architectures": ["ChatGLMModel"],
        "model_type": CHATGLM,
        "padded_vocab_size": arch.vocab_size,
        "ffn_hidden_size": arch.ffn_hidden_size,
        "num_layers": arch.num_layers,
        "kv_channels": arch.head_dim,
        "multi_query_attention": arch.num_query_groups != arch.num_attention_heads,
        "multi_query_group_num": arch.num_query_groups,
        "seq_length": arch.max_position_embeddings,
        "layernorm_epsilon": arch.norm_eps,
        "add_qkv_bias": arch.qkv_bias,
        "add_bias_linear": False,
        "rmsnorm": True,
        "post_layer_norm": True,
        "apply_residual_connection_post_layernorm": False,
        "original_rope": True,
        "rope_ratio": arch.rope_theta / 10000.0,
        "tie_word_embeddings": False,
    }
    out.update({k: config[k] for k in _SHARED_KEYS if k in config})
    dtype = config.get("dtype", config.get("torch_dtype"))
    if dtype is not None:
        out["torch_dtype"] = dtype
    return out


def hf_config_from_arch(arch: ModelArch, base: dict, layout: Optional[str] = None) -> dict:
    """The config.json to write for ``layout`` (default: the source's): the imported
    one unchanged when the layouts agree, else translated."""
    target = check_layout(layout or source_layout(base))
    if target == source_layout(base):
        return dict(base)
    return glm_config_from_chatglm(base) if target == GLM else chatglm_config_from_glm(base)
