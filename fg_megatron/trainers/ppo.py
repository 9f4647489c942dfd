"""PPO with the FlipGuard constraint (paper eq. 2 and 7).

    torchrun --nproc-per-node 2 tools/train_ppo.py --tp 2

Four models: the actor (trained, from pi0), the critic (trained, a value model:
from the reward model by default, as DeepSpeed-Chat does), the frozen reference
pi0 and the frozen reward model (or ``reward.source=oracle``: the task's own
judge).  One iteration (``train.steps`` counts iterations) is a rollout of
``ppo.rollout_batch_size`` prompts (:mod:`.rollout`), then ``ppo.epochs``
passes over it in mini-batches of ``train.global_batch_size`` prompts (the
samples of one optimizer step, as in every trainer), taken in
rollout order (DeepSpeed-Chat's order: no shuffle, so every layout sees the
same mini-batches); each mini-batch is one actor step, then one critic step,
each with its own optimizer and lr schedule.

Losses (both handed to megatron-core as sums with a count):

- actor: per prompt, the token-mean of the clipped PPO objective (veRL's
  ``seq-mean-token-mean``: the FlipGuard term is per prompt, so both share the
  per-prompt normaliser), plus ``-gamma * gate * logp_pi(y_ref|x)`` (eq. 7,
  ``ce_reduction`` sum|mean as in DPO); ``kd`` takes the better of ``y_ref`` and
  ``y_pol`` by ``R`` with the gate open; then the mean over prompts;
- critic: the clipped value loss, token-mean over the mini-batch (DeepSpeed-Chat).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Optional

import torch

from fg_megatron.config import ConfigError, PPORunConfig
from fg_megatron.config.cli import resolve_path
from fg_megatron.data import PromptDataset
from fg_megatron.data.sampler import GlobalBatchSampler
from fg_megatron.data.tiny_task import judge
from fg_megatron.generation.runner import decode, eos_token_ids
from fg_megatron.losses import constraint_ce, policy_loss, value_loss
from fg_megatron.parallel import get_logger
from fg_megatron.schedule import Batch
from fg_megatron.trainers.loop import Run, reduce_stats, train
from fg_megatron.trainers.parts import check_same_vocabulary
from fg_megatron.trainers.rollout import ROLLOUT_SUM_KEYS, RolloutMaker, response_aligned

log = get_logger("ppo")

LEARN_SUM_KEYS = ("policy_loss", "ce_loss", "prompts", "clipfrac", "approx_kl", "ratio", "pg_tokens",
                  "value_loss", "vf_clipfrac", "vf_tokens")


class PPOTask:
    name = "PPO"
    progress_keys = ("reward", "gate_rate", "kl", "policy_loss", "value_loss", "response_length",
                     "rollout_seconds", "train_seconds")
    summary_keys = ("reward", "reward_ref", "gate_rate", "kl", "policy_loss", "value_loss", "ce_loss",
                    "response_length", "eos_rate")

    def __init__(self, run: Run) -> None:
        cfg = run.cfg
        self.run, self.cfg = run, cfg
        ppo = cfg.ppo
        if ppo.rollout_batch_size % cfg.train.global_batch_size:
            raise ConfigError(f"ppo.rollout_batch_size={ppo.rollout_batch_size} must be a multiple of "
                              f"train.global_batch_size={cfg.train.global_batch_size} (prompts per optimizer step)")
        updates = cfg.train.steps * ppo.epochs * (ppo.rollout_batch_size // cfg.train.global_batch_size)
        critic_optim = cfg.optim
        if ppo.critic_lr is not None:
            critic_optim = dataclasses.replace(cfg.optim, lr=ppo.critic_lr, min_lr=min(cfg.optim.min_lr, ppo.critic_lr))
        self.actor = run.load("actor", cfg.model.load, trainable=True, head="lm", total_steps=updates)
        reward_path = cfg.reward.load
        critic_path = ppo.critic_load or (reward_path if cfg.reward.source == "model" else cfg.model.load)
        self.critic = run.load("critic", critic_path, trainable=True, head="value", total_steps=updates,
                               optim=critic_optim)
        self.reference = run.load("reference", ppo.reference_load or cfg.model.load, trainable=False, head="lm")
        check_same_vocabulary(self.reference, self.actor, "ppo.reference_load")
        self.reward = None
        if cfg.reward.source == "model":
            self.reward = run.load("reward", reward_path, trainable=False, head="value")
            check_same_vocabulary(self.reward, self.actor, "reward.load")
        check_same_vocabulary(self.critic, self.actor, "the critic")
        self.dataset = PromptDataset.from_file(resolve_path(cfg.data.train), run.tokenizer, cfg.data.max_prompt_length,
                                               format=cfg.data.format, chat_template=cfg.data.chat_template,
                                               on_truncation=cfg.data.on_truncation)
        run.check_context(self.dataset, extra=ppo.max_new_tokens, budget="ppo.max_new_tokens")
        self.sampler = GlobalBatchSampler(self.dataset.lengths, ppo.rollout_batch_size, seed=cfg.train.seed,
                                          shuffle=cfg.data.shuffle, group_batches=0, source=self.dataset.path,
                                          batch_field="ppo.rollout_batch_size")
        eos = eos_token_ids(run.tokenizer, resolve_path(cfg.model.load))
        oracle: Optional[Callable[[int, list[int]], float]] = None
        if cfg.reward.source == "oracle":
            oracle = self._oracle

        self.rollouts = RolloutMaker(run, actor=self.actor, reference=self.reference, critic=self.critic,
                                     reward=self.reward, oracle=oracle, dataset=self.dataset, eos_ids=eos)

    def _oracle(self, i: int, ids: list[int]) -> float:
        """The task's judge on the decoded response: 1 right, 0 wrong."""
        return judge(self.dataset.records[i], decode(self.run.tokenizer, ids, self.rollouts.eos_ids))

    def prepare(self, run: Run) -> None:
        pass

    # -- losses (last pipeline stage) -----------------------------------------

    def _actor_loss(self, head, batch: Batch):
        ppo = self.cfg.ppo
        T = ppo.max_new_tokens
        b = batch["n_pol"]
        logp_all = self.run.logprobs.tokens(head, batch["targets"], batch["loss_mask"])
        logp = response_aligned(logp_all, batch["prompt_lengths"], T)
        mask = batch["resp_mask"]
        counts = mask.sum(dim=1)
        # Per-prompt token means: the clipped objective is positively homogeneous in A, so
        # scaling each row's advantages by 1/n_tokens gives sum_i mean_t(pg_it).
        adv = batch["advantages"] / counts[:b, None].clamp(min=1.0)
        # clipfrac, approx_kl, ratio and count do not depend on a positive scale of A: one call serves both
        pg = policy_loss(logp[:b], batch["old_logp"][:b], adv, mask[:b], clip_range=ppo.clip_range)
        ce = torch.zeros((), device=logp.device)
        if ppo.constraint != "none":
            seq = (logp * mask).sum(dim=1)
            target, target_counts = seq[b:], counts[b:]
            gate = batch["gate"]
            if ppo.constraint == "kd":
                choose = batch["choose_ref"]
                target = torch.where(choose, seq[b:], seq[:b])
                target_counts = torch.where(choose, counts[b:], counts[:b])
                gate = torch.ones_like(gate)
            ce = constraint_ce(target, target_counts, gate, gamma=ppo.gamma, reduction=ppo.ce_reduction).sum()
        stats = {"policy_loss": float(pg.loss), "ce_loss": float(ce), "prompts": float(b),
                 "clipfrac": float(pg.clipfrac), "approx_kl": float(pg.approx_kl),
                 "ratio": float(pg.ratio), "pg_tokens": float(pg.count)}
        return pg.loss + ce, b, stats

    def _critic_loss(self, head, batch: Batch):
        values = response_aligned(head.values, batch["prompt_lengths"], self.cfg.ppo.max_new_tokens)
        out = value_loss(values, batch["old_values"], batch["returns"], batch["resp_mask"],
                         clip_range=self.cfg.ppo.value_clip_range)
        return out.loss, out.count, {"value_loss": float(out.loss), "vf_clipfrac": float(out.clipfrac),
                                     "vf_tokens": float(out.count)}

    # -- the iteration ---------------------------------------------------------

    def step(self, step: int) -> dict:
        ctx = self.run.ctx
        minis, rollout = self.rollouts.make(self.sampler.next_batch(), step)
        log.info("iteration %d: rollout %.1fs", step, rollout["rollout_seconds"])
        start = time.perf_counter()
        learn: list[dict] = []
        first_ratio: Optional[float] = None
        for _ in range(self.cfg.ppo.epochs):
            for mini in minis:
                a_stats, a_info = self.actor.train_step([rb.actor for rb in mini], self._actor_loss)
                c_stats, c_info = self.critic.train_step([rb.critic for rb in mini], self._critic_loss)
                learn += [{**a, **c} for a, c in zip(a_stats, c_stats)]
                if first_ratio is None:
                    sums = reduce_stats(ctx, ("ratio", "pg_tokens"), a_stats)
                    first_ratio = sums["ratio"] / max(sums["pg_tokens"], 1.0)
        train_seconds = time.perf_counter() - start
        return self._metrics(rollout, learn, a_info, c_info, first_ratio, train_seconds)

    def _metrics(self, rollout: dict, learn: list[dict], a_info: dict, c_info: dict, first_ratio: float,
                 train_seconds: float) -> dict:
        ctx = self.run.ctx
        r = reduce_stats(ctx, ROLLOUT_SUM_KEYS, [rollout] if ctx.is_last_stage else [])
        s = reduce_stats(ctx, LEARN_SUM_KEYS, learn)
        prompts = max(r["prompts"], 1.0)
        updates = max(s["prompts"], 1.0)
        metrics = {
            "reward": r["reward"] / prompts,
            "gate_rate": r["gate"] / prompts,
            "kl": r["kl"] / prompts,
            "policy_loss": s["policy_loss"] / updates,
            "value_loss": s["value_loss"] / max(s["vf_tokens"], 1.0),
            "ce_loss": s["ce_loss"] / updates,
            "clipfrac": s["clipfrac"] / max(s["pg_tokens"], 1.0),
            "approx_kl": s["approx_kl"] / max(s["pg_tokens"], 1.0),
            "entropy": r["entropy"] / max(r["entropy_tokens"], 1.0),
            "response_length": r["response_tokens"] / prompts,
            "eos_rate": r["eos"] / prompts,
            "rollout_seconds": rollout["rollout_seconds"],
            "train_seconds": train_seconds,
            "first_ratio": first_ratio,
            "lr": a_info["lr"], "critic_lr": c_info["lr"],
            "grad_norm": a_info["grad_norm"], "critic_grad_norm": c_info["grad_norm"],
            "tokens": r["tokens"],
            "flops": r["flops"],
        }
        if self.rollouts.with_reference:
            metrics["reward_ref"] = r["reward_ref"] / prompts
        else:
            metrics.pop("gate_rate")
        return metrics

    def state_dict(self) -> dict:
        return {"data": self.sampler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["data"])


def main(cfg: PPORunConfig) -> dict:
    return train(cfg, PPOTask)
