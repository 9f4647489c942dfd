"""The DPO trainer end to end on the bundled tiny model and data (torchrun, gloo):
step-0 identities, layout invariance, KD offset, kill-and-resume, kill during a save,
bad input errors."""

import json
import math
import subprocess
import sys

import pytest

from dist_utils import ROOT, tool_error, torchrun

TRAIN = ROOT / "tools/train_dpo.py"
BASE = ["--steps", "3", "--global-batch-size", "8", "--micro-batch-size", "2", "--set", "train.log_every=1",
        "--set", "optim.warmup_steps=0", "--set", "train.tensorboard=false"]


def _metrics(save):
    return [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]


def _run(save, nproc, *args, env=None, check=True):
    return torchrun(TRAIN, nproc, *BASE, "--save", save, *args, env=env, check=check)


class _Run(list):
    stderr = ""


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    save = tmp_path_factory.mktemp("dpo") / "tp1"
    proc = _run(save, 1, "--tp", "1")
    run = _Run(_metrics(save))
    run.stderr = proc.stderr
    return run


def test_step0_data_summary_is_logged_before_training(reference_run):
    """Rows, format, token-length percentiles and truncation counts, printed once before step 1."""
    lines = [line for line in reference_run.stderr.splitlines() if line.startswith("[fg rank0] ")]
    at = next(i for i, line in enumerate(lines) if " data " in line and "pref_train.jsonl: 3000 pairs, format generic" in line)
    assert lines[at + 1].startswith("[fg rank0]   tokens before truncation p50/p90/p99/max: prompt ")
    assert lines[at + 2].startswith("[fg rank0]   no pairs truncated by max_prompt_length=")
    assert sum("tokens before truncation" in line for line in lines) == 1


@pytest.mark.distributed
def test_step0_identities(reference_run):
    m0 = reference_run[0]
    assert m0["rewards_chosen"] == 0.0 and m0["rewards_rejected"] == 0.0  # policy == reference, bitwise
    assert abs(m0["dpo_loss"] - math.log(2)) <= 1e-6
    assert m0["gate_rate"] == 0.0  # epsilon 0 and strict '>'
    assert m0["ce_loss"] == 0.0 and abs(m0["loss"] - math.log(2)) <= 1e-6
    assert m0["logps_chosen"] < 0
    for key in ("loss", "dpo_loss", "ce_loss", "gate_rate", "rewards_chosen", "rewards_rejected",
                "reward_margin", "reward_accuracy", "lr", "grad_norm", "tokens", "tokens_per_second"):
        assert all(key in m and math.isfinite(m[key]) for m in reference_run), key
    assert reference_run[-1]["loss"] != reference_run[0]["loss"]  # it trains


@pytest.mark.distributed
@pytest.mark.parametrize("layout", ["tp2", "pp2", "dp2"])
def test_same_losses_for_every_layout(reference_run, tmp_path, layout):
    args = {"tp2": ["--tp", "2"], "pp2": ["--pp", "2"], "dp2": []}[layout]
    _run(tmp_path / layout, 2, *args)
    got = _metrics(tmp_path / layout)
    assert len(got) == 3
    for a, b in zip(reference_run, got):
        for key in ("loss", "dpo_loss", "ce_loss", "gate_rate", "reward_margin"):
            assert abs(a[key] - b[key]) <= 1e-5, (layout, key, a[key], b[key])
        # An extra 1/DP (or a missing one) in the gradient hides in every loss behind clipping and
        # Adam's scale invariance, but not in the gradient norm.
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5 * a["grad_norm"], (layout, a["grad_norm"], b["grad_norm"])


@pytest.mark.distributed
def test_kd_step0_offset(tmp_path):
    gamma = 0.05
    _run(tmp_path / "kd", 1, "--steps", "1", "--constraint", "kd", "--gamma", str(gamma))
    m0 = _metrics(tmp_path / "kd")[0]
    assert m0["gate_rate"] == 1.0
    # loss - ln 2 = -gamma * mean(logp_chosen)
    assert abs((m0["loss"] - math.log(2)) - (-gamma * m0["logps_chosen"])) <= 1e-6
    assert m0["ce_loss"] > 0


