"""Tiny random HF models for parity tests (fixed seeds, built from configs)."""

from __future__ import annotations

from pathlib import Path

import torch

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16, "rope_theta": 500000.0}

# name -> (model_type, config kwargs).  Vocabulary 1000/999 is not a multiple of 128 x TP.
VARIANTS = {
    "llama_gqa_untied": ("llama", dict(vocab_size=1000, hidden_size=64, intermediate_size=96,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)),
    "llama_mha_tied": ("llama", dict(vocab_size=999, hidden_size=48, intermediate_size=80,
                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                     tie_word_embeddings=True)),
    "llama3_rope_scaling": ("llama", dict(vocab_size=1000, hidden_size=64, intermediate_size=96,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                          tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE)),
    "mistral_window": ("mistral", dict(vocab_size=1000, hidden_size=64, intermediate_size=96,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                       sliding_window=8, head_dim=24)),
    # GLM (transformers' GlmForCausalLM): 2 KV groups, QKV bias, RoPE on half of each head
    # (interleaved pairs), vocabulary 1003.  The second has head_dim != hidden / heads and a
    # rope base of 10000 x rope_ratio 5 (ChatGLM3-6B-32k style).
    "glm_mqa_bias": ("glm", dict(vocab_size=1003, hidden_size=64, intermediate_size=96,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 head_dim=16, attention_bias=True)),
    "glm_rope_ratio": ("glm", dict(vocab_size=1003, hidden_size=48, intermediate_size=80,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   head_dim=24, attention_bias=True,
                                   rope_parameters={"rope_type": "default", "rope_theta": 50000.0,
                                                    "partial_rotary_factor": 0.5})),
}
GLM_VARIANTS = tuple(n for n, (t, _) in VARIANTS.items() if t == "glm")


def hf_config(name: str, num_layers: int | None = None):
    """The variant's config; ``num_layers`` overrides its 2 layers (uneven pipeline stages)."""
    from transformers import GlmConfig, LlamaConfig, MistralConfig

    model_type, kwargs = VARIANTS[name]
    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "glm": GlmConfig}[model_type]
    kwargs = dict(kwargs)
    if num_layers is not None:
        kwargs["num_hidden_layers"] = num_layers
    kwargs.setdefault("max_position_embeddings", 256)
    kwargs.setdefault("rms_norm_eps", 1e-5)
    if model_type == "glm":
        kwargs.setdefault("eos_token_id", 2)
        kwargs.setdefault("pad_token_id", 0)
    return cls(**kwargs)


def hf_model(name: str, seed: int = 0, num_layers: int | None = None):
    """A tiny random HF causal LM in fp32, eval mode.  Weights are drawn with a
    std large enough that logits differ materially between tokens."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = hf_config(name, num_layers)
    cfg.initializer_range = 0.2
    return _perturbed(AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval())


def _perturbed(model):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))  # non-trivial norm weights
            elif n.endswith(".bias"):
                p.normal_(0.0, 0.2)  # transformers zero-initialises biases: make them count
    return model


# --- value-head models: transformers' *ForSequenceClassification with one label ------------
# Llama (untied and tied config), Mistral (sliding window), GLM (QKV bias, partial rotary).
VALUE_VARIANTS = ("llama_gqa_untied", "llama_mha_tied", "mistral_window", "glm_mqa_bias")
PAD_ID = 0  # real tokens are drawn from 1..V-1 so transformers' pooling finds each row's last one


def hf_value_model(name: str, seed: int = 0):
    """A tiny random ``<Family>ForSequenceClassification`` (num_labels=1, pad_token_id 0) in fp32, eval mode."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    cfg = hf_config(name)
    cfg.initializer_range = 0.2
    cfg.num_labels = 1
    cfg.pad_token_id = PAD_ID
    return _perturbed(AutoModelForSequenceClassification.from_config(cfg, dtype=torch.float32).eval())


def save_hf_value_model(name: str, out: Path, seed: int = 0, tokenizer_dir: Path | None = None) -> Path:
    model = hf_value_model(name, seed)
    model.save_pretrained(out, safe_serialization=True)
    _copy_tokenizer(tokenizer_dir, out)
    return Path(out)


def _copy_tokenizer(tokenizer_dir: Path | None, out: Path) -> None:
    if tokenizer_dir is not None:
        import shutil

        for f in Path(tokenizer_dir).iterdir():
            if f.is_file() and f.name != "config.json":
                shutil.copy(f, Path(out) / f.name)


def save_hf_model(name: str, out: Path, seed: int = 0, tokenizer_dir: Path | None = None,
                  num_layers: int | None = None) -> Path:
    model = hf_model(name, seed, num_layers)
    model.save_pretrained(out, safe_serialization=True)
    _copy_tokenizer(tokenizer_dir, out)
    return Path(out)


# --- the original ChatGLM3 layout (THUDM's remote-code checkpoints) ------------------
# Written here independently of fg_megatron's adapter, as the inverse of transformers'
# own GLM conversion script, so the parity tests check our layout code against it.


