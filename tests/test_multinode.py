"""The paper's 4-GPU layout, TP=2 x DP=2, as two torchrun agents ("nodes") of 2 processes each
that meet through a c10d rendezvous on 127.0.0.1: 2 DPO steps, a checkpoint written by the ranks
of both nodes, a resume to step 3, and the same losses, grad norms and weights as one 4-process
torchrun and as one process at TP=1."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from dist_utils import ROOT, read_metrics, torchrun, torchrun_nodes

TRAIN = ROOT / "tools/train_dpo.py"
# A constant lr without warmup: a 2-step run resumed to 3 steps follows the 3-step run's schedule.
BASE = ["--global-batch-size", "8", "--micro-batch-size", "2", "--set", "train.log_every=1",
        "--set", "optim.warmup_steps=0", "--set", "optim.lr_schedule=constant", "--set", "train.tensorboard=false"]
KEYS = ("loss", "dpo_loss", "grad_norm", "rewards_chosen", "rewards_rejected", "logps_chosen")

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("nodes")
    torchrun(TRAIN, 1, *BASE, "--tp", "1", "--steps", "3", "--save", root / "tp1")
    torchrun(TRAIN, 4, *BASE, "--tp", "2", "--steps", "3", "--save", root / "one_node")
    first = torchrun_nodes(TRAIN, 2, 2, *BASE, "--tp", "2", "--steps", "2", "--save", root / "two_nodes")
    resumed = torchrun_nodes(TRAIN, 2, 2, *BASE, "--tp", "2", "--steps", "3", "--save", root / "two_nodes",
                             "--resume")
    return root, first, resumed


def test_two_nodes_form_one_tp2_dp2_job(runs):
    root, first, _ = runs
    log = "".join(p.stderr for p in first)
    assert "tp=2 pp=1 dp=2" in log
    # Each agent ran 2 of the 4 ranks; both wrote into one checkpoint on the shared filesystem.
    ckpt = root / "two_nodes/checkpoints/step_000002"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["layout"] == {"tp": 2, "pp": 1, "dp": 2, "world_size": 4}
    assert sorted(p.name for p in ckpt.glob("rng_rank*.safetensors")) == [
        f"rng_rank{r:05d}.safetensors" for r in range(4)]


def test_resume_across_nodes_continues_the_run(runs):
    root, _, resumed = runs
    assert "step_000002 (step 2)" in "".join(p.stderr for p in resumed)
    assert [m["step"] for m in read_metrics(root / "two_nodes")] == [1, 2, 3]


def test_two_nodes_equal_one_node_and_tp1(runs):
    root, _, _ = runs
    nodes, one, tp1 = (read_metrics(root / name) for name in ("two_nodes", "one_node", "tp1"))
    assert len(nodes) == len(one) == len(tp1) == 3
    assert nodes[-1]["loss"] != nodes[0]["loss"]  # it trained
    for a, b, c in zip(nodes, one, tp1):
        for key in KEYS:
            assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(b[key])), (a["step"], key, a[key], b[key])
            assert abs(a[key] - c[key]) <= 1e-5 * max(1.0, abs(c[key])), (a["step"], key, a[key], c[key])


def test_two_nodes_checkpoint_equals_one_nodes_and_verifies(runs):
    root, _, _ = runs
    for shard in ("model_tp00_pp00.safetensors", "model_tp01_pp00.safetensors"):
        a = load_file(root / "two_nodes/checkpoints/step_000003/model" / shard)
        b = load_file(root / "one_node/checkpoints/step_000003/model" / shard)
        assert a.keys() == b.keys()
        for name in a:
            assert torch.allclose(a[name], b[name], rtol=0, atol=1e-6), (shard, name)
    proc = subprocess.run([sys.executable, str(ROOT / "tools/convert_checkpoint.py"), "verify", "--ckpt",
                           str(root / "two_nodes")], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
