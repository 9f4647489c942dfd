"""Token generation with megatron-core under any TP x PP layout, with a KV cache.

One call generates for one batch of prompts.  Every rank of a model-parallel
group calls it with the same prompts.  Each step produces the full-vocabulary
logits of the last position, picks the next tokens (:mod:`.sampling`), and
broadcasts them to every stage and TP rank.  Two backends produce the logits:

- ``direct`` (:mod:`.direct`, the default wherever it can run: PP=1, any TP):
  the GPT forward written out over the stage's own weights with its own cache of
  rotated keys; 3-4x faster than the schedule on CPU (megatron-core's modules
  cost milliseconds of Python per layer per token);
- ``schedule``: one micro-batch per step through the project's one schedule
  (:func:`fg_megatron.schedule.run_microbatches`: PP stages hand activations on
  as in training), with megatron-core's ``StaticInferenceContext`` as the KV
  cache.  It serves PP > 1, and ``use_cache=False`` (recompute the full
  sequence each step: the reference both caches are tested against).

Left padding and positions: megatron-core's RoPE rotates by the column index
(it ignores ``position_ids``), so a row with ``k`` pad tokens sees its tokens at
positions shifted by ``k``; the direct decoder does the same.  RoPE attention
scores depend only on the distance between query and key, so the shift changes
nothing but rounding; the padded keys themselves are masked (:mod:`.masks`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from fg_megatron.data.collate import collate_prompts
from fg_megatron.generation.direct import DirectDecoder, unsupported_reason
from fg_megatron.generation.masks import decode_mask, prefill_mask
from fg_megatron.generation.sampling import SamplingParams, next_tokens, row_generators
from fg_megatron.logprobs import full_logits
from fg_megatron.models.gpt import LMHead
from fg_megatron.parallel import ParallelContext
from fg_megatron.schedule import run_microbatches


@dataclass
class Generation:
    """One prompt's response."""

    ids: list[int]  # generated token ids; ends with the EOS token when finish_reason == "eos"
    finish_reason: str  # "eos" or "length" (max_new_tokens reached)
    # With return_entropy, on the last pipeline stage: the entropy of the (temperature-scaled)
    # next-token distribution at each generated token, as TRL's PPO logs it.
    entropy: list[float] = field(default_factory=list)


def _last_position_logits(tp_group, head: LMHead, batch: dict) -> Tensor:
    """The last stage's result: full-vocabulary logits ``[b, V]`` of the last column."""
    last = LMHead(hidden=head.hidden[-1:], weight=head.weight, vocab_start=head.vocab_start,
                  vocab_size=head.vocab_size)
    return full_logits(last, tp_group)[:, 0].float()  # gathered over TP, padding rows dropped


