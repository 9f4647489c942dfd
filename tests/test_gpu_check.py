"""tools/gpu_check.sh: its dry run on CPU, its argument errors, and the summary it writes
(the GPU stages themselves run only on the GPU machine)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from dist_utils import ROOT
from fg_megatron.bench.check import write_summary

SCRIPT = ROOT / "tools/gpu_check.sh"
STAGES = ["wheels", "install", "env", "gpu_tests", "seq_loglik", "dpo_1b", "dpo_tiny"]


def _run(*args, timeout=60, env=None):
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout, env={**os.environ, "PYTHON": sys.executable, **(env or {})})


def test_dry_run_writes_every_file_and_marks_gpu_stages_skipped(tmp_path):
    out = tmp_path / "out"
    proc = _run(out, "--dry-run", "--wheels", tmp_path / "no_wheels", timeout=600,
                env={"GPU_CHECK_WORK": str(tmp_path / "work")})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("stages.jsonl", "env.json", "env.log", "dpo_tiny.json", "dpo_tiny.log", "summary.json",
                 "summary.md"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    stages = {s["stage"]: s for s in summary["stages"]}
    assert list(stages) == STAGES and summary["ok"]
    for name in ("install", "gpu_tests", "seq_loglik", "dpo_1b"):
        assert (stages[name]["status"], stages[name]["reason"]) == ("skipped", "dry run"), stages[name]
    # no wheels here: a note in a dry run, not a failure
    assert stages["wheels"]["status"] == "skipped" and "found 0" in stages["wheels"]["reason"]
    assert stages["env"]["status"] == "ok" and "torch" in stages["env"]["line"]
    env = json.loads((out / "env.json").read_text())
    assert env["torch"] and "importable" in env["transformer_engine"] and "nvidia_smi" in env
    assert stages["dpo_tiny"]["status"] == "ok", stages["dpo_tiny"]
    dpo = json.loads((out / "dpo_tiny.json").read_text())
    assert dpo["metrics"]["tokens_per_step"] == 4 * 2 * 48  # 4 pairs of exactly 24 + 24 tokens
    assert dpo["metrics"]["tflops"] > 0 and dpo["measured_peak_bytes"] is None  # no CUDA here
    assert dpo["planner"] == "ok" or dpo["planner"].startswith("planner missing"), dpo["planner"]
    md = (out / "summary.md").read_text()
    assert all(f"| {s} |" in md for s in STAGES) and md.rstrip().endswith("ok")


@pytest.mark.parametrize("args,message", [([], "usage: tools/gpu_check.sh OUT_DIR"),
                                          (["OUT", "--bogus"], "unknown option --bogus"),
                                          (["OUT", "--skip", "nope"], "--skip: unknown stage nope"),
                                          (["A", "B"], "one OUT_DIR only")])
def test_bad_arguments_exit_2(tmp_path, args, message):
    proc = _run(*[str(tmp_path / a) if a in ("OUT", "A", "B") else a for a in args])
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_summary_reads_each_stages_numbers(tmp_path):
    stages = [{"stage": "gpu_tests", "status": "failed", "rc": 1, "seconds": 50, "reason": "exit 1"},
              {"stage": "seq_loglik", "status": "ok", "rc": 0, "seconds": 60, "reason": ""},
              {"stage": "dpo_1b", "status": "failed", "rc": 124, "seconds": 150, "reason": "timed out after 150 s"}]
    (tmp_path / "stages.jsonl").write_text("".join(json.dumps(s) + "\n" for s in stages))
    (tmp_path / "gpu_tests.xml").write_text(
        '<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="4" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.test_a" name="t1"/><testcase classname="tests.test_a" name="t2">'
        '<failure message="x"/></testcase><testcase classname="tests.test_b" name="t3"><skipped/></testcase>'
        '<testcase classname="tests.test_b" name="t4"/></testsuite></testsuites>')
    (tmp_path / "seq_loglik_h200.json").write_text(json.dumps({"results": {
        "naive": {"seconds": 0.2, "tflops": 300.0, "peak_bytes": 30 * 2**30},
        "triton": {"seconds": 0.1, "tflops": 600.0, "peak_bytes": 2**30, "time_ratio_vs_naive": 0.5,
                   "memory_ratio_vs_naive": 0.033, "time_ratio_vs_liger": 0.9}},
        "skipped": {"liger": "liger-kernel not importable"}}))
    summary = write_summary(tmp_path)
    by = {s["stage"]: s for s in summary["stages"]}
    assert not summary["ok"] and summary["failed"] == ["gpu_tests", "dpo_1b"]
    assert by["gpu_tests"]["numbers"]["passed"] == 2 and by["gpu_tests"]["numbers"]["failed_tests"] == ["tests.test_a::t2"]
    assert by["gpu_tests"]["line"] == "2 passed, 1 failed, 1 skipped"
    assert "triton 100.0 ms 600 TFLOP/s" in by["seq_loglik"]["line"] and "0.90x time vs liger" in by["seq_loglik"]["line"]
    assert "liger skipped (liger-kernel not importable)" in by["seq_loglik"]["line"]
    assert "line" not in by["dpo_1b"]  # no dpo_1b.json: the reason says why
    assert "FAILED: gpu_tests, dpo_1b" in (tmp_path / "summary.md").read_text()


def test_seq_loglik_bench_ratios_and_missing_liger():
    spec = importlib.util.spec_from_file_location("bench_seq_loglik", ROOT / "tools/bench_seq_loglik.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = {"naive": {"seconds": 2.0, "cpu_seconds": 4.0, "peak_bytes": 100},
               "liger": {"seconds": 1.0, "cpu_seconds": 1.0, "peak_bytes": 10},
               "triton": {"seconds": 0.5, "cpu_seconds": 1.0, "peak_bytes": 5}}
    bench.add_ratios(results)
    assert results["triton"]["time_ratio_vs_naive"] == 0.25 and results["triton"]["time_ratio_vs_liger"] == 0.5
    assert results["liger"]["memory_ratio_vs_naive"] == 0.1 and results["naive"]["time_ratio_vs_liger"] == 2.0
    if not bench.CUDA:
        assert bench.available("liger", requested=True) == "needs CUDA"
