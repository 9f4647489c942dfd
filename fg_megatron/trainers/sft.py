"""SFT step: cross-entropy on response tokens (how a user makes ``pi0``).

    torchrun --nproc-per-node 2 tools/train_sft.py --tp 2
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from fg_megatron.config import SFTRunConfig
from fg_megatron.config.cli import resolve_path
from fg_megatron.data import MicroBatchStream, SFTDataset
from fg_megatron.logprobs import token_logprobs
from fg_megatron.losses import sft_loss
from fg_megatron.schedule import Batch
from fg_megatron.trainers.loop import Run, owns_outputs, reduce_sums, train

SFT_SUM_KEYS = ("nll", "response_tokens", "samples", "tokens")


def loss_mask_with_prompt(batch: Batch) -> torch.Tensor:
    """Every position whose next token is real (prompt and response)."""
    s = batch["input_ids"].shape[1]
    return (torch.arange(s)[None, :] < (batch["lengths"][:, None] - 1)).to(batch["loss_mask"].dtype)


class SFTTask:
    name = "SFT"
    progress_keys = ("loss", "tokens_per_second")

    def __init__(self, run: Run) -> None:
        cfg = run.cfg
        self.run = run
        dataset = SFTDataset.from_file(resolve_path(cfg.data.train), run.tokenizer, cfg.data.max_prompt_length,
                                       cfg.data.max_response_length, format=cfg.data.format,
                                       chat_template=cfg.data.chat_template)
        self.stream = MicroBatchStream.from_config(dataset, cfg.data, cfg.train, dp_size=run.ctx.dp,
                                                   dp_rank=run.ctx.dp_rank)
        self.impl = cfg.model.logprob_impl
        self.train_on_prompt = cfg.sft.train_on_prompt

    def prepare(self, run: Run) -> None:
        pass

    def next_microbatches(self, step: int) -> list[Batch]:
        mbs = self.stream.next_step()
        if self.train_on_prompt:
            for mb in mbs:
                mb["loss_mask"] = loss_mask_with_prompt(mb)
        return mbs

    def head_fn(self, step: int, microbatches: list[Batch]):
        ctx = self.run.ctx
        local = torch.tensor(float(sum(mb["loss_mask"].sum() for mb in microbatches)), dtype=torch.float64,
                             device=ctx.device)
        if ctx.dp > 1:
            dist.all_reduce(local, group=ctx.dp_group)
        # The schedule divides by the micro-batch count and DP averages: undo both so the
        # gradient is that of the token-mean NLL over the whole global batch.
        scale = len(microbatches) * ctx.dp / max(local.item(), 1.0)

        def head(head, batch):
            logp = token_logprobs(head, batch["targets"], batch["loss_mask"], tp_group=ctx.tp_group,
                                  impl=self.impl)
            nll, ntok = sft_loss(logp, batch["loss_mask"])
            stats = {"nll": nll.detach(), "response_tokens": ntok, "samples": batch["input_ids"].shape[0],
                     "tokens": batch["lengths"].sum()}
            return nll * scale, stats

        return head

    def step_metrics(self, step: int, stats: list[dict], microbatches: list[Batch]) -> dict:
        mine = None
        if owns_outputs(self.run.ctx):
            mine = {k: sum(float(s[k]) for s in stats) for k in SFT_SUM_KEYS}
        sums = reduce_sums(self.run.ctx, SFT_SUM_KEYS, mine)
        return {"loss": sums["nll"] / max(sums["response_tokens"], 1.0), "samples": sums["samples"],
                "tokens": sums["tokens"]}

    def state_dict(self) -> dict:
        return {"data": self.stream.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state["data"])


def main(cfg: SFTRunConfig) -> dict:
    return train(cfg, SFTTask)
