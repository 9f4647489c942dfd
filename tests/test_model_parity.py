"""Our megatron-core GPTModel gives transformers' logits (fp32, max abs diff <= 1e-4)
for every tiny variant, at TP=1, TP=2 and PP=2 (torchrun, gloo); GLM variants from
both the transformers ``glm`` layout and the original ChatGLM3 layout; uneven pipeline
stages (3 layers at PP=2, 5 at PP=3) with megatron-core numbering each stage's layers as
the checkpoint mapping does."""

import pytest

from dist_utils import torchrun_json
from tiny_models import GLM_VARIANTS, VARIANTS


@pytest.mark.distributed
@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2)], ids=["tp1", "tp2", "pp2"])
def test_logits_match_transformers(tmp_path, tp, pp):
    res = torchrun_json("parity_logits.py", tp * pp, "--tp", str(tp), "--pp", str(pp),
                        out=tmp_path / "r.json")
    assert set(res) == set(VARIANTS) | {f"{n}@chatglm" for n in GLM_VARIANTS}
    for name, r in res.items():
        assert r["shape"] == r["ref_shape"], name  # padded vocabulary rows are not exposed
        assert r["ref_std"] > 0.5, name  # the reference is not degenerate
        assert r["max_abs_diff"] <= 1e-4, (name, r)


# Uneven pipeline stages: 3 layers on 2 stages (default split [2, 1], and [1, 2] asked for),
# 5 layers on 3 stages ([2, 2, 1]).  An untied model and a tied one (the output layer's copy of
# the embedding on the last stage).
UNEVEN = [(2, 3, None, [[0, 1], [2]]), (2, 3, "1,2", [[0], [1, 2]]), (3, 5, None, [[0, 1], [2, 3], [4]])]


@pytest.mark.distributed
@pytest.mark.parametrize("pp,layers,split,stage_layers", UNEVEN, ids=["pp2_3layers", "pp2_3layers_1_2",
                                                                        "pp3_5layers"])
def test_uneven_stages_match_transformers(tmp_path, pp, layers, split, stage_layers):
    names = ["llama_gqa_untied", "llama_mha_tied"]
    args = ["--pp", str(pp), "--num-layers", str(layers), "--variants", ",".join(names)]
    if split:
        args += ["--layers-per-stage", split]
    res = torchrun_json("parity_logits.py", pp, *args, out=tmp_path / "r.json")
    assert sorted(res) == sorted(names)
    for name, r in res.items():
        assert r["stage_layers"] == stage_layers, name  # megatron-core's numbering = the checkpoint mapping
        assert r["shape"] == r["ref_shape"], name
        assert r["ref_std"] > 0.5, name
        assert r["max_abs_diff"] <= 1e-4, (name, r)
