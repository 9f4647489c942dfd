"""HF <-> fg conversion and resharding (CPU, one process).

References: the safetensors library reads what we write, transformers loads
what fg-to-hf exports (same tensors bit for bit, same logits), and the shard
files of a resharded checkpoint equal those of a direct conversion.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fg_megatron.checkpoint.atomic import OutputExistsError
from fg_megatron.checkpoint.convert import fg_to_hf, hf_to_fg, reshard
from fg_megatron.checkpoint.layout import META_FILE, FgCheckpoint, read_meta, shard_file_name
from fg_megatron.checkpoint.mapping import CheckpointMismatchError
from fg_megatron.checkpoint.tokenizer import load_tokenizer
from fg_megatron.models.arch import ModelConfigError
from fg_megatron.parallel import ParallelLayoutError
from tiny_models import VARIANTS, hf_model, save_hf_model


def read_hf_dir(d: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF directory, through the safetensors library."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))


def assert_same_tensors(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert same_bits(a[k], b[k]), k


def read_fg_dir(d: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {f.name: load_file(f) for f in sorted(Path(d).glob("model_tp*_pp*.safetensors"))}


def make_tokenizer(d: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["hello world", "the quick brown fox jumps"],
                            trainers.WordLevelTrainer(special_tokens=["[UNK]", "<s>", "</s>"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>",
                            eos_token="</s>").save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    tok = make_tokenizer(root / "tokenizer")
    return {name: save_hf_model(name, root / name, tokenizer_dir=tok) for name in VARIANTS}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_round_trip_is_bit_identical(hf_dirs, tmp_path, name):
    hf = hf_dirs[name]
    meta = hf_to_fg(hf, tmp_path / "fg", tp=2, pp=2)
    assert (meta.tp, meta.pp, meta.padded_vocab_size) == (2, 2, 1024)
    assert len(list((tmp_path / "fg").glob("model_tp*_pp*.safetensors"))) == 4
    fg_to_hf(tmp_path / "fg", tmp_path / "back")
    assert_same_tensors(read_hf_dir(hf), read_hf_dir(tmp_path / "back"))
    assert json.loads((tmp_path / "back" / "config.json").read_text()) == json.loads((hf / "config.json").read_text())


def test_export_loads_in_transformers_with_tokenizer(hf_dirs, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = "llama_mha_tied"
    hf_to_fg(hf_dirs[name], tmp_path / "fg", tp=2, pp=1)
    # the checkpoint is self-contained: its tokenizer loads without the HF dir
    tok = load_tokenizer(tmp_path / "fg")
    assert tok("hello world")["input_ids"] == AutoTokenizer.from_pretrained(hf_dirs[name])("hello world")["input_ids"]
    fg_to_hf(tmp_path / "fg", tmp_path / "back")
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "back" / f).read_bytes() == (hf_dirs[name] / f).read_bytes(), f
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32).eval()
    ref = hf_model(name)
    assert_same_tensors(ref.state_dict(), model.state_dict())
    ids = torch.randint(0, 999, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    assert AutoTokenizer.from_pretrained(tmp_path / "back")("the fox")["input_ids"] == tok("the fox")["input_ids"]


def test_sharded_hf_in_and_out(tmp_path):
    model = hf_model("llama_gqa_untied")
    model.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    hf_to_fg(tmp_path / "hf", tmp_path / "fg", tp=1, pp=2)
    files = fg_to_hf(tmp_path / "fg", tmp_path / "back", max_shard_bytes=150_000)
    assert len(files) > 1
    index = json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())
    back = read_hf_dir(tmp_path / "back")
    assert sorted(index["weight_map"]) == sorted(back)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in back.values())
    assert_same_tensors(read_hf_dir(tmp_path / "hf"), back)


def test_fg_shards_hold_the_model_stage_names(hf_dirs, tmp_path):
    """Stage-local layer indices, the tied output copy on the last stage, zero vocabulary padding."""
    hf = hf_dirs["llama_mha_tied"]  # vocab 999, tied, 2 layers
    hf_to_fg(hf, tmp_path / "fg", tp=2, pp=2)
    files = read_fg_dir(tmp_path / "fg")
    first, last = files[shard_file_name(1, 0)], files[shard_file_name(1, 1)]
    layer = ["input_layernorm.weight", "self_attention.linear_qkv.weight", "self_attention.linear_proj.weight",
             "pre_mlp_layernorm.weight", "mlp.linear_fc1.weight", "mlp.linear_fc2.weight"]
    assert sorted(first) == sorted(["embedding.word_embeddings.weight"] + [f"decoder.layers.0.{s}" for s in layer])
    assert sorted(last) == sorted(["decoder.final_layernorm.weight", "output_layer.weight"]
                                  + [f"decoder.layers.0.{s}" for s in layer])
    src = load_file(hf / "model.safetensors")
    emb = src["model.embed_tokens.weight"]  # [999, 48]; rank 1 holds rows 512..1023
    for piece in (first["embedding.word_embeddings.weight"], last["output_layer.weight"]):
        assert piece.shape == (512, 48)
        assert torch.equal(piece[:487], emb[512:]) and not piece[487:].any()
    assert torch.equal(last["decoder.layers.0.self_attention.linear_proj.weight"],
                       src["model.layers.1.self_attn.o_proj.weight"][:, 24:])  # row-parallel half
    meta = read_meta(tmp_path / "fg")
    assert meta.num_layers == 2 and meta.vocab_size == 999 and meta.dtype == "float32"
    assert meta.hf_config == json.loads((hf / "config.json").read_text())


def test_reshard_equals_direct_conversion(hf_dirs, tmp_path):
    hf = hf_dirs["llama_gqa_untied"]
    hf_to_fg(hf, tmp_path / "tp2pp1", tp=2, pp=1)
    hf_to_fg(hf, tmp_path / "tp1pp2", tp=1, pp=2)
    reshard(tmp_path / "tp2pp1", tmp_path / "re_tp1pp2", tp=1, pp=2)
    reshard(tmp_path / "re_tp1pp2", tmp_path / "re_tp2pp1", tp=2, pp=1)
    for a, b in (("tp1pp2", "re_tp1pp2"), ("tp2pp1", "re_tp2pp1")):
        fa, fb = read_fg_dir(tmp_path / a), read_fg_dir(tmp_path / b)
        assert sorted(fa) == sorted(fb)
        for f in fa:
            assert_same_tensors(fa[f], fb[f])
    assert (tmp_path / "re_tp2pp1" / "hf" / "tokenizer.json").is_file()


def test_reshard_casts_dtype_and_repads_vocab(hf_dirs, tmp_path):
    hf = hf_dirs["llama_gqa_untied"]  # vocab 1000
    meta = hf_to_fg(hf, tmp_path / "fg", tp=2, pp=1, vocab_pad_multiple=8)
    assert meta.padded_vocab_size == 1008
    meta = reshard(tmp_path / "fg", tmp_path / "bf16", tp=1, pp=1, dtype=torch.bfloat16)
    assert (meta.padded_vocab_size, meta.dtype) == (1000, "bfloat16")
    fg_to_hf(tmp_path / "bf16", tmp_path / "back")
    src = read_hf_dir(hf)
    assert_same_tensors({k: v.to(torch.bfloat16) for k, v in src.items()}, read_hf_dir(tmp_path / "back"))
    assert json.loads((tmp_path / "back" / "config.json").read_text())["dtype"] == "bfloat16"


# --- errors: one line, naming what and where; nothing half-written -------------------------


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_unsupported_model_type(hf_dirs, tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    config = json.loads((hf_dirs["llama_gqa_untied"] / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(ModelConfigError) as exc:
        hf_to_fg(hf, tmp_path / "fg")
    assert "model_type 'gpt2' is not supported" in _one_line(exc)


def test_hf_tensor_mismatches(hf_dirs, tmp_path):
    src = hf_dirs["llama_gqa_untied"]
    tensors = load_file(src / "model.safetensors")

    def variant(name: str, edit, config_edit=None) -> Path:
        d = tmp_path / name
        d.mkdir()
        t = dict(tensors)
        edit(t)
        save_file(t, d / "model.safetensors", metadata={"format": "pt"})
        config = json.loads((src / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**config, **(config_edit or {})}))
        return d

    extra = variant("extra", lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointMismatchError, match="unexpected tensor 'model.layers.0.mlp.extra.weight'"):
        hf_to_fg(extra, tmp_path / "o1")
    missing = variant("missing", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointMismatchError, match="missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        hf_to_fg(missing, tmp_path / "o2")
    shape = variant("shape", lambda t: None, {"intermediate_size": 100})
    with pytest.raises(CheckpointMismatchError) as exc:
        hf_to_fg(shape, tmp_path / "o3")
    assert "has shape [96, 64], config.json implies [100, 64]" in _one_line(exc)
    assert not any(p.name.startswith("o") for p in tmp_path.iterdir())


def test_pickle_weights_are_refused_unread(hf_dirs, tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_bytes((hf_dirs["llama_gqa_untied"] / "config.json").read_bytes())
    (hf / "pytorch_model.bin").write_bytes(b"not a pickle: must never be opened")
    with pytest.raises(CheckpointMismatchError) as exc:
        hf_to_fg(hf, tmp_path / "fg")
    assert "pytorch_model.bin" in _one_line(exc) and "never unpickles" in str(exc.value)


def test_fg_checkpoint_mismatches(hf_dirs, tmp_path):
    fg = tmp_path / "fg"
    hf_to_fg(hf_dirs["llama_gqa_untied"], fg, tp=2, pp=1)
    with pytest.raises(CheckpointMismatchError) as exc:
        FgCheckpoint(fg, expect_family="mistral")
    assert "checkpoint family is 'llama', expected 'mistral'" in _one_line(exc)

    name = shard_file_name(1, 0)
    tensors = load_file(fg / name)
    qkv = "decoder.layers.1.self_attention.linear_qkv.weight"
    save_file({**tensors, qkv: tensors[qkv][:-1]}, fg / name)
    with pytest.raises(CheckpointMismatchError) as exc:
        fg_to_hf(fg, tmp_path / "back")
    assert f"{name}: tensor '{qkv}' has shape [63, 64], expected [64, 64]" in _one_line(exc)
    save_file({k: v for k, v in tensors.items() if k != qkv}, fg / name)
    with pytest.raises(CheckpointMismatchError, match=f"{name}: missing tensor '{qkv}'"):
        reshard(fg, tmp_path / "re", tp=1, pp=1)
    (fg / name).unlink()
    with pytest.raises(CheckpointMismatchError) as exc:
        FgCheckpoint(fg)
    assert f"missing shard file {name} (tp=2 pp=1 needs 2 files, 1 missing)" in _one_line(exc)
    meta = json.loads((fg / META_FILE).read_text())
    (fg / META_FILE).write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(CheckpointMismatchError, match="format_version 99 is not supported"):
        FgCheckpoint(fg)
    assert not (tmp_path / "back").exists() and not (tmp_path / "re").exists()


def test_layout_errors(hf_dirs, tmp_path):
    with pytest.raises(ParallelLayoutError, match="does not divide the model's 2 key/value heads"):
        hf_to_fg(hf_dirs["llama_gqa_untied"], tmp_path / "fg", tp=4)
    with pytest.raises(ParallelLayoutError, match="pipeline parallel size 4 does not divide the model's 2 layers"):
        hf_to_fg(hf_dirs["llama_gqa_untied"], tmp_path / "fg", pp=4)


def test_output_is_atomic_and_never_overwritten(hf_dirs, tmp_path, monkeypatch):
    hf = hf_dirs["llama_gqa_untied"]
    out = tmp_path / "fg"
    hf_to_fg(hf, out, tp=1, pp=1)
    before = read_fg_dir(out)
    with pytest.raises(OutputExistsError, match="exists and is not empty; pass --force"):
        hf_to_fg(hf, out, tp=2, pp=1)
    with pytest.raises(OutputExistsError, match="would overwrite the input"):
        fg_to_hf(out, out, force=True)

    # a conversion failing half way leaves the old checkpoint as it was, and no debris
    from fg_megatron.checkpoint import hf as hf_module

    calls = {"n": 0}
    real_get = hf_module.HFWeights.get

    def failing_get(self, name):
        calls["n"] += 1
        if calls["n"] > 5:
            raise OSError("disk went away")
        return real_get(self, name)

    monkeypatch.setattr(hf_module.HFWeights, "get", failing_get)
    with pytest.raises(OSError, match="disk went away"):
        hf_to_fg(hf, out, tp=2, pp=1, force=True)
    with pytest.raises(OSError):
        hf_to_fg(hf, tmp_path / "new", tp=2, pp=1)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fg"]
    after = read_fg_dir(out)
    assert sorted(after) == sorted(before) and read_meta(out).tp == 1

    hf_to_fg(hf, out, tp=2, pp=1, force=True)
    assert read_meta(out).tp == 2 and len(read_fg_dir(out)) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fg"]


def test_cli(hf_dirs, tmp_path, capsys):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import convert_checkpoint

    hf = hf_dirs["mistral_window"]
    assert convert_checkpoint.main(["hf-to-fg", "--hf", str(hf), "--out", str(tmp_path / "a"),
                                    "--tp", "2", "--pp", "2"]) == 0
    assert convert_checkpoint.main(["reshard", "--ckpt", str(tmp_path / "a"), "--out", str(tmp_path / "b"),
                                    "--tp", "1", "--pp", "1", "--dtype", "bfloat16"]) == 0
    assert convert_checkpoint.main(["fg-to-hf", "--ckpt", str(tmp_path / "b"), "--out", str(tmp_path / "c")]) == 0
    assert_same_tensors({k: v.to(torch.bfloat16) for k, v in read_hf_dir(hf).items()}, read_hf_dir(tmp_path / "c"))
    capsys.readouterr()
    assert convert_checkpoint.main(["reshard", "--ckpt", str(tmp_path / "a"), "--out", str(tmp_path / "b"),
                                    "--tp", "1", "--pp", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("convert_checkpoint.py reshard: error: output directory")
