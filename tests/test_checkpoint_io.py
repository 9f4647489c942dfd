"""safetensors streaming I/O, HF weight discovery and TP merges, against outside references
(the safetensors library, megatron's padding rule, sharding.merge)."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fg_megatron.checkpoint.convert import hf_to_fg
from fg_megatron.checkpoint.hf import SAFE_INDEX, open_hf_weights, shard_plan
from fg_megatron.checkpoint.layout import FgCheckpoint, full_names
from fg_megatron.checkpoint.mapping import CheckpointMismatchError
from fg_megatron.checkpoint.safetensors_io import SafetensorsFile, StreamingWriter, TensorSpec, write_file
from fg_megatron.checkpoint.tokenizer import load_tokenizer
from fg_megatron.models import sharding
from tiny_models import save_hf_model


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(3, 5, generator=g),
        "bf16": torch.randn(7, generator=g).to(torch.bfloat16),
        "f16": torch.randn(2, 2, 2, generator=g).to(torch.float16),
        "i64": torch.arange(-4, 5),
        "flag": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))


def test_streaming_writer_output_reads_back_with_safetensors(tmp_path):
    tensors = sample_tensors()
    path = tmp_path / "a.safetensors"
    specs = [TensorSpec.of(n, t) for n, t in tensors.items()]
    with StreamingWriter(path, specs, {"who": "test"}) as writer:
        for name in reversed(list(tensors)):  # any order
            writer.write(name, tensors[name])
    back = load_file(path)
    assert sorted(back) == sorted(tensors)
    assert all(same_bits(back[n], tensors[n]) for n in tensors)
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt", "who": "test"}
    assert path.stat().st_size == writer.nbytes


def test_reader_reads_library_files(tmp_path):
    tensors = sample_tensors()
    save_file(tensors, tmp_path / "b.safetensors", metadata={"format": "pt"})
    f = SafetensorsFile(tmp_path / "b.safetensors")
    assert sorted(f.names()) == sorted(tensors) and f.metadata() == {"format": "pt"}
    for name, t in tensors.items():
        assert f.spec(name) == TensorSpec.of(name, t)
        assert same_bits(f.get(name), t), name
    with pytest.raises(CheckpointMismatchError, match="no tensor named 'nope'"):
        f.get("nope")


def test_writer_refuses_unplanned_and_incomplete(tmp_path):
    t = torch.ones(2, 3)
    writer = StreamingWriter(tmp_path / "c.safetensors", [TensorSpec.of("a", t), TensorSpec.of("b", t)])
    with pytest.raises(RuntimeError, match="'a' is torch.float32 \\[3, 2\\], planned torch.float32 \\[2, 3\\]"):
        writer.write("a", t.t())
    writer.write("a", t)
    with pytest.raises(RuntimeError, match="written twice"):
        writer.write("a", t)
    with pytest.raises(RuntimeError, match="1 planned tensors never written, e.g. 'b'"):
        writer.close()


def test_reader_rejects_corrupt_files(tmp_path):
    good = tmp_path / "good.safetensors"
    write_file(good, {"w": torch.arange(6, dtype=torch.float32)})
    raw = good.read_bytes()
    cases = {
        "truncated": raw[:-4],
        "garbage": b"\x00" * 3,
        "huge_header": struct.pack("<Q", 1 << 40) + raw[8:],
    }
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    header["w"]["data_offsets"] = [0, 20]  # 20 bytes for six float32 values
    bad = json.dumps(header).encode()
    cases["offsets"] = struct.pack("<Q", len(bad)) + bad + raw[8 + n:]
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointMismatchError) as exc:
            SafetensorsFile(tmp_path / name).get("w")
        assert name in str(exc.value) and "\n" not in str(exc.value)


def test_shard_plan_groups_by_size():
    specs = [TensorSpec(f"t{i}", torch.float32, (10,)) for i in range(5)]  # 40 bytes each
    assert list(shard_plan(specs, 1000)) == ["model.safetensors"]
    plan = shard_plan(specs + [TensorSpec("big", torch.float32, (100,))], 100)
    assert [[s.name for s in g] for g in plan.values()] == [["t0", "t1"], ["t2", "t3"], ["t4"], ["big"]]
    assert list(plan) == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]


def test_hf_weight_discovery_errors(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    save_file({"x": torch.zeros(1)}, a / "one.safetensors")
    save_file({"x": torch.ones(1)}, a / "two.safetensors")
    with pytest.raises(CheckpointMismatchError, match="'x' is in both one.safetensors and two.safetensors"):
        open_hf_weights(a)
    save_file({"x": torch.zeros(1)}, b / "s1.safetensors")
    (b / SAFE_INDEX).write_text(json.dumps({"weight_map": {"x": "s1.safetensors", "y": "s2.safetensors"}}))
    with pytest.raises(CheckpointMismatchError, match="shard s2.safetensors listed in model.safetensors.index.json"):
        open_hf_weights(b)
    (b / SAFE_INDEX).write_text(json.dumps({"weight_map": {"x": "s1.safetensors", "y": "s1.safetensors"}}))
    with pytest.raises(CheckpointMismatchError, match="puts 'y' in s1.safetensors, which does not contain it"):
        open_hf_weights(b).get("y")
    with pytest.raises(CheckpointMismatchError, match="no weights found"):
        open_hf_weights(tmp_path)


def test_vocab_shard_equals_megatron_padding_rule():
    full = torch.randn(999, 6)
    for tp in (1, 2, 4):
        padded = 128 * tp * 8  # >= 999
        reference = torch.chunk(sharding.pad_vocab(full, padded), tp, dim=0)  # pad all, then split
        for r in range(tp):
            assert torch.equal(sharding.shard("output_layer.weight", full, tp, r, padded), reference[r])


def test_full_tensor_equals_sharding_merge(tmp_path):
    """The streaming merge of FgCheckpoint agrees with sharding.merge for every tensor kind."""
    save_hf_model("llama_gqa_untied", tmp_path / "hf")
    hf_to_fg(tmp_path / "hf", tmp_path / "fg", tp=2, pp=2)
    ckpt = FgCheckpoint(tmp_path / "fg")
    for name, _ in full_names(ckpt.adapter):
        stage, local = sharding.stage_of(name, ckpt.arch, 2)[0]
        shards = [ckpt.stage_tensor(r, stage, local) for r in range(2)]
        assert torch.equal(ckpt.full_tensor(name), sharding.merge(name, shards, 1000)), name


def test_load_tokenizer_needs_tokenizer_files(tmp_path):
    save_hf_model("llama_gqa_untied", tmp_path / "hf")
    with pytest.raises(CheckpointMismatchError, match="no tokenizer files"):
        load_tokenizer(tmp_path / "hf")
