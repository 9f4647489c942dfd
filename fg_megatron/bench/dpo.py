"""DPO throughput, MFU and peak memory of a random Llama, next to the memory planner's
prediction (``tools/bench_dpo.py``).

The training runs in this process (``fg_megatron.trainers.dpo.main``), so that
``torch.cuda.max_memory_allocated()`` afterwards is the trainer's peak: the trainer
reports no memory itself.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from fg_megatron import platform
from fg_megatron.bench.model import ROOT, LlamaShape, write_preference_data, write_random_llama
from fg_megatron.trainers.engine import model_dtype
from fg_megatron.trainers.throughput import device_peak_tflops

@dataclasses.dataclass
class BenchSetup:
    shape: LlamaShape
    workdir: Path
    steps: int = 6
    micro_batch: int = 2  # pairs per forward (two sequences each)
    global_batch: int = 16  # pairs per optimizer step
    prompt_tokens: int = 512
    response_tokens: int = 512
    dtype: str = "bfloat16"
    logprob_impl: str = "auto"
    peak_tflops: Optional[float] = None  # None: the trainer's table (trainers/throughput.py), no MFU on CPU
    keep_checkpoint: bool = False
    plan_json: Optional[Path] = None  # where tools/plan_memory.py writes its prediction

    @property
    def seq(self) -> int:
        return self.prompt_tokens + self.response_tokens


def trainer_argv(s: BenchSetup, model_dir: Path, data: Path, save: Path,
                 peak_tflops: Optional[float] = None) -> list[str]:
    """The tools/train_dpo.py command line of the run (also recorded in the report)."""
    argv = ["--load", str(model_dir), "--data", str(data), "--save", str(save), "--overwrite",
            "--steps", str(s.steps), "--global-batch-size", str(s.global_batch),
            "--micro-batch-size", str(s.micro_batch), "--logprob-impl", s.logprob_impl,
            "--set", f"model.dtype={s.dtype}",
            "--set", f"data.max_prompt_length={s.prompt_tokens}",
            "--set", f"data.max_response_length={s.response_tokens}",
            "--set", "data.pad_multiple=8", "--set", "data.group_batches=0",
            "--set", "optim.warmup_steps=0", "--set", "train.tensorboard=false", "--set", "train.report_to=[]",
            "--set", "train.log_every=1", "--set", "train.divergence_factor=0"]
    if peak_tflops is not None:
        argv += ["--set", f"train.peak_tflops={peak_tflops}"]
    return argv


def run_training(argv: list[str], keep_checkpoint: bool) -> None:
    """tools/train_dpo.py's run, in this process."""
    from fg_megatron.config import DPORunConfig
    from fg_megatron.config.cli import PREFERENCE_FLAGS, parse_run_config
    from fg_megatron.trainers import dpo, loop

    cfg = parse_run_config(DPORunConfig, argv, description="bench_dpo", extra_flags=PREFERENCE_FLAGS)
    if not keep_checkpoint:
        # The final checkpoint of a 1 B model with its Adam state is ~15 GB of disk writes:
        # minutes of a 15-minute GPU lease that measure the disk, not the training.
        loop.save_checkpoint = lambda *args, **kwargs: None
    dpo.main(cfg)


def run_planner(model_dir: Path, s: BenchSetup, timeout: float = 120.0) -> dict:
    """tools/plan_memory.py's prediction for this run: {"planned_peak_bytes", ...} or a note why none."""
    tool = ROOT / "tools/plan_memory.py"
    if not tool.exists():
        return {"planned_peak_bytes": None, "planner": "planner missing (tools/plan_memory.py)"}
    out = s.plan_json or (s.workdir / "plan.json")
    cmd = [sys.executable, str(tool), "--hf-config", str(model_dir), "--tp", "1", "--pp", "1", "--dp", "1",
           "--micro-batch", str(s.micro_batch), "--seq", str(s.seq), "--dtype", "bf16" if s.dtype == "bfloat16"
           else ("fp16" if s.dtype == "float16" else "fp32"), "--optimizer", "replicated", "--recompute", "none",
           "--logprob-impl", "fused", "--trainer", "dpo", "--prompt-len", str(s.prompt_tokens),
           # the planner's layer spec is the one the trainer builds: TE's where it is usable
           "--spec", "te" if platform.is_transformer_engine_usable() else "local", "--json", str(out)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"planned_peak_bytes": None, "planner": f"planner timed out after {timeout:.0f} s", "planner_cmd": cmd}
    if proc.returncode != 0 or not out.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
        return {"planned_peak_bytes": None, "planner": f"planner failed (exit {proc.returncode}): {tail[0]}",
                "planner_cmd": cmd}
    plan = json.loads(out.read_text())
    return {"planned_peak_bytes": plan.get("peak_bytes"), "planner": "ok", "planner_cmd": cmd,
            "planner_json": str(out)}


