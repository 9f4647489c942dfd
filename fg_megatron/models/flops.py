"""Model FLOPs of a transformer pass, for achieved TFLOP/s and MFU.

Counted as Megatron-LM's ``num_floating_point_operations`` (megatron/training/training.py;
Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters",
appendix "Floating-point operations") and PaLM (Chowdhery et al. 2022, appendix B): only the
matrix multiplications, 2 FLOPs per multiply-add, per sequence of ``s`` tokens:

    forward(s) = 2 * N * s  +  L * 4 * s^2 * (heads * head_dim)

- ``N`` (:func:`matmul_params`): the weights each token multiplies: per layer Q (h x heads*d),
  K and V (h x groups*d each: GQA), the attention output (heads*d x h), SwiGLU's gate, up and
  down (3 x h x ffn); plus the head: the output layer over the **real** vocabulary (h x V; the
  rows megatron-core pads the vocabulary with are computed but are not the model's math, and
  Megatron-LM counts the padded vocabulary: a difference of under 128 x TP rows), or a value
  model's ``hidden -> 1`` projection.  Embedding lookups, norms, RoPE, softmax and other
  element-wise work are not counted.
- ``4 * s^2 * heads * head_dim`` per layer: the scores ``Q K^T`` and the weighted sum ``A V``
  over the **full** s x s matrix, as Megatron-LM and PaLM count it (a causal mask would halve
  this term: the standard MFU definition does not).
- backward = 2 x forward (a weight and an input gradient per matmul).  Model FLOPs exclude
  activation recomputation: MFU is the model's work, not the hardware's.

Generating with a KV cache (:func:`generation_flops`): the prompt is one forward; each later
new token is fed once, multiplying the ``N`` weights and attending over the keys cached so far.

``torch.utils.flop_counter.FlopCounterMode`` on transformers' ``LlamaForCausalLM`` (eager
attention) gives exactly these numbers (tests/test_flops.py).
"""

from __future__ import annotations

from typing import Iterable

from fg_megatron.models.arch import VALUE_HEAD, ModelArch


def matmul_params(arch: ModelArch) -> int:
    """Weights one token multiplies in a forward (see the module docstring)."""
    h, d = arch.hidden_size, arch.head_dim
    q = arch.num_attention_heads * d
    kv = arch.num_query_groups * d
    attention = h * q + 2 * h * kv + q * h
    mlp = 3 * h * arch.ffn_hidden_size  # SwiGLU: gate, up, down
    head = h if arch.head == VALUE_HEAD else h * arch.vocab_size
    return arch.num_layers * (attention + mlp) + head


def attention_flops(arch: ModelArch, queries: int, keys: int) -> int:
    """Scores and weighted sum of ``queries`` tokens over ``keys`` keys, every layer."""
    return arch.num_layers * 4 * queries * keys * arch.num_attention_heads * arch.head_dim


def forward_flops(arch: ModelArch, length: int) -> int:
    """One sequence of ``length`` tokens through the model, forward only."""
    return 2 * matmul_params(arch) * length + attention_flops(arch, length, length)


def sequences_forward_flops(arch: ModelArch, lengths: Iterable[int]) -> int:
    """Forward FLOPs of a batch: each sequence at its real length (padding is not model work)."""
    return sum(forward_flops(arch, int(n)) for n in lengths)


def training_flops(arch: ModelArch, lengths: Iterable[int]) -> int:
    """Forward + backward (2 x forward) of a batch, recomputation excluded."""
    return 3 * sequences_forward_flops(arch, lengths)


def generation_flops(arch: ModelArch, prompt_length: int, new_tokens: int) -> int:
    """Generating ``new_tokens`` after a prompt with a KV cache: the prompt's forward (which
    gives the first new token), then new tokens 1 .. n-1 fed one at a time, token ``i``
    attending over the ``prompt_length + i`` keys cached by then (itself included)."""
    if new_tokens < 1:
        return 0
    fed = new_tokens - 1
    # sum over i = 1 .. fed of (prompt_length + i) keys, in closed form: a rollout calls this per row
    keys = fed * prompt_length + fed * (fed + 1) // 2
    return forward_flops(arch, prompt_length) + fed * 2 * matmul_params(arch) + attention_flops(arch, 1, keys)
