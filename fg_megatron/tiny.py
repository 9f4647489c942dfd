"""The bundled tiny default models: the random initialisation, and how the committed
``pi0`` and reward model are made.

``assets/tiny/pi0`` is committed; ``tools/make_tiny_pi0.py`` rebuilds it:
random init (here) -> ``train_sft.py --config configs/pi0_tiny.yaml`` on the SFT
split -> ``fg-to-hf`` into ``assets/tiny/pi0``.  ``assets/tiny/rm`` likewise:
``tools/make_tiny_rm.py`` runs ``train_rm.py --config configs/rm_tiny.yaml``
(pi0 with a zero value head, Bradley-Terry on the preference split) -> ``fg-to-hf``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]

import torch

TINY_LLAMA = dict(
    hidden_size=192,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=6,
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


def train_and_export(script: str, config: str, save: Path, out: Path, *, nproc: int = 2, tp: int = 2,
                     steps: Optional[int] = None, extra: Sequence[str] = ()) -> Path:
    """A fresh ``torchrun tools/<script> --config <config>`` run into ``save``, then its last
    checkpoint exported with ``fg-to-hf`` into ``out``."""
    from fg_megatron.checkpoint.convert import fg_to_hf

    shutil.rmtree(save, ignore_errors=True)  # a fresh run, not a resume
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), str(ROOT / "tools" / script),
           "--config", str(ROOT / config), "--tp", str(tp), "--save", str(save), "--set", "train.keep_last=1",
           *extra]
    if steps:
        cmd += ["--steps", str(steps)]
    subprocess.run(cmd, check=True, cwd=ROOT)
    latest = (Path(save) / "checkpoints/latest").read_text().strip()
    fg_to_hf(Path(save) / "checkpoints" / latest / "model", Path(out), force=True)
    return Path(out)
