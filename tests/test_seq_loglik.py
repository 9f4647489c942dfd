"""The fused sequence log-likelihood (kernels/seq_loglik*.py), both backends, on one process.

Reference: torch autograd on ``log_softmax(h @ W.T).gather(...)`` in float64 on
the same (16-bit values upcast) inputs.  Errors are measured relative to the
largest magnitude of the reference tensor: fp32 <= 1e-5, bf16/fp16 <= 2e-2.
The Triton backend runs under the Triton interpreter without a GPU.
"""

import pytest
import torch

import fg_megatron_kernels.seq_loglik as seq_loglik_mod

seq_loglik = seq_loglik_mod.seq_loglik
IMPLS = ["torch", "triton"]
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}


def _backend(impl):
    return seq_loglik_mod.load_backend(impl)


def _inputs(n=37, d=45, v=301, vocab_size=290, dtype=torch.float32, seed=0, masked=0.3, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(n, d, generator=g) * scale).to(dtype)
    w = (torch.randn(v, d, generator=g) * 0.4).to(dtype)
    y = torch.randint(0, vocab_size, (n,), generator=g)
    mask = torch.rand(n, generator=g) >= masked
    up = torch.randn(n, generator=g)  # a non-uniform upstream gradient (as DPO gives per sequence)
    return h, w, y, mask, up


def _reference(h, w, y, mask, up, vocab_size):
    h = h.detach().double().requires_grad_()
    w = w.detach().double().requires_grad_()
    z = h @ w.t()
    z = z.masked_fill(torch.arange(w.shape[0])[None, :] >= vocab_size, float("-inf"))
    logp = torch.log_softmax(z, dim=-1).gather(1, y.clamp(0, vocab_size - 1)[:, None])[:, 0]
    logp = torch.where(mask, logp, torch.zeros_like(logp))
    (logp * up.double()).sum().backward()
    return logp.detach(), h.grad, w.grad


def _ours(h, w, y, mask, up, vocab_size, impl, **kw):
    h = h.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    logp = seq_loglik(h, w, y, mask, vocab_size=vocab_size, impl=impl, **kw)
    (logp * up).sum().backward()
    return logp.detach(), h.grad, w.grad


