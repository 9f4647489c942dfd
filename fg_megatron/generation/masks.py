"""Attention masks for left-padded generation batches (``True`` = do not attend).

megatron-core's local ``DotProductAttention`` uses a given mask as is (it builds
its own causal mask only when none is given), so a left-padded batch passes
causal + key padding in one boolean ``[b, 1, sq, sk]`` tensor.  A padded query
row masks every key; its output is never read (padding is masked as a key in
every layer, so it cannot reach a real token).

Models with a sliding window are the exception: megatron-core replaces any given
mask with its own window mask, so they are generated in batches of prompts of
equal length (no padding at all); see :func:`fg_megatron.generation.runner.make_batches`.
"""

from __future__ import annotations

import torch
from torch import Tensor


def prefill_mask(valid: Tensor) -> Tensor:
    """``valid [b, s]`` (1 on real tokens) -> ``[b, 1, s, s]``: causal, and no padded key."""
    s = valid.shape[1]
    future = torch.ones(s, s, dtype=torch.bool, device=valid.device).triu(1)
    return future[None, None] | ~valid.bool()[:, None, None, :]


def decode_mask(valid: Tensor) -> Tensor:
    """``valid [b, s]`` -> ``[b, 1, 1, s]`` for one new query per row that sees every real key."""
    return ~valid.bool()[:, None, None, :]
