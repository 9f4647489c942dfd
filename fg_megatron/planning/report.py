"""The planner's readable table: one column per pipeline stage, one row per kind of memory."""

from __future__ import annotations

from fg_megatron.planning.hardware import GiB, RESERVE_FIXED, RESERVE_FRACTION, required_bytes
from fg_megatron.planning.memory import Plan

ROWS = (("parameters", "params_bytes"), ("gradients (fp32 buffer)", "grads_bytes"),
        ("optimizer (Adam m, v, master)", "optimizer_bytes"), ("activations", "activations_bytes"),
        ("log-prob / value head", "logprob_bytes"), ("frozen models", "frozen_bytes"),
        ("KV cache (generation)", "kv_cache_bytes"), ("optimizer step (transient)", "optimizer_step_bytes"),
        ("total", "total_bytes"))


def _gib(n: int) -> str:
    return f"{n / GiB:.2f}"


def render(plan: Plan) -> str:
    x, m = plan.inputs, plan.model
    head = (f"{x['hf_config']} ({m['family']}, {m['params'] / 1e9:.2f}B params, {m['layers']} layers) | "
            f"{x['trainer']} | tp={x['tp']} pp={x['pp']} dp={x['dp']} | micro batch {x['micro_batch']} x seq "
            f"{x['prompt_tokens'] + x['response_tokens']} | {x['dtype']} | optimizer {x['optimizer']} | "
            f"recompute {x['recompute']} | log-prob {x['logprob_impl']} | spec {x['spec']}")
    cols = [f"stage {s.stage} ({s.layers} L)" for s in plan.per_stage]
    width = max(12, *(len(c) for c in cols))
    label = max(len(r[0]) for r in ROWS)
    lines = [head, "", f"{'GiB per GPU':<{label}} | " + " | ".join(f"{c:>{width}}" for c in cols)]
    lines.append("-" * len(lines[-1]))
    for name, key in ROWS:
        lines.append(f"{name:<{label}} | " + " | ".join(f"{_gib(getattr(s, key)):>{width}}" for s in plan.per_stage))
    peak = plan.peak_bytes
    lines += ["", f"peak (max over stages): {_gib(peak)} GiB; with the reserve ({RESERVE_FIXED // GiB} GiB CUDA "
                  f"context/NCCL/workspace + {RESERVE_FRACTION:.0%} fragmentation): {_gib(required_bytes(peak))} GiB"]
    if plan.gpu is not None:
        verdict = "fits" if plan.fits else "does not fit"
        lines.append(f"{plan.gpu} ({_gib(plan.gpu_bytes)} GiB): {verdict}; largest micro batch that fits: "
                     f"{plan.max_micro_batch}")
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)
