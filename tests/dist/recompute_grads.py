"""Loss and per-parameter gradients of one forward + backward of the tiny GQA Llama built by
the project's own builder, for each ``model.recompute`` mode; counts megatron-core's
checkpointed forwards so a mode that silently recomputed nothing cannot pass.

torchrun --nproc-per-node 1 tests/dist/recompute_grads.py --out r.json
"""

import argparse
import json

import torch

from fg_megatron import parallel
from fg_megatron.checkpoint.mapping import megatron_from_hf, stage_shards
from fg_megatron.logprobs import token_logprobs
from fg_megatron.models import arch_from_hf_config, family_module
from fg_megatron.models.gpt import build_gpt_model, padded_vocab_size
from fg_megatron.schedule import position_ids_like
from tiny_models import hf_model

p = argparse.ArgumentParser()
p.add_argument("--out", required=True)
args = p.parse_args()

ctx = parallel.initialize(1, 1, seed=1)
hf = hf_model("llama_gqa_untied")
arch = arch_from_hf_config(hf.config.to_dict())
adapter = family_module(arch.family).state_dict_adapter(arch)
shards = dict(stage_shards(megatron_from_hf(adapter, hf.state_dict().get), adapter, tp=1, tp_rank=0, pp=1, pp_rank=0,
                           padded_vocab=padded_vocab_size(arch.vocab_size, 1)))

from megatron.core.tensor_parallel import random as mcore_random  # noqa: E402

calls = {"n": 0}
checkpoint_forward = mcore_random.CheckpointFunction.forward


def counted(*a, **k):
    calls["n"] += 1
    return checkpoint_forward(*a, **k)


mcore_random.CheckpointFunction.forward = staticmethod(counted)

g = torch.Generator().manual_seed(5)
ids = torch.randint(0, arch.vocab_size, (3, 13), generator=g)
targets = torch.randint(0, arch.vocab_size, (3, 13), generator=g)
mask = torch.ones(3, 13, dtype=torch.bool)
mask[1, 9:] = False
result = {}
for mode in ("none", "selective", "full"):
    model = build_gpt_model(arch, tp=1, pp=1, pp_rank=0, recompute=mode)
    model.load_state_dict(shards, strict=False)
    model.train()
    calls["n"] = 0
    head = model(ids, position_ids_like(ids), None)
    loss = -(token_logprobs(head, targets, mask, tp_group=ctx.tp_group, impl="torch") * mask).sum()
    loss.backward()
    result[mode] = {"loss": loss.item(), "checkpointed_forwards": calls["n"],
                    "grads": {n: p.grad.flatten().tolist() for n, p in model.named_parameters()},
                    "granularity": model.config.recompute_granularity,
                    "modules": list(model.config.recompute_modules or [])}
with open(args.out, "w") as f:
    json.dump(result, f)
parallel.shutdown()
