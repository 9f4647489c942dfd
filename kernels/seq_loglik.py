"""Vocab-parallel per-token log-likelihood straight from hidden states.

    logp[n] = log softmax(h[n] @ W.T)[y[n]]          h: [N, d], W: [V, d], y: [N]

computed without ever holding the ``[N, V]`` logits (nor this rank's
``[N, V/tp]`` share of them).  Two backends compute the shard-local pieces and
share everything else (this module): :mod:`.seq_loglik_triton` (fused Triton
tiles, GPU or the Triton interpreter) and :mod:`.seq_loglik_torch` (chunked
torch matmuls, CPU or anywhere Triton cannot run).

Math (rank r of the TP group holds rows ``[v0, v0 + V_r)`` of ``W``; rows whose
global index is ``>= vocab_size`` are Megatron's vocabulary padding and are
excluded, i.e. act as logits of ``-inf``)::

    z[n, j]  = h[n] . W[j]                      (never stored beyond one tile)
    m_r[n]   ~ max_j z[n, j]                    shard-local statistics
    s_r[n]   = sum_j exp(z[n, j] - m_r[n])      (backend.shard_stats; m_r is
                                                 any shift keeping s_r finite)
    t_r[n]   = z[n, y[n]] if v0 <= y[n] < v0 + V_r else 0
    M[n]     = max_r m_r[n]                     all-reduce MAX   over TP
    S[n]     = sum_r s_r[n] exp(m_r[n] - M[n])  all-reduce SUM   over TP
    T[n]     = sum_r t_r[n]                     (same all-reduce: one owner)
    lse[n]   = M[n] + log S[n]
    logp[n]  = min(T[n] - lse[n], 0)            (<= 0 exactly; the clamp only
                                                 removes a rounding ulp)

Backward, with ``g[n] = dL/dlogp[n]`` (0 for masked tokens)::

    G[n, j]  = g[n] (1[j == y[n]] - exp(z[n, j] - lse[n]))    z recomputed
    dW_r     = G.T @ h        local rows only: no communication
    dh       = sum_r G_r @ W_r                 all-reduce SUM over TP

The hidden states are replicated over the TP group (as after megatron's
``copy_to_tensor_model_parallel_region``); each rank sees only its ``W_r`` so
its ``dh`` is partial and the all-reduce of ``dh`` is the backward of that
replication.  The forward all-reduces need no backward of their own: ``G``
already uses the global ``lse``.  Masked tokens are dropped before any
matmul (they cost nothing and get an exact zero gradient).

Only ``h``, ``W``, the targets and the per-token ``lse`` are saved for the
backward: O(N + V) extra memory beyond the inputs.
"""

from __future__ import annotations

import os
import sys
from types import ModuleType
from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

IMPLS = ("torch", "triton")


class SeqLogLikInputError(ValueError):
    """Inputs to :func:`seq_loglik` that cannot be right (shapes, dtypes, targets)."""


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _use_triton_interpreter() -> None:
    """Make Triton run under its interpreter (the only way it runs without a GPU).

    ``TRITON_INTERPRET`` is read when ``@triton.jit`` decorates a function,
    and Triton's own library functions (``tl.zeros``, ``tl.sum``, ...) are
    decorated when ``triton.language`` is first imported -- megatron-core
    imports it.  If that happened before the variable was set, those
    functions are compiled-mode objects that fail inside an interpreted
    kernel, so Triton's Python modules are imported afresh (its compiled
    extension ``triton._C`` cannot be and need not be).  Without CUDA nothing
    can have launched a compiled Triton kernel, so nothing is lost.
    """
    os.environ["TRITON_INTERPRET"] = "1"
    tl = sys.modules.get("triton.language")
    if tl is None:
        return
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(tl.zeros, InterpretedFunction):
        for name in [m for m in sys.modules if m == "triton" or m.startswith("triton.")]:
            if not name.startswith("triton._C"):
                del sys.modules[name]


def load_backend(impl: str) -> ModuleType:
    """The backend module for ``impl`` ("torch" or "triton").

    Without CUDA the Triton backend runs under the Triton interpreter (see
    :func:`_use_triton_interpreter`), set up here before the kernel module is
    first imported.
    """
    if impl not in IMPLS:
        raise SeqLogLikInputError(f"seq_loglik impl must be one of {IMPLS}, got {impl!r}")
    if impl == "torch":
        from fg_megatron_kernels import seq_loglik_torch

        return seq_loglik_torch
    if not torch.cuda.is_available() and "fg_megatron_kernels.seq_loglik_triton" not in sys.modules:
        _use_triton_interpreter()
    from fg_megatron_kernels import seq_loglik_triton

    return seq_loglik_triton


def _tp_size(group: Optional[dist.ProcessGroup]) -> int:
    if group is None or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def combine_stats(m: Tensor, s: Tensor, t: Tensor, group: Optional[dist.ProcessGroup]
                  ) -> Tuple[Tensor, Tensor]:
    """Per-token ``(max, sum-exp, target logit)`` of several vocabulary pieces
    ``[P, N]`` (backend splits), then over the TP group -> ``(lse, T)``."""
    big_m = m.max(dim=0).values
    s = (s * torch.exp(m - big_m)).sum(dim=0)
    t = t.sum(dim=0)
    if _tp_size(group) > 1:
        local_m = big_m.clone()
        dist.all_reduce(big_m, op=dist.ReduceOp.MAX, group=group)
        st = torch.stack([s * torch.exp(local_m - big_m), t])
        dist.all_reduce(st, op=dist.ReduceOp.SUM, group=group)
        s, t = st[0], st[1]
    return big_m + torch.log(s), t