def summarise_metrics(rows: list[dict]) -> dict:
    """Mean step time, tokens/s, TFLOP/s and MFU over the steps after the first (warm-up:
    autotuning, allocator growth); with one step that step, flagged."""
    timed = rows[1:] if len(rows) > 1 else rows
    seconds = statistics.mean(r["step_seconds"] for r in timed)
    tokens = statistics.mean(r["tokens"] for r in timed)
    out = {"steps_timed": len(timed), "warmup_excluded": len(rows) > 1, "step_seconds": seconds,
           "step_seconds_all": [r["step_seconds"] for r in rows], "tokens_per_step": tokens,
           "tokens_per_second": tokens / seconds,
           "losses": [r.get("loss") for r in rows], "grad_norms": [r.get("grad_norm") for r in rows]}
    # the trainer's own model-FLOP metrics (fg_megatron/models/flops.py, trainers/throughput.py)
    out["tflops"] = statistics.mean(r["tflops"] for r in timed)
    out["mfu"] = statistics.mean(r["mfu"] for r in timed) if all("mfu" in r for r in timed) else None
    return out


def run_bench(s: BenchSetup) -> dict:
    """Build the model and data under ``s.workdir``, plan, train, and report."""
    t0 = time.perf_counter()
    model_dir, data = s.workdir / "model", s.workdir / "pairs.jsonl"
    n_params = write_random_llama(model_dir, s.shape)
    write_preference_data(data, s.global_batch * s.steps, s.prompt_tokens, s.response_tokens)
    build_seconds = time.perf_counter() - t0
    plan = run_planner(model_dir, s)
    save = s.workdir / "run"
    peak_tflops = s.peak_tflops if s.peak_tflops is not None else device_peak_tflops(model_dtype(s.dtype))
    argv = trainer_argv(s, model_dir, data, save, peak_tflops)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t1 = time.perf_counter()
    run_training(argv, s.keep_checkpoint)
    train_seconds = time.perf_counter() - t1
    measured = torch.cuda.max_memory_allocated() if cuda else None
    rows = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines() if line.strip()]
    planned = plan.get("planned_peak_bytes")
    report = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "shape": dataclasses.asdict(s.shape), "params": n_params,
        "setup": {"tp": 1, "pp": 1, "dp": 1, "dtype": s.dtype, "seq": s.seq, "prompt_tokens": s.prompt_tokens,
                  "response_tokens": s.response_tokens, "micro_batch_pairs": s.micro_batch,
                  "global_batch_pairs": s.global_batch, "steps": s.steps, "logprob_impl": s.logprob_impl,
                  "recompute": "none", "optimizer": "replicated (megatron-core, fp32 main params + Adam)",
                  "reference": "precompute (the reference forward passes run before step 1)",
                  "checkpoint_saved": s.keep_checkpoint},
        "trainer_argv": ["tools/train_dpo.py", *argv],
        "peak_tflops": peak_tflops,
        "metrics": summarise_metrics(rows),
        "measured_peak_bytes": measured,
        "measured_peak_note": ("torch.cuda.max_memory_allocated() over the whole run (load, reference "
                               "precompute, training)" if cuda else "no CUDA: not measured"),
        "planned_peak_bytes": planned,
        "ratio": measured / planned if (measured and planned) else None,  # measured / planned
        **{k: v for k, v in plan.items() if k != "planned_peak_bytes"},
        "build_seconds": build_seconds, "train_seconds": train_seconds,
    }
    return report


def format_report(r: dict) -> str:
    m = r["metrics"]
    gib = lambda b: "n/a" if b is None else f"{b / 2**30:.2f} GiB"  # noqa: E731
    mfu = "n/a" if m.get("mfu") is None else f"{100 * m['mfu']:.1f}%"
    ratio = "n/a" if r["ratio"] is None else f"{r['ratio']:.3f}"
    return (f"{r['device']}: {r['params'] / 1e9:.3f} B params, seq {r['setup']['seq']}, "
            f"{r['setup']['global_batch_pairs']} pairs/step\n"
            f"step {m['step_seconds']:.3f} s ({m['steps_timed']} timed), {m['tokens_per_second']:.0f} tokens/s, "
            f"{m['tflops']:.1f} TFLOP/s, MFU {mfu}\n"
            f"peak memory measured {gib(r['measured_peak_bytes'])}, planned {gib(r['planned_peak_bytes'])} "
            f"({r.get('planner')}), measured/planned {ratio}")

