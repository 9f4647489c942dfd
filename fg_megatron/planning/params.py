"""The parameter tensors one rank of a pipeline stage holds, and megatron-core's DDP grad
buffer around them: pure arithmetic that mirrors :func:`fg_megatron.models.gpt.build_gpt_model`.

Per decoder layer, with ``t`` = TP, ``h`` hidden, ``a`` heads, ``g`` query groups, ``d``
head dim, ``f`` ffn hidden (all as megatron-core shards them)::

    input_layernorm.weight            h                 replicated
    self_attention.linear_proj.weight h * a*d / t       row-parallel
    self_attention.linear_qkv.weight  (a + 2g) d / t * h column-parallel (+ bias (a+2g)d/t: ChatGLM)
    pre_mlp_layernorm.weight          h                 replicated
    mlp.linear_fc1.weight             2f / t * h        column-parallel ([gate; up], SwiGLU)
    mlp.linear_fc2.weight             h * f / t         row-parallel

(Transformer Engine's spec fuses each norm weight into the next linear: same count, in
the model dtype; the local spec's ``torch.nn.RMSNorm`` keeps its weight in fp32.)
The first stage adds ``embedding.word_embeddings.weight`` ``[V_pad / t, h]``; the last
adds ``decoder.final_layernorm.weight`` ``[h]`` and either ``output_layer.weight``
``[V_pad / t, h]`` or, for a value model, ``value_head.weight`` ``[1, h]`` (replicated).
Tied embeddings: one stage holding both ends has one tensor; with PP > 1 the last stage
keeps its own copy of the embedding as ``output_layer.weight`` (megatron-core's
``shared_embedding``).  ``V_pad`` is :func:`~fg_megatron.models.gpt.padded_vocab_size`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fg_megatron.models.arch import VALUE_HEAD, ModelArch
from fg_megatron.models.gpt import DEFAULT_VOCAB_PAD_MULTIPLE, padded_vocab_size


@dataclass(frozen=True)
class ParamTensor:
    name: str
    numel: int
    shared_embedding: bool = False  # megatron-core's tied-embedding copy across first/last stage
    fp32: bool = False  # kept in fp32 whatever the model dtype (local-spec RMSNorm weights)


def layer_params(arch: ModelArch, tp: int, norms_fp32: bool = False) -> list[ParamTensor]:
    h, a, g, d, f = arch.hidden_size, arch.num_attention_heads, arch.num_query_groups, arch.head_dim, \
        arch.ffn_hidden_size
    qkv_rows = (a + 2 * g) * d // tp
    out = [ParamTensor("input_layernorm.weight", h, fp32=norms_fp32),
           ParamTensor("self_attention.linear_proj.weight", h * a * d // tp),
           ParamTensor("self_attention.linear_qkv.weight", qkv_rows * h)]
    if arch.qkv_bias:
        out.append(ParamTensor("self_attention.linear_qkv.bias", qkv_rows))
    out += [ParamTensor("pre_mlp_layernorm.weight", h, fp32=norms_fp32),
            ParamTensor("mlp.linear_fc1.weight", 2 * f // tp * h),
            ParamTensor("mlp.linear_fc2.weight", h * f // tp)]
    return out


def stage_params(arch: ModelArch, *, tp: int, pp: int, stage: int, layers: int,
                 vocab_pad_multiple: int = DEFAULT_VOCAB_PAD_MULTIPLE, norms_fp32: bool = False
                 ) -> list[ParamTensor]:
    """This stage's parameter tensors on one TP rank, in the module's order (``norms_fp32``:
    the local spec's ``torch.nn.RMSNorm`` weights, fp32 in a 16-bit model)."""
    h = arch.hidden_size
    vocab_rows = padded_vocab_size(arch.vocab_size, tp, vocab_pad_multiple) // tp
    first, last = stage == 0, stage == pp - 1
    tied = arch.tie_word_embeddings and arch.head != VALUE_HEAD
    out: list[ParamTensor] = []
    if first:
        out.append(ParamTensor("embedding.word_embeddings.weight", vocab_rows * h, shared_embedding=tied and pp > 1))
    for i in range(layers):
        out += [ParamTensor(f"decoder.layers.{i}.{p.name}", p.numel, fp32=p.fp32)
                for p in layer_params(arch, tp, norms_fp32)]
    if last:
        out.append(ParamTensor("decoder.final_layernorm.weight", h, fp32=norms_fp32))
        if arch.head == VALUE_HEAD:
            out.append(ParamTensor("value_head.weight", h))
        elif not (tied and first):
            out.append(ParamTensor("output_layer.weight", vocab_rows * h, shared_embedding=tied))
    return out


def grad_buffer_numel(params: list[ParamTensor], *, dp: int, distributed_optimizer: bool) -> int:
    """Elements of megatron-core's contiguous grad buffer (``_ParamAndGradBuffer``) for these
    parameters, one bucket (``overlap_grad_reduce=False``: ``bucket_size=None``).

    Without the distributed optimizer it is the plain sum.  With it, megatron-core pads each
    parameter's start to 64 elements, closes a separate bucket around the shared embedding,
    and pads every bucket's end to ``lcm(dp, 128)`` so DP shards are equal; this walks the
    parameters in reverse like ``_ParamAndGradBuffer.__init__`` does.
    """
    if not distributed_optimizer:
        return sum(p.numel for p in params)

    def pad(n: int, div: int) -> int:
        return int(math.ceil(n / div) * div)

    end_div = math.lcm(dp, 128)
    start = 0
    open_bucket = False  # a bucket holds parameters that still await its end padding
    for p in reversed(params):
        start = pad(start, 64)
        if p.shared_embedding and open_bucket:
            start = pad(start, end_div)  # close the bucket before the shared embedding
        stop = start + p.numel
        open_bucket = True
        if p.shared_embedding:
            start = pad(stop, end_div)  # and give it a bucket of its own
            open_bucket = False
        else:
            start = stop
    return pad(start, end_div) if open_bucket else start
