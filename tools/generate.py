"""Responses for prompts, greedy or sampled, under any TP x PP x DP layout.

    torchrun --nproc-per-node N tools/generate.py --load PATH --tp T [--pp P] --prompts IN.jsonl --out OUT.jsonl \
        [--max-new-tokens N] [--temperature T] [--top-p P] [--top-k K] [--seed S] [--batch-size B] \
        [--backend auto|direct|schedule] [--layers-per-stage N,N,...]

PATH is an HF directory or an fg checkpoint.  Input rows need a "prompt" (any
data format works: preference and SFT files give their prompts) or pre-tokenised
"prompt_ids" (used as given: no BOS added, never cut).  Each output row is the
input row plus "response" (text, EOS excluded), "prompt_ids", "response_ids"
(EOS included when generated) and "finish_reason" ("eos" or "length").  Temperature
0 (the default) is greedy; otherwise the same --seed gives the same responses
for any layout.
"""

import argparse

from fg_megatron.config.cli import LAYERS_PER_STAGE_HELP, HelpFormatter, layers_per_stage_arg, option_names
from fg_megatron.generation.runner import generate_file
from fg_megatron.trainers.errors import run_cli

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--load", required=True, metavar="PATH", help="HF directory or fg checkpoint")
    p.add_argument("--prompts", required=True, metavar="FILE",
                   help="JSONL (or parquet) rows with a prompt or prompt_ids")
    p.add_argument("--out", required=True, metavar="FILE", help="output JSONL")
    p.add_argument(*option_names("--tp"), type=int, default=1, metavar="N", help="tensor-parallel size")
    p.add_argument(*option_names("--pp"), type=int, default=1, metavar="N", help="pipeline-parallel size")
    p.add_argument("--layers-per-stage", type=layers_per_stage_arg, default=None, metavar="N,N,...",
                   help=LAYERS_PER_STAGE_HELP)
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="response budget per prompt")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling (1: off)")
    p.add_argument("--top-k", type=int, default=0, metavar="K", help="0: off")
    p.add_argument("--seed", type=int, default=1234, metavar="N",
                   help="sampling seed (each prompt gets its own stream)")
    p.add_argument("--batch-size", type=int, default=32, metavar="N", help="prompts per batch per DP rank")
    p.add_argument("--max-prompt-length", type=int, default=None, metavar="N",
                   help="cut longer prompts on the left (default: max_position_embeddings - max_new_tokens)")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence every step")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weights' dtype while generating")
    p.add_argument("--backend", default="auto", choices=["auto", "direct", "schedule"],
                   help="KV-cache decoding: direct (the stage's weights, PP=1), schedule (megatron-core's "
                        "modules), auto (direct where it can run)")
    a = p.parse_args()
    run_cli(lambda: generate_file(a.load, a.prompts, a.out, tp=a.tp, pp=a.pp, max_new_tokens=a.max_new_tokens,
                                  temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, seed=a.seed,
                                  batch_size=a.batch_size, max_prompt_length=a.max_prompt_length,
                                  use_cache=not a.no_cache, dtype=a.dtype, backend=a.backend,
                                  layers_per_stage=a.layers_per_stage))
