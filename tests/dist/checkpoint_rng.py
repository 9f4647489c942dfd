"""Checkpoint RNG round trip and the save-time finiteness check, on every rank.

torchrun --nproc-per-node 2 tests/dist/checkpoint_rng.py --tp 2 --save DIR --out r.json

Draws python / numpy / torch / megatron-tracker numbers right after save_checkpoint,
scrambles every generator, load_checkpoint()s and draws again: the two must agree.
Then a NaN planted in one rank's weights must stop the next save on every rank
with latest unchanged.
"""

import argparse
import json
import random
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from fg_megatron import parallel
from fg_megatron.config import ModelConfig, OptimConfig
from fg_megatron.trainers.checkpointing import NonFiniteCheckpointError, load_checkpoint, save_checkpoint
from fg_megatron.trainers.parts import load_part

p = argparse.ArgumentParser()
p.add_argument("--tp", type=int, default=1)
p.add_argument("--save", required=True)
p.add_argument("--out", required=True)
args = p.parse_args()

ctx = parallel.initialize(args.tp, 1, seed=7)
part = load_part("policy", "assets/tiny/pi0", ctx, dtype=torch.float32, model_cfg=ModelConfig(), trainable=True,
                 optim=OptimConfig(lr=1e-3, warmup_steps=0, weight_decay=0.0), total_steps=4)
parts = {"policy": part}
state = {"task": {}, "trainer": "test", "config": {}}


def draws() -> list[float]:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    out = [random.random(), float(np.random.rand()), float(torch.rand(()))]
    with get_cuda_rng_tracker().fork():
        out.append(float(torch.rand(())))
    return out


torch.rand(5)  # move the generators away from their seeds
step_dir = save_checkpoint(parts, "policy", Path(args.save), 1, state)
after_save = draws()
random.seed(99)
np.random.seed(99)
torch.manual_seed(99)
scrambled = draws()
load_checkpoint(parts, "policy", step_dir)
after_load = draws()

with torch.no_grad():
    if ctx.rank == ctx.world_size - 1:
        next(part.module.parameters()).view(-1)[0] = float("nan")
error = None
try:
    save_checkpoint(parts, "policy", Path(args.save), 2, state)
except NonFiniteCheckpointError as exc:
    error = str(exc)
gathered = [None] * dist.get_world_size()
dist.all_gather_object(gathered, {"after_save": after_save, "after_load": after_load, "scrambled": scrambled,
                                  "error": error})
if ctx.rank == 0:
    Path(args.out).write_text(json.dumps(gathered))
parallel.shutdown()