class _SeqLogLik(torch.autograd.Function):
    """hidden [N, d] (replicated over TP), weight [V_r, d] -> logp [N] fp32."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, mask: Optional[Tensor],
                vocab_start: int, n_valid: int, group: Optional[dist.ProcessGroup],
                backend: ModuleType, chunk_elems: Optional[int]) -> Tensor:
        n = hidden.shape[0]
        # Drop masked tokens up front (prompt / padding positions: often half the batch).
        idx = None if mask is None else mask.nonzero().squeeze(1)
        if idx is not None and idx.numel() == n:
            idx = None  # nothing masked: skip the copies
        h, y = (hidden, targets) if idx is None else (hidden.index_select(0, idx), targets.index_select(0, idx))
        h = h.contiguous()
        w = weight[:n_valid]  # padded vocabulary rows take no part at all
        m, s, t = backend.shard_stats(h, w, y - vocab_start, chunk_elems=chunk_elems)
        lse, tgt = combine_stats(m, s, t, group)
        logp_sel = torch.clamp(tgt - lse, max=0.0)
        ctx.save_for_backward(h, weight, y, lse, idx if idx is not None else torch.empty(0))
        ctx.meta = (n, vocab_start, n_valid, group, backend, chunk_elems, idx is not None)
        if idx is None:
            return logp_sel
        logp = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        return logp.index_copy_(0, idx, logp_sel)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        h, weight, y, lse, idx = ctx.saved_tensors
        n, vocab_start, n_valid, group, backend, chunk_elems, masked = ctx.meta
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        g = grad_out.float()
        if masked:
            g = g.index_select(0, idx)
        dh, dw = backend.shard_grads(h, weight[:n_valid], y - vocab_start, lse, g.contiguous(),
                                     need_h=need_h, need_w=need_w, chunk_elems=chunk_elems,
                                     pad_rows=weight.shape[0] - n_valid)
        grad_h = grad_w = None
        if need_h:
            if _tp_size(group) > 1:
                # Backward of the replicated hidden input (megatron's copy_to_..._region).
                dist.all_reduce(dh, op=dist.ReduceOp.SUM, group=group)
            dh = dh.to(h.dtype)
            if masked:
                grad_h = torch.zeros((n, h.shape[1]), dtype=h.dtype, device=h.device).index_copy_(0, idx, dh)
            else:
                grad_h = dh
        if need_w:
            grad_w = dw.to(weight.dtype)  # padded rows: zero
        return grad_h, grad_w, None, None, None, None, None, None, None


def seq_loglik(hidden: Tensor, weight: Tensor, targets: Tensor, mask: Optional[Tensor] = None, *,
               vocab_start: int = 0, vocab_size: Optional[int] = None,
               tp_group: Optional[dist.ProcessGroup] = None, impl: str = "torch",
               chunk_elems: Optional[int] = None, check_targets: bool = True) -> Tensor:
    """``log p(targets[n] | hidden[n])`` as ``[N]`` fp32, 0 where ``mask`` is False.

    hidden: ``[N, d]``, identical on every rank of ``tp_group``; weight: this
    rank's ``[V_r, d]`` rows of the output layer (global rows
    ``[vocab_start, vocab_start + V_r)``; the tied embedding works the same);
    targets: ``[N]`` global token ids; mask: ``[N]`` bool or None (all tokens).
    Rows at or beyond ``vocab_size`` (default: no padding) are padding.
    ``impl``: "torch" (chunked matmuls) or "triton" (fused kernel).
    ``chunk_elems`` bounds the elements of one logits tile of the backend
    (default: the backend's).  Differentiable w.r.t. ``hidden`` and ``weight``.
    """
    backend = load_backend(impl)
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise SeqLogLikInputError(f"need hidden [N, d] and weight [V, d], got {tuple(hidden.shape)} "
                                  f"and {tuple(weight.shape)}")
    if hidden.dtype != weight.dtype or hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise SeqLogLikInputError(f"hidden and weight must share one of fp32/bf16/fp16, got {hidden.dtype} "
                                  f"and {weight.dtype}")
    n = hidden.shape[0]
    if targets.shape != (n,) or (mask is not None and mask.shape != (n,)):
        raise SeqLogLikInputError(f"targets and mask must be [N]=[{n}], got {tuple(targets.shape)} and "
                                  f"{None if mask is None else tuple(mask.shape)}")
    if vocab_size is None:
        vocab_size = vocab_start + weight.shape[0]
    n_valid = max(0, min(weight.shape[0], vocab_size - vocab_start))
    mask = None if mask is None else mask.bool()
    targets = targets.long()
    if check_targets and n > 0:
        live = targets if mask is None else targets[mask]
        if live.numel() and (int(live.min()) < 0 or int(live.max()) >= vocab_size):
            raise SeqLogLikInputError(
                f"target ids must lie in [0, vocab_size={vocab_size}) at unmasked positions, got "
                f"min {int(live.min())} max {int(live.max())}; mask out ignored positions instead")
    return _SeqLogLik.apply(hidden, weight, targets, mask, vocab_start, n_valid, tp_group, backend,
                            chunk_elems)
