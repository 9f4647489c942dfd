"""The direct decoder against megatron-core's modules, at TP=2 and TP=1 (DP=2), for several models.

torchrun --nproc-per-node 2 tests/dist/direct_decoder.py --models DIR [DIR ...] --out result.json

For each model and layout: a left-padded batch (equal lengths for a sliding-window
model) is prefilled, then ``STEPS`` fixed tokens are fed one at a time.  At every
step the decoder's last-position logits are compared with a full forward of the
whole sequence through the schedule (no cache).  Also greedy and sampled ids and
entropies of ``generate_ids`` with each backend.
"""

import argparse
import json

import torch

from fg_megatron import parallel
from fg_megatron.checkpoint.load import load_model
from fg_megatron.data.collate import collate_prompts
from fg_megatron.generation import SamplingParams, generate_ids, row_seed
from fg_megatron.generation.direct import DirectDecoder
from fg_megatron.generation.engine import _step_logits
from fg_megatron.generation.masks import prefill_mask

STEPS = 12

p = argparse.ArgumentParser()
p.add_argument("--models", nargs="+", required=True)
p.add_argument("--out", required=True)
args = p.parse_args()
results = {}
for tp in (2, 1):
    ctx = parallel.initialize(tp, 1, seed=1)
    for path in args.models:
        model, arch, _ = load_model(path, ctx)
        model.eval()
        g = torch.Generator().manual_seed(5)
        lengths = (6, 6, 6) if arch.sliding_window else (3, 11, 7)
        prompts = [[1] + torch.randint(3, 900, (n - 1,), generator=g).tolist() for n in lengths]
        feed = torch.randint(3, 900, (len(prompts), STEPS), generator=g)
        batch = collate_prompts(prompts, 0, side="left")
        tokens, valid, positions = batch["input_ids"], batch["attention_mask"].bool(), batch["position_ids"]
        decoder = DirectDecoder(model, ctx.tp_group if tp > 1 else None, len(prompts), tokens.shape[1] + STEPS)
        errors = []
        with torch.no_grad():
            for step in range(STEPS + 1):
                direct = decoder.prefill(tokens, valid) if step == 0 else decoder.decode(tokens[:, -1:], valid)
                full = _step_logits(model, ctx, tokens, positions, prefill_mask(valid), None)
                errors.append(float((direct - full).abs().max() / full.abs().max()))
                if step < STEPS:
                    tokens = torch.cat([tokens, feed[:, step:step + 1]], dim=1)
                    valid = torch.cat([valid, torch.ones_like(valid[:, :1])], dim=1)
                    positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
        common = dict(eos_ids=[], pad_id=0, max_new_tokens=16, return_entropy=True)
        sample = SamplingParams(temperature=0.9, top_p=0.95, top_k=50)
        seeds = [row_seed(7, i) for i in range(len(prompts))]
        runs = {}
        for backend in ("direct", "schedule"):
            greedy = generate_ids(model, ctx, prompts, backend=backend, **common)
            sampled = generate_ids(model, ctx, prompts, backend=backend, sampling=sample, seeds=seeds, **common)
            runs[backend] = {"greedy": [x.ids for x in greedy], "sampled": [x.ids for x in sampled],
                             "entropy": [x.entropy for x in greedy]}
        results[f"{arch.family}:{path}:tp{tp}"] = {"relative_logit_error": errors, **runs}
if ctx.is_main:
    with open(args.out, "w") as f:
        json.dump(results, f)
parallel.shutdown()
