"""The GPU check's environment record and report (called by ``tools/gpu_check.sh``).

python -m fg_megatron.bench.check env OUT_DIR       # OUT_DIR/env.json
python -m fg_megatron.bench.check summary OUT_DIR   # OUT_DIR/summary.json + summary.md

The shell script appends one JSON object per stage to ``OUT_DIR/stages.jsonl``
(stage, status ok / failed / skipped, reason, rc, seconds); the summary adds each stage's
key numbers from the files it wrote.  Everything here reads what is there and never
raises on a missing or broken file: a failed stage must still get its summary line.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import platform
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable, Optional

# Stage -> the file its numbers come from (relative to OUT_DIR).
STAGE_FILES = {"wheels": "wheels.log", "gpu_tests": "gpu_tests.xml", "seq_loglik": "seq_loglik_h200.json",
               "dpo_1b": "dpo_1b.json", "dpo_tiny": "dpo_tiny.json", "env": "env.json"}


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _importable(module: str) -> dict:
    try:
        mod = importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - TE fails with OSError / RuntimeError as often as ImportError
        return {"importable": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
    return {"importable": True, "version": getattr(mod, "__version__", None),
            "file": getattr(mod, "__file__", None)}


def _command(cmd: list[str], timeout: float = 20.0) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"({cmd[0]} not run: {type(exc).__name__}: {exc})"
    return (proc.stdout + proc.stderr).strip()


def environment() -> dict:
    """Versions and devices; each probe separate so that one broken package shows as such."""
    env: dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform(),
                           "nvidia_smi": _command(["nvidia-smi"])}
    try:
        import torch

        env["torch"] = torch.__version__
        env["torch_cuda"] = torch.version.cuda
        env["cuda_available"] = torch.cuda.is_available()
        env["device"] = torch.cuda.get_device_name() if env["cuda_available"] else None
        env["device_count"] = torch.cuda.device_count()
    except Exception as exc:  # noqa: BLE001
        env["torch"] = f"not importable: {type(exc).__name__}: {exc}"
    env["triton"] = _importable("triton")
    env["megatron_core"] = {**_importable("megatron.core"), "dist_version": _version("megatron-core")}
    env["liger_kernel"] = {**_importable("liger_kernel"), "dist_version": _version("liger-kernel")}
    env["transformer_engine"] = _importable("transformer_engine")
    env["transformers"] = _importable("transformers")
    env["fg_megatron_kernels"] = _importable("fg_megatron_kernels.seq_loglik")  # a namespace package: no file of its own
    return env


def read_stages(out: Path) -> list[dict]:
    path = out / "stages.jsonl"
    if not path.exists():
        return []
    stages = []
    for line in path.read_text().splitlines():
        try:
            stages.append(json.loads(line))
        except json.JSONDecodeError:
            stages.append({"stage": "?", "status": "failed", "reason": f"unreadable stage line: {line[:200]}"})
    return stages


def junit_counts(path: Path) -> dict:
    """Test counts of a pytest --junitxml file."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failed_tests"] = [f"{c.get('classname')}::{c.get('name')}" for c in root.iter("testcase")
                              if c.find("failure") is not None or c.find("error") is not None]
    return counts


def _gib(b: Optional[float]) -> str:
    return "n/a" if b is None else f"{b / 2**30:.2f} GiB"


def _num(x: Optional[float], fmt: str) -> str:
    return "n/a" if x is None else format(x, fmt)


def numbers_gpu_tests(path: Path) -> tuple[dict, str]:
    c = junit_counts(path)
    return c, f"{c['passed']} passed, {c['failures'] + c['errors']} failed, {c['skipped']} skipped"


def numbers_seq_loglik(path: Path) -> tuple[dict, str]:
    r = json.loads(path.read_text())
    parts = []
    for impl, v in r.get("results", {}).items():
        extra = "".join(f", {v[k]:.2f}x {k.split('_')[0]} vs {k.rsplit('_', 1)[1]}"
                        for k in ("time_ratio_vs_naive", "memory_ratio_vs_naive", "time_ratio_vs_liger")
                        if k in v and impl in ("triton", "torch"))
        parts.append(f"{impl} {v['seconds'] * 1e3:.1f} ms {v['tflops']:.0f} TFLOP/s {_gib(v['peak_bytes'])}{extra}")
    parts += [f"{impl} skipped ({why})" for impl, why in r.get("skipped", {}).items()]
    return r, "; ".join(parts)


