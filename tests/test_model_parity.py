"""Our megatron-core GPTModel gives transformers' logits (fp32, max abs diff <= 1e-4)
for every tiny variant, at TP=1, TP=2 and PP=2 (torchrun, gloo); GLM variants from
both the transformers ``glm`` layout and the original ChatGLM3 layout."""

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
