"""DPO step with the FlipGuard (or KD) constraint.

    torchrun --nproc-per-node 2 tools/train_dpo.py --tp 2

Chosen and rejected responses go through one forward (``[2b, s]``).  The
reference log-probs are either precomputed in a first pass over exactly the
micro-batches training will see (then the reference model is freed), or
computed online by a second, frozen model.  Computing them on the same
micro-batch shapes makes step 0 exact: policy == reference bit for bit, so the
implicit rewards are 0 and the FlipGuard gate (strict ``>``) is closed.
"""

from __future__ import annotations

import gc
from typing import Optional

import torch
import torch.distributed as dist

from fg_megatron.checkpoint.load import load_model
from fg_megatron.checkpoint.mapping import CheckpointMismatchError
from fg_megatron.config import DPORunConfig
from fg_megatron.config.cli import resolve_path
from fg_megatron.data import MicroBatchStream, PreferenceDataset
from fg_megatron.logprobs import token_logprobs
from fg_megatron.losses import METRIC_SUM_KEYS, preference_loss
from fg_megatron.parallel import get_logger
from fg_megatron.schedule import Batch, run_microbatches
from fg_megatron.trainers.loop import Run, owns_outputs, reduce_sums, train

log = get_logger("dpo")

DPO_SUM_KEYS = METRIC_SUM_KEYS + ("tokens",)


def pair_logps(head, batch: Batch, tp_group, impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence log-likelihoods ``[2b]`` (chosen rows first) and response token counts."""
    mask = batch["loss_mask"]
    logp = token_logprobs(head, batch["targets"], mask, tp_group=tp_group, impl=impl)
    return (logp * mask).sum(dim=-1), mask.sum(dim=-1)


class DPOTask:
    name = "DPO"
    progress_keys = ("loss", "dpo_loss", "gate_rate", "chosen_drop_rate", "reward_accuracy", "reward_margin")

    def __init__(self, run: Run) -> None:
        cfg = run.cfg
        self.run = run
        self.cfg = cfg
        self.impl = cfg.model.logprob_impl
        self.dataset = PreferenceDataset.from_file(resolve_path(cfg.data.train), run.tokenizer,
                                                   cfg.data.max_prompt_length, cfg.data.max_response_length,
                                                   format=cfg.data.format,
                                                   chat_template=cfg.data.chat_template)
        self.stream = self._new_stream()
        self.reference_logps: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.reference_model = None
        self.gated_ids: list[str] = []

    def _new_stream(self) -> MicroBatchStream:
        return MicroBatchStream.from_config(self.dataset, self.cfg.data, self.cfg.train,
                                            dp_size=self.run.ctx.dp, dp_rank=self.run.ctx.dp_rank)

    # -- reference -----------------------------------------------------------

    def _reference_path(self) -> str:
        return resolve_path(self.cfg.dpo.reference_load or self.cfg.model.load)

    def _load_reference(self):
        model, arch, _ = load_model(self._reference_path(), self.run.ctx, dtype=self.run.dtype,
                                    vocab_pad_multiple=self.cfg.model.vocab_pad_multiple)
        if (arch.vocab_size, arch.family) != (self.run.arch.vocab_size, self.run.arch.family):
            raise CheckpointMismatchError(f"dpo.reference_load {self._reference_path()}: {arch.family} with vocabulary "
                             f"{arch.vocab_size} does not match the policy ({self.run.arch.family}, "
                             f"{self.run.arch.vocab_size})")
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        return model

    def _reference_forward(self, model, microbatches: list[Batch]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        ctx = self.run.ctx

        def head(head, batch):
            seq, _ = pair_logps(head, batch, ctx.tp_group, self.impl)
            b = seq.shape[0] // 2
            return torch.zeros(()), {"chosen": seq[:b].detach(), "rejected": seq[b:].detach()}

        out = run_microbatches(model, microbatches, head, forward_only=True)
        return [(o["chosen"], o["rejected"]) for o in out]

    def prepare(self, run: Run) -> None:
        cfg = self.cfg
        same_as_policy = (run.start_step == 0 and cfg.dpo.reference_load is None)
        if cfg.dpo.reference == "online":
            self.reference_model = self._load_reference()
            return
        model = run.engine.module if same_as_policy else self._load_reference()
        replay = self._new_stream()
        total = cfg.train.steps
        log.info("precomputing reference log-probs for steps %d..%d", run.start_step + 1, total)
        for step in range(1, total + 1):
            microbatches = replay.next_step()
            if step <= run.start_step:
                continue
            logps = self._reference_forward(model, microbatches)
            if run.ctx.is_last_stage:
                self.reference_logps[step] = logps
            if step % max(1, total // 10) == 0 or step == total:
                log.info("reference log-probs: %d/%d steps", step, total)
        if not same_as_policy:
            del model
            gc.collect()

    # -- steps ---------------------------------------------------------------

    def next_microbatches(self, step: int) -> list[Batch]:
        microbatches = self.stream.next_step()
        if self.reference_model is not None:
            refs = self._reference_forward(self.reference_model, microbatches)
        else:
            refs = self.reference_logps.pop(step, [])
        if self.run.ctx.is_last_stage:
            for mb, (chosen, rejected) in zip(microbatches, refs, strict=True):
                mb["ref_chosen"], mb["ref_rejected"] = chosen, rejected
        return microbatches

    def head_fn(self, step: int, microbatches: list[Batch]):
        ctx, dpo = self.run.ctx, self.cfg.dpo
        # The schedule divides by the micro-batch count, DP averages: see losses.preference.
        num_samples = self.cfg.train.global_batch_size / (len(microbatches) * ctx.dp)

        def head(head, batch):
            seq, counts = pair_logps(head, batch, ctx.tp_group, self.impl)
            b = seq.shape[0] // 2
            out = preference_loss(seq[:b], seq[b:], batch["ref_chosen"], batch["ref_rejected"], counts[:b],
                                  beta=dpo.beta, constraint=dpo.constraint, gamma=dpo.gamma,
                                  epsilon=dpo.epsilon, loss_type=dpo.loss_type,
                                  label_smoothing=dpo.label_smoothing, ce_reduction=dpo.ce_reduction,
                                  num_samples=num_samples, rejected_token_counts=counts[b:])
            stats = {k: float(v) for k, v in out.metric_sums.items()}
            stats["tokens"] = float(batch["lengths"].sum())
            stats["gated_ids"] = [batch["ids"][i] for i in torch.nonzero(out.gate).flatten().tolist()]
            return out.loss, stats

        return head

    def step_metrics(self, step: int, stats: list[dict], microbatches: list[Batch]) -> dict:
        ctx = self.run.ctx
        mine = None
        if owns_outputs(ctx):
            mine = {k: sum(s[k] for s in stats) for k in DPO_SUM_KEYS}
        sums = reduce_sums(ctx, DPO_SUM_KEYS, mine)
        samples = max(sums["samples"], 1.0)
        metrics = {k: sums[k] / samples for k in METRIC_SUM_KEYS if k != "samples"}
        metrics["tokens"] = sums["tokens"]
        if self.cfg.train.log_gated_ids:
            gathered: list[Optional[list]] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, [i for s in stats for i in s["gated_ids"]] if owns_outputs(ctx) else [])
            metrics["gated_ids"] = sorted(i for part in gathered for i in (part or []))
        return metrics

    def state_dict(self) -> dict:
        return {"data": self.stream.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state["data"])


def main(cfg: DPORunConfig) -> dict:
    return train(cfg, DPOTask)
