"""Choosing the next token from ``[b, V]`` logits: greedy, or temperature / top-k / top-p sampling.

Pure functions, no process groups.  Sampling draws one uniform number per row
from that row's own ``torch.Generator`` and inverts the row's cumulative
distribution, so a row's tokens depend only on its generator's seed and its
logits: not on the batch it shares, the DP layout, or the TP size (TP changes
the logits only by rounding, ~1e-7, which moves a sample only when the uniform
draw lands that close to a bucket edge).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from fg_megatron.config import ConfigError


class GenerationSettingsError(ConfigError):
    """A generation setting out of range (a ``ConfigError``: entry points print it as one line)."""


@dataclass(frozen=True)
class SamplingParams:
    """How tokens are chosen.  ``temperature == 0`` is greedy (top_k / top_p ignored)."""

    temperature: float = 0.0  # 0: greedy (argmax); > 0: sample from softmax(logits / temperature)
    top_p: float = 1.0  # nucleus: keep the smallest set of tokens whose probability reaches top_p (1: off)
    top_k: int = 0  # keep the k most likely tokens (0: off)

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise GenerationSettingsError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise GenerationSettingsError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise GenerationSettingsError(f"top_k must be >= 0 (0 turns it off), got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def row_seed(seed: int, key: object) -> int:
    """A 63-bit seed for one prompt, from the run's seed and the prompt's key (its line):
    a hash, so neighbouring keys get unrelated streams."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def row_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per row (CPU: the same stream on every device and rank)."""
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def filter_logits(logits: Tensor, params: SamplingParams) -> Tensor:
    """``logits / temperature`` with tokens outside top-k / top-p set to ``-inf`` (fp32, ``[b, V]``).

    Top-p follows transformers' ``TopPLogitsWarper``: sort ascending, drop the tokens
    whose cumulative probability is <= ``1 - top_p``; the most likely token always stays.
    """
    scores = logits.float() / params.temperature
    if params.top_k > 0 and params.top_k < scores.shape[-1]:
        kth = torch.topk(scores, params.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative <= (1 - params.top_p)
        drop_sorted[..., -1] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return scores


def next_tokens(logits: Tensor, params: SamplingParams,
                generators: Optional[Sequence[torch.Generator]] = None) -> Tensor:
    """The next token of each row, ``[b]`` int64, from ``[b, V]`` logits (the real vocabulary only)."""
    if params.greedy:
        return logits.argmax(dim=-1)
    if generators is None or len(generators) != logits.shape[0]:
        raise ValueError(f"sampling needs one generator per row: {logits.shape[0]} rows, "
                         f"{None if generators is None else len(generators)} generators")
    probs = filter_logits(logits, params).softmax(dim=-1).double()
    cdf = probs.cumsum(dim=-1)
    # u in (0, 1]: the first index with cdf >= u * total has cdf[i-1] < cdf[i], so a
    # zero-probability (filtered) token is never picked, and u * total <= cdf[-1].
    u = torch.stack([1.0 - torch.rand((), generator=g, dtype=torch.float64) for g in generators])
    u = u.to(cdf.device) * cdf[:, -1]
    return torch.searchsorted(cdf, u[:, None], right=False)[:, 0]
