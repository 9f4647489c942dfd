"""Tokenised examples -> megatron micro-batch tensors (right padding).

A row is ``prompt_ids + response_ids`` padded on the right to ``s`` (a multiple of
``pad_multiple``, so few distinct shapes reach the model).  With ``P`` prompt and
``R`` response tokens:

    input_ids[t]    = token t (pad id after P + R)
    position_ids[t] = t
    targets[t]      = input_ids[t + 1]   (pad id at the last position)
    loss_mask[t]    = 1  iff  P - 1 <= t <= P + R - 2   (the target is a response token)

so ``sum(loss_mask * log p(targets | input_ids[:t+1]))`` is the response's sequence
log-likelihood.  Right padding keeps real tokens at their unpadded positions, and the
causal mask keeps padding from influencing them.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from fg_megatron.data.tokenize import TokenizedExample, TokenizedPair


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple if multiple > 1 else n


def collate_sequences(examples: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int, *,
                      pad_multiple: int = 8, length: Optional[int] = None) -> dict[str, Tensor]:
    """``(prompt_ids, response_ids)`` rows -> ``input_ids, position_ids, targets, loss_mask`` ``[b, s]``
    plus ``prompt_lengths``/``lengths`` ``[b]``.  ``length`` forces ``s`` (>= the longest row)."""
    longest = max(len(p) + len(r) for p, r in examples)
    s = round_up(longest, pad_multiple) if length is None else length
    if s < longest:
        raise ValueError(f"length={s} is shorter than the longest row ({longest} tokens)")
    b = len(examples)
    input_ids = torch.full((b, s), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((b, s), dtype=torch.float32)
    prompt_lengths = torch.empty(b, dtype=torch.long)
    lengths = torch.empty(b, dtype=torch.long)
    for i, (p, r) in enumerate(examples):
        n_p, n_r = len(p), len(r)
        if n_p < 1 or n_r < 1:
            raise ValueError(f"row {i}: a row needs at least one prompt and one response token (got {n_p}, {n_r})")
        input_ids[i, : n_p + n_r] = torch.tensor(list(p) + list(r), dtype=torch.long)
        loss_mask[i, n_p - 1 : n_p + n_r - 1] = 1.0  # positions whose *next* token is a response token
        prompt_lengths[i], lengths[i] = n_p, n_p + n_r
    targets = torch.full_like(input_ids, pad_id)
    targets[:, :-1] = input_ids[:, 1:]
    position_ids = torch.arange(s, dtype=torch.long).unsqueeze(0).expand(b, s).contiguous()
    return {"input_ids": input_ids, "position_ids": position_ids, "targets": targets, "loss_mask": loss_mask,
            "prompt_lengths": prompt_lengths, "lengths": lengths}


def collate_pairs(pairs: Sequence[TokenizedPair], pad_id: int, *, sample_idx: Optional[Sequence[int]] = None,
                  pad_multiple: int = 8, length: Optional[int] = None) -> dict:
    """A DPO micro-batch: chosen rows ``0..b-1`` then rejected rows ``b..2b-1`` in one ``[2b, s]`` batch,
    so both go through a single forward.  Adds ``sample_idx [b]`` and ``ids`` (list of b strings)."""
    rows = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    batch: dict = collate_sequences(rows, pad_id, pad_multiple=pad_multiple, length=length)
    idx = range(len(pairs)) if sample_idx is None else sample_idx
    batch["sample_idx"] = torch.tensor(list(idx), dtype=torch.long)
    batch["ids"] = [p.id for p in pairs]
    return batch


def collate_sft(examples: Sequence[TokenizedExample], pad_id: int, *, ids: Optional[Sequence[str]] = None,
                sample_idx: Optional[Sequence[int]] = None, pad_multiple: int = 8,
                length: Optional[int] = None) -> dict:
    """An SFT / scoring micro-batch ``[b, s]`` with ``sample_idx`` and ``ids``."""
    batch: dict = collate_sequences([(e.prompt_ids, e.response_ids) for e in examples], pad_id,
                                    pad_multiple=pad_multiple, length=length)
    batch["sample_idx"] = torch.tensor(list(range(len(examples)) if sample_idx is None else sample_idx),
                                       dtype=torch.long)
    batch["ids"] = list(ids) if ids is not None else [str(i) for i in batch["sample_idx"].tolist()]
    return batch


def collate_prompts(prompts: Sequence[Sequence[int]], pad_id: int, *, side: str = "left",
                    pad_multiple: int = 1) -> dict[str, Tensor]:
    """Prompts for generation: ``input_ids``, ``attention_mask`` (1 on real tokens), ``position_ids``
    (counting real tokens only, so left padding does not shift them) and ``lengths``."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    s = round_up(max(len(p) for p in prompts), pad_multiple)
    b = len(prompts)
    input_ids = torch.full((b, s), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((b, s), dtype=torch.long)
    for i, p in enumerate(prompts):
        sl = slice(s - len(p), s) if side == "left" else slice(0, len(p))
        input_ids[i, sl] = torch.tensor(list(p), dtype=torch.long)
        attention_mask[i, sl] = 1
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
            "lengths": lengths}
