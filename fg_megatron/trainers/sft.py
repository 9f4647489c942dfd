"""SFT step: cross-entropy on response tokens (how a user makes ``pi0``).

    torchrun --nproc-per-node 2 tools/train_sft.py --tp 2
"""

from __future__ import annotations

import torch

from fg_megatron.config import SFTRunConfig
from fg_megatron.config.cli import resolve_path
from fg_megatron.data import MicroBatchStream, SFTDataset
from fg_megatron.losses import sft_loss
from fg_megatron.models.flops import training_flops
from fg_megatron.schedule import Batch
from fg_megatron.trainers.loop import Run, reduce_stats, train

SFT_SUM_KEYS = ("nll", "response_tokens", "samples", "tokens", "flops")


def loss_mask_with_prompt(batch: Batch) -> torch.Tensor:
    """Every position whose next token is real (prompt and response)."""
    s = batch["input_ids"].shape[1]
    return (torch.arange(s)[None, :] < (batch["lengths"][:, None] - 1)).to(batch["loss_mask"].dtype)


class SFTTask:
    name = "SFT"
    progress_keys = ("loss", "tokens_per_second")
    summary_keys = ("loss",)

    def __init__(self, run: Run) -> None:
        cfg = run.cfg
        self.run = run
        self.policy = run.load("policy", cfg.model.load, trainable=True)
        dataset = SFTDataset.from_file(resolve_path(cfg.data.train), run.tokenizer, cfg.data.max_prompt_length,
                                       cfg.data.max_response_length, format=cfg.data.format,
                                       chat_template=cfg.data.chat_template, **cfg.data.truncation())
        run.check_context(dataset)
        self.stream = MicroBatchStream.from_config(dataset, cfg.data, cfg.train, dp_size=run.ctx.dp,
                                                   dp_rank=run.ctx.dp_rank)
        self.train_on_prompt = cfg.sft.train_on_prompt

    def prepare(self, run: Run) -> None:
        pass

    def _loss(self, head, batch: Batch):
        """Summed NLL over the response tokens; megatron-core divides by the global token count."""
        logp = self.run.logprobs.tokens(head, batch["targets"], batch["loss_mask"])
        nll, ntok = sft_loss(logp, batch["loss_mask"])
        stats = {"nll": nll.detach(), "response_tokens": ntok, "samples": batch["input_ids"].shape[0],
                 "tokens": batch["lengths"].sum(),
                 "flops": float(training_flops(self.policy.arch, batch["lengths"].tolist()))}
        return nll, ntok, stats

    def step(self, step: int) -> dict:
        microbatches = self.stream.next_step()
        if self.train_on_prompt:
            for mb in microbatches:
                mb["loss_mask"] = loss_mask_with_prompt(mb)
        stats, info = self.policy.train_step(microbatches, self._loss)
        sums = reduce_stats(self.run.ctx, SFT_SUM_KEYS, stats)
        return {"loss": sums["nll"] / max(sums["response_tokens"], 1.0), "samples": sums["samples"],
                "tokens": sums["tokens"], "flops": sums["flops"], "lr": info["lr"], "grad_norm": info["grad_norm"]}

    def state_dict(self) -> dict:
        return {"data": self.stream.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state["data"])


def main(cfg: SFTRunConfig) -> dict:
    return train(cfg, SFTTask)
