"""The direct decoder (fg_megatron/generation/direct.py) held to megatron-core's own modules.

For Llama (GQA untied, MHA tied, llama3 RoPE scaling), Mistral (sliding window
exceeded by the sequence) and GLM (QKV bias, interleaved partial RoPE, two rope
bases), at TP=2 and TP=1: the last-position logits of a prefilled left-padded
batch and of 12 cached decode steps equal a full no-cache forward through the
schedule (relative 1e-5), and ``generate_ids`` gives the same greedy and sampled
ids, and the same entropies, with either backend.  The backend choice itself is
checked without a process group."""

import pytest

from dist_utils import torchrun_json
from tiny_models import VARIANTS, save_hf_model


@pytest.mark.distributed
def test_direct_decoder_matches_schedule_tp2_tp1(tmp_path):
    dirs = [save_hf_model(name, tmp_path / name) for name in VARIANTS]
    res = torchrun_json("direct_decoder.py", 2, "--models", *dirs, out=tmp_path / "r.json")
    assert len(res) == 2 * len(VARIANTS)
    for key, r in res.items():
        assert len(r["relative_logit_error"]) == 13
        assert max(r["relative_logit_error"]) < 1e-5, (key, r["relative_logit_error"])
        assert r["direct"]["greedy"] == r["schedule"]["greedy"], key
        assert r["direct"]["sampled"] == r["schedule"]["sampled"], key
        assert r["direct"]["sampled"] != r["direct"]["greedy"], key  # the sampler really sampled
        for a, b in zip(r["direct"]["entropy"], r["schedule"]["entropy"]):
            assert len(a) == len(b) == 16
            assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4, key
    for name in VARIANTS:  # TP=2 and TP=1 agree
        tp2, tp1 = (next(r for k, r in res.items() if f"/{name}:tp{t}" in k) for t in (2, 1))
        assert tp2["direct"]["greedy"] == tp1["direct"]["greedy"], name


class _Config:
    def __init__(self, **kw):
        defaults = dict(sequence_parallel=False, context_parallel_size=1, num_query_groups=2,
                        normalization="RMSNorm", gated_linear_unit=True, add_bias_linear=False,
                        qk_layernorm=False, multi_latent_attention=False, num_moe_experts=None)
        self.__dict__.update({**defaults, **kw})


class _Stage:
    def __init__(self, value=False, **kw):
        self.config, self.decoder, self.position_embedding_type = _Config(**kw), object(), "rope"
        self.value_head = object() if value else None


class _Ctx:
    def __init__(self, tp=1, pp=1):
        self.tp, self.pp = tp, pp


def test_backend_choice():
    from fg_megatron.generation.engine import pick_backend

    stage = _Stage()
    assert pick_backend(stage, _Ctx(), "auto", True) == "direct"
    assert pick_backend(stage, _Ctx(tp=2), "auto", True) == "direct"
    assert pick_backend(stage, _Ctx(), "auto", False) == "schedule"  # no cache: the reference path
    assert pick_backend(stage, _Ctx(), "schedule", True) == "schedule"
    assert pick_backend(stage, _Ctx(pp=2), "auto", True) == "schedule"
    assert pick_backend(stage, _Ctx(tp=4), "auto", True) == "schedule"  # 2 KV groups over 4 ranks
    assert pick_backend(_Stage(sequence_parallel=True), _Ctx(tp=2), "auto", True) == "schedule"
    with pytest.raises(ValueError, match="pipeline parallel"):
        pick_backend(stage, _Ctx(pp=2), "direct", True)
    with pytest.raises(ValueError, match="value model"):
        pick_backend(_Stage(value=True), _Ctx(), "direct", True)
    with pytest.raises(ValueError, match="KV cache"):
        pick_backend(stage, _Ctx(), "direct", False)
    with pytest.raises(ValueError, match="backend must be one of"):
        pick_backend(stage, _Ctx(), "vllm", True)
