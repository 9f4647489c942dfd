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


# --- uneven pipeline stages: 3 layers on 2 or 3 stages -------------------------------------


@pytest.fixture(scope="module")
def hf3(tmp_path_factory) -> Path:
    """A tied Llama (vocab 999) with 3 layers: no even split at PP=2."""
    root = tmp_path_factory.mktemp("hf3")
    return save_hf_model("llama_mha_tied", root / "llama3l", tokenizer_dir=make_tokenizer(root / "tok"),
                         num_layers=3)


def test_uneven_stages_convert_and_export_bit_exact(hf3, tmp_path):
    """Default split [2, 1] recorded in the metadata; stage files hold stage-local layer names;
    the export is the HF model bit for bit."""
    meta = hf_to_fg(hf3, tmp_path / "fg", tp=2, pp=2)
    assert (meta.pp, meta.layers_per_stage) == (2, [2, 1])
    assert read_meta(tmp_path / "fg").layers_per_stage == [2, 1]
    files = read_fg_dir(tmp_path / "fg")
    layers = lambda f: sorted({k.split(".")[2] for k in f if k.startswith("decoder.layers.")})  # noqa: E731
    assert layers(files[shard_file_name(0, 0)]) == ["0", "1"] and layers(files[shard_file_name(0, 1)]) == ["0"]
    src = load_file(hf3 / "model.safetensors")
    assert torch.equal(files[shard_file_name(0, 1)]["decoder.layers.0.mlp.linear_fc2.weight"],
                       src["model.layers.2.mlp.down_proj.weight"][:, :40])  # model layer 2, row-parallel half
    fg_to_hf(tmp_path / "fg", tmp_path / "back")
    assert_same_tensors(read_hf_dir(hf3), read_hf_dir(tmp_path / "back"))


def test_uneven_reshard_equals_direct_conversion(hf3, tmp_path):
    """Every reshard path gives the files a direct conversion to that split gives, bit for bit."""
    for name, tp, pp, split in (("d21", 1, 2, None), ("d12", 1, 2, [1, 2]), ("d111", 1, 3, None),
                                ("d12_tp2", 2, 2, [1, 2])):
        hf_to_fg(hf3, tmp_path / name, tp=tp, pp=pp, layers_per_stage=split)
    assert read_meta(tmp_path / "d111").layers_per_stage == [1, 1, 1]
    reshard(tmp_path / "d12", tmp_path / "r111", tp=1, pp=3)  # new pp: the default split
    reshard(tmp_path / "r111", tmp_path / "r12", tp=1, pp=2, layers_per_stage=[1, 2])
    reshard(tmp_path / "r12", tmp_path / "r12_tp2", tp=2, pp=2)  # same pp: the source's split is kept
    reshard(tmp_path / "r12_tp2", tmp_path / "r21", tp=1, pp=2, layers_per_stage=[2, 1])
    for direct, resharded in (("d111", "r111"), ("d12", "r12"), ("d12_tp2", "r12_tp2"), ("d21", "r21")):
        assert read_meta(tmp_path / resharded).layers_per_stage == read_meta(tmp_path / direct).layers_per_stage
        fa, fb = read_fg_dir(tmp_path / direct), read_fg_dir(tmp_path / resharded)
        assert sorted(fa) == sorted(fb)
        for f in fa:
            assert_same_tensors(fa[f], fb[f])
    reshard(tmp_path / "r21", tmp_path / "r1", tp=1, pp=1)
    fg_to_hf(tmp_path / "r1", tmp_path / "back")
    assert_same_tensors(read_hf_dir(hf3), read_hf_dir(tmp_path / "back"))


def test_checkpoint_without_split_is_the_even_split(hf_dirs, hf3, tmp_path):
    """Checkpoints written before uneven stages have no layers_per_stage: the even split."""
    fg = tmp_path / "old"
    hf_to_fg(hf_dirs["llama_gqa_untied"], fg, tp=1, pp=2)
    meta = json.loads((fg / META_FILE).read_text())
    assert meta.pop("layers_per_stage") == [1, 1]
    (fg / META_FILE).write_text(json.dumps(meta))
    ckpt = FgCheckpoint(fg)
    assert ckpt.meta.layers_per_stage is None and ckpt.meta.stage_counts == [1, 1]
    fg_to_hf(fg, tmp_path / "back")
    assert_same_tensors(read_hf_dir(hf_dirs["llama_gqa_untied"]), read_hf_dir(tmp_path / "back"))

    uneven = tmp_path / "uneven"
    hf_to_fg(hf3, uneven, tp=1, pp=2)
    meta = json.loads((uneven / META_FILE).read_text())
    for bad, needle in ((None, "no field 'layers_per_stage', and pp 2 does not divide the 3 layers evenly"),
                        ([1, 1], "layers_per_stage [1, 1] (parallel.layers_per_stage / --layers-per-stage) sums "
                                 "to 2, but the model has 3 layers"),
                        ("2,1", "field 'layers_per_stage' must be a list of integers")):
        (uneven / META_FILE).write_text(json.dumps({**meta, "layers_per_stage": bad}))
        with pytest.raises(CheckpointMismatchError) as exc:
            FgCheckpoint(uneven)
        assert needle in _one_line(exc) and str(uneven / META_FILE) in str(exc.value)
    # the split is part of the layout: a file laid out as [2, 1] does not pass as [1, 2]
    (uneven / META_FILE).write_text(json.dumps({**meta, "layers_per_stage": [1, 2]}))
    with pytest.raises(CheckpointMismatchError, match="unexpected tensor 'decoder.layers.1."):
        FgCheckpoint(uneven)


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
    with pytest.raises(ParallelLayoutError, match="pipeline parallel size 4 is larger than the model's 2 layers"):
        hf_to_fg(hf_dirs["llama_gqa_untied"], tmp_path / "fg", pp=4)
    with pytest.raises(ParallelLayoutError, match=r"layers_per_stage \[2, 1\] .* sums to 3, but the model has 2"):
        hf_to_fg(hf_dirs["llama_gqa_untied"], tmp_path / "fg", pp=2, layers_per_stage=[2, 1])
    assert not (tmp_path / "fg").exists()


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


def test_cli_layers_per_stage(hf3, tmp_path, capsys):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import convert_checkpoint

    assert convert_checkpoint.main(["hf-to-fg", "--hf", str(hf3), "--out", str(tmp_path / "a"), "--pp", "2",
                                    "--layers-per-stage", "1,2"]) == 0
    assert read_meta(tmp_path / "a").layers_per_stage == [1, 2]
    assert convert_checkpoint.main(["reshard", "--ckpt", str(tmp_path / "a"), "--out", str(tmp_path / "b"),
                                    "--tp", "1", "--pp", "2", "--layers-per-stage", "2,1"]) == 0
    assert read_meta(tmp_path / "b").layers_per_stage == [2, 1]
    capsys.readouterr()
    assert convert_checkpoint.main(["reshard", "--ckpt", str(tmp_path / "a"), "--out", str(tmp_path / "c"),
                                    "--tp", "1", "--pp", "2", "--layers-per-stage", "2,2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sums to 4, but the model has 3 layers" in err
    assert not (tmp_path / "c").exists()
