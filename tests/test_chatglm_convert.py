"""ChatGLM3 / GLM checkpoints: both HF layouts in, either layout out (CPU, one process).

References: the original-layout fixtures are written from transformers'
``GlmForCausalLM`` by the test's own inverse of transformers' GLM conversion
(``tiny_models.chatglm_original_state``), in safetensors and in sharded
``.bin`` files; transformers loads the default export with no remote code and
gives the same logits bit for bit; ``--layout chatglm`` gives back the
original tensors and config.json byte for byte.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from chatglm_assets import make_chatglm_tokenizer
from fg_megatron.checkpoint.convert import fg_to_hf, hf_to_fg, reshard
from fg_megatron.checkpoint.layout import read_meta
from fg_megatron.checkpoint.mapping import CheckpointMismatchError
from fg_megatron.checkpoint.tokenizer import load_tokenizer
from fg_megatron.models import arch_from_hf_config
from fg_megatron.models.arch import ModelConfigError
from fg_megatron.models.chatglm.tokenizer import ChatGLMTokenizer
from fg_megatron.parallel import ParallelLayoutError
from tiny_models import chatglm_original_config, chatglm_original_state, hf_model, save_chatglm_original, save_hf_model

NAME = "glm_mqa_bias"


def read_weights(d: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF directory: safetensors through the safetensors library, .bin with
    torch.load(weights_only=True)."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(f))
    for f in sorted(Path(d).glob("*.bin")):
        out.update(torch.load(f, weights_only=True))
    return out


def assert_same_bits(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8)), k


def one_line(exc) -> str:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    return msg


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("chatglm")
    tok = make_chatglm_tokenizer(root / "tok")
    return {
        "tok": tok,
        "safetensors": save_chatglm_original(NAME, root / "orig_st", fmt="safetensors", tokenizer_dir=tok),
        "bin": save_chatglm_original(NAME, root / "orig_bin", fmt="bin", tokenizer_dir=tok),
        "fp16": save_chatglm_original(NAME, root / "orig_fp16", fmt="bin", dtype=torch.float16, tokenizer_dir=tok),
        "glm": save_hf_model(NAME, root / "glm", tokenizer_dir=tok),
    }


@pytest.mark.parametrize("fmt,tp,pp", [("safetensors", 2, 1), ("bin", 1, 2), ("fp16", 2, 2)])
def test_original_layout_round_trip_is_bit_identical(dirs, tmp_path, fmt, tp, pp):
    src = dirs[fmt]
    meta = hf_to_fg(src, tmp_path / "fg", tp=tp, pp=pp)
    assert (meta.family, meta.tp, meta.pp, meta.hf_config["model_type"]) == ("chatglm", tp, pp, "chatglm")
    fg_to_hf(tmp_path / "fg", tmp_path / "back", layout="chatglm")
    back = read_weights(tmp_path / "back")
    assert "transformer.rotary_pos_emb.inv_freq" in back
    assert_same_bits(read_weights(src), back)
    assert not list((tmp_path / "back").glob("*.bin"))  # never writes pickles
    for f in ("config.json", "tokenizer.model", "tokenizer_config.json"):
        assert (tmp_path / "back" / f).read_bytes() == (src / f).read_bytes(), f


def test_default_export_is_transformers_glm(dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    hf_to_fg(dirs["bin"], tmp_path / "fg", tp=2, pp=1)
    fg_to_hf(tmp_path / "fg", tmp_path / "back")  # default layout: transformers' glm
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["model_type"] == "glm" and config["architectures"] == ["GlmForCausalLM"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32).eval()
    ref = hf_model(NAME)
    assert type(model).__name__ == "GlmForCausalLM"
    assert_same_bits(ref.state_dict(), model.state_dict())
    ids = torch.randint(0, ref.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    tok = load_tokenizer(tmp_path / "back")  # tokenizer files travel; no trust_remote_code
    assert isinstance(tok, ChatGLMTokenizer)
    assert tok("你好")["input_ids"] == load_tokenizer(dirs["tok"])("你好")["input_ids"]


def test_native_glm_in_original_layout_out(dirs, tmp_path):
    """transformers' glm layout -> fg -> the original layout: the independent fixture's tensors."""
    hf_to_fg(dirs["glm"], tmp_path / "fg", tp=1, pp=2)
    fg_to_hf(tmp_path / "fg", tmp_path / "orig", layout="chatglm")
    model = hf_model(NAME)
    assert_same_bits(chatglm_original_state(model), read_weights(tmp_path / "orig"))
    written = json.loads((tmp_path / "orig" / "config.json").read_text())
    assert arch_from_hf_config(written) == arch_from_hf_config(chatglm_original_config(model.config))
    # ... and back to transformers' layout: the native checkpoint again
    hf_to_fg(tmp_path / "orig", tmp_path / "fg2", tp=2, pp=1)
    fg_to_hf(tmp_path / "fg2", tmp_path / "glm")
    assert_same_bits(read_weights(dirs["glm"]), read_weights(tmp_path / "glm"))
    again = json.loads((tmp_path / "glm" / "config.json").read_text())
    assert arch_from_hf_config(again).to_dict() == {**arch_from_hf_config(model.config.to_dict()).to_dict()}


def test_tp_larger_than_kv_groups_is_refused(dirs, tmp_path):
    for src in (dirs["safetensors"], dirs["glm"]):
        with pytest.raises(ParallelLayoutError) as exc:
            hf_to_fg(src, tmp_path / "fg", tp=4)
        msg = one_line(exc)
        assert "tensor parallel size 4" in msg and "2 key/value heads" in msg
    hf_to_fg(dirs["safetensors"], tmp_path / "ok", tp=1)
    with pytest.raises(ParallelLayoutError, match="tensor parallel size 4 .* 2 key/value heads"):
        reshard(tmp_path / "ok", tmp_path / "re", tp=4, pp=1)
    assert not (tmp_path / "fg").exists() and not (tmp_path / "re").exists()


class _Payload:
    """Unpickling this with plain pickle would create a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_bin_is_read_only_through_the_restricted_unpickler(dirs, tmp_path):
    src = dirs["bin"]
    evil = tmp_path / "evil"
    evil.mkdir()
    for f in src.iterdir():
        (evil / f.name).write_bytes(f.read_bytes())
    index = json.loads((src / "pytorch_model.bin.index.json").read_text())
    shard = evil / index["weight_map"]["transformer.encoder.layers.1.mlp.dense_4h_to_h.weight"]
    state = torch.load(shard, weights_only=True)
    marker = tmp_path / "unpickled"
    torch.save({**state, "payload": _Payload(marker)}, shard)
    with pytest.raises(CheckpointMismatchError) as exc:
        hf_to_fg(evil, tmp_path / "fg")
    assert shard.name in one_line(exc) and "weights_only=True" in str(exc.value)
    assert not marker.exists() and not (tmp_path / "fg").exists()
    # .bin files are read for the original ChatGLM layout only
    glm_bin = tmp_path / "glm_bin"
    glm_bin.mkdir()
    (glm_bin / "config.json").write_bytes((dirs["glm"] / "config.json").read_bytes())
    (glm_bin / "pytorch_model.bin").write_bytes(b"not a pickle: must never be opened")
    with pytest.raises(CheckpointMismatchError, match="never unpickles"):
        hf_to_fg(glm_bin, tmp_path / "fg")


