"""TP=2 log-probs and gradients of the tiny GQA Llama with and without sequence parallelism
(NCCL + Transformer Engine only: megatron-core's local spec asserts under it).

torchrun --nproc-per-node 2 tests/dist/sequence_parallel.py --out r.json
"""

import argparse
import json

import torch
import torch.distributed as dist

from fg_megatron import parallel
from fg_megatron.checkpoint.mapping import megatron_from_hf, stage_shards
from fg_megatron.logprobs import token_logprobs
from fg_megatron.models import arch_from_hf_config, family_module
from fg_megatron.models.gpt import build_gpt_model, padded_vocab_size, stage_state_dict
from fg_megatron.schedule import position_ids_like
from tiny_models import hf_model

p = argparse.ArgumentParser()
p.add_argument("--out", required=True)
args = p.parse_args()

TP = 2
ctx = parallel.initialize(TP, 1, seed=1)
hf = hf_model("llama_gqa_untied")
arch = arch_from_hf_config(hf.config.to_dict())
adapter = family_module(arch.family).state_dict_adapter(arch)
shards = dict(stage_shards(megatron_from_hf(adapter, hf.state_dict().get), adapter, tp=TP, tp_rank=ctx.tp_rank,
                           pp=1, pp_rank=0, padded_vocab=padded_vocab_size(arch.vocab_size, TP)))
g = torch.Generator().manual_seed(5)
ids = torch.randint(0, arch.vocab_size, (3, 16), generator=g).to(ctx.device)  # 16: divisible by TP
targets = torch.randint(0, arch.vocab_size, (3, 16), generator=g).to(ctx.device)
mask = torch.ones(3, 16, dtype=torch.bool, device=ctx.device)
mask[1, 9:] = False
out = {}
for sp in (False, True):
    model = build_gpt_model(arch, tp=TP, pp=1, pp_rank=0, sequence_parallel=sp)
    for name, param in stage_state_dict(model).items():  # TE's fused-norm names read as the local spec's
        if name in shards:
            with torch.no_grad():
                param.copy_(shards[name])
    logp = token_logprobs(model(ids, position_ids_like(ids), None), targets, mask, tp_group=ctx.tp_group)
    (-(logp * mask).sum()).backward()
    for param in model.parameters():  # what finalize_model_grads does for SP's replicated norm weights
        if getattr(param, "sequence_parallel", False):
            dist.all_reduce(param.grad, group=ctx.tp_group)
    out[sp] = (logp.detach().cpu(), {n: p.grad.detach().cpu().clone() for n, p in model.named_parameters()})
logp_diff = (out[True][0] - out[False][0]).abs().max().item()
grad_diff = max((out[True][1][n] - g).abs().max().item() for n, g in out[False][1].items())
if ctx.rank == 0:
    with open(args.out, "w") as f:
        json.dump({"logp_max_abs_diff": logp_diff, "grad_max_abs_diff": grad_diff}, f)
parallel.shutdown()
