"""Bytes of the tensors the trainer builds per rank -- parameters, megatron-core DDP grad
buffers, Adam states and fp32 master weights -- after one optimizer step, for
fg_megatron.planning to be compared against.

torchrun --nproc-per-node 8 tests/dist/plan_bytes.py --case DIR:float32 --case DIR2:bfloat16 --tp 2 --pp 2 --out r.json
"""

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist

from fg_megatron import parallel
from fg_megatron.config import ModelConfig, OptimConfig
from fg_megatron.logprobs import token_logprobs
from fg_megatron.schedule import position_ids_like
from fg_megatron.trainers.parts import load_part

p = argparse.ArgumentParser()
p.add_argument("--case", action="append", required=True, help="HF_DIR:DTYPE (torch dtype name)")
p.add_argument("--tp", type=int, default=2)
p.add_argument("--pp", type=int, default=2)
p.add_argument("--out", required=True)
args = p.parse_args()


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def measure(ctx, path: str, dtype: torch.dtype) -> dict:
    part = load_part("policy", path, ctx, dtype=dtype, model_cfg=ModelConfig(), trainable=True,
                     optim=OptimConfig(lr=1e-4, warmup_steps=0), total_steps=1)
    engine = part.engine
    g = torch.Generator().manual_seed(1 + ctx.dp_rank)
    ids = torch.randint(3, part.arch.vocab_size, (2, 9), generator=g)
    x = ids[:, :-1]
    mbs = [{"input_ids": x, "position_ids": position_ids_like(x), "targets": ids[:, 1:],
            "loss_mask": torch.ones_like(x, dtype=torch.bool)} for _ in range(2)]

    def loss_fn(head, batch):
        logp = token_logprobs(head, batch["targets"], batch["loss_mask"], impl="torch")
        return -logp.sum(), batch["loss_mask"].sum(), {}

    _, info = part.train_step(mbs, loss_fn)
    model_params = list(engine.module.parameters())
    ids_model = {id(t) for t in model_params}
    buffers = list(engine.model.buffers) + list(getattr(engine.model, "expert_parallel_buffers", []))
    states, masters = [], []
    for opt in getattr(engine.optimizer, "chained_optimizers", [engine.optimizer]):
        inner = opt.optimizer
        for group in inner.param_groups:
            # 16-bit training: the inner optimizer steps fp32 master copies, not the model's params
            masters += [q for q in group["params"] if id(q) not in ids_model]
        for state in inner.state.values():
            # torch Adam's per-tensor "step" scalar is left out (fused GPU Adams keep one per group)
            states += [v for k, v in state.items() if k != "step" and torch.is_tensor(v)]
    out = {"pp_rank": ctx.pp_rank, "tp_rank": ctx.tp_rank, "dp_rank": ctx.dp_rank, "skipped": info["skipped"],
           "params_bytes": nbytes(model_params), "grads_bytes": nbytes(b.grad_data for b in buffers),
           "optimizer_bytes": nbytes(states) + nbytes(masters), "n_states": len(states), "n_masters": len(masters),
           "param_names": [n for n, _ in engine.module.named_parameters()]}
    return out


ctx = parallel.initialize(args.tp, args.pp, seed=1)
result = {}
for case in args.case:
    path, _, name = case.rpartition(":")
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, measure(ctx, path, getattr(torch, name)))
    result[case] = rows
if dist.get_rank() == 0:
    Path(args.out).write_text(json.dumps(result, indent=1))
parallel.shutdown()
