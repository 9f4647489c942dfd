"""Llama and Mistral: HF ``LlamaForCausalLM`` / ``MistralForCausalLM`` on a megatron-core GPTModel.

Both use rotate-half RoPE, so HF's q/k rows map to megatron's without a
permutation; only the grouped QKV fuse and the ``[gate; up]`` fc1 fuse differ.
"""

from __future__ import annotations

from fg_megatron.models.adapter import (KeyMap, StateDictAdapter, causal_lm_global_maps, fuse_cat0, qkv_map,
                                        split_halves0)
from fg_megatron.models.arch import ModelArch, ModelConfigError, require, rope_parameters

HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}


def arch_from_hf_config(hf_config: dict, family: str = "llama") -> ModelArch:
    src = f"config.json ({family})"
    hidden = int(require(hf_config, "hidden_size", src))
    heads = int(require(hf_config, "num_attention_heads", src))
    act = hf_config.get("hidden_act", "silu")
    if act != "silu":
        raise ModelConfigError(f"{src}: hidden_act {act!r} is not supported (only 'silu')")
    if hf_config.get("mlp_bias"):
        raise ModelConfigError(f"{src}: mlp_bias=true is not supported")
    if hf_config.get("attention_bias"):
        raise ModelConfigError(f"{src}: attention_bias=true is not supported for {family}")
    theta, scaling = rope_parameters(hf_config)
    window = hf_config.get("sliding_window") if family == "mistral" else None
    return ModelArch(
        family=family,
        vocab_size=int(require(hf_config, "vocab_size", src)),
        hidden_size=hidden,
        ffn_hidden_size=int(require(hf_config, "intermediate_size", src)),
        num_layers=int(require(hf_config, "num_hidden_layers", src)),
        num_attention_heads=heads,
        num_query_groups=int(hf_config.get("num_key_value_heads") or heads),
        head_dim=int(hf_config.get("head_dim") or hidden // heads),
        norm_eps=float(hf_config.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(hf_config.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
        rope_theta=theta,
        rope_scaling=scaling,
        sliding_window=int(window) if window else None,
    )


def state_dict_adapter(arch: ModelArch) -> StateDictAdapter:
    L = "model.layers.{}"
    global_maps = causal_lm_global_maps(arch)
    layer_maps = [
        KeyMap("decoder.layers.{}.input_layernorm.weight", (f"{L}.input_layernorm.weight",)),
        qkv_map("decoder.layers.{}.self_attention.linear_qkv.weight",
                f"{L}.self_attn.q_proj.weight", f"{L}.self_attn.k_proj.weight",
                f"{L}.self_attn.v_proj.weight"),
        KeyMap("decoder.layers.{}.self_attention.linear_proj.weight", (f"{L}.self_attn.o_proj.weight",)),
        KeyMap("decoder.layers.{}.pre_mlp_layernorm.weight", (f"{L}.post_attention_layernorm.weight",)),
        KeyMap("decoder.layers.{}.mlp.linear_fc1.weight",
               (f"{L}.mlp.gate_proj.weight", f"{L}.mlp.up_proj.weight"),
               fuse=fuse_cat0, split=split_halves0),
        KeyMap("decoder.layers.{}.mlp.linear_fc2.weight", (f"{L}.mlp.down_proj.weight",)),
    ]
    return StateDictAdapter(arch, global_maps, layer_maps)


def hf_config_from_arch(arch: ModelArch, base: dict) -> dict:
    """The HF config.json to write on export: the imported one, kept as is."""
    out = dict(base)
    out.setdefault("architectures", [HF_ARCHITECTURES[arch.family]])
    out["model_type"] = arch.family
    return out