@pytest.mark.distributed
def test_eval_pairs_are_scored_the_same_on_every_layout_and_reference_mode(tmp_path):
    pairs = tmp_path / "eval.jsonl"
    pairs.write_text("".join((ROOT / "assets/tiny/data/pref_eval.jsonl").read_text().splitlines(True)[:10]))
    args = ["--steps", "3", "--eval-data", pairs, "--eval-every", "2"]
    _run(tmp_path / "tp1", 1, *args)
    _run(tmp_path / "dp2", 2, *args, "--set", "dpo.reference=online")  # 5 pairs per replica, own reference
    keys = ("eval_loss", "eval_dpo_loss", "eval_reward_accuracy", "eval_reward_margin", "eval_gate_rate")
    a, b = _metrics(tmp_path / "tp1"), _metrics(tmp_path / "dp2")
    assert [sorted(k for k in m if k.startswith("eval_")) for m in a] == [[], sorted(keys), sorted(keys)]
    for ma, mb in zip(a[1:], b[1:]):
        for key in keys:
            assert math.isfinite(ma[key]) and abs(ma[key] - mb[key]) <= 1e-5, (key, ma[key], mb[key])
    assert 0 <= a[2]["eval_reward_accuracy"] <= 1 and 0 <= a[2]["eval_gate_rate"] <= 1
    assert a[2]["eval_reward_margin"] != 0 and a[2]["eval_loss"] >= a[2]["eval_dpo_loss"]


@pytest.mark.distributed
def test_epochs_resolve_to_steps_once_the_data_is_read(tmp_path):
    rows = tmp_path / "train.jsonl"
    rows.write_text("".join((ROOT / "assets/tiny/data/pref_train.jsonl").read_text().splitlines(True)[:20]))
    args = [a for a in BASE if a not in ("--steps", "3")]
    proc = torchrun(TRAIN, 1, *args, "--save", tmp_path / "e", "--data", rows, "--set", "train.epochs=1")
    assert "train.epochs=1: 20 rows / global batch 8 -> train.steps=3" in proc.stdout + proc.stderr
    assert [m["step"] for m in _metrics(tmp_path / "e")] == [1, 2, 3]
    # config.yaml keeps the epochs (it loads again); the checkpoint knows the steps they resolved to
    assert "epochs: 1" in (tmp_path / "e/config.yaml").read_text()
    again = torchrun(TRAIN, 1, *args, "--save", tmp_path / "e", "--data", rows, "--set", "train.epochs=1", "--resume")
    assert "already finished at step 3 (train.steps=3)" in again.stdout
    line = tool_error(TRAIN, *BASE, "--save", tmp_path / "both", "--set", "train.epochs=1")
    assert "train.steps=3 and train.epochs=1 are both set" in line
    line = tool_error(ROOT / "tools/train_rm.py", "--save", tmp_path / "rm", "--set", "train.epochs=1")
    assert "train.epochs: RM counts train.steps; set train.steps instead" in line


@pytest.mark.distributed
def test_kill_and_resume_reproduces_losses(tmp_path):
    args = ["--tp", "2", "--steps", "6", "--save-every", "2"]
    _run(tmp_path / "full", 2, *args)
    full = _metrics(tmp_path / "full")
    killed = tmp_path / "killed"
    # killed right after step 3 (last checkpoint: step 2) ...
    proc = _run(killed, 2, *args, env={"FG_FAULT": "step:3"}, check=False)
    assert proc.returncode != 0
    assert (killed / "checkpoints/latest").read_text() == "step_000002"
    # ... then killed in the middle of saving step 4: the step-2 checkpoint stays the latest
    proc = _run(killed, 2, *args, "--resume", env={"FG_FAULT": "save:4"}, check=False)
    assert proc.returncode != 0
    assert (killed / "checkpoints/latest").read_text() == "step_000002"
    assert not (killed / "checkpoints/step_000004").exists()
    _run(killed, 2, *args, "--resume")
    resumed = _metrics(killed)
    assert [m["step"] for m in resumed] == list(range(1, 7))
    for a, b in zip(full, resumed):
        for key in ("loss", "dpo_loss", "gate_rate", "reward_margin", "grad_norm"):
            assert abs(a[key] - b[key]) <= 1e-6, (a["step"], key, a[key], b[key])
    # the final checkpoint exports to an HF model that transformers loads
    from transformers import AutoModelForCausalLM

    from fg_megatron.checkpoint.convert import fg_to_hf

    fg_to_hf(killed / "checkpoints/step_000006/model", tmp_path / "hf")
    AutoModelForCausalLM.from_pretrained(tmp_path / "hf")


