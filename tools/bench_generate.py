"""Generation speed with and without the KV cache (greedy, no early stop).

    python tools/bench_generate.py                                   # TP=1, the tiny pi0
    torchrun --nproc-per-node 2 tools/bench_generate.py --tp 2 --load PATH --new-tokens 128

Prints tokens/s for both and the speed-up (no-cache time / cache time); both
paths must produce the same tokens, which is checked.
"""

import argparse
import time

import torch

from fg_megatron import parallel
from fg_megatron.checkpoint.load import load_model
from fg_megatron.generation import generate_ids

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", default="assets/tiny/pi0")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    a = p.parse_args()
    ctx = parallel.initialize(a.tp, a.pp, seed=0)
    model, arch, _ = load_model(a.load, ctx)
    model.eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, arch.vocab_size, (a.prompt_tokens,), generator=g).tolist()
               for _ in range(a.batch_size)]
    common = dict(eos_ids=[], pad_id=0, max_new_tokens=a.new_tokens)
    generate_ids(model, ctx, prompts, max_new_tokens=2, eos_ids=[], pad_id=0)  # warm-up
    seconds, outputs = {}, {}
    for cache in (True, False):
        start = time.perf_counter()
        outputs[cache] = [r.ids for r in generate_ids(model, ctx, prompts, use_cache=cache, **common)]
        seconds[cache] = time.perf_counter() - start
    tokens = a.batch_size * a.new_tokens
    if ctx.is_main:
        print(f"tp={a.tp} pp={a.pp} batch={a.batch_size} prompt={a.prompt_tokens} new={a.new_tokens} "
              f"({arch.num_layers} layers, hidden {arch.hidden_size})")
        print(f"  kv cache : {seconds[True]:7.2f} s  {tokens / seconds[True]:8.1f} tokens/s")
        print(f"  no cache : {seconds[False]:7.2f} s  {tokens / seconds[False]:8.1f} tokens/s")
        print(f"  speed-up : {seconds[False] / seconds[True]:.2f}x  same tokens: {outputs[True] == outputs[False]}")
    parallel.shutdown()
