"""A few SFT-like optimizer steps through megatron-core; writes losses and the
updated full weights so layouts can be compared.

torchrun --nproc-per-node N tests/dist/train_steps.py --tp T --pp P --variant V --out r.json --weights DIR
    [--num-layers L] [--layers-per-stage 2,1]
"""

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from fg_megatron import parallel
from fg_megatron.checkpoint.mapping import megatron_from_hf, stage_shards
from fg_megatron.config import OptimConfig
from fg_megatron.config.cli import layers_per_stage_arg
from fg_megatron.logprobs import token_logprobs
from fg_megatron.models import arch_from_hf_config, family_module, sharding
from fg_megatron.models.gpt import build_gpt_model, padded_vocab_size
from fg_megatron.schedule import position_ids_like
from fg_megatron.trainers.engine import build_engine, train_step
from tiny_models import hf_model

p = argparse.ArgumentParser()
p.add_argument("--tp", type=int, default=1)
p.add_argument("--pp", type=int, default=1)
p.add_argument("--variant", default="llama_gqa_untied")
p.add_argument("--impl", default="megatron")
p.add_argument("--steps", type=int, default=3)
p.add_argument("--out", required=True)
p.add_argument("--weights", required=True)
p.add_argument("--num-layers", type=int, default=None, help="layers instead of the variant's 2")
p.add_argument("--layers-per-stage", type=layers_per_stage_arg, default=None)
args = p.parse_args()

ctx = parallel.initialize(args.tp, args.pp, seed=1)
hf = hf_model(args.variant, num_layers=args.num_layers)
arch = arch_from_hf_config(hf.config.to_dict())
adapter = family_module(arch.family).state_dict_adapter(arch)
split = args.layers_per_stage
model = build_gpt_model(arch, tp=args.tp, pp=args.pp, pp_rank=ctx.pp_rank, layers_per_stage=split)
shards = dict(stage_shards(megatron_from_hf(adapter, hf.state_dict().get), adapter, tp=args.tp,
                           tp_rank=ctx.tp_rank, pp=args.pp, pp_rank=ctx.pp_rank,
                           padded_vocab=padded_vocab_size(arch.vocab_size, args.tp), layers_per_stage=split))
model.load_state_dict(shards, strict=False)
engine = build_engine(model, ctx, OptimConfig(lr=1e-3, weight_decay=0.1, warmup_steps=0, clip_grad=1.0, adam_eps=1e-6),
                      total_steps=args.steps)

GLOBAL_BATCH, MICRO = 8, 2
g = torch.Generator().manual_seed(3)
losses, grad_norms = [], []
for step in range(args.steps):
    lengths = torch.randint(6, 17, (GLOBAL_BATCH,), generator=g)
    ids = torch.randint(0, arch.vocab_size, (GLOBAL_BATCH, 17), generator=g)
    mask = torch.arange(17)[None, :] < (lengths[:, None] - 1)
    mask[:, :3] = False  # a "prompt"
    global_tokens = int(mask[:, :-1].sum())
    per_dp = GLOBAL_BATCH // ctx.dp
    mine = range(ctx.dp_rank * per_dp, (ctx.dp_rank + 1) * per_dp)
    n_micro = per_dp // MICRO
    mbs = []
    for m in range(n_micro):
        rows = list(mine)[m * MICRO:(m + 1) * MICRO]
        x = ids[rows, :-1]
        mbs.append({"input_ids": x, "position_ids": position_ids_like(x), "targets": ids[rows, 1:],
                    "loss_mask": mask[rows, :-1]})

    def loss_fn(head, batch):
        logp = token_logprobs(head, batch["targets"], batch["loss_mask"], tp_group=ctx.tp_group,
                              impl=args.impl)
        nll = -(logp * batch["loss_mask"]).sum()
        # a sum and its count: megatron-core divides by the global token count
        return nll, batch["loss_mask"].sum(), {"nll": nll.detach()}

    stats, info = train_step(engine, mbs, loss_fn)
    total = torch.tensor(sum(float(s["nll"]) for s in stats) if ctx.is_last_stage and ctx.tp_rank == 0 else 0.0,
                         dtype=torch.float64)
    dist.all_reduce(total)
    losses.append(total.item() / global_tokens)
    grad_norms.append(info["grad_norm"])

# full updated weights: gather TP shards, merge, write one file per stage
out_dir = Path(args.weights)
full = {}
for name, param in engine.module.state_dict().items():
    if name.endswith("_extra_state"):
        continue
    pieces = [torch.empty_like(param) for _ in range(ctx.tp)]
    dist.all_gather(pieces, param.contiguous(), group=ctx.tp_group)
    fname = sharding.full_name(name, arch, args.pp, ctx.pp_rank, split)
    if ctx.pp_rank == args.pp - 1 and name == "output_layer.weight" and arch.tie_word_embeddings:
        fname = "tied_output_copy"
        full[fname] = sharding.merge("output_layer.weight", pieces, vocab_size=arch.vocab_size)
        continue
    full[fname] = sharding.merge(name if not name.startswith("decoder.layers") else fname, pieces,
                                 vocab_size=arch.vocab_size)
if ctx.tp_rank == 0 and ctx.dp_rank == 0:
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in full.items()}, str(out_dir / f"stage{ctx.pp_rank}.safetensors"))
if ctx.rank == 0:
    Path(args.out).write_text(json.dumps({"losses": losses, "grad_norms": grad_norms, "dp": ctx.dp}))
parallel.shutdown()
