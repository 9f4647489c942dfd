"""tools/score.py on a value-head checkpoint writes "reward" (and n_tokens, no logp): transformers'
LlamaForSequenceClassification logits (fp32, relative 1e-4) for text and pre-tokenised rows,
from an HF directory and from an fg checkpoint, at TP=2, PP=2 (also uneven stages) and DP=2, in
padded batches."""

import json

import pytest
import torch

from dist_utils import ROOT, torchrun
from tiny_models import SCORE_ROWS, row_token_ids, write_rows
from fg_megatron.checkpoint.convert import hf_to_fg

TOKENIZER = ROOT / "assets/tiny/tokenizer"


@pytest.fixture(scope="module")
def reward_setup(tmp_path_factory):
    return _reward_setup(tmp_path_factory.mktemp("reward"), num_layers=2)


def _reward_setup(tmp, num_layers: int):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=num_layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      initializer_range=0.2, num_labels=1, pad_token_id=tok.pad_token_id)
    model = LlamaForSequenceClassification(cfg).eval()
    model_dir = tmp / "rm"
    model.save_pretrained(model_dir, safe_serialization=True)
    tok.save_pretrained(model_dir)
    if num_layers % 2 == 0:
        hf_to_fg(model_dir, tmp / "rm_fg_pp2", tp=1, pp=2)
    rows = SCORE_ROWS
    data = write_rows(rows, tmp / "in.jsonl")
    expected = []
    for r in rows:
        p, resp = row_token_ids(tok, r)
        assert tok.pad_token_id not in p + resp  # transformers pools at the last non-pad token
        with torch.no_grad():
            expected.append((model(torch.tensor([p + resp])).logits[0, 0].item(), len(resp)))
    return tmp, data, rows, expected


@pytest.mark.distributed
@pytest.mark.parametrize("load,tp,pp,nproc", [("rm", 2, 1, 2), ("rm_fg_pp2", 1, 2, 2), ("rm", 1, 1, 2)],
                         ids=["hf-tp2", "fg-pp2", "hf-dp2"])
def test_score_writes_transformers_rewards(reward_setup, tmp_path, load, tp, pp, nproc):
    _check_scores(reward_setup, tmp_path, load, tp, pp, nproc)


@pytest.mark.distributed
def test_score_rewards_with_uneven_stages(tmp_path):
    """A 3-layer reward model at PP=2 with --layers-per-stage 1,2: the value head on a 2-layer last stage."""
    setup = _reward_setup(tmp_path / "setup", num_layers=3)
    _check_scores(setup, tmp_path, "rm", 1, 2, 2, "--layers-per-stage", "1,2")


def _check_scores(reward_setup, tmp_path, load, tp, pp, nproc, *extra):
    root, data, rows, expected = reward_setup
    out = tmp_path / "out.jsonl"
    torchrun(ROOT / "tools/score.py", nproc, "--load", root / load, "--data", data, "--out", out,
             "--tp", str(tp), "--pp", str(pp), "--batch-size", "2", *extra)
    got = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(got) == len(rows)
    scale = max(abs(r) for r, _ in expected)
    assert scale > 0.1 and len({round(r, 3) for r, _ in expected}) == len(rows)  # distinct, non-degenerate
    print(f"reward max relative diff ({load}, tp{tp} pp{pp} on {nproc}): "
          f"{max(abs(g['reward'] - r) for g, (r, _) in zip(got, expected)) / scale:.2e}")
    for row, g, (reward, n) in zip(rows, got, expected):
        assert set(g) == set(row) | {"reward", "n_tokens"}  # no logp on a value model
        assert {k: g[k] for k in row} == row
        assert g["n_tokens"] == n
        assert abs(g["reward"] - reward) <= 1e-4 * scale, (row, g["reward"], reward)
