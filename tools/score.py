"""Sequence log-likelihood of responses given prompts, or their rewards under a reward model.

    torchrun --nproc-per-node N tools/score.py --load PATH --tp T --pp P --data IN.jsonl --out OUT.jsonl
        [--layers-per-stage N,N,...]

PATH is an HF directory or an fg checkpoint.  Rows are {"prompt", "response"}
strings or pre-tokenised {"prompt_ids", "response_ids"} (scored exactly as
given); each output row adds "logp" and "n_tokens".  On a value-head model
(*ForSequenceClassification, one label) it adds "reward" (the score at the
row's last real token) and "n_tokens" instead.
"""

import argparse

from fg_megatron.config.cli import LAYERS_PER_STAGE_HELP, HelpFormatter, layers_per_stage_arg, option_names
from fg_megatron.eval.score import score_file
from fg_megatron.trainers.errors import run_cli

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--load", required=True, metavar="PATH", help="HF directory or fg checkpoint")
    p.add_argument("--data", required=True, metavar="FILE", help="JSONL (or parquet) rows to score")
    p.add_argument("--out", required=True, metavar="FILE", help="output JSONL")
    p.add_argument(*option_names("--tp"), type=int, default=1, metavar="N", help="tensor-parallel size")
    p.add_argument(*option_names("--pp"), type=int, default=1, metavar="N", help="pipeline-parallel size")
    p.add_argument("--layers-per-stage", type=layers_per_stage_arg, default=None, metavar="N,N,...",
                   help=LAYERS_PER_STAGE_HELP)
    p.add_argument("--batch-size", type=int, default=8, metavar="N", help="rows per forward per DP rank")
    p.add_argument("--logprob-impl", default="auto", choices=["auto", "triton", "torch", "megatron"],
                   help="sequence log-likelihood implementation (auto: Triton on CUDA, chunked torch elsewhere)")
    p.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights' dtype while scoring (auto: bf16 on GPU, fp32 on CPU)")
    a = p.parse_args()
    run_cli(lambda: score_file(a.load, a.data, a.out, tp=a.tp, pp=a.pp, batch_size=a.batch_size,
                               logprob_impl=a.logprob_impl, dtype=a.dtype,
                               layers_per_stage=a.layers_per_stage))
