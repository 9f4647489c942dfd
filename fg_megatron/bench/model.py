"""A random HF Llama directory of a given shape (seeded, safetensors) and preference
data whose every sequence has exactly the asked-for length."""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
# A byte-level BPE whose pre-tokenizer splits digits one by one: a string of n digits is
# exactly n tokens, so the data's lengths can be set without a real model's tokenizer.
TOKENIZER = ROOT / "assets/tiny/tokenizer"


@dataclass(frozen=True)
class LlamaShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    max_positions: int
    tied: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


# Llama-3.2-1B's shape (1.24 B parameters, tied embeddings, 128k vocabulary): the vocabulary
# makes the output layer ~20% of the FLOPs, where the fused log-likelihood matters.
ONE_B = LlamaShape(hidden=2048, layers=16, heads=32, kv_heads=8, ffn=8192, vocab=128256, max_positions=2048)
TINY = LlamaShape(hidden=64, layers=2, heads=4, kv_heads=2, ffn=128, vocab=1024, max_positions=256)


def write_random_llama(directory: Path, shape: LlamaShape, *, seed: int = 0,
                       dtype: torch.dtype = torch.bfloat16) -> int:
    """Write config.json, model.safetensors and the tiny tokenizer into ``directory``;
    returns the parameter count.  Weights are N(0, 0.02) from a seeded CPU generator and
    the norms ones, filled tensor by tensor: building the model with transformers' own
    initialisation would hold it twice and take minutes at 1 B."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    directory.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.ffn,
                         num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.kv_heads, max_position_embeddings=shape.max_positions,
                         rms_norm_eps=1e-5, tie_word_embeddings=shape.tied, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0, rope_theta=500000.0)
    with torch.device("meta"):  # names and shapes only
        names = {k: tuple(v.shape) for k, v in LlamaForCausalLM(config).state_dict().items()}
    if shape.tied:
        names.pop("lm_head.weight", None)  # HF saves a tied output layer once, as the embedding
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, size in sorted(names.items()):
        if name.endswith("norm.weight"):
            tensors[name] = torch.ones(size, dtype=dtype)
        else:
            tensors[name] = (torch.randn(size, generator=gen) * 0.02).to(dtype)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(str(directory))
    for f in TOKENIZER.iterdir():
        shutil.copy(f, directory / f.name)
    (directory / "bench_shape.json").write_text(json.dumps(asdict(shape), indent=1) + "\n")
    return sum(t.numel() for t in tensors.values())


def write_preference_data(path: Path, rows: int, prompt_tokens: int, response_tokens: int, seed: int = 0) -> None:
    """``rows`` generic pairs whose prompt and responses are digit strings longer than the
    limits: with ``data.max_prompt_length=prompt_tokens`` and ``max_response_length=
    response_tokens`` truncation makes every sequence exactly ``prompt_tokens +
    response_tokens`` long (BOS included, the cut responses lose EOS)."""
    rng = random.Random(seed)

    def digits(n: int) -> str:
        return "".join(rng.choice("0123456789") for _ in range(n))

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for i in range(rows):
            row = {"id": i, "prompt": digits(prompt_tokens + 8), "chosen": " " + digits(response_tokens + 8),
                   "rejected": " " + digits(response_tokens + 8)}
            f.write(json.dumps(row) + "\n")
