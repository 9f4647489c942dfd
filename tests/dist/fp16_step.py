"""Three optimizer steps of a tiny Llama in float32 and in float16 (one process, CPU):
losses, grad norms, skipped steps, the loss scale and the weight update of each.

python tests/dist/fp16_step.py --out r.json
"""

import argparse
import json
from pathlib import Path

import torch

from fg_megatron import parallel
from fg_megatron.checkpoint.mapping import megatron_from_hf, stage_shards
from fg_megatron.config import OptimConfig
from fg_megatron.logprobs import token_logprobs
from fg_megatron.models import arch_from_hf_config, family_module
from fg_megatron.models.gpt import build_gpt_model, padded_vocab_size
from fg_megatron.schedule import position_ids_like
from fg_megatron.trainers.engine import build_engine, train_step
from tiny_models import hf_model

p = argparse.ArgumentParser()
p.add_argument("--out", required=True)
args = p.parse_args()


def run(dtype: torch.dtype) -> dict:
    ctx = parallel.initialize(1, 1, seed=1)
    hf = hf_model("llama_gqa_untied")
    arch = arch_from_hf_config(hf.config.to_dict())
    adapter = family_module(arch.family).state_dict_adapter(arch)
    model = build_gpt_model(arch, tp=1, pp=1, pp_rank=0, dtype=dtype)
    shards = dict(stage_shards(megatron_from_hf(adapter, hf.state_dict().get), adapter, tp=1, tp_rank=0, pp=1,
                               pp_rank=0, padded_vocab=padded_vocab_size(arch.vocab_size, 1)))
    model.load_state_dict({k: v.to(dtype) for k, v in shards.items()}, strict=False)
    # clip_grad 1.0 with grad norms ~5: clipping must engage in both dtypes
    engine = build_engine(model, ctx, OptimConfig(lr=1e-3, warmup_steps=0, weight_decay=0.0, clip_grad=1.0,
                                                    initial_loss_scale=1024.0),
                          total_steps=3, dtype=dtype)
    before = {k: v.detach().double().clone() for k, v in engine.module.named_parameters()}
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, arch.vocab_size, (4, 17), generator=g)
    x = ids[:, :-1]
    mask = torch.ones_like(x, dtype=torch.bool)
    mbs = [{"input_ids": x, "position_ids": position_ids_like(x), "targets": ids[:, 1:], "loss_mask": mask}]

    def loss_fn(head, batch):
        logp = token_logprobs(head, batch["targets"], batch["loss_mask"], tp_group=None, impl="torch")
        nll = -(logp * batch["loss_mask"]).sum()
        return nll, batch["loss_mask"].sum(), {"nll": nll.detach()}

    out = {"losses": [], "grad_norms": [], "skipped": []}
    for _ in range(3):
        stats, info = train_step(engine, mbs, loss_fn)
        out["losses"].append(float(stats[0]["nll"]) / int(mask.sum()))
        out["grad_norms"].append(info["grad_norm"])
        out["skipped"].append(info["skipped"])
    out["loss_scale"] = float(engine.optimizer.get_loss_scale())
    delta = torch.cat([(p.detach().double() - before[k]).flatten() for k, p in engine.module.named_parameters()])
    parallel.shutdown()
    return out, delta


fp32, d32 = run(torch.float32)
fp16, d16 = run(torch.float16)
result = {"float32": fp32, "float16": fp16,
          "update_cosine": float(torch.nn.functional.cosine_similarity(d32, d16, dim=0)),
          "update_norm_ratio": float(d16.norm() / d32.norm())}
Path(args.out).write_text(json.dumps(result, indent=1))