def chatglm_original_config(cfg) -> dict:
    """An original ChatGLM3 config.json for a transformers GlmConfig."""
    theta = cfg.rope_parameters["rope_theta"]
    return {
        "_name_or_path": "THUDM/chatglm3-6b",  # unsorted keys, as in the real file
        "model_type": "chatglm",
        "architectures": ["ChatGLMModel"],
        "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                     "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration"},
        "add_bias_linear": False,
        "add_qkv_bias": cfg.attention_bias,
        "apply_query_key_layer_scaling": True,
        "apply_residual_connection_post_layernorm": False,
        "attention_dropout": 0.0,
        "attention_softmax_in_fp32": True,
        "bias_dropout_fusion": True,
        "ffn_hidden_size": cfg.intermediate_size,
        "fp32_residual_connection": False,
        "hidden_dropout": 0.0,
        "hidden_size": cfg.hidden_size,
        "kv_channels": cfg.head_dim,
        "layernorm_epsilon": cfg.rms_norm_eps,
        "multi_query_attention": True,
        "multi_query_group_num": cfg.num_key_value_heads,
        "num_attention_heads": cfg.num_attention_heads,
        "num_layers": cfg.num_hidden_layers,
        "original_rope": True,
        "padded_vocab_size": cfg.vocab_size,
        "post_layer_norm": True,
        "rmsnorm": True,
        "rope_ratio": theta / 10000.0,
        "seq_length": cfg.max_position_embeddings,
        "use_cache": True,
        "torch_dtype": "float32",
        "transformers_version": "4.30.2",
        "tie_word_embeddings": False,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }


def chatglm_original_state(model) -> dict:
    """The original-layout tensors of a GlmForCausalLM: fused [all Q | all K | all V] with bias,
    dense_h_to_4h = gate_up_proj, and the rotary buffer ChatGLM saves."""
    sd = model.state_dict()
    cfg = model.config
    out = {"transformer.embedding.word_embeddings.weight": sd["model.embed_tokens.weight"]}
    for i in range(cfg.num_hidden_layers):
        h, o = f"model.layers.{i}.", f"transformer.encoder.layers.{i}."
        out[o + "input_layernorm.weight"] = sd[h + "input_layernorm.weight"]
        for kind in ("weight", "bias"):
            out[o + f"self_attention.query_key_value.{kind}"] = torch.cat(
                [sd[h + f"self_attn.{p}_proj.{kind}"] for p in "qkv"], dim=0)
        out[o + "self_attention.dense.weight"] = sd[h + "self_attn.o_proj.weight"]
        out[o + "post_attention_layernorm.weight"] = sd[h + "post_attention_layernorm.weight"]
        out[o + "mlp.dense_h_to_4h.weight"] = sd[h + "mlp.gate_up_proj.weight"]
        out[o + "mlp.dense_4h_to_h.weight"] = sd[h + "mlp.down_proj.weight"]
    out["transformer.encoder.final_layernorm.weight"] = sd["model.norm.weight"]
    out["transformer.output_layer.weight"] = sd["lm_head.weight"]
    # modeling_chatglm.RotaryEmbedding(kv_channels // 2, dtype=torch_dtype).inv_freq, a persistent buffer
    dim = cfg.head_dim // 2
    dtype = sd["model.norm.weight"].dtype
    out["transformer.rotary_pos_emb.inv_freq"] = 1.0 / (10000 ** (torch.arange(0, dim, 2).to(dtype=dtype) / dim))
    return {k: v.contiguous().clone() for k, v in out.items()}


def save_chatglm_original(name: str, out: Path, seed: int = 0, fmt: str = "safetensors",
                          tokenizer_dir: Path | None = None, dtype: torch.dtype = torch.float32) -> Path:
    """A tiny original-layout ChatGLM3 directory: ``safetensors`` (one indexed shard per
    layer, like the real checkpoint) or ``bin`` (sharded torch.save files + index)."""
    import json

    from safetensors.torch import save_file

    model = hf_model(name, seed).to(dtype)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = chatglm_original_state(model)
    config = chatglm_original_config(model.config)
    config["torch_dtype"] = str(dtype).replace("torch.", "")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shards: dict[str, dict] = {}
    for key, tensor in state.items():
        layer = key.split(".")[3] if ".layers." in key else "x"
        shards.setdefault(layer, {})[key] = tensor
    n = len(shards)
    weight_map = {}
    for i, group in enumerate(shards.values()):
        if fmt == "bin":
            fname = f"pytorch_model-{i + 1:05d}-of-{n:05d}.bin"
            torch.save(group, out / fname)
        else:
            fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            save_file(group, out / fname, metadata={"format": "pt"})
        weight_map.update({k: fname for k in group})
    index = "pytorch_model.bin.index.json" if fmt == "bin" else "model.safetensors.index.json"
    total = sum(t.numel() * t.element_size() for t in state.values())
    (out / index).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    if tokenizer_dir is not None:
        import shutil

        for f in Path(tokenizer_dir).iterdir():
            if f.is_file() and f.name != "config.json":
                shutil.copy(f, out / f.name)
    return out


# Rows for tools/score.py tests: text and pre-tokenised, ASCII and not, of different lengths.
SCORE_ROWS = [
    {"prompt": "\n\nHuman: What is 3 plus 4?\n\nAssistant:", "response": " 7"},
    {"prompt": "\n\nHuman: Reverse the word cat.\n\nAssistant:", "response": " tac", "id": "x"},
    {"prompt_ids": [5, 17, 300, 2], "response_ids": [40, 41, 42, 43, 44]},
    {"prompt": "\n\nHuman: 你好\n\nAssistant:", "response": " I cannot help with that."},
    {"prompt_ids": [9], "response_ids": [1000]},
]


def write_rows(rows, path: Path) -> Path:
    """JSONL, UTF-8, non-ASCII kept as is."""
    import json

    Path(path).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return Path(path)


def row_token_ids(tok, row: dict) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of a score row exactly as score.py and training tokenise it."""
    from fg_megatron.data.tokenize import tokenize_example

    if "prompt_ids" in row:
        return list(row["prompt_ids"]), list(row["response_ids"])
    ex = tokenize_example(tok, row["prompt"], row["response"], 128, 128)
    return list(ex.prompt_ids), list(ex.response_ids)
