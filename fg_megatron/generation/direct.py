"""A direct KV-cache decoder: the GPT forward written out over a megatron-core stage's own weights.

Why it exists: megatron-core's layer modules cost ~3.5 ms of Python per layer per
generated token on CPU (autograd Functions, process-group lookups, RoPE over the
whole cached key every step), which made our generation 0.44x transformers'
``generate`` on the tiny model.  Decoding is the rollout half of PPO, so the field
runs it outside the training stack: veRL and OpenRLHF roll out with vLLM,
NeMo-Aligner with TensorRT-LLM, each a separate inference implementation fed the
trained weights.  This is ours, small enough to read against megatron-core:

- the weights are the stage's parameters themselves (no copy), so a PPO actor's
  update is what the next rollout samples from;
- keys are cached after RoPE (megatron-core's static cache stores them before,
  and rotates every cached key at every step);
- the arithmetic is megatron-core's local spec: RMSNorm, fused QKV in its
  ``[groups, (q heads per group + 2) * head_dim]`` layout, RoPE by column index
  (half-split, or GLM's interleaved pairs, on the first ``rotary_dim`` dims),
  grouped-query attention with the causal, key-padding and sliding-window masks,
  SwiGLU with ``[gate; up]`` in ``linear_fc1``, and the TP all-reduces of the
  row-parallel layers and the vocab-parallel embedding.

It serves one pipeline stage holding every layer (PP=1), at any TP.  Anything else
(PP > 1, sequence parallelism, fewer KV groups than TP ranks) goes through the
schedule (:func:`fg_megatron.generation.engine.generate_ids` picks).  The tests
hold it to the schedule path: logits, entropies and tokens, for every family, at
TP=1 and TP=2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from fg_megatron.logprobs import full_logits
from fg_megatron.models.gpt import LMHead


def stage_module(model) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while not hasattr(model, "decoder") and hasattr(model, "module"):
        model = model.module
    return model


def unsupported_reason(model, tp: int, pp: int) -> Optional[str]:
    """Why this stage cannot be decoded directly, or None when it can."""
    gpt = stage_module(model)
    cfg = getattr(gpt, "config", None)
    if cfg is None or not hasattr(gpt, "decoder"):
        return "not a megatron-core GPTModel"
    if pp != 1:
        return "pipeline parallel (the direct decoder needs every layer on one stage)"
    if getattr(gpt, "value_head", None) is not None:
        return "a value model has no output layer"
    if cfg.sequence_parallel or cfg.context_parallel_size != 1:
        return "sequence or context parallel"
    if cfg.num_query_groups % tp:
        return f"{cfg.num_query_groups} KV groups do not split over TP={tp}"
    if cfg.normalization != "RMSNorm" or not cfg.gated_linear_unit or cfg.add_bias_linear:
        return "not a RMSNorm / SwiGLU / bias-free model"
    if cfg.qk_layernorm or cfg.multi_latent_attention or cfg.num_moe_experts:
        return "QK norm, MLA or MoE"
    if gpt.position_embedding_type != "rope":
        return "not a RoPE model"
    return None


@dataclass
class _Layer:
    norm1: Tensor
    qkv: Tensor
    qkv_bias: Optional[Tensor]
    proj: Tensor
    norm2: Tensor
    gate: Tensor  # the two halves of megatron-core's linear_fc1 ([gate; up] on each TP rank), as views:
    up: Tensor  # two GEMMs of half the size beat one on CPU (the weight stays in cache), as in HF's MLP
    fc2: Tensor


def _bias(linear) -> Optional[Tensor]:
    # Transformer Engine keeps an empty tensor where a layer has no bias.
    bias = getattr(linear, "bias", None)
    return bias if isinstance(bias, Tensor) and bias.numel() else None


def _norm_weight(norm_module, fused_linear) -> Tensor:
    # Transformer Engine's spec fuses the norm into the following linear layer.
    weight = getattr(norm_module, "weight", None)
    return weight if weight is not None else fused_linear.layer_norm_weight


class DirectDecoder:
    """KV-cache decoding of one batch with a PP=1 stage's weights (see the module docstring).

    ``prefill`` / ``decode`` return the full-vocabulary fp32 logits ``[b, V]`` of each
    row's last position on every rank (gathered over TP).
    """

    def __init__(self, model, tp_group, batch_size: int, max_length: int):
        gpt = stage_module(model)
        cfg = gpt.config
        self.tp_group = tp_group
        self.tp = 1 if tp_group is None else dist.get_world_size(tp_group)
        self.eps = cfg.layernorm_epsilon
        self.head_dim = cfg.kv_channels
        self.heads = cfg.num_attention_heads // self.tp
        self.groups = cfg.num_query_groups // self.tp
        self.window = None if cfg.window_size is None else int(cfg.window_size[0])
        self.interleaved = bool(cfg.rotary_interleaved)
        self.embedding = gpt.embedding.word_embeddings
        self.final_norm = gpt.decoder.final_layernorm.weight
        self.output = (gpt.shared_embedding_or_output_weight() if gpt.share_embeddings_and_output_weights
                       else gpt.output_layer.weight)
        self.vocab_start = (0 if self.tp == 1 else dist.get_rank(tp_group)) * self.output.shape[0]
        self.vocab_size = gpt.real_vocab_size
        self.layers = []
        for layer in gpt.decoder.layers:
            attn, mlp = layer.self_attention, layer.mlp
            gate, up = mlp.linear_fc1.weight.chunk(2, dim=0)
            self.layers.append(_Layer(
                norm1=_norm_weight(layer.input_layernorm, attn.linear_qkv), qkv=attn.linear_qkv.weight,
                qkv_bias=_bias(attn.linear_qkv), proj=attn.linear_proj.weight,
                norm2=_norm_weight(layer.pre_mlp_layernorm, mlp.linear_fc1), gate=gate, up=up,
                fc2=mlp.linear_fc2.weight))
        dtype, device = self.output.dtype, self.output.device
        # megatron-core's RotaryEmbedding: fp32 angles of position x inverse frequency, each
        # frequency used twice (half-split: [f, f]; interleaved: [f0, f0, f1, f1, ...]), and
        # cos / sin cast to the activation dtype.
        inv_freq = gpt.rotary_pos_emb.inv_freq.float()
        angles = torch.outer(torch.arange(max_length, device=inv_freq.device, dtype=torch.float32), inv_freq)
        angles = angles.repeat_interleave(2, dim=-1) if self.interleaved else torch.cat([angles, angles], dim=-1)
        self.cos = angles.cos().to(device=device, dtype=dtype)
        self.sin = angles.sin().to(device=device, dtype=dtype)
        self.rotary_dim = angles.shape[-1]
        shape = (batch_size, self.groups, max_length, self.head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in self.layers]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in self.layers]
        self.length = 0  # columns cached so far

    # --- pieces -------------------------------------------------------------------------------
    def _all_reduce(self, x: Tensor) -> Tensor:
        if self.tp > 1:
            dist.all_reduce(x, group=self.tp_group)
        return x

    def _embed(self, ids: Tensor) -> Tensor:
        emb = self.embedding
        if self.tp == 1:
            return F.embedding(ids, emb.weight)
        outside = (ids < emb.vocab_start_index) | (ids >= emb.vocab_end_index)
        local = (ids - emb.vocab_start_index).masked_fill(outside, 0)
        x = F.embedding(local, emb.weight).masked_fill(outside[..., None], 0.0)
        return self._all_reduce(x)

    def _rope(self, x: Tensor, start: int) -> Tensor:
        """``x [b, n, t, d]`` at columns ``start .. start + t - 1``."""
        t, rd = x.shape[2], self.rotary_dim
        cos, sin = self.cos[start:start + t], self.sin[start:start + t]
        rot = x[..., :rd]
        if self.interleaved:
            half = torch.stack((-rot[..., 1::2], rot[..., ::2]), dim=-1).flatten(-2)
        else:
            a, b = rot.chunk(2, dim=-1)
            half = torch.cat((-b, a), dim=-1)
        rot = rot * cos + half * sin
        return rot if rd == x.shape[-1] else torch.cat((rot, x[..., rd:]), dim=-1)

    def _mask(self, valid: Tensor, start: int, t: int) -> Tensor:
        """``[b, 1, t, start + t]``, True = attend: causal, real keys, inside the window.

        A padding query also sees itself, so its (never read) output stays finite:
        an all-masked row would be NaN, and NaN values times a zero weight poison
        the real rows of the next layer.
        """
        k = start + t
        q_col = torch.arange(start, k, device=valid.device)[:, None]
        k_col = torch.arange(k, device=valid.device)[None, :]
        seen = (k_col <= q_col)
        if self.window is not None:
            seen = seen & (q_col - k_col <= self.window)
        return (seen[None] & valid[:, None, :k].bool() | (k_col == q_col)[None])[:, None]

    def _forward(self, ids: Tensor, valid: Tensor) -> Tensor:
        b, t = ids.shape
        start, d = self.length, self.head_dim
        per_group = self.heads // self.groups
        mask = self._mask(valid, start, t)
        x = self._embed(ids).view(b * t, -1)  # 2-D activations: the GEMMs run a little faster on CPU
        hidden = x.shape[-1]
        for n, layer in enumerate(self.layers):
            h = F.rms_norm(x, (hidden,), layer.norm1, self.eps)
            qkv = F.linear(h, layer.qkv, layer.qkv_bias).view(b, t, self.groups, (per_group + 2) * d)
            q = qkv[..., :per_group * d].reshape(b, t, self.heads, d).transpose(1, 2)
            k = qkv[..., per_group * d:(per_group + 1) * d].transpose(1, 2)
            v = qkv[..., (per_group + 1) * d:].transpose(1, 2)
            self.keys[n][:b, :, start:start + t] = self._rope(k, start)
            self.values[n][:b, :, start:start + t] = v
            attn = F.scaled_dot_product_attention(
                self._rope(q, start), self.keys[n][:b, :, :start + t], self.values[n][:b, :, :start + t],
                attn_mask=mask, enable_gqa=per_group > 1)
            x = x + self._all_reduce(F.linear(attn.transpose(1, 2).reshape(b * t, self.heads * d), layer.proj))
            h = F.rms_norm(x, (hidden,), layer.norm2, self.eps)
            x = x + self._all_reduce(F.linear(F.silu(F.linear(h, layer.gate)) * F.linear(h, layer.up), layer.fc2))
        self.length = start + t
        last = x.view(b, t, hidden)[:, -1]
        last = F.rms_norm(last, (hidden,), self.final_norm, self.eps)[None]  # [1, b, h]
        head = LMHead(hidden=last, weight=self.output, vocab_start=self.vocab_start, vocab_size=self.vocab_size)
        return full_logits(head, self.tp_group)[:, 0].float()

    # --- the two steps -----------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, ids: Tensor, valid: Tensor) -> Tensor:
        """Encode the left-padded prompts ``ids [b, s]`` (``valid``: 1 on real tokens)."""
        self.length = 0
        return self._forward(ids, valid)

    @torch.no_grad()
    def decode(self, ids: Tensor, valid: Tensor) -> Tensor:
        """One new token per row, ``ids [b, 1]``; ``valid [b, length + 1]`` covers the cache and it."""
        return self._forward(ids, valid)
