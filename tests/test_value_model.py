"""Value-head models (reward models, critics) against transformers' *ForSequenceClassification.

Under torchrun (gloo) at TP=1, TP=2 and PP=2, models loaded from HF sequence-classification
directories give transformers' logits as their sequence scores (fp32, relative 1e-4) on
right-padded batches of different lengths, and the parameter gradients of sum(scores) equal
transformers' autograd mapped through the converter (relative 1e-4).  A value model seeded
from a causal LM by load_model(head="value") and saved equals `hf-to-fg --head value` bit for
bit, scores exactly 0, and its head gets a gradient on the first step.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dist_utils import torchrun_json
from fg_megatron.checkpoint.convert import hf_to_fg
from fg_megatron.checkpoint.layout import read_meta
from fg_megatron.checkpoint.mapping import megatron_from_hf
from fg_megatron.models import arch_from_hf_config, sharding, state_dict_adapter
from tiny_models import PAD_ID, VALUE_VARIANTS, hf_value_model, save_hf_model, save_hf_value_model

LAYOUTS = [(1, 1), (2, 1), (1, 2)]
SEED_LM = "llama_mha_tied"  # tied embeddings: under PP its last stage holds a copy that must go
REL_TOL = 1e-4
MEASURED: dict[str, float] = {}  # largest relative differences seen, printed with -s


def make_tokenizer(d: Path) -> Path:
    """A word-level tokenizer with a pad token (id 1): seeding takes pad_token_id from it."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["hello world"], trainers.WordLevelTrainer(special_tokens=["[UNK]", "[PAD]"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(d)
    return d


