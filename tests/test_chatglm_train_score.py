"""A tiny original-layout ChatGLM3 checkpoint through the public command lines (torchrun, gloo):
``score.py`` equals transformers' sequence log-probs; ``train_dpo.py`` trains on Chinese
CValues rows at TP=2 with UTF-8 kept intact in paths, logs, metrics and saved files."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import yaml

from chatglm_assets import CVALUES_ZH, make_chatglm_tokenizer
from dist_utils import ROOT, torchrun
from tiny_models import hf_model, row_token_ids, save_chatglm_original, write_rows

NAME = "glm_mqa_bias"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("glm") / "模型"  # non-ASCII paths on purpose
    tok = make_chatglm_tokenizer(root / "tok")
    return save_chatglm_original(NAME, root / "chatglm3-tiny", fmt="bin", tokenizer_dir=tok)


@pytest.mark.distributed
def test_score_matches_transformers(model_dir, tmp_path):
    from fg_megatron.checkpoint.tokenizer import load_tokenizer
    tok = load_tokenizer(model_dir)
    chat = tok.apply_chat_template([{"role": "user", "content": "如何提高睡眠质量？"}], tokenize=False,
                                   add_generation_prompt=True)
    rows = [
        {"prompt": "我的邻居总是很吵，有什么办法？", "response": "先和邻居沟通，或者联系物业调解。"},
        {"prompt": chat, "response": "保持规律作息，睡前不看手机。", "id": "样本"},
        {"prompt_ids": [501, 503, 506, 7, 300], "response_ids": [40, 41, 2]},
    ]
    data = write_rows(rows, tmp_path / "输入.jsonl")
    model = hf_model(NAME)
    expected = []
    for r in rows:
        p, resp = row_token_ids(tok, r)
        ids = torch.tensor([p + resp])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits.double(), dim=-1)[0]
        expected.append((logp[len(p) - 1:-1].gather(1, ids[0, len(p):, None]).sum().item(), len(resp)))
    out = tmp_path / "输出.jsonl"
    torchrun(ROOT / "tools/score.py", 2, "--load", model_dir, "--data", data, "--out", out, "--tp", "2",
             "--batch-size", "2")
    got = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(got) == len(rows)
    for row, g, (logp, n) in zip(rows, got, expected):
        assert {k: g[k] for k in row} == row  # Chinese text carried through unchanged
        assert g["n_tokens"] == n and g["logp"] < 0
        assert math.isclose(g["logp"], logp, rel_tol=1e-5), (row, g["logp"], logp)


@pytest.mark.distributed
def test_dpo_on_chinese_cvalues_at_tp2(model_dir, tmp_path):
    data = tmp_path / "数据" / "cvalues_zh.jsonl"
    data.parent.mkdir()
    shutil.copyfile(CVALUES_ZH, data)
    save = tmp_path / "运行"
    proc = torchrun(ROOT / "tools/train_dpo.py", 2, "--tp", "2", "--load", model_dir, "--data", data,
                    "--save", save, "--steps", "2", "--global-batch-size", "4", "--micro-batch-size", "2",
                    "--constraint", "kd", "--set", "train.log_gated_ids=true", "--set", "train.log_every=1",
                    "--set", "train.tensorboard=false", "--set", "optim.warmup_steps=0")
    logs = proc.stdout + proc.stderr
    assert "\ufffd" not in logs and str(model_dir) in logs  # the Chinese path is logged as written
    metrics = [json.loads(line) for line in (save / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        for key in ("loss", "dpo_loss", "ce_loss", "logps_chosen", "reward_margin", "grad_norm"):
            assert math.isfinite(m[key]), (key, m)
    assert metrics[0]["rewards_chosen"] == 0.0 and abs(metrics[0]["dpo_loss"] - math.log(2)) <= 1e-6
    assert metrics[1]["rewards_chosen"] != 0.0  # it trains
    ids = {json.loads(line)["id"] for line in CVALUES_ZH.read_text(encoding="utf-8").splitlines()}
    gated = [i for m in metrics for i in m["gated_ids"]]
    assert len(gated) == 8 and set(gated) <= ids  # kd gates every sample; ids read back intact
    saved = yaml.safe_load((save / "config.yaml").read_text(encoding="utf-8"))
    assert saved["data"]["train"] == str(data) and saved["model"]["load"] == str(model_dir)

    # the trained model exports to the original layout with its tokenizer
    from fg_megatron.checkpoint.convert import fg_to_hf
    from fg_megatron.checkpoint.tokenizer import load_tokenizer

    ckpt = save / "checkpoints" / (save / "checkpoints" / "latest").read_text(encoding="utf-8").strip() / "model"
    fg_to_hf(ckpt, tmp_path / "导出", layout="chatglm")
    assert json.loads((tmp_path / "导出" / "config.json").read_text())["model_type"] == "chatglm"
    exported = load_tokenizer(tmp_path / "导出")
    assert exported("你好")["input_ids"] == load_tokenizer(model_dir)("你好")["input_ids"]
