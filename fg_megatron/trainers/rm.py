"""Reward-model training: the Bradley-Terry pairwise loss of paper eq. 1.

    torchrun --nproc-per-node 2 tools/train_rm.py --tp 2

A value-head model (``model.head=value``: a causal-LM checkpoint gets a
zero-initialised head) scores ``prompt + chosen`` and ``prompt + rejected`` in
one forward (``[2b, s]``, chosen rows first); a sequence's reward is the value
at its last real token, as transformers' ``*ForSequenceClassification`` pools
it.  ``rm.margin`` subtracts each pair's ``margin`` field inside the sigmoid
and ``rm.center_rewards_coefficient`` adds TRL's centering term
(:mod:`fg_megatron.losses.reward`).  With ``data.eval`` and ``train.eval_every``
the held-out pairs are scored every N steps and at the end (``eval_accuracy``,
``eval_loss``, ``eval_margin``).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from fg_megatron.config import ConfigError, RMRunConfig
from fg_megatron.config.cli import resolve_path
from fg_megatron.data import DataFormatError, MicroBatchStream, PreferenceDataset
from fg_megatron.losses import REWARD_METRIC_KEYS, REWARD_SUM_KEYS, reward_loss
from fg_megatron.models.flops import training_flops
from fg_megatron.models.gpt import sequence_scores
from fg_megatron.parallel import get_logger
from fg_megatron.schedule import Batch
from fg_megatron.trainers.loop import Run, reduce_stats, train

log = get_logger("rm")

RM_SUM_KEYS = REWARD_SUM_KEYS + ("tokens", "flops")


def pair_margins(dataset: PreferenceDataset) -> list[float]:
    """Each pair's ``margin`` field (a finite number), checked up front with file and line."""
    out = []
    for record in dataset.records:
        value = record.meta.get("margin")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            path, _, line = record.source.rpartition(":")
            raise DataFormatError(path, int(line) if line.isdigit() else None,
                                  f"rm.margin=true needs a finite number, got {value!r}", "margin")
        out.append(float(value))
    return out


class RewardModelTask:
    name = "RM"
    progress_keys = ("loss", "accuracy", "margin", "eval_accuracy")
    summary_keys = ("loss", "accuracy", "margin", "reward_chosen", "reward_rejected", "eval_accuracy")

    def __init__(self, run: Run) -> None:
        cfg = run.cfg
        self.run = run
        self.cfg = cfg
        self.model = run.load("reward", cfg.model.load, trainable=True, head=cfg.model.head)
        if self.model.arch.head != "value":
            raise ConfigError(f"model.head={cfg.model.head!r}: train_rm trains a value-head model (model.head=value)")
        self.dataset = self._dataset(cfg.data.train)
        self.margins = pair_margins(self.dataset) if cfg.rm.margin else None
        self.stream = MicroBatchStream.from_config(self.dataset, cfg.data, cfg.train, dp_size=run.ctx.dp,
                                                   dp_rank=run.ctx.dp_rank)
        self.eval_dataset: Optional[PreferenceDataset] = None
        if cfg.data.eval and cfg.train.eval_every:
            self.eval_dataset = self._dataset(cfg.data.eval)

    def _dataset(self, path: str) -> PreferenceDataset:
        data = self.cfg.data
        dataset = PreferenceDataset.from_file(resolve_path(path), self.run.tokenizer, data.max_prompt_length,
                                              data.max_response_length, format=data.format,
                                              chat_template=data.chat_template, **data.truncation())
        self.run.check_context(dataset)
        return dataset

    def prepare(self, run: Run) -> None:
        pass

    def _loss(self, head, batch: Batch):
        """Summed per-pair losses; megatron-core divides by the global pair count."""
        scores = sequence_scores(head.values, batch["lengths"].to(head.values.device))
        b = scores.shape[0] // 2
        out = reward_loss(scores[:b], scores[b:], batch.get("margin"),
                          center_coefficient=self.cfg.rm.center_rewards_coefficient)
        stats = {k: float(v) for k, v in out.metric_sums.items()}
        stats["tokens"] = float(batch["lengths"].sum())
        stats["flops"] = float(training_flops(self.model.arch, batch["lengths"].tolist()))  # forward + backward
        return out.losses.sum(), b, stats

    def step(self, step: int) -> dict:
        microbatches = self.stream.next_step()
        if self.margins is not None:
            for mb in microbatches:
                mb["margin"] = torch.tensor([self.margins[i] for i in mb["sample_idx"].tolist()])
        stats, info = self.model.train_step(microbatches, self._loss)
        sums = reduce_stats(self.run.ctx, RM_SUM_KEYS, stats)
        metrics = self._means(sums)
        metrics.update(flops=sums["flops"], lr=info["lr"], grad_norm=info["grad_norm"])
        every = self.cfg.train.eval_every
        if self.eval_dataset is not None and (step % every == 0 or step == self.cfg.train.steps):
            metrics.update({f"eval_{k}": v for k, v in self.evaluate().items()})
        return metrics

    @staticmethod
    def _means(sums: dict[str, float]) -> dict:
        samples = max(sums["samples"], 1.0)
        metrics = {k: sums[k] / samples for k in REWARD_METRIC_KEYS}
        metrics["tokens"] = sums["tokens"]
        return metrics

    def evaluate(self) -> dict[str, float]:
        """Loss, accuracy and margin over every held-out pair (each DP rank scores a share)."""
        ctx, data = self.run.ctx, self.cfg.data
        mine = list(range(len(self.eval_dataset)))[ctx.dp_rank::ctx.dp]
        size = self.cfg.train.micro_batch_size
        batches = [self.eval_dataset.collate(mine[i:i + size], pad_multiple=data.pad_multiple)
                   for i in range(0, len(mine), size)]

        def score(head, batch):
            return self._loss(head, batch)[2]

        sums = reduce_stats(ctx, RM_SUM_KEYS, self.model.forward(batches, score))
        metrics = self._means(sums)
        return {k: metrics[k] for k in ("loss", "accuracy", "margin")}

    def state_dict(self) -> dict:
        return {"data": self.stream.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state["data"])


def main(cfg: RMRunConfig) -> dict:
    return train(cfg, RewardModelTask)
