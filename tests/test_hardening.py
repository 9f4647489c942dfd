"""Hostile and careless use of the trainers (issue 11): each case ends in one line and a
non-zero exit, or in the documented recovery, and nothing saved is damaged.

The table of cases in the README's reliability section points here.
"""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dist_utils import ROOT, read_metrics, torchrun

TRAIN = ROOT / "tools/train_dpo.py"
CONVERT = ROOT / "tools/convert_checkpoint.py"
BASE = ["--global-batch-size", "8", "--micro-batch-size", "4", "--set", "train.log_every=100",
        "--set", "optim.warmup_steps=0", "--set", "train.tensorboard=false"]


def _train(save, *args, check=True):
    proc = subprocess.run([sys.executable, str(TRAIN), *BASE, "--save", str(save), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _one_line_error(proc, code=2) -> str:
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """Three steps, a checkpoint after each (all kept)."""
    save = tmp_path_factory.mktemp("hard") / "base"
    _train(save, "--steps", "3", "--save-every", "1", "--set", "train.keep_last=3")
    return save


def _copy(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / run.name
    shutil.copytree(run, dst)
    return dst


def _tensors_finite(step_dir: Path) -> bool:
    from safetensors.torch import load_file

    return all(bool(t.isfinite().all()) for f in (step_dir / "model").glob("*.safetensors")
               for t in load_file(str(f)).values())


# -- resume invariants -------------------------------------------------------------------


def test_resume_refuses_a_new_objective_and_damages_nothing(base_run, tmp_path):
    run = _copy(base_run, tmp_path)
    config, metrics = (run / "config.yaml").read_text(), (run / "metrics.jsonl").read_text()
    line = _one_line_error(_train(run, "--steps", "5", "--resume", "--gamma", "0.5", "--beta", "0.3", check=False))
    assert "dpo.beta was 0.1 in the run being resumed, now 0.3 (and 1 more: dpo.gamma)" in line
    assert "--allow-change dpo.beta" in line
    line = _one_line_error(_train(run, "--steps", "5", "--resume", "--lr", "1e-3", check=False))
    assert "optim.lr was 0.0005 in the run being resumed, now 0.001" in line
    # fields the checkpoint's tensors depend on cannot change, even when asked
    line = _one_line_error(_train(run, "--resume", "--set", "model.dtype=float16", "--allow-change", "model.dtype",
                                  check=False))
    assert "--allow-change model.dtype" in line and "cannot change on resume" in line
    line = _one_line_error(_train(run, "--allow-change", "optim.lr", check=False))
    assert "--allow-change optim.lr applies to --resume only" in line
    line = _one_line_error(_train(run, "--resume", "--allow-change", "optim.lrr", check=False))
    assert "--allow-change optim.lrr: no such config field" in line
    assert (run / "config.yaml").read_text() == config and (run / "metrics.jsonl").read_text() == metrics


def test_allowed_change_is_applied_and_recorded(base_run, tmp_path):
    run = _copy(base_run, tmp_path)
    _train(run, "--steps", "5", "--resume", "--lr", "1e-4", "--gamma", "0.5", "--allow-change", "optim.lr",
           "--allow-change", "dpo")
    metrics = read_metrics(run)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5]
    # the schedule is rebuilt from the new peak (cosine over 5 steps), not the checkpoint's 5e-4
    for m in metrics[3:]:
        expected = 0.5 * 1e-4 * (1 + math.cos(math.pi * (m["step"] - 1) / 5))
        assert m["lr"] == pytest.approx(expected, rel=1e-9), m
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["optim"]["lr"] == 1e-4 and saved["dpo"]["gamma"] == 0.5
    history = {h["field"]: h for h in saved["resume_history"]}
    assert history["optim.lr"] == {"step": 3, "field": "optim.lr", "old": 0.0005, "new": 0.0001}
    assert history["dpo.gamma"] == {"step": 3, "field": "dpo.gamma", "old": 0.1, "new": 0.5}
    # the history travels with the checkpoint: a second resume keeps it and needs no new permission
    _train(run, "--steps", "6", "--resume", "--lr", "1e-4", "--gamma", "0.5")
    again = yaml.safe_load((run / "config.yaml").read_text())["resume_history"]
    assert {"step": 3, "field": "optim.lr", "old": 0.0005, "new": 0.0001} in again


def test_resuming_a_finished_run_does_nothing_and_a_lower_steps_is_refused(base_run, tmp_path):
    run = _copy(base_run, tmp_path)
    config, metrics = (run / "config.yaml").read_text(), (run / "metrics.jsonl").read_text()
    proc = _train(run, "--steps", "3", "--resume")
    out = proc.stdout + proc.stderr
    assert f"run in {run} already finished at step 3 (train.steps=3); pass --steps M to extend it" in proc.stdout
    assert "precomputing" not in out and "loaded" not in out.lower(), out[-3000:]
    line = _one_line_error(_train(run, "--steps", "2", "--resume", check=False))
    assert "--steps 2: the run in" in line and "already at step 3" in line and "--steps 4 or more" in line
    assert (run / "config.yaml").read_text() == config and (run / "metrics.jsonl").read_text() == metrics


def test_extending_a_run_rebuilds_the_schedule_for_the_new_length(base_run, tmp_path):
    run = _copy(base_run, tmp_path)
    proc = _train(run, "--steps", "5", "--resume")
    assert "train.steps 3 -> 5: lr schedule rebuilt" in proc.stderr + proc.stdout, proc.stderr[-3000:]
    metrics = read_metrics(run)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5]
    # cosine over the new 5 steps, continuing at step 3 (the old schedule had decayed to 0 there)
    for m in metrics:
        total = 3 if m["step"] <= 3 else 5
        assert m["lr"] == pytest.approx(0.5 * 5e-4 * (1 + math.cos(math.pi * (m["step"] - 1) / total)), rel=1e-9), m
    history = yaml.safe_load((run / "config.yaml").read_text())["resume_history"]
    assert {"step": 3, "field": "train.steps", "old": 3, "new": 5} in history


def test_resume_verifies_checksums(base_run, tmp_path):
    run = _copy(base_run, tmp_path)
    optim = run / "checkpoints/step_000003/optim_tp00_pp00.safetensors"
    data = bytearray(optim.read_bytes())
    data[len(data) // 2] ^= 1
    optim.write_bytes(bytes(data))
    line = _one_line_error(_train(run, "--steps", "4", "--resume", check=False))
    assert f"{optim}: sha256" in line and "does not match" in line
    ok = subprocess.run([sys.executable, str(CONVERT), "verify", "--ckpt", str(run / "checkpoints/step_000002")],
                        capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0 and "12 files match SHA256SUMS" in ok.stdout, ok.stderr
    bad = subprocess.run([sys.executable, str(CONVERT), "verify", "--ckpt", str(run)], capture_output=True, text=True,
                         cwd=ROOT)
    assert bad.returncode == 2 and "optim_tp00_pp00.safetensors: sha256" in bad.stderr
    # a model loaded from a training checkpoint (here by a new run) is checked against the step's manifest
    shard = run / "checkpoints/step_000001/model/model_tp00_pp00.safetensors"
    data = bytearray(shard.read_bytes())
    data[-100] ^= 1
    shard.write_bytes(bytes(data))
    line = _one_line_error(_train(tmp_path / "new", "--steps", "1", "--load", shard.parent, check=False))
    assert f"{shard}: sha256" in line
    # the manifest is coreutils' format
    if shutil.which("sha256sum"):
        check = subprocess.run(["sha256sum", "--quiet", "-c", "SHA256SUMS"], cwd=run / "checkpoints/step_000002")
        assert check.returncode == 0


# -- one run per directory -----------------------------------------------------------------


def test_fresh_run_refuses_earlier_output_until_overwrite(tmp_path):
    save = tmp_path / "died"
    # a run killed after its first step, before any checkpoint
    proc = subprocess.run([sys.executable, str(TRAIN), *BASE, "--save", str(save), "--steps", "3"],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, "FG_FAULT": "step:1"})
    assert proc.returncode == 137
    assert len(read_metrics(save)) == 1 and not (save / "checkpoints").exists()
    before = (save / "metrics.jsonl").read_text()
    line = _one_line_error(_train(save, "--steps", "2", check=False))
    assert f"train.save={save} holds an earlier run's output (metrics.jsonl, config.yaml)" in line
    assert "--overwrite" in line and (save / "metrics.jsonl").read_text() == before
    _train(save, "--steps", "2", "--overwrite")
    assert [m["step"] for m in read_metrics(save)] == [1, 2]


def test_locked_save_dir_is_refused_and_stale_lock_taken_over(tmp_path):
    from fg_megatron.trainers.rundir import LOCK_FILE, RunLock

    save = tmp_path / "locked"
    save.mkdir()
    held = RunLock.acquire(save)  # this (live) process holds it
    line = _one_line_error(_train(save, "--steps", "1", check=False))
    assert f"train.save={save} is in use by pid {os.getpid()}" in line
    held.release()
    # a lock left by a process that is gone (kill -9) does not block the next run
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (save / LOCK_FILE).write_text(json.dumps({"host": os.uname().nodename, "pid": dead.pid, "start": "1",
                                              "since": "earlier"}))
    _train(save, "--steps", "1")
    assert not (save / LOCK_FILE).exists()  # released at the end
    # a run that fails before writing anything leaves no directory behind
    _one_line_error(_train(tmp_path / "never", "--steps", "1", "--set", "dpo.gama=1", check=False))
    _one_line_error(_train(tmp_path / "never", "--steps", "1", "--data", tmp_path, check=False))
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("kind", ["file", "under_file"])
def test_save_path_that_cannot_be_a_directory(tmp_path, kind):
    f = tmp_path / "f"
    f.write_text("x")
    save = f if kind == "file" else f / "sub"
    start = time.time()
    line = _one_line_error(_train(save, "--steps", "1", check=False))
    assert (f"train.save={save} is a file" in line) if kind == "file" else (f"{f} is a file, so no directory" in line)
    assert time.time() - start < 30  # before any model is loaded


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_save_dir(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    line = _one_line_error(_train(ro / "run", "--steps", "1", check=False))
    assert f"{ro} is not writable" in line


# -- guarded training ----------------------------------------------------------------------


def test_huge_lr_stops_before_any_save(tmp_path):
    save = tmp_path / "huge"
    line = _one_line_error(_train(save, "--steps", "3", "--lr", "1e4", "--save-every", "1", check=False))
    assert "step 1: the weight norm of policy went from" in line and "latest checkpoint: none" in line
    assert not (save / "checkpoints").exists()


def test_huge_lr_never_becomes_latest(tmp_path):
    save = tmp_path / "huge"
    _train(save, "--steps", "1", "--lr", "1e-5")  # a healthy step 1, saved
    line = _one_line_error(_train(save, "--steps", "4", "--resume", "--lr", "1e20", "--allow-change", "optim.lr",
                                  "--save-every", "1", check=False))
    assert "step 2: the weight norm of policy went from" in line and "latest checkpoint: step_000001" in line
    assert (save / "checkpoints/latest").read_text() == "step_000001"
    assert _tensors_finite(save / "checkpoints/step_000001")
    assert [m["step"] for m in read_metrics(save)] == [1, 2]  # the diverged step is logged, not saved


def test_nonfinite_config_values_are_refused(tmp_path):
    for args, needle in ((["--lr", "nan"], "optim.lr: must be a finite number"),
                         (["--gamma", "inf"], "dpo.gamma: must be a finite number"),
                         (["--lr", "0"], "optim.lr must be > 0")):
        line = _one_line_error(_train(tmp_path / "s", "--steps", "1", *args, check=False))
        assert needle in line


def test_sequences_longer_than_the_model_are_refused(tmp_path):
    long = tmp_path / "long.jsonl"
    rows = [{"prompt": "What is 2+2?", "chosen": " 4", "rejected": " 5"}] * 3
    rows.append({"prompt": " ".join(["word"] * 600), "chosen": " yes", "rejected": " no"})
    long.write_text("".join(json.dumps(r) + "\n" for r in rows))
    line = _one_line_error(_train(tmp_path / "s", "--steps", "1", "--data", long, "--set",
                                  "data.max_prompt_length=1000", check=False))
    assert f"{long}:4:" in line and "more than the 256 positions of policy" in line


def test_guard_rules():
    from fg_megatron.trainers.guard import DivergenceError, DivergenceGuard

    guard = DivergenceGuard(3.0)
    guard.start({"policy": 10.0})
    guard.check(1, {"policy": 10.1}, {"loss": 0.7, "grad_norm": 2.0})
    guard.check(2, {"policy": 10.2}, {"loss": 1.5, "grad_norm": 1.0})  # noisy but fine
    with pytest.raises(DivergenceError, match=r"step 3: the weight norm of policy went from 10.2 to 40.8"):
        guard.check(3, {"policy": 40.8}, {"loss": 0.7, "grad_norm": 1.0})
    with pytest.raises(DivergenceError, match="the gradient norm collapsed to 0"):
        guard.check(3, {"policy": 10.2}, {"loss": 0.7, "grad_norm": 0.0})
    with pytest.raises(DivergenceError, match="the loss jumped to 6.5, over 3x its recent maximum 1.5"):
        guard.check(3, {"policy": 10.2}, {"loss": 6.5, "grad_norm": 1.0})
    guard.check(3, {"policy": 10.2}, {"loss": 2.4, "grad_norm": 1.0})  # under 3x the recent maximum
    off = DivergenceGuard(0)
    off.start({"policy": 1.0})
    off.check(1, {"policy": 1e6}, {"loss": 1e6, "grad_norm": 0.0})  # disabled ...
    with pytest.raises(DivergenceError, match="hold NaN/inf"):  # ... except for NaN/inf weights
        off.check(2, {"policy": float("nan")}, {})


# -- faults ----------------------------------------------------------------------------------


def test_torchrun_summary_ends_with_the_one_line_error(tmp_path):
    # every rank fails after the process group is up; rank 0 says it, once, and torchrun's failure
    # summary carries the same line (error file) instead of "To enable traceback see ..."
    proc = torchrun(TRAIN, 2, *BASE, "--global-batch-size", "4", "--save", tmp_path / "s", check=False)
    assert proc.returncode != 0
    expected = "error: train.global_batch_size=4 must be a multiple of data-parallel size 2"
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith(expected), proc.stderr[-3000:]
    assert "To enable traceback" not in proc.stderr, proc.stderr[-3000:]
    root = proc.stderr.split("Root Cause (first observed failure):")[1]
    assert "rank      : 0 " in root, root
    last = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip().strip("=")][-1]
    assert last.startswith(f"traceback : {expected}"), proc.stderr[-3000:]


def test_ctrl_c_is_one_line_and_exit_130(tmp_path):
    save = tmp_path / "int"
    # SIG_DFL: a shell's background job (nohup ... &) would pass SIGINT on ignored, and Python then
    # installs no KeyboardInterrupt handler
    proc = subprocess.Popen([sys.executable, str(TRAIN), *BASE, "--save", str(save), "--steps", "400",
                             "--save-every", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (save / "metrics.jsonl").exists() and len(read_metrics(save)) >= 3:
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    last = err.strip().splitlines()[-1]
    latest = (save / "checkpoints/latest").read_text()
    assert last.startswith("interrupted at step ") and f"latest checkpoint {latest}; continue with --resume" in last
    assert not (save / ".lock").exists()


@pytest.mark.distributed
def test_stalled_rank_ends_the_job_at_the_timeout(tmp_path):
    start = time.time()
    proc = torchrun(TRAIN, 2, *BASE, "--tp", "2", "--steps", "4", "--save", tmp_path / "stall", "--set",
                    "parallel.timeout_minutes=0.1", env={"FG_FAULT": "stall:2:1"}, check=False, timeout=300)
    assert proc.returncode != 0
    assert "error: a collective operation timed out: another rank stalled" in proc.stderr, proc.stderr[-3000:]
    assert time.time() - start < 240  # not the 10-minute default, let alone the old 30


# -- fp16 and RNG ----------------------------------------------------------------------------


def test_bf16_dpo_run_trains_on_cpu(tmp_path):
    """--bf16 on CPU trains end to end (megatron-core's mixed-precision optimizer with fp32 main
    params) and saves a checkpoint in one dtype (norm weights stay fp32 in training): its step-1
    log-probs and grad norm and its step-2 loss are close to an fp32 run's."""
    runs = {}
    for name, extra in (("fp32", []), ("bf16", ["--bf16"])):
        _train(tmp_path / name, "--steps", "2", *extra)
        runs[name] = read_metrics(tmp_path / name)
    fp32, bf16 = runs["fp32"], runs["bf16"]
    for m in bf16:
        assert all(math.isfinite(m[k]) for k in ("loss", "logps_chosen", "grad_norm")), m
    assert abs(bf16[0]["logps_chosen"] - fp32[0]["logps_chosen"]) < 0.05 * abs(fp32[0]["logps_chosen"])
    assert bf16[0]["grad_norm"] == pytest.approx(fp32[0]["grad_norm"], rel=0.05)
    assert bf16[1]["loss"] == pytest.approx(fp32[1]["loss"], rel=0.05) and bf16[1]["loss"] < math.log(2) - 0.01
    meta = json.loads((tmp_path / "bf16/checkpoints/step_000002/model/fg_checkpoint.json").read_text())
    assert meta["dtype"] == "bfloat16"


def test_fp16_step_matches_fp32_step(tmp_path):
    """With model.dtype float16 the loss is scaled up before backward and the gradients down
    after it: grad norms, losses and the weight update agree with fp32."""
    out = tmp_path / "fp16.json"
    subprocess.run([sys.executable, str(ROOT / "tests/dist/fp16_step.py"), "--out", str(out)], check=True, cwd=ROOT,
                   env={**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}, capture_output=True)
    r = json.loads(out.read_text())
    assert not any(r["float16"]["skipped"])
    for a, b in zip(r["float32"]["grad_norms"], r["float16"]["grad_norms"]):
        assert b == pytest.approx(a, rel=5e-3)
    for a, b in zip(r["float32"]["losses"], r["float16"]["losses"]):
        assert b == pytest.approx(a, rel=5e-3)
    assert r["update_cosine"] > 0.99 and r["update_norm_ratio"] == pytest.approx(1.0, rel=0.02)
    # before the fix the update was ~1e-2 of fp32's: gradients divided by the 2^16 scale only
    assert r["float16"]["loss_scale"] > 1.0


@pytest.mark.distributed
def test_resume_restores_every_rng_and_never_saves_nan(tmp_path):
    from dist_utils import torchrun_json

    ranks = torchrun_json("checkpoint_rng.py", 2, "--tp", "2", "--save", tmp_path / "s", out=tmp_path / "r.json")
    for r in ranks:
        assert r["after_load"] == r["after_save"]  # python, numpy, torch and megatron's tracker stream
        assert r["scrambled"] != r["after_save"]  # (the check could fail)
        assert r["error"] is not None and "holds NaN/inf" in r["error"] and "latest checkpoint: step_000001" in r["error"]
    assert ranks[0]["error"] == ranks[1]["error"]  # the rank holding the NaN names it on every rank
    assert ranks[0]["after_save"][3] != ranks[1]["after_save"][3]  # TP ranks draw different tracker streams
    assert (tmp_path / "s/checkpoints/latest").read_text() == "step_000001"
    assert not (tmp_path / "s/checkpoints/step_000002").exists()