def _rel(a, ref):
    return ((a.double() - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_matches_autograd_reference(impl, dtype):
    h, w, y, mask, up = _inputs(dtype=dtype)
    ref = _reference(h, w, y, mask, up, 290)
    ours = _ours(h, w, y, mask, up, 290, impl)
    assert ours[0].dtype == torch.float32 and ours[1].dtype == dtype and ours[2].dtype == dtype
    errs = [_rel(a, r) for a, r in zip(ours, ref)]
    assert max(errs) <= TOL[dtype], (impl, dtype, errs)
    assert ref[0].abs().max() > 3 and ref[2].abs().max() > 0.1  # the reference is not degenerate
    assert (ours[0] <= 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_chunking_and_splits_do_not_change_results(impl, monkeypatch):
    """Several vocabulary chunks, several token tiles (torch) / vocabulary splits of
    the forward grid (triton), some of them empty: same numbers."""
    h, w, y, mask, up = _inputs(n=41, v=333, vocab_size=330)
    ref = _reference(h, w, y, mask, up, 330)
    backend = _backend(impl)
    if impl == "torch":
        monkeypatch.setattr(backend, "MAX_TOKENS_PER_TILE", 16)
        kw = dict(chunk_elems=16 * 100)  # 3 token tiles x 4 vocabulary chunks
    else:
        monkeypatch.setattr(backend, "_parts", lambda n, v, device: 5)  # 2 blocks of 256: 3 empty splits
        kw = dict(chunk_elems=31 * 70)  # the backward in 5 vocabulary chunks
    ours = _ours(h, w, y, mask, up, 330, impl, **kw)
    errs = [_rel(a, r) for a, r in zip(ours, ref)]
    assert max(errs) <= 1e-5, errs


def test_torch_path_rescales_when_a_later_chunk_would_overflow():
    """The torch forward shifts every chunk by the first chunk's row maximum; a later
    chunk whose logits exceed it by > 88 (exp overflows fp32) must be redone exactly."""
    h, w, y, mask, up = _inputs(n=29, v=300, vocab_size=300, masked=0.0)
    w[200:] *= 60.0  # the last chunk's logits are ~60x larger
    z = h.double() @ w.double().t()
    assert (z[:, 200:].max(1).values - z[:, :100].max(1).values > 100).any()
    ref = _reference(h, w, y, mask, up, 300)
    ours = _ours(h, w, y, mask, up, 300, "torch", chunk_elems=29 * 100)
    errs = [_rel(a, r) for a, r in zip(ours, ref)]
    assert max(errs) <= 1e-5, errs
    assert torch.isfinite(ours[0]).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_masked_tokens_and_padded_rows_have_no_effect(impl):
    h, w, y, mask, up = _inputs()
    base = _ours(h, w, y, mask, up, 290, impl)
    # Garbage where it must not matter: masked hidden states, masked targets
    # (out of range, like -100 labels) and padded vocabulary rows.
    h2, w2, y2 = h.clone(), w.clone(), y.clone()
    h2[~mask] = 1e4
    y2[~mask] = -100
    w2[290:] = 50.0
    other = _ours(h2, w2, y2, mask, up, 290, impl)
    for a, b in zip(base, other):
        assert torch.equal(a, b)
    logp, gh, gw = base
    assert (logp[~mask] == 0).all() and (gh[~mask] == 0).all() and (gw[290:] == 0).all()
    assert (gh[mask].abs().sum(1) > 0).all() and (logp[mask] < 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_logprobs_never_positive_and_finite_at_extreme_logits(impl):
    """Logits in the thousands (p(target) ~ 1 for some tokens): finite, <= 0, still exact."""
    h, w, y, mask, up = _inputs(scale=40.0, masked=0.0)
    z = h.double() @ w.double().t()
    y = torch.where(torch.arange(37) % 2 == 0, z[:, :290].argmax(1), y)  # half the targets are the argmax
    ref = _reference(h, w, y, mask, up, 290)
    logp, gh, gw = _ours(h, w, y, mask, up, 290, impl)
    assert torch.isfinite(logp).all() and torch.isfinite(gh).all() and torch.isfinite(gw).all()
    assert (logp <= 0).all() and (ref[0][::2] > -0.1).all()
    assert (logp - ref[0]).abs().max() <= 1e-5 * ref[0].abs().max()


@pytest.mark.parametrize("impl", IMPLS)
def test_deterministic(impl):
    h, w, y, mask, up = _inputs()
    a = _ours(h, w, y, mask, up, 290, impl)
    b = _ours(h, w, y, mask, up, 290, impl)
    assert all(torch.equal(x, z) for x, z in zip(a, b))


@pytest.mark.parametrize("impl", IMPLS)
def test_all_masked_and_frozen_weight(impl):
    h, w, y, mask, up = _inputs()
    logp, gh, gw = _ours(h, w, y, torch.zeros_like(mask), up, 290, impl)
    assert (logp == 0).all() and (gh == 0).all() and (gw == 0).all()
    # Frozen output layer (e.g. a reference model): only the hidden gradient.
    hh = h.clone().requires_grad_()
    (seq_loglik(hh, w, y, mask, vocab_size=290, impl=impl) * up).sum().backward()
    assert _rel(hh.grad, _reference(h, w, y, mask, up, 290)[1]) <= 1e-5


def test_bad_input_errors():
    h, w, y, mask, _ = _inputs()
    y_bad = y.clone()
    y_bad[mask.nonzero()[0, 0]] = 290
    with pytest.raises(ValueError, match=r"target ids must lie in \[0, vocab_size=290\).*max 290"):
        seq_loglik(h, w, y_bad, mask, vocab_size=290)
    with pytest.raises(ValueError, match="share one of fp32/bf16/fp16"):
        seq_loglik(h, w.double(), y, mask)
    with pytest.raises(ValueError, match="hidden \\[N, d\\] and weight \\[V, d\\]"):
        seq_loglik(h, w[:, :-1], y, mask)
    with pytest.raises(ValueError, match="impl must be one of"):
        seq_loglik(h, w, y, mask, impl="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matches_reference_on_gpu(impl, dtype):
    """The compiled kernel (not the interpreter) at a size with many blocks and
    autotuning; odd sizes so every mask is exercised."""
    h, w, y, mask, up = _inputs(n=1031, d=517, v=4099, vocab_size=4000, dtype=dtype)
    ref = _reference(h, w, y, mask, up, 4000)
    ours = _ours(h.cuda(), w.cuda(), y.cuda(), mask.cuda(), up.cuda(), 4000, impl)
    errs = [_rel(a.cpu(), r) for a, r in zip(ours, ref)]
    assert max(errs) <= TOL[dtype], (impl, dtype, errs)
    assert (ours[0] <= 0).all()


def test_triton_impl_works_when_triton_was_imported_first():
    """megatron-core imports triton before any log-prob is computed; without CUDA
    and without TRITON_INTERPRET in the environment, impl "triton" must still run
    (under the interpreter) and agree with the torch backend."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    code = (
        "import triton.language as tl, torch\n"
        "from triton.runtime.interpreter import InterpretedFunction\n"
        "assert not isinstance(tl.zeros, InterpretedFunction)  # compiled mode, as megatron leaves it\n"
        "import fg_megatron_kernels.seq_loglik as sl\n"
        "h, w, y = torch.randn(37, 45), torch.randn(301, 45) * 0.4, torch.randint(0, 301, (37,))\n"
        "a, b = sl.seq_loglik(h, w, y, impl='triton'), sl.seq_loglik(h, w, y, impl='torch')\n"
        "print(float((a - b).abs().max() / b.abs().max()))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(root)
    if torch.cuda.is_available():
        pytest.skip("the interpreter path is for machines without CUDA")
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert float(proc.stdout.strip()) <= 1e-6
