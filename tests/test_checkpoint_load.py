"""load_model / save_model under torchrun (gloo, 2 processes).

Models loaded from an HF directory (converted on the fly per rank) and from fg
checkpoints give transformers' logits; the TP=2,PP=1 -> TP=1,PP=2 reshard gives
the same logits as the original; a checkpoint saved from live TP=2 or PP=2
models exports back to the original HF tensors bit for bit; loading at another
layout is refused with the reshard command.  The same for uneven pipeline stages (a
3-layer model at PP=2): the split is recorded, kept, and a different one refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dist_utils import torchrun_json
from fg_megatron.checkpoint.convert import fg_to_hf, hf_to_fg, reshard
from fg_megatron.checkpoint.layout import read_meta
from tiny_models import hf_model, save_hf_model

NAMES = ("llama_gqa_untied", "llama_mha_tied")  # GQA + untied; MHA + tied + vocab 999


def read_hf_dir(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def make_tokenizer(d: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["hello world"], trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ckpt")
    tok = make_tokenizer(root / "tok")
    for name in NAMES:
        save_hf_model(name, root / f"hf_{name}", tokenizer_dir=tok)
        hf_to_fg(root / f"hf_{name}", root / f"tp2pp1_{name}", tp=2, pp=1)
    return root


def run(root: Path, phases: list[dict]) -> dict:
    plan = root / "plan.json"
    plan.write_text(json.dumps(phases))
    return torchrun_json("checkpoint_load.py", 2, "--plan", str(plan), out=root / "result.json")


def logits_vs_transformers(root: Path, run_name: str, model_name: str) -> tuple[torch.Tensor, float]:
    got = load_file(root / f"{run_name}.safetensors")
    with torch.no_grad():
        ref = hf_model(model_name)(got["ids"]).logits
    assert got["logits"].shape == ref.shape and ref.std() > 0.5
    return got["logits"], (got["logits"] - ref).abs().max().item()


def check_saved(root: Path, saved: str, name: str, tp: int, pp: int) -> None:
    meta = read_meta(root / saved)
    assert (meta.tp, meta.pp, meta.extra) == (tp, pp, {"step": 7})
    assert (root / saved / "hf" / "tokenizer.json").is_file()
    fg_to_hf(root / saved, root / f"{saved}_hf")
    src, back = read_hf_dir(root / f"hf_{name}"), read_hf_dir(root / f"{saved}_hf")
    assert sorted(src) == sorted(back)
    for k in src:
        assert torch.equal(src[k], back[k]) and src[k].dtype == back[k].dtype, k


@pytest.fixture(scope="module")
def runs(ckpts) -> tuple[Path, dict]:
    """One torchrun (2 processes): TP=2,PP=1 from the HF dir and the fg checkpoint, then
    TP=1,PP=2 from the resharded checkpoint and the HF dir; each layout saves one model."""
    root = ckpts
    reshard(root / "tp2pp1_llama_gqa_untied", root / "refused_tp1pp2", tp=1, pp=2)
    tp2, pp2 = [], []
    for name in NAMES:
        tp2.append({"name": f"tp2_hf_{name}", "path": str(root / f"hf_{name}"),
                    "save": str(root / f"saved_tp2_{name}")})
        tp2.append({"name": f"tp2_fg_{name}", "path": str(root / f"tp2pp1_{name}"), "save": None})
        reshard(root / f"tp2pp1_{name}", root / f"tp1pp2_{name}", tp=1, pp=2)
        pp2.append({"name": f"pp2_fg_{name}", "path": str(root / f"tp1pp2_{name}"),
                    "save": str(root / f"saved_pp2_{name}")})
        pp2.append({"name": f"pp2_hf_{name}", "path": str(root / f"hf_{name}"), "save": None})
    return root, run(root, [{"tp": 2, "pp": 1, "load": tp2, "refuse": [str(root / "refused_tp1pp2")]},
                            {"tp": 1, "pp": 2, "load": pp2, "refuse": []}])


@pytest.mark.distributed
@pytest.mark.parametrize("name", NAMES)
def test_loaded_models_give_transformers_logits(runs, name):
    root = runs[0]
    logits = {}
    for run_name in ("tp2_hf", "tp2_fg", "pp2_hf", "pp2_fg"):
        logits[run_name], diff = logits_vs_transformers(root, f"{run_name}_{name}", name)
        assert diff <= 1e-4, (run_name, diff)
    # same shards in the same layout: the same bits, whether converted on the fly or from disk
    assert torch.equal(logits["tp2_hf"], logits["tp2_fg"])
    assert torch.equal(logits["pp2_hf"], logits["pp2_fg"])
    # reshard TP=2,PP=1 -> TP=1,PP=2: the same logits up to the order of float sums across TP
    assert (logits["pp2_fg"] - logits["tp2_fg"]).abs().max().item() <= 1e-5


@pytest.mark.distributed
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("layout,tp,pp", [("tp2", 2, 1), ("pp2", 1, 2)])
def test_saved_model_exports_the_original_weights(runs, name, layout, tp, pp):
    check_saved(runs[0], f"saved_{layout}_{name}", name, tp, pp)


@pytest.mark.distributed
def test_other_layout_is_refused_with_the_reshard_command(runs):
    root, result = runs
    msg = result["refused"][str(root / "refused_tp1pp2")]
    assert "\n" not in msg and "saved with tp=1 pp=2 but this run uses tp=2 pp=1" in msg
    assert f"convert_checkpoint.py reshard --ckpt {root / 'refused_tp1pp2'} --out" in msg and "--tp 2 --pp 1" in msg


# --- uneven pipeline stages: a 3-layer model at PP=2 ------------------------------------------


@pytest.fixture(scope="module")
def uneven_runs(ckpts) -> tuple[Path, dict]:
    """One torchrun (2 processes, PP=2) on a tied 3-layer Llama: from the HF dir (default split
    [2, 1]) and from an fg checkpoint converted with [1, 2] (kept: no split asked for), each saved;
    then with [2, 1] asked for, the [1, 2] checkpoint is refused."""
    root = ckpts
    save_hf_model("llama_mha_tied", root / "hf3", tokenizer_dir=root / "tok", num_layers=3)
    hf_to_fg(root / "hf3", root / "fg3_12", tp=1, pp=2, layers_per_stage=[1, 2])
    load = [{"name": "pp2u_hf", "path": str(root / "hf3"), "save": str(root / "saved_pp2u_hf")},
            {"name": "pp2u_fg12", "path": str(root / "fg3_12"), "save": str(root / "saved_pp2u_fg12")}]
    return root, run(root, [{"tp": 1, "pp": 2, "load": load, "refuse": []},
                            {"tp": 1, "pp": 2, "layers_per_stage": [2, 1], "load": [],
                             "refuse": [str(root / "fg3_12")]}])


@pytest.mark.distributed
def test_uneven_stages_load_save_and_refuse(uneven_runs):
    root, result = uneven_runs
    for run_name, split in (("pp2u_hf", [2, 1]), ("pp2u_fg12", [1, 2])):
        got = load_file(root / f"{run_name}.safetensors")
        with torch.no_grad():
            ref = hf_model("llama_mha_tied", num_layers=3)(got["ids"]).logits
        assert ref.std() > 0.5 and (got["logits"] - ref).abs().max().item() <= 1e-4, run_name
        saved = root / f"saved_{run_name}"
        meta = read_meta(saved)
        assert (meta.tp, meta.pp, meta.layers_per_stage, meta.extra) == (1, 2, split, {"step": 7})
        fg_to_hf(saved, root / f"{saved.name}_hf")
        src, back = read_hf_dir(root / "hf3"), read_hf_dir(root / f"{saved.name}_hf")
        assert sorted(src) == sorted(back)
        for k in src:
            assert torch.equal(src[k], back[k]), (run_name, k)
    msg = result["refused"][str(root / "fg3_12")]
    assert "\n" not in msg
    assert "saved with tp=1 pp=2 layers_per_stage=1,2 but this run uses tp=1 pp=2 layers_per_stage=2,1" in msg
    assert msg.endswith("--tp 1 --pp 2 --layers-per-stage 2,1")


# --- refusals that need no process group (checked before any model is built) ----------------


def _ctx(tp: int, pp: int, layers_per_stage=None):
    from fg_megatron.parallel import ParallelContext

    return ParallelContext(world_size=tp * pp, rank=0, tp=tp, pp=pp, dp=1, tp_rank=0, pp_rank=0, dp_rank=0,
                           tp_group=None, pp_group=None, dp_group=None, device=torch.device("cpu"),
                           layers_per_stage=layers_per_stage)


def test_load_model_refusals(ckpts, tmp_path):
    from fg_megatron.checkpoint.load import load_model
    from fg_megatron.checkpoint.mapping import CheckpointMismatchError

    hf, fg = ckpts / "hf_llama_gqa_untied", ckpts / "tp2pp1_llama_gqa_untied"
    with pytest.raises(CheckpointMismatchError, match="model family is 'llama' .*expected 'mistral'"):
        load_model(hf, _ctx(1, 1), family="mistral")
    with pytest.raises(CheckpointMismatchError, match="checkpoint family is 'llama', expected 'mistral'"):
        load_model(fg, _ctx(2, 1), family="mistral")
    with pytest.raises(CheckpointMismatchError) as exc:
        load_model(fg, _ctx(1, 1))
    assert str(exc.value).endswith(f"reshard --ckpt {fg} --out {fg}_tp1_pp1 --tp 1 --pp 1")
    with pytest.raises(CheckpointMismatchError, match="saved with vocab_pad_multiple 128, asked for 64"):
        load_model(fg, _ctx(2, 1), vocab_pad_multiple=64)
    with pytest.raises(CheckpointMismatchError, match="neither an fg checkpoint"):
        load_model(tmp_path, _ctx(1, 1))
    from fg_megatron.parallel import ParallelLayoutError

    with pytest.raises(ParallelLayoutError, match=r"layers_per_stage \[1, 2\] .* sums to 3, but the model has 2"):
        load_model(hf, _ctx(1, 2, (1, 2)))
    hf_to_fg(hf, tmp_path / "fg_pp2", tp=1, pp=2)
    with pytest.raises(ParallelLayoutError, match=r"layers_per_stage \[1, 2\] .* sums to 3, but the model has 2"):
        load_model(tmp_path / "fg_pp2", _ctx(1, 2, (1, 2)))
