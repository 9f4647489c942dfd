"""Logits of one checkpoint built with Transformer Engine's layer spec and with
megatron-core's local spec (one process, CUDA, bf16).

python tests/dist/te_logits.py --load HF_DIR --out result.json
"""

import argparse
import json

import torch

from fg_megatron import parallel
from fg_megatron.checkpoint.load import load_model
from fg_megatron.logprobs import full_logits
from fg_megatron.schedule import position_ids_like, run_microbatches

p = argparse.ArgumentParser()
p.add_argument("--load", required=True)
p.add_argument("--out", required=True)
args = p.parse_args()

ctx = parallel.initialize(1, 1, seed=1)
g = torch.Generator().manual_seed(7)
ids = torch.randint(0, 1000, (3, 33), generator=g).cuda()
mbs = [{"input_ids": ids[i:i + 1], "position_ids": position_ids_like(ids[i:i + 1])} for i in range(3)]
logits = {}
for use_te in (False, True):
    model, arch, _ = load_model(args.load, ctx, dtype=torch.bfloat16, use_te=use_te)
    model.eval()
    out = run_microbatches(model, mbs, lambda head, b: {"logits": full_logits(head, ctx.tp_group)},
                           forward_only=True)
    logits[use_te] = torch.cat([o["logits"] for o in out]).float()
    del model
local, te = logits[False], logits[True]
result = {"max_abs_diff": (te - local).abs().max().item(), "local_std": local.std().item(),
          "argmax_agreement": (te.argmax(-1) == local.argmax(-1)).float().mean().item(),
          "shape": list(local.shape)}
with open(args.out, "w") as f:
    json.dump(result, f)
parallel.shutdown()
