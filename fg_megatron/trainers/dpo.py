"""DPO step with the FlipGuard (or KD) constraint.

    torchrun --nproc-per-node 2 tools/train_dpo.py --tp 2

Chosen and rejected responses go through one forward (``[2b, s]``).  The
reference log-probs are either precomputed in a first pass over exactly the
micro-batches training will see (then the reference model is freed), or
computed online by a second, frozen model.  Computing them on the same
micro-batch shapes makes step 0 exact: policy == reference bit for bit, so the
implicit rewards are 0 and the FlipGuard gate (strict ``>``) is closed.

With ``data.eval`` and ``train.eval_every`` the held-out pairs are scored every
N steps and at the end (forward only, each DP replica a share, the same
log-prob and loss code as training; their reference log-probs are precomputed
with the training ones, or computed online): ``eval_loss``, ``eval_dpo_loss``,
``eval_reward_accuracy``, ``eval_reward_margin``, ``eval_gate_rate``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from fg_megatron.config import DPORunConfig
from fg_megatron.config.cli import resolve_path
from fg_megatron.data import MicroBatchStream, PreferenceDataset
from fg_megatron.losses import METRIC_SUM_KEYS, preference_loss
from fg_megatron.models.flops import sequences_forward_flops, training_flops
from fg_megatron.parallel import get_logger
from fg_megatron.schedule import Batch
from fg_megatron.trainers.loop import Run, owns_outputs, reduce_stats, train
from fg_megatron.trainers.parts import ModelPart, check_same_vocabulary

log = get_logger("dpo")

DPO_SUM_KEYS = METRIC_SUM_KEYS + ("tokens", "flops")
EVAL_KEYS = ("loss", "dpo_loss", "reward_accuracy", "reward_margin", "gate_rate")  # logged as eval_*


class DPOTask:
    name = "DPO"
    counts_epochs = True  # train.epochs is resolved from data.train before the policy is built
    progress_keys = ("loss", "dpo_loss", "gate_rate", "chosen_drop_rate", "reward_accuracy", "reward_margin")
    summary_keys = ("loss", "dpo_loss", "ce_loss", "gate_rate", "reward_accuracy", "reward_margin", "eval_loss",
                    "eval_reward_accuracy", "eval_gate_rate")

    def __init__(self, run: Run) -> None:
        cfg = run.cfg
        self.run = run
        self.cfg = cfg
        self.dataset = self._read(cfg.data.train)
        run.resolve_steps(len(self.dataset))
        self.policy = run.load("policy", cfg.model.load, trainable=True)
        run.check_context(self.dataset)
        self.stream = self._new_stream()
        self.reference_logps: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.eval_batches: Optional[list[Batch]] = None  # this DP replica's share of data.eval
        self.eval_reference_logps: list[tuple[torch.Tensor, torch.Tensor]] = []
        if cfg.data.eval and cfg.train.eval_every:
            eval_dataset = self._dataset(cfg.data.eval)
            mine = list(range(len(eval_dataset)))[run.ctx.dp_rank::run.ctx.dp]
            size = cfg.train.micro_batch_size
            self.eval_batches = [eval_dataset.collate(mine[i:i + size], pad_multiple=cfg.data.pad_multiple)
                                 for i in range(0, len(mine), size)]
        self.reference: Optional[ModelPart] = None  # online reference: a frozen part kept for the run

    def _read(self, path: str) -> PreferenceDataset:
        data = self.cfg.data
        return PreferenceDataset.from_file(resolve_path(path), self.run.tokenizer, data.max_prompt_length,
                                           data.max_response_length, format=data.format,
                                           chat_template=data.chat_template, **data.truncation())

    def _dataset(self, path: str) -> PreferenceDataset:
        dataset = self._read(path)
        self.run.check_context(dataset)
        return dataset

    def _new_stream(self) -> MicroBatchStream:
        return MicroBatchStream.from_config(self.dataset, self.cfg.data, self.cfg.train,
                                            dp_size=self.run.ctx.dp, dp_rank=self.run.ctx.dp_rank)

    # -- reference -----------------------------------------------------------

    def _load_reference(self) -> ModelPart:
        path = self.cfg.dpo.reference_load or self.cfg.model.load
        part = self.run.load("reference", path, trainable=False)
        check_same_vocabulary(part, self.policy, f"dpo.reference_load {path}")
        return part

    def _reference_forward(self, part: ModelPart, microbatches: list[Batch]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        def pair_logps(head, batch):
            seq, _ = self.run.logprobs.sequences(head, batch["targets"], batch["loss_mask"])
            b = seq.shape[0] // 2
            return seq[:b].detach(), seq[b:].detach()

        return part.forward(microbatches, pair_logps)

    def prepare(self, run: Run) -> None:
        cfg = self.cfg
        same_as_policy = (run.start_step == 0 and cfg.dpo.reference_load is None)
        if cfg.dpo.reference == "online":
            self.reference = self._load_reference()
            return
        part = self.policy if same_as_policy else self._load_reference()
        replay = self._new_stream()
        total = cfg.train.steps
        log.info("precomputing reference log-probs for steps %d..%d", run.start_step + 1, total)
        for step in range(1, total + 1):
            microbatches = replay.next_step()
            if step <= run.start_step:
                continue
            logps = self._reference_forward(part, microbatches)
            if run.ctx.is_last_stage:
                self.reference_logps[step] = logps
            if step % max(1, total // 10) == 0 or step == total:
                log.info("reference log-probs: %d/%d steps", step, total)
        if self.eval_batches is not None:
            logps = self._reference_forward(part, self.eval_batches)
            if run.ctx.is_last_stage:
                self.eval_reference_logps = logps
        if not same_as_policy:
            run.free("reference")

    # -- steps ---------------------------------------------------------------

    def _microbatches(self, step: int) -> list[Batch]:
        microbatches = self.stream.next_step()
        if self.reference is not None:
            refs = self._reference_forward(self.reference, microbatches)
        else:
            refs = self.reference_logps.pop(step, [])
        return self._with_reference(microbatches, refs)

    def _with_reference(self, microbatches: list[Batch], refs: list) -> list[Batch]:
        if self.run.ctx.is_last_stage:
            for mb, (chosen, rejected) in zip(microbatches, refs, strict=True):
                mb["ref_chosen"], mb["ref_rejected"] = chosen, rejected
        return microbatches

    def _loss(self, head, batch: Batch):
        """Summed per-sample losses; megatron-core divides by the global sample count."""
        dpo = self.cfg.dpo
        seq, counts = self.run.logprobs.sequences(head, batch["targets"], batch["loss_mask"])
        b = seq.shape[0] // 2
        out = preference_loss(seq[:b], seq[b:], batch["ref_chosen"], batch["ref_rejected"], counts[:b],
                              beta=dpo.beta, constraint=dpo.constraint, gamma=dpo.gamma,
                              epsilon=dpo.epsilon, loss_type=dpo.loss_type,
                              label_smoothing=dpo.label_smoothing, ce_reduction=dpo.ce_reduction,
                              rejected_token_counts=counts[b:])
        stats = {k: float(v) for k, v in out.metric_sums.items()}
        stats["tokens"] = float(batch["lengths"].sum())
        stats["flops"] = float(self._flops(batch))
        stats["gated_ids"] = [batch["ids"][i] for i in torch.nonzero(out.gate).flatten().tolist()]
        return out.losses.sum(), b, stats

    def _flops(self, batch: Batch) -> int:
        """Model FLOPs of one micro-batch's step: the policy's forward + backward over chosen and
        rejected, plus the online reference's forward (a precomputed reference runs in prepare
        and is not counted in any step)."""
        lengths = batch["lengths"].tolist()
        flops = training_flops(self.policy.arch, lengths)
        if self.reference is not None:
            flops += sequences_forward_flops(self.reference.arch, lengths)
        return flops

    def step(self, step: int) -> dict:
        ctx = self.run.ctx
        stats, info = self.policy.train_step(self._microbatches(step), self._loss)
        sums = reduce_stats(ctx, DPO_SUM_KEYS, stats)
        samples = max(sums["samples"], 1.0)
        metrics = {k: sums[k] / samples for k in METRIC_SUM_KEYS if k != "samples"}
        metrics.update(tokens=sums["tokens"], flops=sums["flops"], lr=info["lr"], grad_norm=info["grad_norm"])
        if self.cfg.train.log_gated_ids:
            gathered: list[Optional[list]] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, [i for s in stats for i in s["gated_ids"]] if owns_outputs(ctx) else [])
            metrics["gated_ids"] = sorted(i for part in gathered for i in (part or []))
        every = self.cfg.train.eval_every
        if self.eval_batches is not None and (step % every == 0 or step == self.cfg.train.steps):
            metrics.update({f"eval_{k}": v for k, v in self.evaluate().items()})
        return metrics

    def evaluate(self) -> dict[str, float]:
        """The preference loss and its metrics over every held-out pair, forward only."""
        if self.reference is not None:
            refs = self._reference_forward(self.reference, self.eval_batches)
        else:
            refs = self.eval_reference_logps
        batches = self._with_reference(self.eval_batches, refs)

        def score(head, batch):
            return self._loss(head, batch)[2]

        sums = reduce_stats(self.run.ctx, DPO_SUM_KEYS, self.policy.forward(batches, score))
        samples = max(sums["samples"], 1.0)
        return {k: sums[k] / samples for k in EVAL_KEYS}

    def state_dict(self) -> dict:
        return {"data": self.stream.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state["data"])


def main(cfg: DPORunConfig) -> dict:
    return train(cfg, DPOTask)
