"""A run with several named models: a trainable policy (LM head), a trainable critic
(value head seeded from the same LM) and a frozen reference, with an optimizer step of
each trainable part in every iteration -- the shape PPO has.  Used to check that a
checkpoint holds every trainable part and that --resume restores them all.

torchrun --nproc-per-node N tests/dist/two_parts.py --tp T --save DIR --steps S [--resume]
"""

import argparse

from fg_megatron.config import SFTRunConfig, load_config
from fg_megatron.config.cli import resolve_path
from fg_megatron.data import MicroBatchStream, SFTDataset
from fg_megatron.models.gpt import sequence_scores
from fg_megatron.trainers.loop import Run, reduce_stats, train

p = argparse.ArgumentParser()
p.add_argument("--tp", type=int, default=1)
p.add_argument("--pp", type=int, default=1)
p.add_argument("--save", required=True)
p.add_argument("--steps", type=int, default=4)
p.add_argument("--resume", action="store_true")
args = p.parse_args()

KEYS = ("nll", "ntok", "sq", "rows", "ref_nll", "tokens")


class TwoPartTask:
    name = "two-part"
    progress_keys = ("policy_loss", "critic_loss")
    summary_keys = ("policy_loss", "critic_loss")

    def __init__(self, run: Run) -> None:
        cfg = run.cfg
        self.run = run
        self.policy = run.load("policy", cfg.model.load, trainable=True)
        self.critic = run.load("critic", cfg.model.load, trainable=True, head="value")
        self.reference = run.load("reference", cfg.model.load, trainable=False)
        data = SFTDataset.from_file(resolve_path(cfg.data.train), run.tokenizer, 32, 16, format="sft")
        self.stream = MicroBatchStream.from_config(data, cfg.data, cfg.train, dp_size=run.ctx.dp,
                                                   dp_rank=run.ctx.dp_rank)

    def prepare(self, run: Run) -> None:
        pass

    def _policy_loss(self, head, batch):
        logp, ntok = self.run.logprobs.sequences(head, batch["targets"], batch["loss_mask"])
        nll = -logp.sum()
        return nll, ntok.sum(), {"nll": float(nll), "ntok": float(ntok.sum()), "tokens": float(batch["lengths"].sum())}

    def _critic_loss(self, head, batch):
        scores = sequence_scores(head.values, batch["lengths"].to(head.values.device))
        sq = ((scores - 0.5) ** 2).sum()
        return sq, scores.shape[0], {"sq": float(sq), "rows": float(scores.shape[0])}

    def _reference(self, head, batch):
        logp, _ = self.run.logprobs.sequences(head, batch["targets"], batch["loss_mask"])
        return {"ref_nll": float(-logp.sum())}

    def step(self, step: int) -> dict:
        mbs = self.stream.next_step()
        ref = self.reference.forward(mbs, self._reference)
        p_stats, p_info = self.policy.train_step(mbs, self._policy_loss)
        c_stats, c_info = self.critic.train_step(mbs, self._critic_loss)
        stats = [{**a, **b, **c} for a, b, c in zip(p_stats, c_stats, ref)] if p_stats else []
        sums = reduce_stats(self.run.ctx, KEYS, stats)
        return {"policy_loss": sums["nll"] / sums["ntok"], "critic_loss": sums["sq"] / sums["rows"],
                "reference_nll": sums["ref_nll"] / sums["ntok"], "policy_grad_norm": p_info["grad_norm"],
                "critic_grad_norm": c_info["grad_norm"], "critic_lr": c_info["lr"], "tokens": sums["tokens"]}

    def state_dict(self) -> dict:
        return {"data": self.stream.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state["data"])


overrides = [("parallel.tp", args.tp), ("parallel.pp", args.pp), ("train.save", args.save),
             ("train.steps", args.steps), ("train.save_every", 2), ("train.global_batch_size", 8),
             ("train.micro_batch_size", 2), ("train.tensorboard", False), ("optim.lr", 1e-3),
             ("data.train", "assets/tiny/data/sft_train.jsonl"), ("data.format", "sft"),
             ("data.pad_multiple", 1), ("train.resume", args.resume)]
train(load_config(SFTRunConfig, None, overrides), TwoPartTask)
