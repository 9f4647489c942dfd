"""Per-GPU memory of a training run, per pipeline stage, before launching it.

python tools/plan_memory.py --hf-config mistral-7b --tp 2 --dp 2 --micro-batch 1 --seq 1024 --gpu a100-80g

``--hf-config`` is a preset (llama-2-7b, mistral-7b, chatglm3-6b, llama-3-8b, llama-3-70b)
or an HF checkpoint directory.  ``--micro-batch`` counts samples per DP rank as the trainer
does (DPO/RM: pairs, 2 sequences each; PPO: prompts; SFT: rows); ``--seq`` is tokens per
sequence (PPO: prompt + new tokens).  The formulas are in fg_megatron/planning/.
"""

import argparse
import json
import sys
from pathlib import Path

from fg_megatron.models.arch import ModelConfigError
from fg_megatron.planning import PlanInputError, PlanInputs, load_hf_config, plan
from fg_megatron.planning.report import render


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like every planner error
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def parse(argv=None) -> argparse.Namespace:
    p = _Parser(description=__doc__.split("\n")[0])
    p.add_argument("--hf-config", required=True, help="preset name or HF checkpoint directory")
    p.add_argument("--trainer", default="dpo", help="dpo | ppo | sft | rm")
    for name, default in (("tp", 1), ("pp", 1), ("dp", 1), ("micro-batch", 1), ("seq", 1024)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--dtype", default="bf16", help="bf16 | fp16 | fp32")
    p.add_argument("--optimizer", default="replicated",
                   help="replicated (the trainer's default) | distributed (shards master, m, v over DP; NCCL)")
    p.add_argument("--recompute", default="none", help="none | selective | full")
    p.add_argument("--logprob-impl", default="fused", help="fused (ours) | naive (full fp32 logits)")
    p.add_argument("--spec", default="te", help="te (Transformer Engine layers, flash attention: a GPU run) | "
                                                "local (megatron-core local spec, unfused attention, fp32 norms)")
    p.add_argument("--sequence-parallel", action="store_true")
    p.add_argument("--layers-per-stage", help="comma-separated layer counts, one per stage")
    p.add_argument("--num-microbatches", type=int, help="per step and DP rank (default: from --global-batch, "
                                                         "else pp: a full pipeline)")
    p.add_argument("--global-batch", type=int)
    p.add_argument("--reference", default="precompute", help="DPO: precompute | online")
    p.add_argument("--prompt-len", type=int, help="default: seq // 2")
    p.add_argument("--max-new-tokens", type=int, help="PPO: default seq - prompt-len")
    p.add_argument("--constraint", default="flipguard", help="PPO: none | kd | flipguard")
    p.add_argument("--gpu", help="a100-40g | a100-80g | h100-80g | h200")
    p.add_argument("--json", help="also write the plan as JSON here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse(argv)
    try:
        layers = None
        if a.layers_per_stage:
            try:
                layers = tuple(int(n) for n in a.layers_per_stage.split(","))
            except ValueError:
                raise PlanInputError(f"--layers-per-stage {a.layers_per_stage!r}: expected integers like 20,20") \
                    from None
        source, config = load_hf_config(a.hf_config)
        inputs = PlanInputs(tp=a.tp, pp=a.pp, dp=a.dp, micro_batch=a.micro_batch, seq=a.seq, trainer=a.trainer,
                            dtype=a.dtype, optimizer=a.optimizer, recompute=a.recompute,
                            logprob_impl=a.logprob_impl, spec=a.spec,
                            sequence_parallel=a.sequence_parallel, layers_per_stage=layers,
                            num_microbatches=a.num_microbatches, global_batch=a.global_batch,
                            reference=a.reference, prompt_len=a.prompt_len, max_new_tokens=a.max_new_tokens,
                            constraint=a.constraint, gpu=a.gpu)
        result = plan(config, inputs, source=a.hf_config)
    except (PlanInputError, ModelConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(render(result))
    if a.json:
        Path(a.json).write_text(json.dumps(result.to_dict(), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
