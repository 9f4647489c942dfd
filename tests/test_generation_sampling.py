"""Next-token choice, masks and batching, on CPU without process groups: top-k / top-p equal
transformers' logits warpers; sampled frequencies match softmax(logits / T); seeds reproduce."""

import pytest
import torch

from fg_megatron.generation.masks import decode_mask, prefill_mask
from fg_megatron.generation.runner import make_batches
from fg_megatron.generation.sampling import (GenerationSettingsError, SamplingParams, filter_logits, next_tokens,
                                             row_generators, row_seed)


@pytest.mark.parametrize("top_p,top_k", [(0.9, 0), (0.5, 0), (1.0, 7), (0.8, 20), (0.05, 0)])
def test_filter_matches_transformers_warpers(top_p, top_k):
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(6, 97, generator=torch.Generator().manual_seed(0)) * 3
    ours = filter_logits(logits, SamplingParams(temperature=0.7, top_p=top_p, top_k=top_k))
    ref = TemperatureLogitsWarper(0.7)(None, logits.clone())
    if top_k:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p < 1:
        ref = TopPLogitsWarper(top_p)(None, ref)
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    kept = ~torch.isinf(ref)
    assert torch.allclose(ours[kept], ref[kept], rtol=0, atol=1e-6)
    assert kept.sum(-1).min() >= 1


def test_sampled_frequencies_match_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0]])
    params = SamplingParams(temperature=1.5)
    n = 20000
    gens = row_generators([row_seed(0, i) for i in range(n)])
    toks = next_tokens(logits.expand(n, 5), params, gens)
    freq = torch.bincount(toks, minlength=5).double() / n
    probs = torch.softmax(logits[0].double() / 1.5, -1)
    # binomial standard error <= 0.0036 at n=20000: 4 sigma
    assert (freq - probs).abs().max() < 0.014, (freq, probs)


def test_filtered_tokens_are_never_sampled_and_greedy_is_argmax():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(1))
    params = SamplingParams(temperature=1.0, top_k=3)
    allowed = torch.topk(logits, 3, dim=-1).indices
    for s in range(300):
        toks = next_tokens(logits, params, row_generators([s * 10 + i for i in range(4)]))
        assert all(t in allowed[i] for i, t in enumerate(toks.tolist()))
    assert torch.equal(next_tokens(logits, SamplingParams()), logits.argmax(-1))


def test_row_sample_depends_only_on_its_seed():
    logits = torch.randn(5, 40, generator=torch.Generator().manual_seed(2))
    params = SamplingParams(temperature=1.0, top_p=0.9)
    seeds = [row_seed(7, i) for i in range(5)]
    together = next_tokens(logits, params, row_generators(seeds))
    alone = [next_tokens(logits[i:i + 1], params, row_generators([seeds[i]]))[0] for i in range(5)]
    assert together.tolist() == [int(t) for t in alone]
    again = next_tokens(logits, params, row_generators(seeds))
    assert torch.equal(together, again)
    assert row_seed(7, 0) != row_seed(7, 1) and row_seed(7, 0) != row_seed(8, 0)
    assert row_seed(7, 0) == row_seed(7, 0) < 2 ** 63


@pytest.mark.parametrize("kwargs,field", [({"temperature": -0.1}, "temperature"), ({"top_p": 0.0}, "top_p"),
                                          ({"top_p": 1.5}, "top_p"), ({"top_k": -1}, "top_k")])
def test_bad_settings_name_the_field(kwargs, field):
    with pytest.raises(GenerationSettingsError, match=field):
        SamplingParams(**kwargs)


def test_masks_left_padding():
    valid = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    m = prefill_mask(valid)
    assert m.shape == (2, 1, 4, 4) and m.dtype == torch.bool
    # row 0: query 3 sees keys 2, 3 only; row 1: plain causal
    assert m[0, 0, 3].tolist() == [True, True, False, False]
    assert m[0, 0, 2].tolist() == [True, True, False, True]
    assert m[1, 0].tolist() == torch.ones(4, 4, dtype=torch.bool).triu(1).tolist()
    assert decode_mask(valid)[:, 0, 0].tolist() == [[True, True, False, False], [False] * 4]


def test_make_batches_sorted_and_equal_length():
    lengths = [5, 3, 5, 9, 3, 5]
    assert make_batches(lengths, range(6), 2) == [[1, 4], [0, 2], [5, 3]]
    assert make_batches(lengths, range(6), 2, equal_length=True) == [[1, 4], [0, 2], [5], [3]]
    assert make_batches(lengths, [0, 3], 8) == [[0, 3]]
    with pytest.raises(GenerationSettingsError, match="batch-size"):
        make_batches(lengths, range(6), 0)
