"""Bytes of the tensors autograd saves in one decoder layer's forward (local spec, one
process, CPU), for fg_megatron.planning.activations to be compared against.  Storages are
counted once (views share them) and parameters are left out.

python tests/dist/plan_activations.py --out r.json
"""

import argparse
import json
from pathlib import Path

import torch

from fg_megatron import parallel
from fg_megatron.models import arch_from_hf_config
from fg_megatron.models.gpt import build_gpt_model
from tiny_models import hf_config

p = argparse.ArgumentParser()
p.add_argument("--variants", default="llama_gqa_untied,llama_mha_tied,glm_mqa_bias")
p.add_argument("--dtypes", default="float32,bfloat16")
p.add_argument("--seq", type=int, default=32)
p.add_argument("--rows", type=int, default=3)
p.add_argument("--out", required=True)
args = p.parse_args()


def layer_saved_bytes(name: str, dtype: torch.dtype) -> int:
    arch = arch_from_hf_config(hf_config(name).to_dict())
    model = build_gpt_model(arch, tp=1, pp=1, pp_rank=0, dtype=dtype, use_te=False, perform_initialization=True)
    model.train()
    ids = torch.randint(0, arch.vocab_size, (args.rows, args.seq), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(args.seq)[None].expand(args.rows, args.seq)
    storages: dict[int, int] = {}
    inside = [False]

    def pack(t):
        if inside[0]:
            st = t.untyped_storage()
            storages[st.data_ptr()] = max(storages.get(st.data_ptr(), 0), st.nbytes())
        return t

    layer = model.decoder.layers[0]
    layer.register_forward_pre_hook(lambda *_: inside.__setitem__(0, True))
    layer.register_forward_hook(lambda *_: inside.__setitem__(0, False))
    params = {q.untyped_storage().data_ptr() for q in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, pos, None)
    return sum(n for ptr, n in storages.items() if ptr not in params)


parallel.initialize(1, 1, seed=1)
result = {f"{v}:{d}": layer_saved_bytes(v, getattr(torch, d))
          for v in args.variants.split(",") for d in args.dtypes.split(",")}
Path(args.out).write_text(json.dumps(result, indent=1))
parallel.shutdown()
