"""Seed a value model (reward model or critic) from a causal LM checkpoint.

``convert_checkpoint.py hf-to-fg --head value`` and ``load_model(..., head="value")``
both come here, so the two give the same model bit for bit:

- the config.json becomes the ``*ForSequenceClassification`` one with one label
  (:func:`fg_megatron.models.value.value_hf_config`), with ``pad_token_id`` taken
  from the tokenizer files when the LM's config has none;
- every tensor of the LM is kept except the output layer (``lm_head``, or its
  tied copy on the last pipeline stage);
- ``value_head.weight`` [1, h] is added on the last stage, all zeros.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch
from torch import Tensor

from fg_megatron.checkpoint.mapping import CheckpointMismatchError
from fg_megatron.checkpoint.tokenizer import tokenizer_pad_id
from fg_megatron.models.arch import HEADS, LM_HEAD, head_from_hf_config
from fg_megatron.models.value import check_value_head_supported, value_hf_config

VALUE_HEAD_NAME = "value_head.weight"
LM_OUTPUT_NAME = "output_layer.weight"  # full name, and stage-local name of the tied copy too


def seeds_value_head(hf_config: dict, head: Optional[str], source: str) -> bool:
    """True when a checkpoint with this config.json is to be loaded as a new value model.

    ``head`` None keeps the checkpoint's own head; asking for ``lm`` on a value model is an
    error (it has no output layer to give)."""
    if head is None:
        return False
    if head not in HEADS:
        raise CheckpointMismatchError(f"{source}: head {head!r} is not one of {', '.join(HEADS)}")
    have = head_from_hf_config(hf_config, f"{source}: config")
    if have == head:
        return False
    if head == LM_HEAD:
        arch = (hf_config.get("architectures") or ["?"])[0]
        raise CheckpointMismatchError(f"{source}: is a value-head model ({arch}) and has no LM head; "
                                      f"load it with head 'value' (or the checkpoint's own head)")
    check_value_head_supported(hf_config, f"{source}: config")
    return True


def seeded_value_config(lm_config: dict, tokenizer_from: Optional[Path]) -> dict:
    """The value model's config.json for an LM's (pad id from ``tokenizer_from``'s tokenizer if needed)."""
    pad = None
    if lm_config.get("pad_token_id") is None and tokenizer_from is not None:
        pad = tokenizer_pad_id(tokenizer_from)
    return value_hf_config(lm_config, pad)


def initial_value_head(hidden_size: int, dtype: torch.dtype) -> Tensor:
    """``value_head.weight`` of a freshly seeded value model: zeros.

    Zeros, because:
    - every sequence starts with reward exactly 0, so a reward model's first pairwise
      loss is exactly ln 2, and a critic starts at V = 0 everywhere, like GAE's
      terminal bootstrap;
    - no RNG is involved, so the seeded model is identical at every TP x PP layout
      (and between hf-to-fg and load_model);
    - training still moves it on the first step: d(score)/d(w) is the hidden state,
      which is not zero (only the gradient into the body is zero until w moves).
    """
    return torch.zeros((1, hidden_size), dtype=dtype)


def seed_value_tensors(tensors: Iterable[tuple[str, Tensor]], *, last_stage: bool, hidden_size: int,
                       dtype: torch.dtype) -> Iterator[tuple[str, Tensor]]:
    """An LM's (name, tensor) stream as a value model's: the output layer dropped, the zero head
    appended when ``last_stage``.  Names are full names or stage-local ones (the global tensors'
    names are the same in both)."""
    for name, tensor in tensors:
        if name != LM_OUTPUT_NAME:
            yield name, tensor
    if last_stage:
        yield VALUE_HEAD_NAME, initial_value_head(hidden_size, dtype)
