"""The paper's RM-based evaluation end to end with the committed tiny reward model:
tools/score.py writes rewards equal to transformers' LlamaForSequenceClassification, and
tools/eval_flips.py --score-field reward counts flips / wins / ties with the 0.1 margin."""

import json
import subprocess
import sys

import pytest
import torch

from dist_utils import ROOT, torchrun

RM = ROOT / "assets/tiny/rm"


@pytest.mark.distributed
def test_rm_nfr_end_to_end(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rows = [json.loads(line) for line in (ROOT / "assets/tiny/data/pref_eval.jsonl").read_text().splitlines()[:16]]
    # pi0 answered with the chosen response, pi with the rejected one: flips wherever the RM prefers chosen
    for name, field in (("pi0", "chosen"), ("pi", "rejected")):
        (tmp_path / f"{name}.jsonl").write_text("".join(
            json.dumps({"id": r["id"], "prompt": r["prompt"], "response": r[field]}) + "\n" for r in rows))
        torchrun(ROOT / "tools/score.py", 2, "--load", RM, "--tp", "2", "--data", tmp_path / f"{name}.jsonl",
                 "--out", tmp_path / f"{name}_rm.jsonl")
    scored = {n: [json.loads(line) for line in (tmp_path / f"{n}_rm.jsonl").read_text().splitlines()]
              for n in ("pi0", "pi")}

    tok = AutoTokenizer.from_pretrained(str(RM))
    hf = AutoModelForSequenceClassification.from_pretrained(str(RM)).eval()
    for row in scored["pi0"][:4]:
        ids = [tok.bos_token_id] + tok(row["prompt"] + row["response"], add_special_tokens=False)["input_ids"]
        ids.append(tok.eos_token_id)
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0, 0].item()
        assert abs(row["reward"] - ref) <= 1e-4 * max(1.0, abs(ref)), (row["reward"], ref)

    proc = subprocess.run([sys.executable, str(ROOT / "tools/eval_flips.py"), "--pi0", str(tmp_path / "pi0_rm.jsonl"),
                           "--pi", str(tmp_path / "pi_rm.jsonl"), "--score-field", "reward",
                           "--out", str(tmp_path / "summary.json")], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    r0 = [r["reward"] for r in scored["pi0"]]
    r1 = [r["reward"] for r in scored["pi"]]
    flips = sum(b < a - 0.1 for a, b in zip(r0, r1))
    wins = sum(b > a + 0.1 for a, b in zip(r0, r1))
    assert summary["margin"] == 0.1 and summary["flips"] == flips and summary["wins"] == wins
    assert abs(summary["nfr"] - flips / 16) < 1e-12 and flips > wins  # the RM mostly prefers the chosen
