"""Memory of the last stage's head for one micro-batch: the log-likelihood of an LM head
(fused or naive) or the scalar of a value head.

``N`` = tokens of the micro-batch, ``Nr`` = the scored (response) tokens, ``Vt`` =
``V_pad / t`` rows of this rank's output-weight shard, ``h`` hidden, ``p`` bytes per
element of the model dtype.

* ``fused`` (``kernels/seq_loglik.py``, the Triton backend a GPU run uses): saves the
  scored rows of the hidden states (``p Nr h``, an ``index_select`` copy) and one fp32
  log-sum-exp per token (``4 Nr``); its backward allocates ``dh`` in fp32 (``4 Nr h``)
  and its cast (``p Nr h``), the full ``grad_h`` (``p N h``), ``dW`` in the weight's
  dtype (``p Vt h``) and one logit-gradient chunk of at most ``2^27`` elements
  (``DEFAULT_CHUNK_ELEMS`` of ``seq_loglik_triton``, ``p`` bytes each; 256 MiB in bf16).
* ``naive`` (``--logprob-impl megatron``, full logits): fp32 logits ``[N, Vt]`` and
  megatron-core's softmax, overwritten by its gradient in place (``2 x 4 N Vt``), the
  fp32 copies of the hidden states and the weight its matmul saves (``4 N h``, and
  ``4 Vt h`` unless the model is fp32), then ``dh`` (``4 N h``) and ``dW`` in fp32
  (``4 Vt h``) plus its cast (``p Vt h``).  All tokens are scored: it masks afterwards.
* value head (reward model, critic): ``hidden.float()`` saved by the fp32 matmul
  (``4 N h``) and its gradient (``4 N h``).
"""

from __future__ import annotations

from fg_megatron.models.arch import ModelArch
from fg_megatron.models.gpt import DEFAULT_VOCAB_PAD_MULTIPLE, padded_vocab_size

LOGPROB_IMPLS = ("fused", "naive")
TRITON_CHUNK_ELEMS = 1 << 27  # kernels/seq_loglik_triton.DEFAULT_CHUNK_ELEMS


def fused_bytes(arch: ModelArch, *, tokens: int, scored: int, tp: int, dtype_bytes: int,
                vocab_pad_multiple: int = DEFAULT_VOCAB_PAD_MULTIPLE) -> int:
    p, h = dtype_bytes, arch.hidden_size
    vt = padded_vocab_size(arch.vocab_size, tp, vocab_pad_multiple) // tp
    saved = p * scored * h + 4 * scored
    backward = 4 * scored * h + p * scored * h + p * tokens * h + p * vt * h + p * min(scored * vt, TRITON_CHUNK_ELEMS)
    return saved + backward


def naive_bytes(arch: ModelArch, *, tokens: int, tp: int, dtype_bytes: int,
                vocab_pad_multiple: int = DEFAULT_VOCAB_PAD_MULTIPLE) -> int:
    p, h, n = dtype_bytes, arch.hidden_size, tokens
    vt = padded_vocab_size(arch.vocab_size, tp, vocab_pad_multiple) // tp
    logits = 2 * 4 * n * vt
    copies = 4 * n * h + (4 * vt * h if p < 4 else 0)
    backward = 4 * n * h + 4 * vt * h + (p * vt * h if p < 4 else 0)
    return logits + copies + backward


def value_head_bytes(arch: ModelArch, *, tokens: int) -> int:
    return 2 * 4 * tokens * arch.hidden_size


def lm_head_bytes(impl: str, arch: ModelArch, *, tokens: int, scored: int, tp: int, dtype_bytes: int,
                  vocab_pad_multiple: int = DEFAULT_VOCAB_PAD_MULTIPLE) -> int:
    if impl == "fused":
        return fused_bytes(arch, tokens=tokens, scored=scored, tp=tp, dtype_bytes=dtype_bytes,
                           vocab_pad_multiple=vocab_pad_multiple)
    return naive_bytes(arch, tokens=tokens, tp=tp, dtype_bytes=dtype_bytes, vocab_pad_multiple=vocab_pad_multiple)
