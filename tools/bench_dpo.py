"""DPO throughput, MFU and peak GPU memory of a random ~1 B Llama, next to the memory planner.

python tools/bench_dpo.py --out benchmarks/dpo_1b.json --workdir /tmp/bench_dpo      # on a GPU
python tools/bench_dpo.py --tiny --out /tmp/dpo_tiny.json                             # CPU smoke run

The model has Llama-3.2-1B's shape (hidden 2048, 16 layers, 32 heads, 8 KV heads, ffn 8192,
vocab 128256, tied embeddings; random weights); every pair is a 512-token prompt and two
512-token responses (sequence 1024), TP=1, bf16.  The training runs in this process
(tools/train_dpo.py's code and flags), the final checkpoint is skipped (--keep-checkpoint
keeps it).  Step time, tokens/s, TFLOP/s and MFU exclude the first (warm-up) step.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fg_megatron.bench.dpo import BenchSetup, format_report, run_bench  # noqa: E402
from fg_megatron.bench.model import ONE_B, TINY  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="a tiny shape, 2 steps, sequence 48 (CPU smoke run)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 6; --tiny 2)")
    p.add_argument("--micro-batch", type=int, default=None, help="pairs per forward (default 2)")
    p.add_argument("--global-batch", type=int, default=None, help="pairs per step (default 16; --tiny 4)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                   help="default bfloat16")
    p.add_argument("--peak-tflops", type=float, default=None, help="for MFU (default: from the GPU's name)")
    p.add_argument("--keep-checkpoint", action="store_true", help="save the final checkpoint as the trainer does")
    p.add_argument("--workdir", type=Path, default=None, help="model, data and run (default: a temporary dir)")
    p.add_argument("--plan-json", type=Path, default=None, help="where tools/plan_memory.py writes its JSON")
    p.add_argument("--out", type=Path, default=None, help="write the report as JSON here")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    a = parse_args(argv)
    tiny = dict(shape=TINY, steps=2, micro_batch=2, global_batch=4, prompt_tokens=24,
                response_tokens=24) if a.tiny else dict(shape=ONE_B)
    given = {"steps": a.steps, "micro_batch": a.micro_batch, "global_batch": a.global_batch, "dtype": a.dtype,
             "peak_tflops": a.peak_tflops, "plan_json": a.plan_json}
    with tempfile.TemporaryDirectory(prefix="bench_dpo_") as tmp:
        setup = BenchSetup(workdir=a.workdir or Path(tmp), keep_checkpoint=a.keep_checkpoint,
                           **{**tiny, **{k: v for k, v in given.items() if v is not None}})
        report = run_bench(setup)
    print(format_report(report), flush=True)
    if a.out is not None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