def rel_diff(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute difference relative to the reference's largest magnitude."""
    return ((got.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def note(key: str, value: float) -> None:
    MEASURED[key] = max(MEASURED.get(key, 0.0), value)
    print(f"{key}: {MEASURED[key]:.2e}")


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("value")
    tok = make_tokenizer(root / "tok")
    for name in VALUE_VARIANTS:
        save_hf_value_model(name, root / f"rm_{name}", tokenizer_dir=tok)
    save_hf_model(SEED_LM, root / "lm", tokenizer_dir=tok)
    return root


@pytest.fixture(scope="module", params=LAYOUTS, ids=["tp1", "tp2", "pp2"])
def layout_run(request, assets):
    """One torchrun per layout: every value variant from its HF dir, one from an fg checkpoint,
    and the LM seeded as a value model from its HF dir and from its fg checkpoint (both saved)."""
    tp, pp = request.param
    root, run_dir = assets, assets / f"tp{tp}_pp{pp}"
    run_dir.mkdir()
    hf_to_fg(root / "rm_llama_gqa_untied", run_dir / "fg_rm", tp=tp, pp=pp)
    hf_to_fg(root / "lm", run_dir / "fg_lm", tp=tp, pp=pp)
    hf_to_fg(root / "lm", run_dir / "seeded_ref", tp=tp, pp=pp, head="value")
    plan = [{"name": f"hf_{n}", "path": str(root / f"rm_{n}")} for n in VALUE_VARIANTS]
    plan += [{"name": "fg_rm", "path": str(run_dir / "fg_rm")},
             {"name": "seed_hf", "path": str(root / "lm"), "head": "value", "save": str(run_dir / "saved_hf")},
             {"name": "seed_fg", "path": str(run_dir / "fg_lm"), "head": "value", "save": str(run_dir / "saved_fg")}]
    (run_dir / "plan.json").write_text(json.dumps(plan))
    result = torchrun_json("value_parity.py", tp * pp, "--tp", str(tp), "--pp", str(pp),
                           "--plan", str(run_dir / "plan.json"), out=run_dir / "result.json")
    return tp, pp, run_dir, result


def merged_grads(run_dir: Path, name: str, arch, tp: int, pp: int) -> dict[str, torch.Tensor]:
    """Full (TP-merged, unpadded) megatron gradients from every rank's stage-local file."""
    pieces: dict[str, dict[int, torch.Tensor]] = defaultdict(dict)
    for pp_rank in range(pp):
        for tp_rank in range(tp):
            for local, t in load_file(run_dir / f"{name}_grads_tp{tp_rank}_pp{pp_rank}.safetensors").items():
                pieces[sharding.full_name(local, arch, pp, pp_rank)][tp_rank] = t
    return {n: sharding.merge(n, [by[r] for r in range(tp)], arch.vocab_size) for n, by in pieces.items()}


def transformers_reference(name: str, ids: torch.Tensor):
    """(logits [b], full megatron-named gradients of sum(logits)) from transformers' own model."""
    model = hf_value_model(name)
    logits = model(ids, attention_mask=(ids != PAD_ID).long()).logits  # [b, 1], pooled by transformers
    assert logits.shape == (ids.shape[0], 1)
    logits[:, 0].sum().backward()
    config = {**model.config.to_dict(), "architectures": [type(model).__name__]}
    arch = arch_from_hf_config(config)
    grads = {n: p.grad for n, p in model.named_parameters()}
    return logits[:, 0].detach(), arch, dict(megatron_from_hf(state_dict_adapter(arch), grads.get))


@pytest.mark.distributed
@pytest.mark.parametrize("name", VALUE_VARIANTS)
def test_scores_and_gradients_match_transformers(layout_run, name):
    tp, pp, run_dir, _ = layout_run
    facts = json.loads((run_dir / f"hf_{name}.json").read_text())
    assert facts == {"head": "value", "tie": False, "value_head_tp_sharded": False}
    got = load_file(run_dir / f"hf_{name}.safetensors")
    ids, lengths = got["ids"], got["lengths"]
    assert lengths.tolist() == [21, 13, 17, 9] and not (ids[ids != PAD_ID] == PAD_ID).any()
    ref_scores, arch, ref_grads = transformers_reference(name, ids)
    assert ref_scores.std() > 0.1  # rows score differently: the pooling position matters
    note(f"scores {name} tp{tp}pp{pp}", rel_diff(got["scores"], ref_scores))
    assert rel_diff(got["scores"], ref_scores) <= REL_TOL, (got["scores"], ref_scores)

    grads = merged_grads(run_dir, f"hf_{name}", arch, tp, pp)
    assert sorted(grads) == sorted(ref_grads)
    assert "value_head.weight" in grads and "output_layer.weight" not in grads
    worst = 0.0
    for n, ref in ref_grads.items():
        assert ref.abs().max() > 0, n  # every tensor takes part
        worst = max(worst, rel_diff(grads[n], ref))
        assert rel_diff(grads[n], ref) <= REL_TOL, (n, rel_diff(grads[n], ref))
    note(f"grads {name} tp{tp}pp{pp}", worst)


@pytest.mark.distributed
def test_fg_checkpoint_equals_hf_load(layout_run):
    """The same shards converted on the fly or read from an fg checkpoint: the same bits."""
    tp, pp, run_dir, _ = layout_run
    a, b = load_file(run_dir / "fg_rm.safetensors"), load_file(run_dir / "hf_llama_gqa_untied.safetensors")
    assert torch.equal(a["scores"], b["scores"])
    for r in range(tp):
        for s in range(pp):
            ga = load_file(run_dir / f"fg_rm_grads_tp{r}_pp{s}.safetensors")
            gb = load_file(run_dir / f"hf_llama_gqa_untied_grads_tp{r}_pp{s}.safetensors")
            assert sorted(ga) == sorted(gb) and all(torch.equal(ga[k], gb[k]) for k in ga)


def read_shards(d: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {f.name: load_file(f) for f in sorted(d.glob("model_tp*_pp*.safetensors"))}


@pytest.mark.distributed
def test_seeded_value_model(layout_run):
    """load_model(head="value") on an LM (HF dir or fg checkpoint) == hf-to-fg --head value; scores are 0;
    the zero head still gets a gradient, the body none yet."""
    tp, pp, run_dir, _ = layout_run
    ref, lm = read_shards(run_dir / "seeded_ref"), read_shards(run_dir / "fg_lm")
    ref_meta = read_meta(run_dir / "seeded_ref")
    assert ref_meta.hf_config["architectures"] == ["LlamaForSequenceClassification"]
    assert ref_meta.hf_config["pad_token_id"] == 1  # from the tokenizer: the LM's config has none
    last = f"model_tp00_pp{pp - 1:02d}.safetensors"
    for f, tensors in ref.items():
        expected = {k: v for k, v in lm[f].items() if k != "output_layer.weight"}  # tied copy under PP
        if f.endswith(f"_pp{pp - 1:02d}.safetensors"):
            assert torch.equal(tensors["value_head.weight"], torch.zeros(1, 48))
            expected["value_head.weight"] = tensors["value_head.weight"]
        assert sorted(tensors) == sorted(expected) and all(torch.equal(tensors[k], expected[k]) for k in tensors)
    assert last in ref
    for saved in ("saved_hf", "saved_fg"):
        shards = read_shards(run_dir / saved)
        assert sorted(shards) == sorted(ref)
        for f in ref:
            assert sorted(shards[f]) == sorted(ref[f]), (saved, f)
            assert all(torch.equal(shards[f][k], ref[f][k]) for k in ref[f]), (saved, f)
        meta = read_meta(run_dir / saved)
        assert meta.hf_config == ref_meta.hf_config
        assert json.loads((run_dir / saved / "hf" / "config.json").read_text()) == ref_meta.hf_config
    for name in ("seed_hf", "seed_fg"):
        assert json.loads((run_dir / f"{name}.json").read_text())["head"] == "value"
        assert torch.equal(load_file(run_dir / f"{name}.safetensors")["scores"], torch.zeros(4))
        grads = merged_grads(run_dir, name, arch_from_hf_config(ref_meta.hf_config), tp, pp)
        assert grads.pop("value_head.weight").abs().max() > 0
        assert all(not g.any() for g in grads.values())
