"""PPO + FlipGuard end to end on the bundled tiny models (torchrun, gloo): the first-iteration
identities, layout invariance of the losses and the updated weights, kill-and-resume, the
reference rollouts of each constraint, and the exports of actor and critic."""

import math

import pytest

from dist_utils import ROOT, cli_error, read_metrics, tool_error, torchrun

TRAIN = ROOT / "tools/train_ppo.py"
BASE = ["--steps", "1", "--rollout-batch-size", "8", "--global-batch-size", "4", "--micro-batch-size", "2",
        "--set", "ppo.max_new_tokens=6", "--set", "train.tensorboard=false", "--set", "train.log_every=1",
        "--set", "train.save_every=1", "--lr", "1e-4", "--set", "ppo.critic_lr=1e-4",
        # Layouts sum a weight's gradient in different orders: a frequent token's embedding row, whose
        # many ~1e-3 terms cancel to ~3e-7, differs by ~1e-7 (fp32 rounding).  Adam with eps 1e-8 turns
        # such components into steps of up to lr that differ by tens of percent; with eps 1e-5 a step
        # is at most lr * g / eps, so rounding moves a weight by ~lr * 1e-7 / 1e-5 = 1e-6 over the two
        # steps, and the weights compare at 1e-5 (the losses match to 1e-5 whatever eps is).
        "--set", "optim.adam_eps=1e-5"]
KEYS = ("reward", "reward_ref", "gate_rate", "kl", "policy_loss", "value_loss", "ce_loss", "clipfrac", "approx_kl",
        "entropy", "response_length", "eos_rate", "rollout_seconds", "train_seconds", "tokens_per_second")


def _run(save, nproc, *args, env=None, check=True):
    return torchrun(TRAIN, nproc, *BASE, "--save", save, *args, env=env, check=check)


def _weights(save, step=1):
    from fg_megatron.checkpoint.layout import FgCheckpoint

    out = {}
    for part in ("model", "critic/model"):
        ckpt = FgCheckpoint(save / "checkpoints" / f"step_{step:06d}" / part)
        out.update({f"{part}:{n}": ckpt.full_tensor(n) for n in ckpt.present_full_names()})
    return out


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    save = tmp_path_factory.mktemp("ppo") / "tp1"
    _run(save, 1, "--tp", "1")
    return save


@pytest.mark.distributed
def test_first_iteration_identities(reference_run):
    m = read_metrics(reference_run)[0]
    for key in KEYS:
        assert key in m and math.isfinite(m[key]), key
    assert abs(m["kl"]) <= 1e-6  # actor == reference at iteration 1
    assert abs(m["first_ratio"] - 1.0) <= 1e-6  # the first mini-batch's PPO ratio
    # y_ref ~ pi0 with the same seeds as y_pol ~ pi == pi0: the same responses, so the gate is closed
    assert m["gate_rate"] == 0.0 and abs(m["reward_ref"] - m["reward"]) <= 1e-6
    assert m["ce_loss"] == 0.0 and 0 < m["response_length"] <= 6 and 0 <= m["eos_rate"] <= 1


@pytest.mark.distributed
@pytest.mark.parametrize("layout", ["tp2", "pp2", "dp2"])
def test_first_iteration_matches_tp1(reference_run, tmp_path, layout):
    args = {"tp2": ["--tp", "2"], "pp2": ["--pp", "2"], "dp2": []}[layout]
    _run(tmp_path / layout, 2, *args)
    a, b = read_metrics(reference_run)[0], read_metrics(tmp_path / layout)[0]
    for key in ("policy_loss", "value_loss", "reward", "kl", "response_length", "clipfrac"):
        assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), (layout, key, a[key], b[key])
    ref_w, got_w = _weights(reference_run), _weights(tmp_path / layout)
    assert set(ref_w) == set(got_w)
    for name, tensor in ref_w.items():
        diff = (tensor - got_w[name]).abs().max().item()
        assert diff <= 1e-5, (layout, name, diff)


