"""Logits of our megatron-core model vs transformers, for every tiny variant; GLM variants
also from their original ChatGLM3 layout (``<name>@chatglm``).

torchrun --nproc-per-node N tests/dist/parity_logits.py --tp T --pp P --out result.json
    [--variants a,b] [--num-layers L] [--layers-per-stage 2,1]

``--num-layers`` gives the variants L layers instead of 2 (uneven pipeline stages);
each result also records the model-wide layer numbers megatron-core built per stage.
"""

import argparse
import json

import torch
import torch.distributed as dist

from fg_megatron import parallel
from fg_megatron.config.cli import layers_per_stage_arg
from fg_megatron.checkpoint.mapping import megatron_from_hf, stage_shards
from fg_megatron.logprobs import full_logits
from fg_megatron.models import arch_from_hf_config, family_module
from fg_megatron.models.gpt import build_gpt_model, padded_vocab_size
from fg_megatron.schedule import position_ids_like, run_microbatches
from tiny_models import GLM_VARIANTS, VARIANTS, chatglm_original_config, chatglm_original_state, hf_model

p = argparse.ArgumentParser()
p.add_argument("--tp", type=int, default=1)
p.add_argument("--pp", type=int, default=1)
p.add_argument("--out", required=True)
p.add_argument("--variants", default=None, help="comma-separated subset of the variants (no @chatglm cases)")
p.add_argument("--num-layers", type=int, default=None)
p.add_argument("--layers-per-stage", type=layers_per_stage_arg, default=None)
args = p.parse_args()

ctx = parallel.initialize(args.tp, args.pp, seed=1)
results = {}
if args.variants:
    cases = [(name, name, "hf") for name in args.variants.split(",")]
else:
    cases = [(name, name, "hf") for name in VARIANTS] + [(f"{n}@chatglm", n, "chatglm") for n in GLM_VARIANTS]
split = args.layers_per_stage
for case, name, layout in cases:
    hf = hf_model(name, num_layers=args.num_layers)
    if layout == "chatglm":  # the same weights, as THUDM's original checkpoint names them
        config, state = chatglm_original_config(hf.config), chatglm_original_state(hf)
    else:
        config, state = hf.config.to_dict(), hf.state_dict()
    arch = arch_from_hf_config(config)
    adapter = family_module(arch.family).state_dict_adapter(arch)
    full = megatron_from_hf(adapter, state.get)
    model = build_gpt_model(arch, tp=args.tp, pp=args.pp, pp_rank=ctx.pp_rank, layers_per_stage=split)
    shards = dict(stage_shards(full, adapter, tp=args.tp, tp_rank=ctx.tp_rank, pp=args.pp,
                               pp_rank=ctx.pp_rank, padded_vocab=padded_vocab_size(arch.vocab_size, args.tp),
                               layers_per_stage=split))
    model.load_state_dict(shards, strict=False)
    missing = [k for k in model.state_dict() if k not in shards and not k.endswith("_extra_state")]
    assert not missing, missing
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, arch.vocab_size, (3, 21), generator=g)  # longer than the Mistral window
    with torch.no_grad():
        ref = hf(ids).logits
    mbs = [{"input_ids": ids[i:i + 1], "position_ids": position_ids_like(ids[i:i + 1])} for i in range(3)]
    out = run_microbatches(
        model, mbs, lambda head, b: {"logits": full_logits(head, ctx.tp_group)},
        forward_only=True)
    # megatron-core's own numbering of the layers each stage built (1-based, model-wide)
    built: list = [None] * args.pp
    dist.all_gather_object(built, [layer.layer_number - 1 for layer in model.decoder.layers], group=ctx.pp_group)
    if ctx.is_last_stage:
        logits = torch.cat([o["logits"] for o in out])
        results[case] = {"max_abs_diff": (logits - ref).abs().max().item(),
                         "shape": list(logits.shape), "ref_shape": list(ref.shape),
                         "ref_std": ref.std().item(), "stage_layers": built}
if ctx.is_last_stage and ctx.tp_rank == 0:
    with open(args.out, "w") as f:
        json.dump(results, f)
parallel.shutdown()