def _cli_error(args, tmp_path):
    proc = subprocess.run([sys.executable, str(TRAIN), *BASE, "--save", str(tmp_path / "s"), *args],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-3000:]
    return proc.stderr.strip().splitlines()[-1]


def test_malformed_row_is_one_line_error_before_training(tmp_path):
    bad = tmp_path / "bad.jsonl"
    good = {"prompt": "Q?", "chosen": " a", "rejected": " b"}
    bad.write_text(json.dumps(good) + "\n" + json.dumps({**good, "chosen": None}) + "\n")
    line = _cli_error(["--data", str(bad)], tmp_path)
    assert line.startswith("error: ") and "bad.jsonl:2" in line and "chosen" in line
    assert not (tmp_path / "s/metrics.jsonl").exists()


def test_truncated_row_with_on_truncation_error_is_one_line_error(tmp_path):
    data = tmp_path / "long.jsonl"
    rows = [{"prompt": "Q?", "chosen": " a", "rejected": " b"}] * 9
    rows[3] = {"prompt": "a very long question " * 20, "chosen": " a", "rejected": " b"}
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    line = _cli_error(["--data", str(data), "--set", "data.max_prompt_length=16", "--set", "data.max_response_length=8",
                       "--set", "data.on_truncation=error"], tmp_path)
    assert line.startswith(f"error: {data}:4: prompt cut from the left by max_prompt_length=16, "
                           f"max_response_length=8 (1 of 9 rows are truncated; data.on_truncation=error)"), line
    assert not (tmp_path / "s/metrics.jsonl").exists()


@pytest.mark.parametrize("case", ["surrogate", "too_few_rows"])
def test_bad_data_file_is_one_line_error(tmp_path, case):
    """A lone surrogate escape (tokenizers would raise deep inside) and a file holding less than one
    global batch (the sampler's check) both stop the run before training with one located line."""
    data = tmp_path / "bad.jsonl"
    good = {"prompt": "Q?", "chosen": " a", "rejected": " b"}
    rows = [json.dumps(good), '{"prompt": "Q\\ud800?", "chosen": " a", "rejected": " b"}']
    if case == "too_few_rows":
        rows = [json.dumps({**good, "chosen": f" a{i}"}) for i in range(3)]
    data.write_text("\n".join(rows) + "\n")
    line = tool_error(TRAIN, *BASE, "--save", tmp_path / "s", "--data", data)
    if case == "surrogate":
        assert line.startswith(f"error: {data}:2: field 'prompt': lone UTF-16 surrogate \\ud800"), line
    else:
        assert line == (f"error: {data}: 3 samples, fewer than one global batch (train.global_batch_size=8); "
                        f"lower train.global_batch_size or add data")
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("trainer", ["dpo", "sft", "rm", "ppo"])
def test_data_directory_is_one_line_error_for_every_trainer(tmp_path, trainer):
    line = tool_error(ROOT / f"tools/train_{trainer}.py", "--steps", "1", "--save", tmp_path / "s", "--data", tmp_path)
    assert line == f"error: {tmp_path}: is a directory; expected a data file (JSONL, or parquet: *.parquet / *.pq)"
    assert not (tmp_path / "s").exists()


def test_bad_config_is_one_line_error(tmp_path):
    line = _cli_error(["--set", "dpo.gama=0.1"], tmp_path)
    assert line.startswith("error: ") and "gama" in line
    line = _cli_error(["--load", str(tmp_path / "missing")], tmp_path)
    assert line.startswith("error: ") and "missing" in line


