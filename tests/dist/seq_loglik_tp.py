"""Vocab-parallel sequence log-likelihood across ranks (tests/test_seq_loglik_tp.py).

torchrun --nproc-per-node 2 tests/dist/seq_loglik_tp.py --layouts 2x1,1x2 --out r.json

Part "kernel" (TP only): seq_loglik on this rank's weight shard with the TP
group vs the same call on the whole weight in one process (TP=1), both
backends; forward and gradients.  Part "model": token_logprobs on the LMHead of
a tiny megatron-core GPTModel (tied and untied output layer; at PP>1 the tied
variant only), impl torch and triton vs impl megatron (megatron-core's vocab_parallel_cross_entropy) for the
log-probs and the gradient of every parameter, and vs transformers' own logits.
Each ``TPxPP`` layout of ``--layouts`` runs in turn in the same processes (one
launch: process start-up dominates on CPU).  Every number written is a
maximum over ranks.
"""

import argparse
import json

import torch
import torch.distributed as dist

from fg_megatron import parallel
from fg_megatron.checkpoint.mapping import megatron_from_hf, stage_shards
from fg_megatron_kernels.seq_loglik import seq_loglik
from fg_megatron.logprobs import token_logprobs
from fg_megatron.models import arch_from_hf_config, family_module
from fg_megatron.models.gpt import build_gpt_model, padded_vocab_size
from fg_megatron.schedule import position_ids_like, run_microbatches
from tiny_models import hf_model

p = argparse.ArgumentParser()
p.add_argument("--layouts", default="2x1", help="comma-separated TPxPP layouts")
p.add_argument("--out", required=True)
args = p.parse_args()
IMPLS = ("torch", "triton")


def rel(a, ref):
    return ((a.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


def run_kernel(h, w, y, mask, up, vocab_start, vocab_size, group, impl):
    h = h.clone().requires_grad_()
    w = w.clone().requires_grad_()
    logp = seq_loglik(h, w, y, mask, vocab_start=vocab_start, vocab_size=vocab_size, tp_group=group, impl=impl)
    (logp * up).sum().backward()
    return logp.detach(), h.grad, w.grad


def kernel_part(ctx, args):
    """TP=tp vs TP=1, odd sizes; vocab 150 of 320 padded rows leaves rank 1 all padding."""
    res = {}
    for vocab_size, dtype in [(301, torch.float32), (150, torch.float32), (301, torch.bfloat16)]:
        g = torch.Generator().manual_seed(vocab_size)
        n, d, v_pad = 37, 45, 160 * args.tp
        h = torch.randn(n, d, generator=g).to(dtype)
        w = (torch.randn(v_pad, d, generator=g) * 0.4).to(dtype)
        y = torch.randint(0, vocab_size, (n,), generator=g)
        mask = torch.rand(n, generator=g) > 0.25
        up = torch.randn(n, generator=g)
        shard = v_pad // args.tp
        lo = ctx.tp_rank * shard
        for impl in IMPLS:
            one = run_kernel(h, w, y, mask, up, 0, vocab_size, None, impl)
            tp = run_kernel(h, w[lo:lo + shard], y, mask, up, lo, vocab_size, ctx.tp_group, impl)
            key = f"{impl}_v{vocab_size}_{str(dtype).split('.')[1]}"
            res[f"{key}_logp"] = rel(tp[0], one[0])
            res[f"{key}_grad_h"] = rel(tp[1], one[1])
            res[f"{key}_grad_w"] = rel(tp[2], one[2][lo:lo + shard])
            res[f"{key}_max_logp"] = tp[0][mask].max().item()
    return res


def model_part(ctx, args, variant):
    hf = hf_model(variant)
    arch = arch_from_hf_config(hf.config.to_dict())
    adapter = family_module(arch.family).state_dict_adapter(arch)
    model = build_gpt_model(arch, tp=args.tp, pp=args.pp, pp_rank=ctx.pp_rank)
    shards = dict(stage_shards(megatron_from_hf(adapter, hf.state_dict().get), adapter, tp=args.tp,
                               tp_rank=ctx.tp_rank, pp=args.pp, pp_rank=ctx.pp_rank,
                               padded_vocab=padded_vocab_size(arch.vocab_size, args.tp)))
    model.load_state_dict(shards, strict=False)
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(0, arch.vocab_size, (4, 14), generator=g)
    mask = torch.ones(4, 13, dtype=torch.bool)
    mask[:, :4] = False  # prompt
    mask[1, 9:] = False  # right padding
    coef = torch.randn(4, generator=g)  # per-sequence upstream gradient, like DPO's
    mbs = [{"input_ids": ids[i:i + 2, :-1], "position_ids": position_ids_like(ids[i:i + 2, :-1]),
            "targets": ids[i:i + 2, 1:], "mask": mask[i:i + 2], "coef": coef[i:i + 2]} for i in (0, 2)]
    with torch.no_grad():
        hf_logp = torch.log_softmax(hf(ids[:, :-1]).logits.double(), -1).gather(-1, ids[:, 1:, None])[..., 0]
        hf_logp = hf_logp * mask

    outs = {}
    for impl in ("megatron",) + IMPLS:
        model.zero_grad(set_to_none=True)

        def head_fn(head, b, impl=impl):
            logp = token_logprobs(head, b["targets"], b["mask"], tp_group=ctx.tp_group, impl=impl)
            # count 1: this bare model (no DDP engine) keeps megatron's mean over micro-batches
            return -(logp.sum(1) * b["coef"]).sum(), 1, {"logp": logp.detach()}

        stats = run_microbatches(model, mbs, head_fn, forward_only=False)
        logp = torch.cat([s["logp"] for s in stats]) if stats else None
        grads = {n: prm.grad.clone() for n, prm in model.named_parameters() if prm.grad is not None}
        outs[impl] = (logp, grads)
    res = {}
    ref_logp, ref_grads = outs["megatron"]
    for impl in IMPLS:
        logp, grads = outs[impl]
        assert set(grads) == set(ref_grads), (set(grads) ^ set(ref_grads))
        res[f"{impl}_logp_vs_megatron"] = 0.0 if logp is None else rel(logp, ref_logp)
        res[f"{impl}_logp_vs_transformers"] = 0.0 if logp is None else rel(logp, hf_logp)
        res[f"{impl}_max_logp"] = -1e9 if logp is None else logp[mask].max().item()
        res[f"{impl}_grad_vs_megatron"] = max(rel(grads[n], ref_grads[n]) for n in grads)
    res["megatron_logp_vs_transformers"] = 0.0 if ref_logp is None else rel(ref_logp, hf_logp)
    res["n_params_with_grad"] = float(len(ref_grads))
    return res


results = {}
for layout in args.layouts.split(","):
    tp, pp = map(int, layout.split("x"))
    ctx = parallel.initialize(tp, pp, seed=1)
    lay = argparse.Namespace(tp=tp, pp=pp)
    if pp == 1:
        results[f"kernel_{layout}"] = kernel_part(ctx, lay)
    for variant in ("llama_mha_tied", "llama_gqa_untied")[: 1 if pp > 1 else 2]:
        results[f"{variant}_{layout}"] = model_part(ctx, lay, variant)
# Maximum of every number over all ranks.
flat = [(part, k) for part in results for k in results[part]]
vals = torch.tensor([results[p][k] for p, k in flat], dtype=torch.float64)
dist.all_reduce(vals, op=dist.ReduceOp.MAX)
if dist.get_rank() == 0:
    out = {}
    for (part, k), v in zip(flat, vals.tolist()):
        out.setdefault(part, {})[k] = v
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
parallel.shutdown()