@pytest.mark.parametrize("edit,field", [
    ({"rmsnorm": False}, "rmsnorm=false"),
    ({"apply_residual_connection_post_layernorm": True}, "apply_residual_connection_post_layernorm=true"),
    ({"post_layer_norm": False}, "post_layer_norm=false"),
    ({"pre_seq_len": 128}, "pre_seq_len=128"),
    ({"multi_query_group_num": 3}, "multi_query_group_num 3 does not divide num_attention_heads 4"),
])
def test_unsupported_original_configs(dirs, tmp_path, edit, field):
    d = tmp_path / "bad"
    d.mkdir()
    for f in dirs["safetensors"].iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, **edit}))
    with pytest.raises(ModelConfigError) as exc:
        hf_to_fg(d, tmp_path / "fg")
    assert field in one_line(exc) and "config.json (chatglm)" in str(exc.value)


def test_cli_layout(dirs, tmp_path, capsys):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import convert_checkpoint

    assert convert_checkpoint.main(["hf-to-fg", "--hf", str(dirs["bin"]), "--out", str(tmp_path / "fg"),
                                    "--tp", "2"]) == 0
    assert read_meta(tmp_path / "fg").family == "chatglm"
    assert convert_checkpoint.main(["fg-to-hf", "--ckpt", str(tmp_path / "fg"), "--out", str(tmp_path / "orig"),
                                    "--layout", "chatglm"]) == 0
    assert_same_bits(read_weights(dirs["bin"]), read_weights(tmp_path / "orig"))
    capsys.readouterr()
    assert convert_checkpoint.main(["fg-to-hf", "--ckpt", str(tmp_path / "fg"), "--out", str(tmp_path / "x"),
                                    "--layout", "megatron"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--layout megatron" in err and "glm, chatglm" in err
    assert not (tmp_path / "x").exists()