def _step_logits(model, ctx: ParallelContext, input_ids: Tensor, position_ids: Tensor, mask: Tensor,
                 inference_context) -> Optional[Tensor]:
    """One forward through the pipeline; ``[b, V]`` logits on the last stage, None elsewhere."""
    batch = {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": mask}
    out = run_microbatches(model, [batch], partial(_last_position_logits, ctx.tp_group), forward_only=True,
                           inference_context=inference_context)
    return out[0] if ctx.is_last_stage else None


def _share_tokens(tokens: Tensor, ctx: ParallelContext) -> Tensor:
    """The last stage's tokens on every rank of the model-parallel group (TP rank 0's win)."""
    from megatron.core import parallel_state as ps

    if ctx.pp > 1:
        dist.broadcast(tokens, ps.get_pipeline_model_parallel_last_rank(), group=ctx.pp_group)
    if ctx.tp > 1:
        # Every TP rank sampled from the same gathered logits with the same generators; the
        # broadcast makes agreement a guarantee rather than an assumption about rounding.
        dist.broadcast(tokens, ps.get_tensor_model_parallel_src_rank(), group=ctx.tp_group)
    return tokens


BACKENDS = ("auto", "direct", "schedule")


def pick_backend(model, ctx: ParallelContext, backend: str, use_cache: bool) -> str:
    """``direct`` (:mod:`.direct`) when asked or, under ``auto``, when the stage allows it and the
    KV cache is on; else ``schedule``.  Asking for ``direct`` where it cannot run is an error."""
    if backend not in BACKENDS:
        raise ValueError(f"generation backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "schedule" or not use_cache:
        if backend == "direct":
            raise ValueError("the direct decoder always uses the KV cache (use_cache=False needs backend='schedule')")
        return "schedule"
    reason = unsupported_reason(model, ctx.tp, ctx.pp)
    if reason is None:
        return "direct"
    if backend == "direct":
        raise ValueError(f"the direct decoder cannot run this model: {reason}")
    return "schedule"


@torch.no_grad()
def generate_ids(model, ctx: ParallelContext, prompts: Sequence[Sequence[int]], *, eos_ids: Sequence[int],
                 pad_id: int, max_new_tokens: int, sampling: SamplingParams = SamplingParams(),
                 seeds: Optional[Sequence[int]] = None, use_cache: bool = True,
                 return_entropy: bool = False, backend: str = "auto") -> list[Generation]:
    """Responses for ``prompts`` (token ids, BOS included), one :class:`Generation` each.

    ``model`` is this rank's stage (eval mode).  A row stops at its first token in
    ``eos_ids`` (kept in ``ids``) or after ``max_new_tokens``; the loop stops when
    every row has.  ``seeds`` (one per prompt) seed each row's sampling generator;
    ignored when greedy.  ``backend``: ``direct`` decodes with the stage's weights
    (:mod:`.direct`, PP=1), ``schedule`` steps through megatron-core's modules,
    ``auto`` takes ``direct`` where it can run.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not prompts:
        return []
    if not sampling.greedy and (seeds is None or len(seeds) != len(prompts)):
        raise ValueError(f"sampling needs one seed per prompt ({len(prompts)} prompts)")
    backend = pick_backend(model, ctx, backend, use_cache)
    if (backend == "schedule" and getattr(getattr(model, "config", None), "window_size", None) is not None
            and len(set(map(len, prompts))) > 1):
        # megatron-core replaces the given mask with its sliding-window mask: padding would be attended
        raise ValueError("a sliding-window model needs prompts of equal length in one batch "
                         "(runner.make_batches(equal_length=True))")
    device = ctx.device
    batch = collate_prompts(prompts, pad_id, side="left")
    tokens = batch["input_ids"].to(device)  # [b, s]
    valid = batch["attention_mask"].bool().to(device)
    positions = batch["position_ids"].to(device)
    b, s = tokens.shape
    if backend == "direct":
        decoder = DirectDecoder(model, ctx.tp_group if ctx.tp > 1 else None, b, s + max_new_tokens)

        def step_logits(step: int) -> Optional[Tensor]:
            return decoder.prefill(tokens, valid) if step == 0 else decoder.decode(tokens[:, -1:], valid)
    else:
        from megatron.core.inference.contexts import StaticInferenceContext

        cache = StaticInferenceContext(b, s + max_new_tokens) if use_cache else None

        def step_logits(step: int) -> Optional[Tensor]:
            if cache is None or step == 0:
                step_ids, step_pos, mask = tokens, positions, prefill_mask(valid)
            else:
                step_ids, step_pos, mask = tokens[:, -1:], positions[:, -1:], decode_mask(valid)
            logits = _step_logits(model, ctx, step_ids, step_pos, mask, cache)
            if cache is not None:
                cache.increment_sequence_len_offset(step_ids.shape[1])
                cache.enable_decode_mode()
            return logits
    generators = None if sampling.greedy else row_generators(seeds)
    eos = torch.tensor(sorted(set(int(e) for e in eos_ids)), dtype=torch.long, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    out: list[list[int]] = [[] for _ in range(b)]
    entropies: list[list[float]] = [[] for _ in range(b)]
    for step in range(max_new_tokens):
        logits = step_logits(step)
        nxt = torch.empty(b, dtype=torch.long, device=device)
        if logits is not None:
            nxt.copy_(next_tokens(logits, sampling, generators))
        alive = (~done).tolist()
        if return_entropy and logits is not None:
            scaled = logits if sampling.greedy else logits / sampling.temperature
            logp = torch.log_softmax(scaled, dim=-1)
            step_entropy = (-(logp.exp() * logp).sum(dim=-1)).tolist()
            for i in range(b):
                if alive[i]:
                    entropies[i].append(step_entropy[i])
        nxt = _share_tokens(nxt, ctx)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)  # finished rows idle on padding
        for i, token in enumerate(nxt.tolist()):
            if alive[i]:
                out[i].append(token)
        done |= torch.isin(nxt, eos)
        if bool(done.all()):
            break
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        valid = torch.cat([valid, torch.ones_like(valid[:, :1])], dim=1)
        positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
    eos_set = set(eos.tolist())
    return [Generation(ids, "eos" if ids and ids[-1] in eos_set else "length", ent)
            for ids, ent in zip(out, entropies)]