@pytest.mark.distributed
def test_kill_and_resume_reproduces_the_next_iteration(tmp_path):
    args = ["--tp", "2", "--steps", "3"]
    _run(tmp_path / "full", 2, *args)
    full = read_metrics(tmp_path / "full")
    killed = tmp_path / "killed"
    proc = _run(killed, 2, *args, env={"FG_FAULT": "step:2"}, check=False)
    assert proc.returncode != 0
    assert (killed / "checkpoints/latest").read_text() == "step_000002"
    _run(killed, 2, *args, "--resume")
    resumed = read_metrics(killed)
    assert [m["step"] for m in resumed] == [1, 2, 3]
    for key in ("reward", "reward_ref", "gate_rate", "kl", "policy_loss", "value_loss", "ce_loss", "clipfrac",
                "approx_kl", "entropy", "response_length"):
        assert abs(full[2][key] - resumed[2][key]) <= 1e-6, (key, full[2][key], resumed[2][key])
    # the actor exports as a causal LM and the critic as a sequence-classification model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from fg_megatron.checkpoint.convert import fg_to_hf

    fg_to_hf(killed / "checkpoints/step_000003/model", tmp_path / "actor_hf")
    fg_to_hf(killed / "checkpoints/step_000003/critic/model", tmp_path / "critic_hf")
    AutoModelForCausalLM.from_pretrained(tmp_path / "actor_hf")
    AutoModelForSequenceClassification.from_pretrained(tmp_path / "critic_hf")


@pytest.mark.distributed
def test_resume_with_more_steps_rebuilds_both_schedules(tmp_path):
    import json

    save = tmp_path / "run"
    _run(save, 1, "--tp", "1", "--set", "optim.lr_schedule=cosine")
    proc = _run(save, 1, "--tp", "1", "--set", "optim.lr_schedule=cosine", "--steps", "2", "--resume")
    # 8 prompts per rollout / 4 per optimizer step: 2 updates per iteration, 4 for the extended run
    assert "train.steps 1 -> 2: lr schedule rebuilt" in proc.stderr + proc.stdout
    state = json.loads((save / "checkpoints/step_000002/trainer_state.json").read_text())
    for name in ("actor", "critic"):
        assert state["schedulers"][name]["lr_decay_steps"] == 4 and state["schedulers"][name]["num_steps"] == 4
    assert [m["step"] for m in read_metrics(save)] == [1, 2]


@pytest.mark.distributed
@pytest.mark.parametrize("constraint,log_ref", [("none", False), ("none", True), ("kd", False)])
def test_reference_rollouts_per_constraint(tmp_path, constraint, log_ref):
    _run(tmp_path / "r", 1, "--constraint", constraint, "--set", f"ppo.log_reference_rollouts={str(log_ref).lower()}",
         "--reward-source", "oracle")
    m = read_metrics(tmp_path / "r")[0]
    assert ("gate_rate" in m) == ("reward_ref" in m) == (constraint != "none" or log_ref)
    assert m["reward"] in [i / 8 for i in range(9)]  # the oracle: 1 right, 0 wrong
    if constraint == "kd":
        assert m["ce_loss"] > 0  # KD pulls toward the better response with the gate open
    else:
        assert m["ce_loss"] == 0.0


def test_bad_config_is_one_line_error(tmp_path):
    line = cli_error(TRAIN, *BASE, "--save", tmp_path / "s", "--rollout-batch-size", "6")
    assert line.startswith("error: ") and "ppo.rollout_batch_size=6" in line
    line = cli_error(TRAIN, *BASE, "--save", tmp_path / "s", "--set", "ppo.gae_lambda=2")
    assert line.startswith("error: ") and "gae_lambda" in line


def test_fewer_prompts_than_one_rollout_batch_is_one_line_error(tmp_path):
    """The sampler's size check names the file and the field that sets PPO's batch of prompts."""
    import json

    rows = [json.loads(line) for line in (ROOT / "assets/tiny/data/test_prompts.jsonl").read_text().splitlines()[:5]]
    data = tmp_path / "five.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    line = tool_error(TRAIN, *BASE, "--save", tmp_path / "s", "--data", data)
    assert line == (f"error: {data}: 5 samples, fewer than one global batch (ppo.rollout_batch_size=8); "
                    f"lower ppo.rollout_batch_size or add data")
    assert not (tmp_path / "s").exists()