def numbers_dpo(path: Path) -> tuple[dict, str]:
    r = json.loads(path.read_text())
    m = r.get("metrics", {})
    mfu = m.get("mfu")
    line = (f"{_num(m.get('tokens_per_second'), '.0f')} tokens/s, step {_num(m.get('step_seconds'), '.3f')} s, "
            f"{_num(m.get('tflops'), '.1f')} TFLOP/s, MFU {'n/a' if mfu is None else f'{100 * mfu:.1f}%'}, "
            f"peak {_gib(r.get('measured_peak_bytes'))} vs planned {_gib(r.get('planned_peak_bytes'))} "
            f"(ratio {_num(r.get('ratio'), '.3f')}; {r.get('planner')})")
    return r, line


def numbers_env(path: Path) -> tuple[dict, str]:
    e = json.loads(path.read_text())
    te = e.get("transformer_engine", {})
    return e, (f"{e.get('device') or 'no CUDA'}, torch {e.get('torch')} (CUDA {e.get('torch_cuda')}), "
               f"triton {e.get('triton', {}).get('version')}, megatron-core {e.get('megatron_core', {}).get('version')}, "
               f"liger {e.get('liger_kernel', {}).get('dist_version')}, "
               f"TE {'importable' if te.get('importable') else 'not importable'}")


def numbers_wheels(path: Path) -> tuple[dict, str]:
    found = [ln for ln in path.read_text().splitlines() if ln.endswith(".whl")]
    return {"wheels": found}, ", ".join(found) or "no wheels"


NUMBERS: dict[str, Callable[[Path], tuple[dict, str]]] = {
    "wheels": numbers_wheels, "gpu_tests": numbers_gpu_tests, "seq_loglik": numbers_seq_loglik, "dpo_1b": numbers_dpo,
    "dpo_tiny": numbers_dpo, "env": numbers_env}


def summarise(out: Path) -> dict:
    stages = read_stages(out)
    for s in stages:
        name = s.get("stage")
        path = out / STAGE_FILES.get(name, "")
        if name in NUMBERS and path.is_file():
            try:
                s["numbers"], s["line"] = NUMBERS[name](path)
            except Exception as exc:  # noqa: BLE001 - a broken output file is one more failure to report
                s["line"] = f"could not read {path.name}: {type(exc).__name__}: {exc}"
    failed = [s["stage"] for s in stages if s.get("status") == "failed"]
    return {"ok": not failed, "failed": failed, "stages": stages}


def write_summary(out: Path) -> dict:
    summary = summarise(out)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    lines = ["# GPU check summary", "", "| stage | status | seconds | details |", "|---|---|---|---|"]
    for s in summary["stages"]:
        status = s.get("status", "?") + (f" ({s['reason']})" if s.get("reason") else "")
        details = (s.get("line") or "").replace("|", "/")
        lines.append(f"| {s.get('stage')} | {status.replace('|', '/')} | {s.get('seconds', '')} | {details} |")
    lines += ["", "ok" if summary["ok"] else f"FAILED: {', '.join(summary['failed'])}", ""]
    (out / "summary.md").write_text("\n".join(lines))
    return summary


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description="the GPU check's environment record and summary")
    p.add_argument("what", choices=["env", "summary"])
    p.add_argument("out_dir", type=Path)
    a = p.parse_args(argv)
    a.out_dir.mkdir(parents=True, exist_ok=True)
    if a.what == "env":
        env = environment()
        (a.out_dir / "env.json").write_text(json.dumps(env, indent=1) + "\n")
        print(numbers_env(a.out_dir / "env.json")[1])
        return 0
    summary = write_summary(a.out_dir)
    print((a.out_dir / "summary.md").read_text())
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
