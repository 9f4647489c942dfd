"""Activation memory of megatron-core's GPT layer as our models build it.

Source: Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
Transformer Models" (arXiv:2205.05198), section 4: per layer ``sbh(34 + 5as/h)``
bytes in 16-bit, with TP ``sbh(10 + 24/t + 5as/(ht))``; selective recomputation drops
the ``5as/h`` attention-score term; full recomputation keeps only each layer's input.
Their layer is GPT-3's (LayerNorm, GELU MLP of 4h, MHA, dropout).  Ours (see
:func:`fg_megatron.models.gpt.transformer_config`) has RMSNorm, SwiGLU with
``ffn_hidden_size`` f, grouped-query attention with g query groups of head dim d,
RoPE, no biases (ChatGLM: a QKV bias, which saves nothing) and no dropout, so each
saved tensor is recounted.  ``p`` = bytes per activation element (2 for bf16/fp16,
4 for fp32), ``T = s * b`` tokens of the micro-batch, ``hq = a d`` (query width),
``hkv = g d``:

Attention block (tensors autograd keeps for the backward)::

    norm_in      what input_layernorm saves: TE's fused RMSNorm keeps x and
                 an fp32 rstd                                                   p T h + 4 T  (te)
                 the local spec's torch.nn.RMSNorm (fp32 weight) computes in
                 fp32 and keeps x and x * rstd in fp32, and rstd                8 T h + 4 T  (local)
    qkv_in       input of linear_qkv (the norm's output)                        p T h
    q            query after RoPE (RoPE's backward needs only cos/sin)          p T hq
    rope, mask   local spec: the cos/sin tables each layer makes for q and k
                 (4 s r p, r = rotary dims) and the bool causal mask (s^2)       4 s r p + s^2  (local)
    kv           keys and values the core attention reads.  Q, K, V start as
                 views of linear_qkv's output [T, hq + 2 hkv]; RoPE makes new
                 Q and K, but V stays a view, so a saved V keeps that whole
                 output alive.  megatron-core's local DotProductAttention
                 repeat_interleaves K and V to all a heads (new tensors) when
                 g < a:                                                         2 p T hq             (local, g < a)
                 else K after RoPE + the QKV output under V                     p T (2 hq + 2 hkv)   (local, g = a)
                 TE's attention reads K and V at g heads (V a view)              p T (hq + 3 hkv)     (te)
    scores       local (unfused, attention_softmax_in_fp32): the fp32 softmax
                 output (softmax backward) and its p-byte copy (probs @ V)      (4 + p) a s T  (4 a s T in fp32)
                 TE's fused / flash attention stores no [s, s] matrix, only
                 the fp32 log-sum-exp per head and token                        4 a T  (te)
    proj_in      input of linear_proj (the attention output)                    p T hq

MLP block::

    norm_in      what pre_mlp_layernorm saves (as above)                        p T h + 4 T | 8 T h + 4 T
    fc1_in       input of linear_fc1                                            p T h
    fc1_out      [gate; up] = fc1's output, read by SiLU and the product        2 p T f
    silu_out     SiLU(gate), read by the product's backward                     p T f
    up_offset    ``up + glu_linear_offset`` (megatron-core's glu adds the 0.0
                 offset, a new tensor the product saves)                        p T f
    fc2_in       SwiGLU output, input of linear_fc2                             p T f

In 16-bit with no GQA and f = 8h/3 (Llama's SwiGLU width: the parameters of a 4h GELU MLP)
the TE spec's sbh terms are 12 (attention) + 4 + 80/3 (MLP) = 42.7 per layer (paper: 34, of
which 3 are dropout masks; SwiGLU keeps both halves of fc1's output and two more f-wide
tensors where GELU keeps one) and the local spec's score term is 6as/h (paper: 5 =
softmax 2 + dropout mask 1 + dropout output 2).  The local-spec terms are checked
tensor for tensor against autograd's saved tensors (``tests/dist/plan_activations.py``).

Tensor parallelism without sequence parallelism: norm_in, qkv_in (both blocks) stay
replicated on every TP rank (the paper's ``10 sbh``); q, kv, scores, proj_in, fc1_out,
silu_out, fc2_in are split over heads / ffn columns and divide by t.  With
``sequence_parallel`` the replicated terms divide by t too.

Recomputation (megatron-core ``recompute_granularity``):

* ``selective`` recomputes core attention: the ``scores`` term is dropped (nothing to
  drop under TE's flash attention, which never stores it).
* ``full`` (``uniform``, 1 layer per checkpoint, as our config sets) keeps each layer's
  input ``p T h`` (/t with SP) and, during the backward, one layer's full set above.

Pipeline (megatron-core's 1F1B, ``forward_backward_pipelining_without_interleaving``):
stage ``i`` of ``pp`` runs ``min(pp - i, m)`` warm-up forwards before its first
backward, so it holds that many micro-batches of its layers' activations (stage 0 the
most), and with ``deallocate_pipeline_outputs=False`` each one's output tensor
``p T h`` on every stage but the last.  The last stage adds the final norm's input.

Not counted: the rotary cos/sin tables and attention masks (O(s d) / O(s^2) once,
shared by all layers), the embedding's saved token ids, and transient buffers of one
op (the QK^T product before the softmax, all-reduce staging), which the allocator
reuses between layers.
"""

