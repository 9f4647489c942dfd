"""Chunked torch backend of :func:`fg_megatron_kernels.seq_loglik.seq_loglik`.

Same math and interface as the Triton backend (see ``seq_loglik.py`` for the
formulas and where the TP all-reduces sit); it runs wherever torch runs and is
the CPU path.  The shard's logits are visited one tile ``[tokens_per_tile,
vocab_per_tile]`` at a time, vocabulary chunks outside and token tiles inside:

* forward: per tile the sum of exponentials (shifted by the first chunk's row
  maximum, see :func:`shard_stats`) and the target logit;
* backward: the tile is recomputed and turned in place into
  ``G = g (onehot(y) - exp(z - lse))``, then multiplied into ``dh += G @ W_c``
  and ``dW_c += G.T @ h``.  Vocabulary chunks outside mean each row block of
  ``dW`` is finished before the next starts (no ``[V, d]`` re-read per token
  tile when all tokens fit in one tile, the common case).

Arithmetic is fp32 whatever the input dtype (16-bit tiles are upcast one tile
at a time), so results match the Triton kernel's fp32 accumulation.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from fg_megatron_kernels.seq_loglik_common import EMPTY_SHARD_MAX

# Elements of the one logits tile buffer: 4 Mi fp32 = 16 MiB.  Measured on 2
# CPU cores at N=4096, d=1024, V=32000: 2 Mi-element tiles cost ~12% more time.
DEFAULT_CHUNK_ELEMS = 1 << 22
MAX_TOKENS_PER_TILE = 4096


def _tiles(n: int, v: int, chunk_elems: Optional[int]) -> Tuple[int, int]:
    budget = chunk_elems or DEFAULT_CHUNK_ELEMS
    tokens = max(1, min(n, MAX_TOKENS_PER_TILE, budget))
    vocab = max(1, min(v, budget // tokens))
    return tokens, vocab


def _f32(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float32 else x.float()


def _tile(buf: Tensor, rows: int, cols: int) -> Tensor:
    """A contiguous ``[rows, cols]`` view of the one logits buffer.  Writing every
    tile into the same memory keeps exactly one tile alive (``z = h @ w.T`` in a
    loop holds two, and the allocator's churn adds more)."""
    return buf[: rows * cols].view(rows, cols)


def shard_stats(h: Tensor, w: Tensor, y: Tensor, *, chunk_elems: Optional[int] = None
                ) -> Tuple[Tensor, Tensor, Tensor]:
    """Shard-local ``(shift, sum exp(z - shift), target logit or 0)``, each ``[1, N]`` fp32.

    h ``[N, d]``; w ``[V, d]`` (real rows only); y ``[N]`` target index local
    to ``w`` (outside ``[0, V)``: not on this shard).  ``shift`` is the row
    maximum of the first vocabulary chunk, raised only when a later chunk
    would overflow ``exp`` (then that tile is recomputed): a row maximum per
    tile would cost one more pass over every tile, and a smaller shift loses
    nothing (values far below it underflow to 0 next to the ``exp(0) = 1`` of
    the first chunk's maximum, exactly as they would next to the true maximum).
    """
    n, v = h.shape[0], w.shape[0]
    m = torch.full((n,), EMPTY_SHARD_MAX, dtype=torch.float32, device=h.device)
    s = torch.zeros(n, dtype=torch.float32, device=h.device)
    t = torch.zeros(n, dtype=torch.float32, device=h.device)
    if n == 0 or v == 0:
        return m[None], s[None], t[None]
    tok, voc = _tiles(n, v, chunk_elems)
    buf = torch.empty(tok * voc, dtype=torch.float32, device=h.device)
    for c0 in range(0, v, voc):
        w_c = _f32(w[c0:c0 + voc])
        cv = w_c.shape[0]
        for t0 in range(0, n, tok):
            h_t = _f32(h[t0:t0 + tok])
            rows = slice(t0, t0 + h_t.shape[0])
            y_t = y[rows] - c0
            z = torch.mm(h_t, w_c.t(), out=_tile(buf, h_t.shape[0], cv))  # (tok, cv) fp32
            here = (y_t >= 0) & (y_t < cv)
            picked = z.gather(1, y_t.clamp(0, cv - 1)[:, None])[:, 0]
            t[rows] += torch.where(here, picked, torch.zeros_like(picked))
            if c0 > 0:
                cs = z.sub_(m[rows, None]).exp_().sum(dim=1)
                if bool(torch.isfinite(cs).all()):
                    s[rows] += cs
                    continue
                z = torch.mm(h_t, w_c.t(), out=z)  # overflow: redo this tile with its maximum
            cm = z.max(dim=1).values
            new_m = torch.maximum(m[rows], cm)
            s[rows] = s[rows] * torch.exp(m[rows] - new_m) + z.sub_(new_m[:, None]).exp_().sum(dim=1)
            m[rows] = new_m
    return m[None], s[None], t[None]


def shard_grads(h: Tensor, w: Tensor, y: Tensor, lse: Tensor, g: Tensor, *, need_h: bool = True,
                need_w: bool = True, chunk_elems: Optional[int] = None, pad_rows: int = 0
                ) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """``(dh partial [N, d], dW [V + pad_rows, d])`` in fp32 for this shard, recomputing
    the logits; the ``pad_rows`` rows of ``dW`` (padded vocabulary) are zero.

    ``lse`` is the global (TP-combined) log-sum-exp, ``g`` the upstream gradient.
    """
    n, v = h.shape[0], w.shape[0]
    dh = torch.zeros((n, h.shape[1]), dtype=torch.float32, device=h.device) if need_h else None
    dw = torch.zeros((v + pad_rows, w.shape[1]), dtype=torch.float32, device=w.device) if need_w else None
    if n == 0 or v == 0 or not (need_h or need_w):
        return dh, dw
    tok, voc = _tiles(n, v, chunk_elems)
    buf = torch.empty(tok * voc, dtype=torch.float32, device=h.device)
    for c0 in range(0, v, voc):
        w_c = _f32(w[c0:c0 + voc])
        cv = w_c.shape[0]
        for t0 in range(0, n, tok):
            h_t = _f32(h[t0:t0 + tok])
            rows = slice(t0, t0 + h_t.shape[0])
            y_t = y[rows] - c0
            # G = g (onehot - exp(z - lse)) = -g (P - onehot), built in the logits tile.
            q = torch.mm(h_t, w_c.t(), out=_tile(buf, h_t.shape[0], cv))
            q.sub_(lse[rows, None]).exp_()
            here = ((y_t >= 0) & (y_t < cv)).float()
            q.scatter_add_(1, y_t.clamp(0, cv - 1)[:, None], -here[:, None])
            q.mul_(-g[rows, None])
            if need_h:
                dh[rows].addmm_(q, w_c)
            if need_w:
                dw[c0:c0 + cv].addmm_(q.t(), h_t)
    return dh, dw

