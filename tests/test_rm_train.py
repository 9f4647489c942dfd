"""The reward-model trainer end to end on the bundled tiny model and data (torchrun, gloo):
the zero-head step-0 identity, layout invariance of losses and gradient norms, kill-and-resume,
held-out evaluation, margins, the export as a sequence-classification model, bad input."""

import json
import math

import pytest

from dist_utils import ROOT, cli_error, read_metrics, torchrun

TRAIN = ROOT / "tools/train_rm.py"
EVAL = ROOT / "assets/tiny/data/pref_eval.jsonl"
BASE = ["--steps", "3", "--global-batch-size", "8", "--micro-batch-size", "2", "--set", "train.log_every=1",
        "--set", "optim.warmup_steps=0", "--set", "train.tensorboard=false", "--set", "train.eval_every=0",
        "--lr", "1e-3"]


def _run(save, nproc, *args, env=None, check=True):
    return torchrun(TRAIN, nproc, *BASE, "--save", save, *args, env=env, check=check)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    save = tmp_path_factory.mktemp("rm") / "tp1"
    _run(save, 1, "--tp", "1")
    return read_metrics(save)


@pytest.mark.distributed
def test_step0_identity_andread_metrics(reference_run):
    m0 = reference_run[0]
    # pi0 seeded with a zero value head: every reward is exactly 0
    assert m0["reward_chosen"] == 0.0 and m0["reward_rejected"] == 0.0 and m0["margin"] == 0.0
    assert abs(m0["loss"] - math.log(2)) <= 1e-7 and m0["accuracy"] == 0.0
    for key in ("loss", "accuracy", "margin", "reward_chosen", "reward_rejected", "grad_norm", "lr",
                "tokens_per_second"):
        assert all(key in m and math.isfinite(m[key]) for m in reference_run), key
    assert reference_run[0]["grad_norm"] > 0  # the zero head still gets a gradient
    assert reference_run[-1]["margin"] != 0.0  # it trains


@pytest.mark.distributed
@pytest.mark.parametrize("layout", ["tp2", "pp2", "dp2"])
def test_same_losses_and_grad_norms_for_every_layout(reference_run, tmp_path, layout):
    args = {"tp2": ["--tp", "2"], "pp2": ["--pp", "2"], "dp2": []}[layout]
    _run(tmp_path / layout, 2, *args)
    got = read_metrics(tmp_path / layout)
    assert len(got) == 3
    for a, b in zip(reference_run, got):
        for key in ("loss", "accuracy", "margin", "reward_chosen"):
            assert abs(a[key] - b[key]) <= 1e-5, (layout, key, a[key], b[key])
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5 * a["grad_norm"], (layout, a["grad_norm"], b["grad_norm"])


@pytest.mark.distributed
def test_kill_and_resume_reproduces_losses_and_exports(tmp_path):
    args = ["--tp", "2", "--steps", "5", "--save-every", "2", "--set", f"data.eval={EVAL}",
            "--set", "train.eval_every=2"]
    _run(tmp_path / "full", 2, *args)
    full = read_metrics(tmp_path / "full")
    assert [("eval_accuracy" in m) for m in full] == [False, True, False, True, True]
    killed = tmp_path / "killed"
    proc = _run(killed, 2, *args, env={"FG_FAULT": "step:3"}, check=False)
    assert proc.returncode != 0
    assert (killed / "checkpoints/latest").read_text() == "step_000002"
    _run(killed, 2, *args, "--resume")
    resumed = read_metrics(killed)
    assert [m["step"] for m in resumed] == list(range(1, 6))
    for a, b in zip(full, resumed):
        for key in ("loss", "accuracy", "margin", "grad_norm", "eval_accuracy", "eval_loss"):
            if key in a:
                assert abs(a[key] - b[key]) <= 1e-6, (a["step"], key, a[key], b[key])
    # the checkpoint exports as a sequence-classification model that transformers loads
    from transformers import AutoModelForSequenceClassification

    from fg_megatron.checkpoint.convert import fg_to_hf

    fg_to_hf(killed / "checkpoints/step_000005/model", tmp_path / "hf")
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf")
    assert model.config.num_labels == 1 and type(model).__name__ == "LlamaForSequenceClassification"


@pytest.mark.distributed
def test_margin_column_changes_the_loss(tmp_path):
    rows = [json.loads(line) for line in (ROOT / "assets/tiny/data/pref_train.jsonl").read_text().splitlines()[:16]]
    data = tmp_path / "m.jsonl"
    data.write_text("".join(json.dumps({**r, "margin": 1.0}) + "\n" for r in rows))
    _run(tmp_path / "m", 1, "--data", str(data), "--steps", "1", "--set", "rm.margin=true")
    m0 = read_metrics(tmp_path / "m")[0]
    assert abs(m0["loss"] - math.log(1 + math.e)) <= 1e-6  # -log sigmoid(0 - 1)


def test_bad_input_is_one_line_error(tmp_path):
    data = tmp_path / "nomargin.jsonl"
    data.write_text(json.dumps({"prompt": "Q?", "chosen": " a", "rejected": " b"}) + "\n"
                    + json.dumps({"prompt": "Q?", "chosen": " a", "rejected": " b", "margin": "big"}) + "\n")
    line = cli_error(TRAIN, *BASE, "--save", tmp_path / "s", "--data", data, "--set", "rm.margin=true")
    assert line.startswith("error: ") and "nomargin.jsonl:1" in line and "margin" in line
    line = cli_error(TRAIN, *BASE, "--save", tmp_path / "s", "--set", "rm.center_rewards_coefficient=-1")
    assert line.startswith("error: ") and "center_rewards_coefficient" in line
    line = cli_error(TRAIN, *BASE, "--save", tmp_path / "s", "--set", "model.head=lm")
    assert line.startswith("error: ") and "model.head" in line
    assert not (tmp_path / "s/metrics.jsonl").exists()
