"""Vocab-parallel sequence log-likelihood over 2 processes (torchrun, gloo):

* kernel level: seq_loglik on a TP=2 weight shard == TP=1 on the whole weight,
  log-probs and both gradients, torch and triton (interpreter) backends, with a
  vocabulary whose padding fills part of rank 1 (301 of 320) or all of it (150);
* model level: token_logprobs on a tiny GPTModel's LMHead (tied and untied
  output layer at TP=2, tied at PP=2), impl torch / triton == impl megatron
  (megatron-core's vocab_parallel_cross_entropy) for the log-probs and the
  gradient of every parameter, and == transformers' log-softmax of its logits.
"""

import pytest

from dist_utils import torchrun_json

FP32, BF16 = 1e-5, 2e-2


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("seq_loglik_tp") / "r.json"
    return torchrun_json("seq_loglik_tp.py", 2, "--layouts", "2x1,1x2", out=out)


@pytest.mark.distributed
def test_tp2_equals_tp1(result):
    r = result["kernel_2x1"]
    for impl in ("torch", "triton"):
        for case, tol in (("v301_float32", FP32), ("v150_float32", FP32), ("v301_bfloat16", BF16)):
            for what in ("logp", "grad_h", "grad_w"):
                assert r[f"{impl}_{case}_{what}"] <= tol, (impl, case, what, r)
            assert r[f"{impl}_{case}_max_logp"] < 0


@pytest.mark.distributed
@pytest.mark.parametrize("part", ["llama_mha_tied_2x1", "llama_gqa_untied_2x1", "llama_mha_tied_1x2"])
def test_model_scores_and_grads_equal_megatron_reference(result, part):
    r = result[part]
    assert r["megatron_logp_vs_transformers"] <= FP32, r
    assert r["n_params_with_grad"] >= 8  # gradients reached the transformer layers
    for impl in ("torch", "triton"):
        assert r[f"{impl}_logp_vs_megatron"] <= FP32, (impl, r)
        assert r[f"{impl}_logp_vs_transformers"] <= FP32, (impl, r)
        assert r[f"{impl}_grad_vs_megatron"] <= FP32, (impl, r)
        assert -1e9 < r[f"{impl}_max_logp"] < 0, (impl, r)
