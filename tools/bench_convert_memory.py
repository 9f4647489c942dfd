"""Peak memory and time of checkpoint conversion on a >= 1 GB random Llama-like model.

    python tools/bench_convert_memory.py [--layers 4] [--hidden 2048] [--vocab 128256] [--tp 2] [--pp 2]

Builds a random HF Llama checkpoint (bf16, sharded safetensors with an index;
written one tensor at a time, so building it needs no memory either), then
runs each ``tools/convert_checkpoint.py`` sub-command in a child process and
reports its peak resident memory (``ru_maxrss`` from ``wait4`` in a small launcher) and wall time,
next to the model size, the largest single tensor and the baseline of a
process that only imports the converter.  ``--verify`` checks that
hf-to-fg -> reshard -> fg-to-hf returns every tensor bit for bit (streamed).
Not part of CI.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from fg_megatron.checkpoint.hf import open_hf_weights, write_hf_weights  # noqa: E402
from fg_megatron.checkpoint.safetensors_io import TensorSpec  # noqa: E402


def build_hf_model(out: Path, args: argparse.Namespace) -> tuple[int, int]:
    """Random bf16 Llama HF directory; returns (total bytes, largest tensor bytes)."""
    from transformers import LlamaConfig

    head_dim = args.hidden // args.heads
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, tie_word_embeddings=False, dtype="bfloat16")
    out.mkdir(parents=True)
    config.save_pretrained(out)
    h, kv = args.hidden, args.kv_heads * head_dim
    shapes = {"model.embed_tokens.weight": (args.vocab, h), "model.norm.weight": (h,), "lm_head.weight": (args.vocab, h)}
    for i in range(args.layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                       p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                       p + "mlp.gate_proj.weight": (args.ffn, h), p + "mlp.up_proj.weight": (args.ffn, h),
                       p + "mlp.down_proj.weight": (h, args.ffn)})
    specs = [TensorSpec(n, torch.bfloat16, s) for n, s in shapes.items()]
    gen = torch.Generator().manual_seed(0)
    tensors = ((s.name, (0.02 * torch.randn(s.shape, generator=gen)).to(torch.bfloat16)) for s in specs)
    write_hf_weights(out, specs, tensors, max_shard_bytes=args.shard_gb * 1024**3)
    return sum(s.nbytes for s in specs), max(s.nbytes for s in specs)


# A tiny launcher forks the measured command: a child's ru_maxrss starts from the RSS of
# the process it was forked from, so forking straight from this (large) process would
# report our own memory instead of the command's.
_LAUNCHER = (
    "import os, sys\n"
    "pid = os.fork()\n"
    "if pid == 0:\n"
    "    os.execv(sys.argv[2], sys.argv[2:])\n"
    "_, status, usage = os.wait4(pid, 0)\n"
    "open(sys.argv[1], 'w').write(str(usage.ru_maxrss))\n"
    "sys.exit(os.waitstatus_to_exitcode(status))\n"
)


def measure(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of one command."""
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as rss:
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-S", "-c", _LAUNCHER, rss.name, *cmd], cwd=ROOT)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
        return seconds, int(Path(rss.name).read_text()) / 1024  # Linux reports KiB


def verify(a: Path, b: Path) -> None:
    wa, wb = open_hf_weights(a), open_hf_weights(b)
    assert sorted(wa.names()) == sorted(wb.names()), "different tensor names"
    for name in wa.names():
        x, y = wa.get(name), wb.get(name)
        assert x.dtype == y.dtype and torch.equal(x.view(torch.uint8), y.view(torch.uint8)), name


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=5632)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--shard-gb", type=float, default=1.0, help="HF shard size of the generated model")
    p.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory, removed after")
    p.add_argument("--verify", action="store_true")
    args = p.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="fg_bench_"))
    try:
        total, largest = build_hf_model(work / "hf", args)
        py, tool = sys.executable, str(ROOT / "tools" / "convert_checkpoint.py")
        steps = {
            "import only (baseline)": [py, "-c", "import sys; sys.path.insert(0, '.'); "
                                                 "import fg_megatron.checkpoint.convert"],
            f"hf-to-fg --tp {args.tp} --pp {args.pp}": [py, tool, "hf-to-fg", "--hf", str(work / "hf"),
                                                        "--out", str(work / "fg"), "--tp", str(args.tp),
                                                        "--pp", str(args.pp)],
            "reshard --tp 1 --pp 1": [py, tool, "reshard", "--ckpt", str(work / "fg"), "--out",
                                      str(work / "fg1"), "--tp", "1", "--pp", "1"],
            "fg-to-hf": [py, tool, "fg-to-hf", "--ckpt", str(work / "fg1"), "--out", str(work / "back")],
        }
        rows = {name: measure(cmd) for name, cmd in steps.items()}
        if args.verify:
            verify(work / "hf", work / "back")
        report = {"model_bytes": total, "largest_tensor_bytes": largest, "layers": args.layers,
                  "verified_bit_identical": args.verify,
                  "steps": {k: {"seconds": round(s, 1), "peak_rss_mib": round(m)} for k, (s, m) in rows.items()}}
        print(f"model: {total / 1e9:.2f} GB bf16 ({args.layers} layers, hidden {args.hidden}, vocab {args.vocab}); "
              f"largest tensor {largest / 1e6:.0f} MB")
        print("| step | wall s | peak RSS MiB |\n|---|---|---|")
        for name, (secs, mib) in rows.items():
            print(f"| {name} | {secs:.1f} | {mib:.0f} |")
        print(json.dumps(report))
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
