"""Generation speed: our KV cache (the direct decoder at PP=1, megatron-core's modules otherwise), the
KV cache through megatron-core's modules, no cache, and transformers' ``generate`` (greedy, no early stop).

    python tools/bench_generate.py                                   # TP=1, the tiny pi0
    python tools/bench_generate.py --out benchmarks/generate_cpu.json
    torchrun --nproc-per-node 2 tools/bench_generate.py --tp 2 --load PATH --new-tokens 128

Prints tokens/s of each and the ratios measured in the same run; every path must
produce the same tokens, which is checked.  transformers' ``generate`` (with its
KV cache, same prompts, same dtype) runs at TP=1 on an HF directory only.

The README's second model is a random Llama (vocabulary 1024, hidden 1024, 8 layers,
16 heads / 8 KV heads, ffn 2816, tied embeddings) saved with ``save_pretrained``.
"""

import argparse
import json
import time
from pathlib import Path

import torch

from fg_megatron import parallel
from fg_megatron.checkpoint.load import load_model
from fg_megatron.generation import generate_ids
from fg_megatron.generation.engine import pick_backend

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", default="assets/tiny/pi0")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="best of N timings")
    p.add_argument("--out", default=None, help="also write the numbers as JSON")
    a = p.parse_args()
    ctx = parallel.initialize(a.tp, a.pp, seed=0)
    model, arch, _ = load_model(a.load, ctx)
    model.eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, arch.vocab_size, (a.prompt_tokens,), generator=g).tolist()
               for _ in range(a.batch_size)]
    common = dict(eos_ids=[], pad_id=0, max_new_tokens=a.new_tokens)
    generate_ids(model, ctx, prompts, max_new_tokens=2, eos_ids=[], pad_id=0)  # warm-up

    def best_of(fn):
        times, out = [], None
        for _ in range(a.repeats):
            start = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - start)
        return min(times), out

    seconds, outputs = {}, {}
    # kv_cache: what generate_ids picks (the direct decoder where it can run, else the schedule)
    for name, cache, backend in (("kv_cache", True, "auto"), ("kv_cache_schedule", True, "schedule"),
                                 ("no_cache", False, "schedule")):
        seconds[name], outputs[name] = best_of(
            lambda: [r.ids for r in generate_ids(model, ctx, prompts, use_cache=cache, backend=backend, **common)])
    if a.tp == 1 and a.pp == 1 and ctx.world_size == 1 and (Path(a.load) / "config.json").is_file():
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(a.load, dtype=torch.float32).eval()
        ids = torch.tensor(prompts)

        def hf_generate():
            with torch.no_grad():
                out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                  max_new_tokens=a.new_tokens, use_cache=True, eos_token_id=None,
                                  pad_token_id=0)
            return out[:, ids.shape[1]:].tolist()

        hf_generate()  # warm-up
        seconds["transformers"], outputs["transformers"] = best_of(hf_generate)
    tokens = a.batch_size * a.new_tokens
    if ctx.is_main:
        result = {"tp": a.tp, "pp": a.pp, "batch": a.batch_size, "prompt_tokens": a.prompt_tokens,
                  "new_tokens": a.new_tokens, "layers": arch.num_layers, "hidden": arch.hidden_size,
                  "threads": torch.get_num_threads(), "kv_cache_backend": pick_backend(model, ctx, "auto", True),
                  "tokens_per_second": {k: tokens / v for k, v in seconds.items()},
                  "same_tokens": {k: outputs[k] == outputs["kv_cache"] for k in outputs}}
        print(f"tp={a.tp} pp={a.pp} batch={a.batch_size} prompt={a.prompt_tokens} new={a.new_tokens} "
              f"({arch.num_layers} layers, hidden {arch.hidden_size})")
        for k, v in seconds.items():
            print(f"  {k:13s}: {v:7.2f} s  {tokens / v:8.1f} tokens/s  same tokens: {result['same_tokens'][k]}")
        print(f"  kv cache vs no cache: {seconds['no_cache'] / seconds['kv_cache']:.2f}x")
        if "transformers" in seconds:
            result["ours_vs_transformers"] = seconds["transformers"] / seconds["kv_cache"]
            print(f"  ours vs transformers generate: {result['ours_vs_transformers']:.2f}x")
        if a.out:
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    parallel.shutdown()
