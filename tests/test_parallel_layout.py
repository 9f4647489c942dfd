"""Layout validation: one-line errors before any work."""

import subprocess
import sys

import pytest

from dist_utils import ROOT, torchrun
from fg_megatron.parallel import ParallelLayoutError, validate_layout


def test_valid_layouts_give_dp():
    assert validate_layout(8, 2, 2, num_kv_heads=4, num_layers=4) == 2
    assert validate_layout(2, 1, 1) == 2


@pytest.mark.parametrize("world,tp,pp,kw,needle", [
    (3, 2, 1, {}, "world size 3 is not divisible by tp*pp = 2*1 = 2"),
    (4, 4, 1, {"num_kv_heads": 2}, "tensor parallel size 4 does not divide the model's 2 key/value heads"),
    (2, 1, 2, {"num_layers": 3}, "pipeline parallel size 2 does not divide the model's 3 layers"),
    (2, 0, 1, {}, "must be >= 1"),
])
def test_invalid_layouts(world, tp, pp, kw, needle):
    with pytest.raises(ParallelLayoutError, match=needle.replace("*", r"\*")):
        validate_layout(world, tp, pp, **kw)


@pytest.mark.distributed
def test_cli_refuses_tp_larger_than_kv_heads(tmp_path):
    # the tiny pi0 has 2 KV heads; 4 processes at TP=4
    proc = torchrun(ROOT / "tools/train_dpo.py", 4, "--tp", "4", "--save", tmp_path / "s", check=False)
    assert proc.returncode != 0
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert errors, proc.stderr[-3000:]
    assert "tensor parallel size 4 does not divide the model's 2 key/value heads" in errors[0]
    assert len(errors) == 1  # rank 0 speaks for everyone
    assert not (tmp_path / "s/checkpoints").exists()


def test_score_refuses_world_not_divisible(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "tools/score.py"), "--load", str(ROOT / "assets/tiny/pi0"),
                           "--data", "x.jsonl", "--out", str(tmp_path / "o"), "--tp", "2"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: world size 1 is not divisible by tp*pp = 2*1 = 2; launch a multiple of 2 processes or change --tp/--pp")
