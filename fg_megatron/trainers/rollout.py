"""The rollout half of a PPO iteration: generate, score, and turn scores into advantages.

For each micro-batch of prompts (the same micro-batches whatever the layout:
:func:`~fg_megatron.data.sampler.split_global_batch`):

1. ``y_pol ~ pi(.|x)`` with the KV-cache generator; with a constraint (or
   ``ppo.log_reference_rollouts``) also ``y_ref ~ pi0(.|x)`` with the same decoding
   settings and the same per-prompt seeds (so at iteration 1, where pi == pi0, the
   two responses are the same and the gate is closed).
2. One right-padded batch ``[y_pol rows; y_ref rows]`` per micro-batch: the actor
   scores it for ``old_logp`` (the very batch the learning phase will see, so the
   first PPO ratio is exactly 1), the reference for ``ref_logp``, the reward model
   (or the oracle judge) for ``R``; the critic scores the ``y_pol`` rows for ``V``.
3. Per-token rewards (KL penalty + the score at the EOS action), GAE, and
   advantage whitening over the whole rollout (all DP ranks), from
   :mod:`fg_megatron.losses.ppo`.

Everything per token lives on the last pipeline stage (where the heads are);
the tensors the losses need are attached to the micro-batches there.
Response-aligned tensors are ``[rows, T]`` with ``T = ppo.max_new_tokens``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from fg_megatron.data.collate import collate_sequences
from fg_megatron.data.sampler import split_global_batch
from fg_megatron.generation.engine import generate_ids
from fg_megatron.generation.sampling import SamplingParams, row_seed
from fg_megatron.losses import (gae, kd_targets_ref, masked_moments, ppo_flip_gate, token_rewards, whiten)
from fg_megatron.models.flops import generation_flops, sequences_forward_flops, training_flops
from fg_megatron.models.gpt import sequence_scores
from fg_megatron.schedule import Batch
from fg_megatron.trainers.loop import Run
from fg_megatron.trainers.parts import ModelPart

# Sums over the rollout, for the iteration's metrics.
ROLLOUT_SUM_KEYS = ("prompts", "reward", "reward_ref", "gate", "kl", "response_tokens", "eos", "entropy",
                    "entropy_tokens", "tokens", "flops")


def response_aligned(x: Tensor, prompt_lengths: Tensor, length: int) -> Tensor:
    """``[rows, s]`` per-position values -> ``[rows, length]``: column ``j`` is position
    ``P - 1 + j``, the position that predicts (log-probs) or precedes (values) response token ``j``."""
    idx = prompt_lengths.to(x.device)[:, None] - 1 + torch.arange(length, device=x.device)[None, :]
    return x.gather(1, idx.clamp(max=x.shape[1] - 1))


@dataclass
class RolloutBatch:
    """One micro-batch of the rollout: the actor's rows and the critic's rows."""

    actor: Batch  # [y_pol rows; y_ref rows] (y_ref only when generated)
    critic: Batch  # y_pol rows
    prompt_idx: list[int]
    finish_pol: list[str] = field(default_factory=list)


class RolloutMaker:
    """Builds one iteration's rollout for this rank (see the module docstring)."""

    def __init__(self, run: Run, *, actor: ModelPart, reference: ModelPart, critic: ModelPart,
                 reward: Optional[ModelPart], oracle: Optional[Callable[[int, list[int]], float]],
                 dataset: Any, eos_ids: list[int]) -> None:
        self.run, self.cfg = run, run.cfg
        self.actor, self.reference, self.critic, self.reward = actor, reference, critic, reward
        self.oracle = oracle
        self.dataset = dataset
        self.eos_ids = eos_ids
        ppo = self.cfg.ppo
        self.sampling = SamplingParams(temperature=ppo.temperature, top_p=ppo.top_p, top_k=ppo.top_k)
        self.with_reference = ppo.constraint != "none" or ppo.log_reference_rollouts

    # -- generation ------------------------------------------------------------

    def _generate(self, part: ModelPart, prompts: list, seeds: list[int]):
        was_training = part.module.training
        part.module.eval()
        try:
            return generate_ids(part.module, self.run.ctx, prompts, eos_ids=self.eos_ids, pad_id=self.dataset.pad_id,
                                max_new_tokens=self.cfg.ppo.max_new_tokens, sampling=self.sampling, seeds=seeds,
                                return_entropy=True)
        finally:
            part.module.train(was_training)

    def _micro_batch(self, idx: list[int], iteration: int, stats: dict) -> RolloutBatch:
        seed = self.cfg.train.seed * 1_000_003 + iteration
        # keyed by the prompt's line, not its path: the same rollouts from any checkout (as generate.py)
        seeds = [row_seed(seed, self.dataset.records[i].source.rpartition(":")[2]) for i in idx]
        prompts = [list(self.dataset.items[i]) for i in idx]
        pol = self._generate(self.actor, prompts, seeds)
        rows = [(p, g.ids) for p, g in zip(prompts, pol)]
        ref = self._generate(self.reference, prompts, seeds) if self.with_reference else []
        rows += [(p, g.ids) for p, g in zip(prompts, ref)]
        pad, multiple = self.dataset.pad_id, self.cfg.data.pad_multiple
        actor = collate_sequences(rows, pad, pad_multiple=multiple)
        critic = collate_sequences(rows[:len(idx)], pad, pad_multiple=multiple)
        actor["n_pol"] = critic["n_pol"] = len(idx)
        actor["eos_reached"] = torch.tensor([g.finish_reason == "eos" for g in pol + ref])
        if self.oracle is not None:
            actor["oracle"] = torch.tensor([self.oracle(i, g.ids) for i, g in zip(idx + idx, pol + ref)])
        stats["entropy"] += sum(sum(g.entropy) for g in pol)
        stats["entropy_tokens"] += sum(len(g.entropy) for g in pol)
        return RolloutBatch(actor=actor, critic=critic, prompt_idx=idx, finish_pol=[g.finish_reason for g in pol])

    # -- scoring ---------------------------------------------------------------

    def _logps(self, part: ModelPart, batches: list[Batch]) -> list[Tensor]:
        T = self.cfg.ppo.max_new_tokens

        def fn(head, batch):
            logp = self.run.logprobs.tokens(head, batch["targets"], batch["loss_mask"])
            return response_aligned(logp, batch["prompt_lengths"], T).detach()

        return part.forward(batches, fn)

    def _values(self, batches: list[Batch]) -> list[Tensor]:
        T = self.cfg.ppo.max_new_tokens
        return self.critic.forward(batches, lambda head, batch: response_aligned(
            head.values, batch["prompt_lengths"], T).detach())

    def _scores(self, batches: list[Batch]) -> list[Tensor]:
        if self.reward is None:
            return [b["oracle"].float() for b in batches] if self.run.ctx.is_last_stage else []
        return self.reward.forward(batches, lambda head, batch: sequence_scores(
            head.values, batch["lengths"].to(head.values.device)).detach())

    # -- the iteration ---------------------------------------------------------

    def make(self, prompt_indices: list[int], iteration: int) -> tuple[list[list[RolloutBatch]], dict]:
        """This rank's rollout of the global prompt batch, as [mini-batch][micro-batch]."""
        ctx, train = self.run.ctx, self.cfg.train
        start = time.perf_counter()
        stats = dict.fromkeys(ROLLOUT_SUM_KEYS, 0.0)
        minis: list[list[RolloutBatch]] = []
        for m in range(0, len(prompt_indices), train.global_batch_size):
            mini = prompt_indices[m:m + train.global_batch_size]
            micro = split_global_batch(mini, ctx.dp, ctx.dp_rank, train.micro_batch_size)
            minis.append([self._micro_batch(idx, iteration, stats) for idx in micro])
        flat = [rb for mini in minis for rb in mini]
        actor_batches = [rb.actor for rb in flat]
        critic_batches = [rb.critic for rb in flat]
        old_logp = self._logps(self.actor, actor_batches)
        ref_logp = self._logps(self.reference, actor_batches)
        values = self._values(critic_batches)
        scores = self._scores(actor_batches)
        if ctx.is_last_stage:
            self._advantages(flat, old_logp, ref_logp, values, scores, stats)
            stats["flops"] = float(self.iteration_flops(flat))
        stats["rollout_seconds"] = time.perf_counter() - start
        return minis, stats

    def iteration_flops(self, flat: list[RolloutBatch]) -> int:
        """Model FLOPs of one PPO iteration over this rank's rollout: generating every actor row
        (y_pol by the actor, y_ref by the reference: KV cache, each row at its own prompt and
        response length), the actor's and the reference's log-prob forwards and the reward model's
        forward over the actor rows, the critic's forward over the y_pol rows, and per ppo.epochs
        the actor's and the critic's forward + backward (PPOTask.step)."""
        act, ref, crit = self.actor.arch, self.reference.arch, self.critic.arch
        flops = 0
        for rb in flat:
            a, c = rb.actor, rb.critic
            rows = a["lengths"].tolist()
            for i, (p, n) in enumerate(zip(a["prompt_lengths"].tolist(), rows)):
                flops += generation_flops(act if i < a["n_pol"] else ref, p, n - p)
            flops += sequences_forward_flops(act, rows) + sequences_forward_flops(ref, rows)
            if self.reward is not None:
                flops += sequences_forward_flops(self.reward.arch, rows)
            flops += sequences_forward_flops(crit, c["lengths"].tolist())
            flops += self.cfg.ppo.epochs * (training_flops(act, rows) + training_flops(crit, c["lengths"].tolist()))
        return flops

    def _advantages(self, flat: list[RolloutBatch], old_logp: list[Tensor], ref_logp: list[Tensor],
                    values: list[Tensor], scores: list[Tensor], stats: dict) -> None:
        ppo = self.cfg.ppo
        T = ppo.max_new_tokens
        per_batch = []
        for rb, lp, rlp, v, sc in zip(flat, old_logp, ref_logp, values, scores, strict=True):
            a, b = rb.actor, rb.actor["n_pol"]
            resp_len = (a["lengths"] - a["prompt_lengths"]).to(lp.device)
            mask = (torch.arange(T, device=lp.device)[None, :] < resp_len[:, None]).float()
            eos = a["eos_reached"].to(lp.device)
            rewards, kl = token_rewards(lp[:b], rlp[:b], mask[:b], sc[:b], kl_coef=ppo.kl_coef,
                                        estimator=ppo.kl_estimator, score_clip=ppo.score_clip,
                                        eos_reached=eos[:b], missing_eos_penalty=ppo.missing_eos_penalty)
            a["old_logp"], a["resp_mask"] = lp, mask
            rb.critic["old_values"], rb.critic["resp_mask"] = v, mask[:b]
            if sc.shape[0] > b:  # y_ref was generated: the gate (and the KD target) from both scores
                a["gate"] = ppo_flip_gate(sc[b:], sc[:b], ppo.epsilon)
                a["choose_ref"] = kd_targets_ref(sc[b:], sc[:b])
                stats["reward_ref"] += float(sc[b:].sum())
                stats["gate"] += float(a["gate"].sum())
            stats["prompts"] += b
            stats["reward"] += float(sc[:b].sum())
            stats["kl"] += float(kl.sum())
            stats["response_tokens"] += float(mask[:b].sum())
            stats["eos"] += float(eos[:b].sum())
            stats["tokens"] += float(a["lengths"].sum())
            per_batch.append((rewards, v, mask[:b]))
        if ppo.whiten_rewards:
            moments = self._global_moments([(r, m) for r, _, m in per_batch])
            per_batch = [(whiten(r, m, moments=moments, shift_mean=False), v, m) for r, v, m in per_batch]
        advantages = [gae(r, v, m, gamma=ppo.gae_gamma, lam=ppo.gae_lambda) for r, v, m in per_batch]
        if ppo.whiten_advantages:
            moments = self._global_moments([(adv, m) for (adv, _), (_, _, m) in zip(advantages, per_batch)])
        for rb, (adv, ret), (_, _, m) in zip(flat, advantages, per_batch):
            rb.actor["advantages"] = whiten(adv, m, moments=moments) if ppo.whiten_advantages else adv
            rb.critic["returns"] = ret

    def _global_moments(self, pairs: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor, Tensor]:
        """Masked (sum, sum of squares, count) over the whole rollout: every micro-batch of every DP rank."""
        total = torch.zeros(3, dtype=torch.float64, device=self.run.ctx.device)
        for x, m in pairs:
            total += torch.stack(masked_moments(x, m)).to(total.device)
        if self.run.ctx.dp > 1:
            dist.all_reduce(total, group=self.run.ctx.dp_group)
        return total[0], total[1], total[2]
