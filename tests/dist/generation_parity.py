"""Greedy and sampled generation at TP=2, PP=2 and TP=1 (DP=2) from one HF directory.

torchrun --nproc-per-node 2 tests/dist/generation_parity.py --load DIR --prompts P.json --eos E --out result.json
    [--layouts tp2,pp2,tp1]

For each layout: greedy ids for the whole left-padded batch with and without the
KV cache (each backend), greedy ids of each prompt alone, and sampled ids for two seeds.
"""

import argparse
import json
import time

from fg_megatron import parallel
from fg_megatron.checkpoint.load import load_model
from fg_megatron.generation import SamplingParams, generate_ids, row_seed

p = argparse.ArgumentParser()
p.add_argument("--load", required=True)
p.add_argument("--prompts", required=True)
p.add_argument("--eos", type=int, required=True)
p.add_argument("--max-new-tokens", type=int, default=12)
p.add_argument("--out", required=True)
p.add_argument("--layouts", default="tp2,pp2,tp1", help="a subset of tp2,pp2,tp1")
args = p.parse_args()
prompts = json.load(open(args.prompts))
common = dict(eos_ids=[args.eos], pad_id=0, max_new_tokens=args.max_new_tokens)
sample = SamplingParams(temperature=0.9, top_p=0.95, top_k=50)
results = {}
LAYOUTS = {"tp2": (2, 1), "pp2": (1, 2), "tp1": (1, 1)}
for name in args.layouts.split(","):
    tp, pp = LAYOUTS[name]
    ctx = parallel.initialize(tp, pp, seed=1)
    model, _, _ = load_model(args.load, ctx)
    model.eval()
    t0 = time.perf_counter()
    cached = generate_ids(model, ctx, prompts, **common)  # the direct decoder at PP=1
    t1 = time.perf_counter()
    scheduled = generate_ids(model, ctx, prompts, backend="schedule", **common)  # megatron-core's KV cache
    nocache = generate_ids(model, ctx, prompts, use_cache=False, **common)
    t2 = time.perf_counter()
    alone = [generate_ids(model, ctx, [q], **common)[0] for q in prompts]
    sampled = {str(seed): [g.ids for g in generate_ids(model, ctx, prompts, sampling=sample,
                                                      seeds=[row_seed(seed, i) for i in range(len(prompts))],
                                                      **common)]
               for seed in (1, 2)}
    # the same rows in another batch order: a row's sample depends only on its own seed
    rev = generate_ids(model, ctx, prompts[::-1], sampling=sample,
                       seeds=[row_seed(1, i) for i in reversed(range(len(prompts)))], **common)
    results[name] = {"cached": [g.ids for g in cached], "finish": [g.finish_reason for g in cached],
                     "scheduled": [g.ids for g in scheduled],
                     "nocache": [g.ids for g in nocache], "alone": [g.ids for g in alone],
                     "sampled": sampled, "sampled_reversed": [g.ids for g in rev][::-1],
                     "seconds_cache": t1 - t0, "seconds_nocache": t2 - t1}
if ctx.is_main:
    with open(args.out, "w") as f:
        json.dump(results, f)
parallel.shutdown()
