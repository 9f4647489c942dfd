"""The bundled tiny default model: its random initialisation and how ``pi0`` is made.

``assets/tiny/pi0`` is committed; ``tools/make_tiny_pi0.py`` rebuilds it:
random init (here) -> ``train_sft.py --config configs/sft_tiny.yaml`` on the SFT
split -> ``fg-to-hf`` into ``assets/tiny/pi0``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

TINY_LLAMA = dict(
    hidden_size=128,
    intermediate_size=352,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    rope_theta=10000.0,
    initializer_range=0.02,
)


def write_init_model(out: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A randomly initialised Llama sized for the tiny task, as an HF directory."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         **TINY_LLAMA)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return out
