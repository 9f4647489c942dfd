"""Value-head checkpoints on CPU, one process: which configs are value models, HF seq-cls <-> fg
round trips (bit-identical), reshard, transformers loading the export, seeding a value model
from a causal LM with --head value, and the one-line refusals."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from dist_utils import ROOT
from fg_megatron.checkpoint.convert import fg_to_hf, hf_to_fg, reshard
from fg_megatron.checkpoint.layout import read_meta
from fg_megatron.checkpoint.mapping import CheckpointMismatchError
from fg_megatron.models import arch_from_hf_config
from fg_megatron.models.arch import ModelConfigError, head_from_hf_config
from fg_megatron.models.gpt import sequence_scores
from test_convert import assert_same_tensors, read_fg_dir, read_hf_dir
from test_value_model import make_tokenizer
from tiny_models import (PAD_ID, VALUE_VARIANTS, hf_model, hf_value_model, save_chatglm_original, save_hf_model,
                         save_hf_value_model)

sys.path.insert(0, str(ROOT / "tools"))  # convert_checkpoint.py's main()


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("value_hf")
    tok = make_tokenizer(root / "tok")
    out = {f"rm_{n}": save_hf_value_model(n, root / f"rm_{n}", tokenizer_dir=tok) for n in VALUE_VARIANTS}
    for n in ("llama_gqa_untied", "llama_mha_tied", "glm_mqa_bias"):
        out[f"lm_{n}"] = save_hf_model(n, root / f"lm_{n}", tokenizer_dir=tok)
    out["lm_no_tok"] = save_hf_model("mistral_window", root / "lm_no_tok")
    out["tok"] = tok
    return out


def padded_ids(vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, vocab, (3, 11), generator=g)
    ids[1, 7:] = PAD_ID
    ids[2, 4:] = PAD_ID
    return ids


# --- which config is a value model ---------------------------------------------------------


def test_head_from_hf_config():
    lm = {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    assert head_from_hf_config(lm) == "lm" and head_from_hf_config({"model_type": "llama"}) == "lm"
    rm = {"model_type": "llama", "architectures": ["LlamaForSequenceClassification"]}
    assert head_from_hf_config({**rm, "id2label": {"0": "LABEL_0"}}) == "value"
    assert head_from_hf_config({**rm, "num_labels": 1, "id2label": {"0": "a", "1": "b"}}) == "value"
    for extra, field, n in (({"num_labels": 2}, "num_labels", 2), ({"id2label": {"0": "a", "1": "b", "2": "c"}},
                                                                    "id2label", 3), ({}, "id2label", 2)):
        with pytest.raises(ModelConfigError) as exc:
            head_from_hf_config({**rm, **extra})
        assert str(exc.value) == (f"config.json: LlamaForSequenceClassification needs exactly one label for a "
                                  f"reward/value head, field {field!r} gives {n}")


def test_sequence_scores_pick_the_last_real_token_like_transformers():
    values = torch.arange(12.0).reshape(3, 4)
    assert sequence_scores(values, torch.tensor([4, 1, 3])).tolist() == [3.0, 4.0, 10.0]
    ids = padded_ids(50)
    lengths = (ids != PAD_ID).sum(1)
    # transformers: the rightmost token that is not the pad id
    hf_index = (torch.arange(ids.shape[1]) * (ids != PAD_ID)).argmax(-1)
    v = torch.randn(ids.shape)
    assert torch.equal(sequence_scores(v, lengths), v[torch.arange(3), hf_index])


# --- HF *ForSequenceClassification <-> fg ----------------------------------------------------


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
@pytest.mark.parametrize("name", VALUE_VARIANTS)
def test_round_trip_is_bit_identical(dirs, tmp_path, name, tp, pp):
    hf = dirs[f"rm_{name}"]
    meta = hf_to_fg(hf, tmp_path / "fg", tp=tp, pp=pp)
    assert meta.hf_config == json.loads((hf / "config.json").read_text())
    shards = read_fg_dir(tmp_path / "fg")
    assert len(shards) == tp * pp
    h = hf_value_model(name).config.hidden_size
    for f, tensors in shards.items():
        assert "output_layer.weight" not in tensors
        last = f.endswith(f"_pp{pp - 1:02d}.safetensors")
        assert ("value_head.weight" in tensors) == last  # replicated on every TP rank of the last stage
        if last:
            assert tensors["value_head.weight"].shape == (1, h)
    fg_to_hf(tmp_path / "fg", tmp_path / "back")
    assert_same_tensors(read_hf_dir(hf), read_hf_dir(tmp_path / "back"))
    assert (tmp_path / "back" / "config.json").read_bytes() == (hf / "config.json").read_bytes()


def test_reshard_equals_direct_conversion(dirs, tmp_path):
    hf = dirs["rm_mistral_window"]
    hf_to_fg(hf, tmp_path / "tp2pp1", tp=2, pp=1)
    hf_to_fg(hf, tmp_path / "tp1pp2", tp=1, pp=2)
    reshard(tmp_path / "tp2pp1", tmp_path / "re_tp1pp2", tp=1, pp=2)
    reshard(tmp_path / "re_tp1pp2", tmp_path / "re_tp2pp2", tp=2, pp=2)
    hf_to_fg(hf, tmp_path / "tp2pp2", tp=2, pp=2)
    for a, b in (("tp1pp2", "re_tp1pp2"), ("tp2pp2", "re_tp2pp2")):
        fa, fb = read_fg_dir(tmp_path / a), read_fg_dir(tmp_path / b)
        assert sorted(fa) == sorted(fb)
        for f in fa:
            assert_same_tensors(fa[f], fb[f])
    fg_to_hf(tmp_path / "re_tp2pp2", tmp_path / "back")
    assert_same_tensors(read_hf_dir(hf), read_hf_dir(tmp_path / "back"))


@pytest.mark.parametrize("name", ["llama_mha_tied", "glm_mqa_bias"])
def test_export_loads_in_transformers_with_the_same_logits(dirs, tmp_path, name):
    from transformers import AutoModelForSequenceClassification

    hf_to_fg(dirs[f"rm_{name}"], tmp_path / "fg", tp=2, pp=2)
    fg_to_hf(tmp_path / "fg", tmp_path / "back")
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "back", dtype=torch.float32).eval()
    ref = hf_value_model(name)
    assert type(model) is type(ref)
    assert_same_tensors(ref.state_dict(), model.state_dict())
    ids = padded_ids(ref.config.vocab_size)
    with torch.no_grad():
        got, want = model(ids).logits, ref(ids).logits
    assert got.shape == (3, 1) and want.std() > 0.1 and torch.equal(got, want)


# --- seeding a value model from a causal LM -----------------------------------------------------


@pytest.mark.parametrize("name,tp,pp", [("llama_mha_tied", 2, 2), ("llama_gqa_untied", 1, 2),
                                        ("glm_mqa_bias", 2, 1)])
def test_head_value_seeds_from_a_causal_lm(dirs, tmp_path, name, tp, pp):
    import convert_checkpoint
    from transformers import AutoModelForSequenceClassification

    lm_dir = dirs[f"lm_{name}"]
    assert convert_checkpoint.main(["hf-to-fg", "--hf", str(lm_dir), "--out", str(tmp_path / "rm"), "--head",
                                    "value", "--tp", str(tp), "--pp", str(pp)]) == 0
    lm_config = json.loads((lm_dir / "config.json").read_text())
    meta = read_meta(tmp_path / "rm")
    cls = {"llama": "LlamaForSequenceClassification", "glm": "GlmForSequenceClassification"}[lm_config["model_type"]]
    lm_pad = lm_config.get("pad_token_id")
    want = {**lm_config, "architectures": [cls], "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0},
            "pad_token_id": 1 if lm_pad is None else lm_pad}  # 1: the tokenizer's [PAD]
    assert meta.hf_config == want
    assert json.loads((tmp_path / "rm" / "hf" / "config.json").read_text()) == want
    assert arch_from_hf_config(meta.hf_config).head == "value"

    # every LM tensor but the output layer (or its tied copy), plus a zero head on the last stage
    hf_to_fg(lm_dir, tmp_path / "lm", tp=tp, pp=pp)
    lm, rm = read_fg_dir(tmp_path / "lm"), read_fg_dir(tmp_path / "rm")
    for f in lm:
        head = rm[f].pop("value_head.weight", None)
        assert (head is not None) == f.endswith(f"_pp{pp - 1:02d}.safetensors")
        if head is not None:
            assert head.shape == (1, lm_config["hidden_size"]) and not head.any()
        assert_same_tensors({k: v for k, v in lm[f].items() if k != "output_layer.weight"}, rm[f])

    convert_checkpoint.main(["fg-to-hf", "--ckpt", str(tmp_path / "rm"), "--out", str(tmp_path / "back")])
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "back", dtype=torch.float32).eval()
    assert type(model).__name__ == cls
    body = {k.removeprefix("model."): v for k, v in hf_model(name).state_dict().items() if k != "lm_head.weight"}
    got = model.state_dict()
    assert not got.pop("score.weight").any()
    assert_same_tensors(body, {k.removeprefix("model."): v for k, v in got.items()})
    with torch.no_grad():
        assert torch.equal(model(padded_ids(lm_config["vocab_size"])).logits, torch.zeros(3, 1))


def test_seeding_without_tokenizer_or_pad_leaves_pad_unset(dirs, tmp_path):
    meta = hf_to_fg(dirs["lm_no_tok"], tmp_path / "rm", head="value")
    assert meta.hf_config["architectures"] == ["MistralForSequenceClassification"]
    assert meta.hf_config.get("pad_token_id") is None


def test_head_value_on_a_value_model_and_lm_on_a_value_model(dirs, tmp_path, capsys):
    import convert_checkpoint

    rm = dirs["rm_llama_gqa_untied"]
    hf_to_fg(rm, tmp_path / "plain")
    hf_to_fg(rm, tmp_path / "same", head="value")  # already a value model: converted as is
    assert_same_tensors(*(read_fg_dir(tmp_path / d)["model_tp00_pp00.safetensors"] for d in ("plain", "same")))
    assert read_meta(tmp_path / "same").hf_config == read_meta(tmp_path / "plain").hf_config
    capsys.readouterr()
    assert convert_checkpoint.main(["hf-to-fg", "--hf", str(rm), "--out", str(tmp_path / "x"), "--head", "lm"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("convert_checkpoint.py hf-to-fg: error: ")
    assert "is a value-head model (LlamaForSequenceClassification) and has no LM head" in err
    assert not (tmp_path / "x").exists()


# --- refusals: one line, naming the file and the field --------------------------------------------


def test_chatglm_original_layout_refuses_a_value_head(dirs, tmp_path):
    hf = save_chatglm_original("glm_mqa_bias", tmp_path / "chatglm")
    with pytest.raises(ModelConfigError) as exc:
        hf_to_fg(hf, tmp_path / "rm", head="value")
    msg = str(exc.value)
    assert "\n" not in msg and "value head is not supported in THUDM's original chatglm layout" in msg
    config = json.loads((hf / "config.json").read_text())
    with pytest.raises(ModelConfigError, match="original chatglm layout"):
        arch_from_hf_config({**config, "architectures": ["ChatGLMForSequenceClassification"], "num_labels": 1})
    hf_to_fg(dirs["rm_glm_mqa_bias"], tmp_path / "glm_rm")
    with pytest.raises(ModelConfigError, match="cannot be written in the original chatglm layout"):
        fg_to_hf(tmp_path / "glm_rm", tmp_path / "back", layout="chatglm")


def test_two_label_classifier_is_refused(dirs, tmp_path):
    hf = tmp_path / "two"
    hf.mkdir()
    config = json.loads((dirs["rm_llama_gqa_untied"] / "config.json").read_text())
    config["id2label"] = {"0": "bad", "1": "good"}
    (hf / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelConfigError) as exc:
        hf_to_fg(hf, tmp_path / "fg")
    assert str(exc.value) == ("config.json: LlamaForSequenceClassification needs exactly one label for a "
                              "reward/value head, field 'id2label' gives 2")


def _ctx(tp: int = 1, pp: int = 1):
    from fg_megatron.parallel import ParallelContext

    return ParallelContext(world_size=tp * pp, rank=0, tp=tp, pp=pp, dp=1, tp_rank=0, pp_rank=0, dp_rank=0,
                           tp_group=None, pp_group=None, dp_group=None, device=torch.device("cpu"))


def test_load_model_head_refusals(dirs, tmp_path):
    """Checked before any model is built (so no process group is needed)."""
    from fg_megatron.checkpoint.load import load_model

    rm = dirs["rm_llama_gqa_untied"]
    hf_to_fg(rm, tmp_path / "fg")
    for path in (rm, tmp_path / "fg"):
        with pytest.raises(CheckpointMismatchError) as exc:
            load_model(path, _ctx(), head="lm")
        assert "\n" not in str(exc.value) and f"{path}: is a value-head model" in str(exc.value)
    with pytest.raises(CheckpointMismatchError, match="head 'critic' is not one of lm, value"):
        load_model(dirs["lm_llama_gqa_untied"], _ctx(), head="critic")
