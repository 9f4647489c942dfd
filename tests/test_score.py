"""tools/score.py: sums of response log-probs equal transformers' (relative 1e-5, fp32)
for text and pre-tokenised rows, at TP=1, TP=2 and PP=2, for every logprob impl."""

import json
import math
import subprocess
import sys

import pytest
import torch

from dist_utils import ROOT, tool_error, torchrun
from tiny_models import SCORE_ROWS, row_token_ids, write_rows

TOKENIZER = ROOT / "assets/tiny/tokenizer"


@pytest.fixture(scope="module")
def scoring_setup(tmp_path_factory):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tmp = tmp_path_factory.mktemp("score")
    tok = AutoTokenizer.from_pretrained(str(TOKENIZER))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      initializer_range=0.2, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    model_dir = tmp / "model"
    model.save_pretrained(model_dir, safe_serialization=True)
    tok.save_pretrained(model_dir)
    rows = SCORE_ROWS
    data = write_rows(rows, tmp / "in.jsonl")
    expected = []
    for r in rows:
        p, resp = row_token_ids(tok, r)
        ids = torch.tensor([p + resp])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits.double(), dim=-1)[0]
        targets = ids[0, len(p):]
        expected.append((logp[len(p) - 1:-1].gather(1, targets[:, None]).sum().item(), len(resp)))
    return model_dir, data, rows, expected


@pytest.mark.distributed
@pytest.mark.parametrize("tp,pp,impl", [(1, 1, "torch"), (2, 1, "torch"), (2, 1, "triton"), (1, 2, "megatron")])
def test_score_matches_transformers(scoring_setup, tmp_path, tp, pp, impl):
    model_dir, data, rows, expected = scoring_setup
    out = tmp_path / "out.jsonl"
    torchrun(ROOT / "tools/score.py", tp * pp, "--load", model_dir, "--data", data, "--out", out,
             "--tp", str(tp), "--pp", str(pp), "--batch-size", "2", "--logprob-impl", impl)
    got = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(got) == len(rows)
    for row, g, (logp, n) in zip(rows, got, expected):
        assert {k: g[k] for k in row} == row  # the input row is carried through, in order
        assert g["n_tokens"] == n
        assert g["logp"] < 0
        assert math.isclose(g["logp"], logp, rel_tol=1e-5), (row, g["logp"], logp)


def test_score_rejects_token_outside_vocabulary(scoring_setup, tmp_path):
    model_dir, _, _, _ = scoring_setup
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt_ids": [1, 2], "response_ids": [99999]}) + "\n")
    proc = subprocess.run([sys.executable, str(ROOT / "tools/score.py"), "--load", str(model_dir), "--data",
                           str(bad), "--out", str(tmp_path / "o.jsonl")], capture_output=True, text=True,
                          cwd=ROOT)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "bad.jsonl:1" in last and "99999" in last, proc.stderr[-2000:]
    assert not (tmp_path / "o.jsonl").exists()


def test_score_rejects_bad_batch_size_and_too_long_rows(scoring_setup, tmp_path):
    model_dir, _, _, _ = scoring_setup
    ok = tmp_path / "ok.jsonl"
    ok.write_text(json.dumps({"prompt_ids": [1, 2], "response_ids": [3]}) + "\n")
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt_ids": [1, 2], "response_ids": [3]}) + "\n"
                    + json.dumps({"prompt_ids": [5] * 120, "response_ids": [7] * 20}) + "\n")
    for data, extra, needle in ((ok, ["--batch-size", "0"], "--batch-size must be >= 1 (got 0)"),
                                (long, [], f"{long}:2: 140 tokens, more than the model's "
                                           "max_position_embeddings=128")):
        proc = subprocess.run([sys.executable, str(ROOT / "tools/score.py"), "--load", str(model_dir), "--data",
                               str(data), "--out", str(tmp_path / "o.jsonl"), *extra], capture_output=True,
                              text=True, cwd=ROOT)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert proc.stderr.strip().splitlines()[-1] == f"error: {needle}"


@pytest.mark.parametrize("case", ["surrogate", "directory", "out_under_a_file"])
def test_score_bad_input_is_one_line_error(scoring_setup, tmp_path, case):
    model_dir, _, _, _ = scoring_setup
    data, out = tmp_path / "in.jsonl", tmp_path / "o.jsonl"
    data.write_text('{"prompt": "p", "response": "r"}\n{"prompt": "p", "response": "\\ud800 r"}\n')
    if case == "directory":
        data = tmp_path
    if case == "out_under_a_file":
        out = data / "o.jsonl"
    line = tool_error(ROOT / "tools/score.py", "--load", model_dir, "--data", data, "--out", out)
    expected = {"surrogate": f"error: {data}:2: field 'response': lone UTF-16 surrogate \\ud800",
                "directory": f"error: {tmp_path}: is a directory; expected a data file",
                "out_under_a_file": f"error: --out {out}: cannot be written: {data} is a file, not a directory"}[case]
    assert line.startswith(expected), line
    assert not (tmp_path / "o.jsonl").exists()
