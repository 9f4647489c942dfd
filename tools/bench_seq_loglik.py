"""Time (forward + backward) and peak extra memory of per-token log-likelihood implementations.

python tools/bench_seq_loglik.py --out benchmarks/seq_loglik_cpu.json            # CPU defaults
python tools/bench_seq_loglik.py --out benchmarks/seq_loglik_h200.json           # on a GPU

Implementations, all computing log p(y | h) = log_softmax(h @ W.T)[y] and the
gradients of h and W for a random per-token upstream gradient:
  naive     full [N, V] logits, log_softmax, gather (torch autograd)
  megatron  full [N, V] fp32 logits + megatron-core's vocab_parallel_cross_entropy
  torch     ours, chunked torch path (kernels/seq_loglik_torch.py)
  triton    ours, fused Triton kernel (GPU only; --impls triton forces the interpreter)
  liger     Liger-Kernel's fused linear cross entropy, reduction "sum" (GPU, if installed)

Peak extra memory = peak during one forward + backward minus the memory held
just before it (inputs already allocated; the gradients of h and W are part of
the peak for every implementation).  On CUDA: torch.cuda.max_memory_allocated.
On CPU: each implementation runs in a fresh process that makes one tiny warm-up
step (so the math libraries' code pages and thread pools are resident), resets
the kernel's resident-set high-water mark (``echo 5 > /proc/self/clear_refs``)
and reads ``VmHWM - VmRSS`` after one full-size step.  RSS sees every
allocation torch makes (tracemalloc does not), glibc returns large freed blocks
to the OS, and no large block was freed before the step, so the high-water mark
is the live peak.  Time: implementations interleaved round-robin in one
process after a warm-up round; ``seconds`` is the minimum over rounds (the
machine may be shared), ``seconds_median`` the median, ``cpu_seconds`` the
minimum process CPU time (all threads: a cross-check that other processes'
load does not skew much).
Every implementation gets its memory and time ratios to naive and to Liger where those
ran.  An implementation that cannot run (Liger or megatron-core not importable, no CUDA)
or fails (out of memory) is listed under ``skipped`` with the reason; the others still run.
TFLOP/s counts the 6 N V d FLOPs of the three GEMMs of a plain forward +
backward (ours does 8 N V d: the backward recomputes the logits).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CUDA = torch.cuda.is_available()
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=16384 if CUDA else 4096)
    p.add_argument("--hidden", type=int, default=4096 if CUDA else 1024)
    p.add_argument("--vocab", type=int, default=128256 if CUDA else 32000)
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16" if CUDA else "float32")
    p.add_argument("--impls", default="naive,megatron,torch,triton,liger",
                   help="comma-separated; unavailable ones are skipped with a note")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds after one warm-up round")
    p.add_argument("--chunk-elems", type=int, default=None, help="logits-tile budget of our impls")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: one memory measurement
    return p.parse_args(argv)


def available(impl: str, requested: bool) -> str | None:
    """None if ``impl`` can run here, else why not (a note in the report, never a crash)."""
    if impl == "triton" and not CUDA and not requested:
        return "no CUDA (the interpreter is for tests; ask with --impls triton)"
    if impl == "liger":
        if not CUDA:
            return "needs CUDA"
        try:  # the submodule too: it imports transformers internals that may not match
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss  # noqa: F401
        except Exception as exc:  # noqa: BLE001 - any import failure is a note
            return f"liger-kernel not importable ({type(exc).__name__}: {exc})"[:300]
    if impl == "megatron":
        try:
            from megatron.core import tensor_parallel  # noqa: F401
        except Exception as exc:  # noqa: BLE001
            return f"megatron-core not importable ({type(exc).__name__}: {exc})"[:300]
    return None


def make_inputs(a):
    dev = "cuda" if CUDA else "cpu"
    g = torch.Generator(device=dev).manual_seed(0)
    dt = DTYPES[a.dtype]
    h = torch.randn(a.tokens, a.hidden, generator=g, device=dev).to(dt).requires_grad_()
    w = (torch.randn(a.vocab, a.hidden, generator=g, device=dev) * a.hidden ** -0.5).to(dt).requires_grad_()
    y = torch.randint(0, a.vocab, (a.tokens,), generator=g, device=dev)
    up = torch.randn(a.tokens, generator=g, device=dev)
    return h, w, y, up


def step_fn(impl: str, a, inputs):
    """A closure running one forward + backward of ``impl`` on ``inputs``."""
    h, w, y, up = inputs
    if impl == "naive":
        def run():
            logp = torch.log_softmax((h @ w.t()).float(), dim=-1).gather(1, y[:, None])[:, 0]
            (logp * up).sum().backward()
    elif impl == "megatron":
        from fg_megatron import parallel
        from megatron.core import tensor_parallel

        parallel.initialize(1, 1)  # vocab_parallel_cross_entropy reads the TP group

        def run():
            nll = tensor_parallel.vocab_parallel_cross_entropy((h @ w.t()).float()[:, None, :], y[:, None], 0.0)
            (-nll[:, 0] * up).sum().backward()
    elif impl in ("torch", "triton"):
        from fg_megatron_kernels.seq_loglik import seq_loglik

        def run():
            (seq_loglik(h, w, y, impl=impl, chunk_elems=a.chunk_elems) * up).sum().backward()
    elif impl == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        loss_fn = LigerFusedLinearCrossEntropyLoss(reduction="sum")

        def run():
            out = loss_fn(w, h, y)
            (out[0] if isinstance(out, tuple) else out).backward()  # some versions add a z-loss
    else:
        raise SystemExit(f"unknown impl {impl!r}")

    def step():
        h.grad = w.grad = None
        run()
        if CUDA:
            torch.cuda.synchronize()
    return step


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def measure_peak(impl: str, a) -> int:
    """Peak extra bytes of one step (see the module docstring for the method)."""
    step = step_fn(impl, a, make_inputs(a))
    if CUDA:
        step()  # autotuning and workspaces happen once, outside the measurement
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        return torch.cuda.max_memory_allocated() - base
    # A tiny step first, so code pages of the math libraries and thread pools
    # are resident before the baseline (they are not memory the step needs).
    tiny = argparse.Namespace(**{**vars(a), "tokens": 64, "hidden": 64, "vocab": 512})
    step_fn(impl, tiny, make_inputs(tiny))()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    base = _status_kib("VmRSS")
    step()
    return (_status_kib("VmHWM") - base) * 1024


class ImplFailed(RuntimeError):
    """One implementation failed (out of memory, a compile error): reported, the others still run."""


def peak_in_fresh_process(impl: str, argv: list[str]) -> int:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, __file__, *argv, "--child", impl], capture_output=True, text=True,
                          env=env)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or ["(no output)"]
        raise ImplFailed(f"memory run failed (exit {proc.returncode}): {lines[-1][:300]}")
    return int(proc.stdout.strip().splitlines()[-1])


def add_ratios(results: dict[str, dict]) -> None:
    """Memory and time of every implementation relative to naive and to Liger (where those ran)."""
    for base in ("naive", "liger"):
        if base not in results:
            continue
        ref = results[base]
        for impl, res in results.items():
            if impl == base:
                continue
            res[f"memory_ratio_vs_{base}"] = res["peak_bytes"] / max(ref["peak_bytes"], 1)
            res[f"time_ratio_vs_{base}"] = res["seconds"] / ref["seconds"]
            if base == "naive":
                res["cpu_time_ratio_vs_naive"] = res["cpu_seconds"] / ref["cpu_seconds"]


def main(argv=None) -> dict:
    a = parse_args(argv)
    if a.child:
        print(measure_peak(a.child, a))
        return {}
    explicit = a.impls != parse_args([]).impls
    impls, skipped = [], {}
    for impl in a.impls.split(","):
        why = available(impl, requested=explicit)
        if why:
            skipped[impl] = why
        else:
            impls.append(impl)
    child_argv = ["--tokens", str(a.tokens), "--hidden", str(a.hidden), "--vocab", str(a.vocab),
                  "--dtype", a.dtype] + (["--chunk-elems", str(a.chunk_elems)] if a.chunk_elems else [])
    results: dict[str, dict] = {}
    for impl in impls:
        try:
            results[impl] = {"peak_bytes": peak_in_fresh_process(impl, child_argv)}
        except ImplFailed as exc:
            skipped[impl] = str(exc)
    impls = [i for i in impls if i in results]
    inputs = make_inputs(a)
    steps, times, cpu_times = {}, {impl: [] for impl in impls}, {impl: [] for impl in impls}
    for impl in impls:
        try:
            steps[impl] = step_fn(impl, a, inputs)
        except Exception as exc:  # noqa: BLE001 - e.g. an import that works only in a fresh process
            skipped[impl] = f"setup failed: {type(exc).__name__}: {exc}"[:300]
            results.pop(impl)
    for r in range(a.rounds + 1):
        for impl in list(steps):
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                steps[impl]()
            except Exception as exc:  # noqa: BLE001 - e.g. out of memory next to the others' inputs
                skipped[impl] = f"timed run failed: {type(exc).__name__}: {exc}"[:300]
                del steps[impl]
                results.pop(impl, None)
                continue
            if r:  # round 0 warms up (allocator, autotuning, thread pools)
                times[impl].append(time.perf_counter() - t0)
                cpu_times[impl].append(time.process_time() - c0)
    flops = 6.0 * a.tokens * a.vocab * a.hidden
    for impl in list(results):
        res = results[impl]
        res["seconds"] = min(times[impl])
        res["seconds_median"] = statistics.median(times[impl])
        res["cpu_seconds"] = min(cpu_times[impl])  # all threads; less sensitive to a shared machine
        res["tflops"] = flops / res["seconds"] / 1e12
    add_ratios(results)
    device = torch.cuda.get_device_name() if CUDA else f"cpu ({torch.get_num_threads()} threads)"
    report = {"device": device, "torch": torch.__version__,
              "config": {"tokens": a.tokens, "hidden": a.hidden, "vocab": a.vocab, "dtype": a.dtype,
                         "rounds": a.rounds, "chunk_elems": a.chunk_elems,
                         "grad_bytes": (a.tokens + a.vocab) * a.hidden * DTYPES[a.dtype].itemsize},
              "results": results, "skipped": skipped}
    print(f"{device}: N={a.tokens} d={a.hidden} V={a.vocab} {a.dtype}, fwd+bwd")
    print(f"{'impl':10s} {'seconds':>9s} {'median':>9s} {'TFLOP/s':>8s} {'peak MiB':>10s} {'mem/naive':>10s} "
          f"{'time/naive':>10s} {'time/liger':>10s}")
    for impl, r in results.items():
        print(f"{impl:10s} {r['seconds']:9.3f} {r['seconds_median']:9.3f} {r['tflops']:8.3f} "
              f"{r['peak_bytes'] / 2**20:10.1f} {r.get('memory_ratio_vs_naive', float('nan')):10.3f} "
              f"{r.get('time_ratio_vs_naive', float('nan')):10.3f} {r.get('time_ratio_vs_liger', float('nan')):10.3f}")
    for impl, why in skipped.items():
        print(f"{impl:10s} skipped: {why}")
    if a.out is not None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
