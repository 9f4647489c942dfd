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
}


def hf_config(name: str):
    from transformers import LlamaConfig, MistralConfig

    model_type, kwargs = VARIANTS[name]
    cls = {"llama": LlamaConfig, "mistral": MistralConfig}[model_type]
    kwargs = dict(kwargs)
    kwargs.setdefault("max_position_embeddings", 256)
    kwargs.setdefault("rms_norm_eps", 1e-5)
    return cls(**kwargs)


def hf_model(name: str, seed: int = 0):
    """A tiny random HF causal LM in fp32, eval mode.  Weights are drawn with a
    std large enough that logits differ materially between tokens."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = hf_config(name)
    cfg.initializer_range = 0.2
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))  # non-trivial norm weights
    return model


def save_hf_model(name: str, out: Path, seed: int = 0, tokenizer_dir: Path | None = None) -> Path:
    model = hf_model(name, seed)
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer_dir is not None:
        import shutil

        for f in Path(tokenizer_dir).iterdir():
            if f.is_file() and f.name != "config.json":
                shutil.copy(f, out / f.name)
    return Path(out)
