"""A run holding several named models (tests/dist/two_parts.py: a trainable policy, a trainable
value-head critic and a frozen reference, two optimizer steps per iteration): every trainable
part is checkpointed with its optimizer and scheduler, and --resume restores them all exactly."""

import json

import pytest

from dist_utils import DIST_DIR, read_metrics, torchrun


@pytest.mark.distributed
def test_every_trainable_part_is_saved_and_resumed(tmp_path):
    script = DIST_DIR / "two_parts.py"
    torchrun(script, 2, "--tp", "2", "--save", tmp_path / "full", "--steps", "5")
    full = read_metrics(tmp_path / "full")
    assert full[0]["critic_loss"] == pytest.approx(0.25, abs=1e-7)  # zero head: every value is 0
    assert full[0]["reference_nll"] == pytest.approx(full[0]["policy_loss"], abs=1e-6)  # same weights at step 1
    assert full[-1]["critic_loss"] < full[0]["critic_loss"] and full[-1]["policy_loss"] != full[0]["policy_loss"]

    step = tmp_path / "full/checkpoints/step_000004"
    state = json.loads((step / "trainer_state.json").read_text())
    assert sorted(state["schedulers"]) == ["critic", "policy"] and state["primary"] == "policy"
    for where in (step, step / "critic"):
        assert (where / "model/fg_checkpoint.json").is_file()
        assert list(where.glob("optim_tp0*_pp00.safetensors")), where
    assert not (step / "reference").exists()  # frozen parts are not saved

    killed = tmp_path / "killed"
    proc = torchrun(script, 2, "--tp", "2", "--save", killed, "--steps", "5", env={"FG_FAULT": "step:3"},
                    check=False)
    assert proc.returncode != 0
    torchrun(script, 2, "--tp", "2", "--save", killed, "--steps", "5", "--resume")
    resumed = read_metrics(killed)
    assert [m["step"] for m in resumed] == [1, 2, 3, 4, 5]
    for a, b in zip(full, resumed):
        for key in ("policy_loss", "critic_loss", "reference_nll", "policy_grad_norm", "critic_grad_norm",
                    "critic_lr"):
            assert abs(a[key] - b[key]) <= 1e-6, (a["step"], key, a[key], b[key])

    # the critic exports as a sequence-classification model
    from transformers import AutoModelForSequenceClassification

    from fg_megatron.checkpoint.convert import fg_to_hf

    fg_to_hf(killed / "checkpoints/step_000005/critic/model", tmp_path / "critic_hf")
    AutoModelForSequenceClassification.from_pretrained(tmp_path / "critic_hf")
