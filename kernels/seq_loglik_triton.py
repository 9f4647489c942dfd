"""Triton backend of :func:`fg_megatron_kernels.seq_loglik.seq_loglik`.

Same math and interface as the torch backend (``seq_loglik.py`` has the
formulas and where the TP all-reduces sit).  Two kernels:

* ``_stats_kernel`` (forward): program ``(i, p)`` owns token block ``i`` and
  the ``p``-th of ``P`` contiguous ranges of vocabulary blocks; for each
  ``[BLOCK_N, BLOCK_V]`` logits tile (K-loop over ``d`` in ``BLOCK_D`` steps,
  fp32 accumulator) it updates an online log-sum-exp (running max and
  rescaled sum) and picks the target logit when the target's row is in the
  tile.  Only ``3 * P * N`` floats leave the chip; the ``P`` ranges (chosen to
  fill the GPU when ``N`` is small) are merged on the host like TP shards.
* ``_dlogits_kernel`` (backward): recomputes one logits tile from ``h`` and
  ``W`` and writes ``G = g (onehot - exp(z - lse))`` for a vocabulary chunk of
  ``[N, V_c]`` (bounded by ``chunk_elems``); the two products ``dW_c = G.T @ h``
  and ``dh += G @ W_c`` are plain GEMMs (cuBLAS).  With ``d`` in the
  thousands a program cannot hold a ``[BLOCK, d]`` gradient accumulator in
  registers, and the alternatives are atomics (non-deterministic) or
  re-reading/writing fp32 accumulators from every tile; chunking the
  vocabulary gives each ``dW`` row block in one deterministic GEMM (fp32
  accumulation inside, no ``[V, d]`` fp32 buffer) and leaves only the
  ``[N, d]`` fp32 ``dh`` accumulator.

Inputs fp32 / bf16 / fp16, fp32 accumulation (fp32 dots use
``input_precision="ieee"``: TF32 would miss the 1e-5 tolerance).  Any N, V, d:
every load and store is masked.  Under the Triton interpreter (CPU) 16-bit
tiles are converted to fp32 after loading (the interpreter computes bf16
arithmetic and ``tl.dot`` wrongly, silently) and autotuning is off.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from fg_megatron_kernels.seq_loglik_common import EMPTY_SHARD_MAX

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Elements of one [N, V_c] logit-gradient chunk in the backward (256 MiB of bf16).
DEFAULT_CHUNK_ELEMS = 1 << 27
INTERPRET_CHUNK_ELEMS = 1 << 22


def _configs(interpret_blocks, gpu_blocks):
    if INTERPRET:
        # Autotuning needs a driver; the interpreter's cost is per program x
        # iteration, so one config with big blocks.
        bn, bv, bd = interpret_blocks
        return [triton.Config({"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_D": bd}, num_warps=4)]
    return [triton.Config({"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_D": bd}, num_warps=w, num_stages=s)
            for bn, bv, bd, w, s in gpu_blocks]


_GPU_BLOCKS = [
    (128, 128, 64, 8, 3),
    (128, 256, 64, 8, 3),
    (64, 256, 64, 8, 4),
    (128, 128, 32, 4, 4),
    (64, 128, 64, 4, 4),
]


@triton.jit
def _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, D, stride_h, stride_w,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                 UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """fp32 ``h[rows] @ W[cols].T`` with a K-loop over ``d``; masked rows/cols read 0."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    h_row = h_ptr + rows.to(tl.int64)[:, None] * stride_h
    w_row = w_ptr + cols.to(tl.int64)[:, None] * stride_w
    for k0 in range(0, D, BLOCK_D):
        ks = k0 + tl.arange(0, BLOCK_D)
        k_ok = ks < D
        h = tl.load(h_row + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_row + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if UPCAST:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        if IEEE:
            acc = tl.dot(h, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(h, tl.trans(w), acc)
    return acc


@triton.autotune(configs=_configs((64, 256, 128), _GPU_BLOCKS), key=["V", "D"])
@triton.jit
def _stats_kernel(h_ptr, w_ptr, y_ptr, m_ptr, s_ptr, t_ptr, N, V, D, stride_h, stride_w, P,
                  BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                  UPCAST: tl.constexpr, IEEE: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_p = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    y = tl.load(y_ptr + rows, mask=row_ok, other=-1)
    m_i = tl.full((BLOCK_N,), -1.0e30, dtype=tl.float32)  # finite: see seq_loglik_common.EMPTY_SHARD_MAX
    s_i = tl.zeros((BLOCK_N,), dtype=tl.float32)
    t_i = tl.zeros((BLOCK_N,), dtype=tl.float32)
    n_vblocks = tl.cdiv(V, BLOCK_V)
    per_part = tl.cdiv(n_vblocks, P)
    vb_end = tl.minimum(n_vblocks, (pid_p + 1) * per_part)
    for vb in range(pid_p * per_part, vb_end):
        cols = vb * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        z = _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, D, stride_h, stride_w,
                         BLOCK_N, BLOCK_V, BLOCK_D, UPCAST, IEEE)
        z = tl.where(col_ok[None, :], z, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, axis=1))
        s_i = s_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m_i = m_new
        hit = (cols[None, :] == y[:, None]) & col_ok[None, :]
        t_i += tl.sum(tl.where(hit, z, 0.0), axis=1)
    out = pid_p * N + rows
    tl.store(m_ptr + out, m_i, mask=row_ok)
    tl.store(s_ptr + out, s_i, mask=row_ok)
    tl.store(t_ptr + out, t_i, mask=row_ok)


@triton.autotune(configs=_configs((64, 256, 128), _GPU_BLOCKS), key=["V", "D"])
@triton.jit
def _dlogits_kernel(h_ptr, w_ptr, y_ptr, lse_ptr, g_ptr, o_ptr, N, V, D, stride_h, stride_w, stride_o,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                    UPCAST: tl.constexpr, IEEE: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < N
    col_ok = cols < V
    z = _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, D, stride_h, stride_w,
                     BLOCK_N, BLOCK_V, BLOCK_D, UPCAST, IEEE)
    y = tl.load(y_ptr + rows, mask=row_ok, other=-1)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
    onehot = tl.where(cols[None, :] == y[:, None], 1.0, 0.0)
    grad = g[:, None] * (onehot - tl.exp(z - lse[:, None]))
    o = o_ptr + rows.to(tl.int64)[:, None] * stride_o + cols[None, :]
    tl.store(o, grad.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _cdiv_rows(n_rows: int, block: int) -> int:
    return triton.cdiv(n_rows, block)


def _flags(dtype: torch.dtype) -> Tuple[bool, bool]:
    """(UPCAST, IEEE) for this input dtype."""
    return INTERPRET and dtype != torch.float32, dtype == torch.float32


def _parts(n: int, v: int, device: torch.device) -> int:
    """Vocabulary ranges per token block: enough programs to fill the GPU twice."""
    if INTERPRET or device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    token_blocks = triton.cdiv(n, 128)
    return max(1, min(triton.cdiv(v, 256), triton.cdiv(2 * sms, token_blocks)))


def shard_stats(h: Tensor, w: Tensor, y: Tensor, *, chunk_elems: Optional[int] = None
                ) -> Tuple[Tensor, Tensor, Tensor]:
    """Shard-local ``(max, sum exp(z - max), target logit or 0)``, each ``[P, N]`` fp32.

    h ``[N, d]``, w ``[V, d]`` (real rows only) contiguous; y ``[N]`` target
    index local to ``w`` (outside ``[0, V)``: not on this shard).
    """
    n, v, d = h.shape[0], w.shape[0], h.shape[1]
    p = _parts(n, v, h.device)
    m = torch.full((p, n), EMPTY_SHARD_MAX, dtype=torch.float32, device=h.device)
    s = torch.zeros((p, n), dtype=torch.float32, device=h.device)
    t = torch.zeros((p, n), dtype=torch.float32, device=h.device)
    if n == 0 or v == 0:
        return m, s, t
    w = w.contiguous()
    upcast, ieee = _flags(h.dtype)
    grid = lambda meta: (_cdiv_rows(n, meta["BLOCK_N"]), p)  # noqa: E731
    _stats_kernel[grid](h, w, y.contiguous(), m, s, t, n, v, d, h.stride(0), w.stride(0), p,
                        UPCAST=upcast, IEEE=ieee)
    return m, s, t


def shard_grads(h: Tensor, w: Tensor, y: Tensor, lse: Tensor, g: Tensor, *, need_h: bool = True,
                need_w: bool = True, chunk_elems: Optional[int] = None, pad_rows: int = 0
                ) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """``(dh partial [N, d] fp32, dW [V + pad_rows, d])`` for this shard, recomputing
    the logits; the ``pad_rows`` rows of ``dW`` (padded vocabulary) are zero."""
    n, v, d = h.shape[0], w.shape[0], h.shape[1]
    dh = torch.zeros((n, d), dtype=torch.float32, device=h.device) if need_h else None
    dw = torch.empty((v + pad_rows, d), dtype=w.dtype, device=w.device) if need_w else None
    if dw is not None:
        dw[v:].zero_()
    if n == 0 or v == 0 or not (need_h or need_w):
        if dw is not None:
            dw.zero_()
        return dh, dw
    w = w.contiguous()
    upcast, ieee = _flags(h.dtype)
    # The interpreter writes G in fp32 (its 16-bit conversions are not to be trusted).
    g_dtype = torch.float32 if (INTERPRET or h.dtype == torch.float32) else h.dtype
    h_mm = h if h.dtype == g_dtype else h.to(g_dtype)
    budget = chunk_elems or (INTERPRET_CHUNK_ELEMS if INTERPRET else DEFAULT_CHUNK_ELEMS)
    vc = max(1, min(v, budget // max(n, 1)))
    buf = torch.empty((n, vc), dtype=g_dtype, device=h.device)
    y = y.contiguous()
    for c0 in range(0, v, vc):
        w_c = w[c0:c0 + vc]
        cv = w_c.shape[0]
        grad = buf[:, :cv]
        grid = lambda meta: (_cdiv_rows(n, meta["BLOCK_N"]), triton.cdiv(cv, meta["BLOCK_V"]))  # noqa: E731
        _dlogits_kernel[grid](h, w_c, y - c0, lse, g, grad, n, cv, d, h.stride(0), w_c.stride(0),
                              grad.stride(0), UPCAST=upcast, IEEE=ieee)
        w_mm = w_c if w_c.dtype == g_dtype else w_c.to(g_dtype)
        if need_w:
            # One GEMM per row block of dW: deterministic, fp32 accumulation inside.
            if dw.dtype == g_dtype:
                torch.mm(grad.t(), h_mm, out=dw[c0:c0 + cv])
            else:
                dw[c0:c0 + cv] = grad.t() @ h_mm
        if need_h:
            if g_dtype == torch.float32:
                dh.addmm_(grad, w_mm)
            else:
                dh.add_(grad @ w_mm)  # 16-bit GEMM (fp32 inside), summed over chunks in fp32
    return dh, dw