@pytest.mark.distributed
def test_nan_loss_stops_without_damaging_checkpoints(tmp_path):
    save = tmp_path / "nan"
    # the divergence guard off: step 1 (lr 1e30) leaves finite weights ~1e30, step 2's loss is NaN
    proc = _run(save, 1, "--steps", "4", "--save-every", "1", "--lr", "1e30", "--set", "train.divergence_factor=0",
                check=False)
    assert proc.returncode != 0  # torchrun reports the rank's exit status 2 as 1
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert errors and "step 2: gradient norm is nan" in errors[0].lower(), proc.stderr[-3000:]
    latest = (save / "checkpoints/latest").read_text()
    assert errors[0].endswith(f"latest checkpoint: {latest}")
    from fg_megatron.checkpoint.layout import FgCheckpoint

    FgCheckpoint(save / "checkpoints" / latest / "model")  # still a valid checkpoint


@pytest.mark.distributed
def test_online_reference_matches_precomputed_and_logs_gated_ids(reference_run, tmp_path):
    save = tmp_path / "online"
    _run(save, 1, "--tp", "1", "--reference", "online", "--set", "train.log_gated_ids=true")
    got = _metrics(save)
    for a, b in zip(reference_run, got):
        for key in ("loss", "dpo_loss", "gate_rate", "reward_margin"):
            assert abs(a[key] - b[key]) <= 1e-6, (key, a[key], b[key])
    for m in got:
        assert len(m["gated_ids"]) == round(m["gate_rate"] * 8)
        assert all(isinstance(i, str) for i in m["gated_ids"])
    assert any(m["gated_ids"] for m in got)


def test_runs_never_mix_in_one_save_dir(tmp_path):
    save = tmp_path / "s"
    base = [sys.executable, str(TRAIN), *BASE, "--steps", "1", "--save", str(save)]
    subprocess.run(base, check=True, capture_output=True, cwd=ROOT)
    assert (save / "checkpoints/latest").read_text() == "step_000001"
    fresh = subprocess.run(base, capture_output=True, text=True, cwd=ROOT)
    assert fresh.returncode == 2
    line = fresh.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and "holds an earlier run's output (checkpoints" in line and "--resume" in line
    changed = subprocess.run(base + ["--resume", "--set", "data.max_prompt_length=32"], capture_output=True,
                             text=True, cwd=ROOT)
    assert changed.returncode == 2
    line = changed.stderr.strip().splitlines()[-1]
    assert "data.max_prompt_length was 64" in line and "now 32" in line
    assert (save / "checkpoints/latest").read_text() == "step_000001"  # untouched


def test_first_hour_own_model_and_long_hh_file(tmp_path):
    """Issue 12's acceptance run: a user's own HF model directory and an HH-RLHF-shaped file with
    300-word prompts, no --config: the run prints its resolved settings and a data summary that
    counts the truncated prompts, and trains with the defaults for a real model."""
    import random
    import shutil

    rng = random.Random(0)
    words = "the cat sat on a mat and then it ran to the big red house where many people live".split()
    rows = []
    for _ in range(16):
        post = " ".join(rng.choice(words) for _ in range(300))
        rows.append({"chosen": f"\n\nHuman: Summarise this: {post}\n\nAssistant: a cat story",
                     "rejected": f"\n\nHuman: Summarise this: {post}\n\nAssistant: no"})
    data = tmp_path / "hh.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = tmp_path / "my_model"
    shutil.copytree(ROOT / "assets/tiny/pi0", model)
    save = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(TRAIN), "--load", str(model), "--data", str(data), "--save", str(save),
                           "--steps", "2", "--global-batch-size", "16", "--micro-batch-size", "8"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    err = proc.stderr
    assert "config: defaults for your model" in err
    assert "lr 1e-06 cosine, warmup 10, min 0, weight decay 0.1" in err
    assert f"data {data}: 16 pairs, format hh_rlhf" in err
    assert "16 of 16 pairs truncated by max_prompt_length=192" in err and "16 prompts cut from the left" in err
    metrics = _metrics(save)
    assert [m["step"] for m in metrics] == [1, 2] and metrics[1]["lr"] == pytest.approx(1e-6)