from __future__ import annotations

from dataclasses import dataclass

from fg_megatron.models.arch import ModelArch

RECOMPUTE = ("none", "selective", "full")
SPECS = ("te", "local")


@dataclass(frozen=True)
class ActivationSetup:
    """What the activation formulas depend on beyond the architecture."""

    seq: int  # s: tokens per sequence
    rows: int  # b: sequences in one micro-batch
    tp: int = 1
    dtype_bytes: int = 2  # p
    recompute: str = "none"
    spec: str = "te"  # te: Transformer Engine layers (fused/flash attention); local: megatron-core unfused
    sequence_parallel: bool = False


def _kv_width(hq: int, hkv: int, local: bool) -> int:
    """Width of the K/V storage core attention keeps alive (see the module docstring)."""
    if local:
        return 2 * hq if hkv < hq else 2 * hq + 2 * hkv
    return hq + 3 * hkv


def layer_terms(arch: ModelArch, x: ActivationSetup) -> dict[str, int]:
    """Bytes each saved tensor of one decoder layer takes for one micro-batch (no recompute)."""
    p, t, s = x.dtype_bytes, x.tp, x.seq
    T = s * x.rows
    h, f = arch.hidden_size, arch.ffn_hidden_size
    hq, hkv = arch.num_attention_heads * arch.head_dim, arch.num_query_groups * arch.head_dim
    a = arch.num_attention_heads
    rep = t if x.sequence_parallel else 1  # divisor of the TP-replicated terms
    local = x.spec == "local"
    scores = (4 + (p if p < 4 else 0)) * a * s * T if local else 4 * a * T
    norm = (8 if local else p) * T * h + 4 * T
    out = {
        "attn.norm_in": norm // rep,
        "attn.qkv_in": p * T * h // rep,
        "attn.q": p * T * hq // t,
        "attn.kv": p * T * _kv_width(hq, hkv, local) // t,
        "attn.scores": scores // t,
        "attn.proj_in": p * T * hq // t,
        "mlp.norm_in": norm // rep,
        "mlp.fc1_in": p * T * h // rep,
        "mlp.fc1_out": 2 * p * T * f // t,
        "mlp.silu_out": p * T * f // t,
        "mlp.up_offset": p * T * f // t,
        "mlp.fc2_in": p * T * f // t,
    }
    if local:
        out["attn.rope_mask"] = 4 * s * arch.rotary_dim * p + s * s
    return out


def layer_bytes(arch: ModelArch, x: ActivationSetup) -> int:
    """Bytes one layer keeps for one micro-batch under ``x.recompute`` (full: its input only)."""
    terms = layer_terms(arch, x)
    if x.recompute == "full":
        return x.dtype_bytes * x.seq * x.rows * arch.hidden_size // (x.tp if x.sequence_parallel else 1)
    if x.recompute == "selective" and x.spec == "local":
        terms.pop("attn.scores")
    return sum(terms.values())


def in_flight(pp: int, stage: int, num_microbatches: int) -> int:
    """Micro-batches whose activations stage ``stage`` holds at once under 1F1B."""
    return max(1, min(pp - stage, num_microbatches))


def stage_bytes(arch: ModelArch, x: ActivationSetup, *, layers: int, pp: int, stage: int,
                num_microbatches: int) -> int:
    """Peak activation bytes of one rank of ``stage`` (``layers`` decoder layers)."""
    hidden = x.dtype_bytes * x.seq * x.rows * arch.hidden_size // (x.tp if x.sequence_parallel else 1)
    per_mb = layers * layer_bytes(arch, x)
    if stage < pp - 1:
        per_mb += hidden  # the output tensor kept for the pipeline backward
    else:
        per_mb += layer_terms(arch, x)["attn.norm_in"]  # the final norm saves what a layer's norm does
    total = in_flight(pp, stage, num_microbatches) * per_mb
    if x.recompute == "full":
        # the one layer being recomputed holds its full set during its backward
        total += sum(layer_terms(arch, x).values())
    return total
