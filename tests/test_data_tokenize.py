"""Tokenisation rules and micro-batch tensors, against hand-computed ids and transformers' own
label shifting."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fg_megatron.data import (DataFormatError, PreferenceRecord, SFTDataset, SFTRecord, collate_pairs,
                              collate_prompts, collate_sequences, decode_response, encode_prompts, encode_responses,
                              token_layout, tokenize_example, tokenize_pair, tokenize_sft)

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["a", "b", "c", "d", "e", "x", "y", "z"]  # ids 4..11


def word_tokenizer(bos: bool = True):
    """Whitespace word-level tokenizer with known ids: <pad>=0 <s>=1 </s>=2 <unk>=3 a=4 ... z=11."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{w: 4 + i for i, w in enumerate(WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


@pytest.fixture(scope="module")
def wt():
    return word_tokenizer()


def test_layout(wt):
    assert token_layout(wt) == token_layout(wt)
    lay = token_layout(wt)
    assert (lay.prefix, lay.suffix, lay.eos_id, lay.pad_id) == ((1,), (), 2, 0)
    assert token_layout(word_tokenizer(bos=False)).prefix == ()


def test_prompt_cut_from_the_left_after_bos(wt):
    assert encode_prompts(wt, ["a b c d e"], 6) == [((1, 4, 5, 6, 7, 8), False)]
    assert encode_prompts(wt, ["a b c d e"], 4) == [((1, 6, 7, 8), True)]  # BOS kept, then the prompt's end
    assert encode_prompts(wt, ["a b c d e"], 2) == [((1, 8), True)]
    with pytest.raises(ValueError, match="max_prompt_length=1 leaves no room"):
        encode_prompts(wt, ["a"], 1)
    # BOS already in the text (a rendered chat template) is not doubled
    assert encode_prompts(wt, ["<s> a b"], 8) == [((1, 4, 5), False)]
    # without BOS the cut is a plain left cut
    assert encode_prompts(word_tokenizer(bos=False), ["a b c"], 2) == [((5, 6), True)]


def test_response_ends_with_eos_unless_cut(wt):
    assert encode_responses(wt, ["x y"], 3) == [((9, 10, 2), False)]
    assert encode_responses(wt, ["x y"], 2) == [((9, 10), True)]  # cut: no EOS
    assert encode_responses(wt, ["x y"], 1) == [((9,), True)]
    assert encode_responses(wt, ["x </s>"], 8) == [((9, 2), False)]  # EOS spelled out: not doubled
    ex = tokenize_example(wt, "a b c", "x y z", 3, 3)
    assert (ex.prompt_ids, ex.response_ids, ex.prompt_truncated, ex.response_truncated) == ((1, 5, 6), (9, 10, 11), True, True)


def test_pair_shares_the_prompt_and_rejects_identical_cuts(wt):
    rec = PreferenceRecord("r1", "a b", "x y", "x z", "f.jsonl:7")
    pair = tokenize_pair(wt, rec, 8, 8)
    assert (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids, pair.length) == ((1, 4, 5), (9, 10, 2), (9, 11, 2), 6)
    with pytest.raises(DataFormatError) as err:
        tokenize_pair(wt, rec, 8, 1)
    assert str(err.value) == ("f.jsonl:7: field 'rejected': chosen and rejected are identical after truncation to "
                              "max_response_length=1; raise it or drop the row")


def test_pretokenised_rows_are_used_as_given(wt):
    ex = tokenize_sft(wt, SFTRecord("p", "", "", "ids.jsonl:2", prompt_ids=(4, 5), response_ids=(6,)), 1, 1)
    assert (ex.prompt_ids, ex.response_ids) == ((4, 5), (6,))  # no BOS, no EOS, no truncation
    with pytest.raises(DataFormatError, match=r"^ids\.jsonl:2: field 'response_ids': token id 99 is outside the "
                                              r"tokenizer's vocabulary of 12$"):
        tokenize_sft(wt, SFTRecord("p", "", "", "ids.jsonl:2", prompt_ids=(4,), response_ids=(99,)), 8, 8)


def test_collate_hand_computed():
    rows = [((1, 4, 5), (9, 2)), ((1, 6), (10, 11, 2))]
    b = collate_sequences(rows, pad_id=0, pad_multiple=8)
    assert b["input_ids"].tolist() == [[1, 4, 5, 9, 2, 0, 0, 0], [1, 6, 10, 11, 2, 0, 0, 0]]
    assert b["targets"].tolist() == [[4, 5, 9, 2, 0, 0, 0, 0], [6, 10, 11, 2, 0, 0, 0, 0]]
    assert b["loss_mask"].tolist() == [[0, 0, 1, 1, 0, 0, 0, 0], [0, 1, 1, 1, 0, 0, 0, 0]]
    assert b["position_ids"].tolist() == [list(range(8))] * 2
    assert b["prompt_lengths"].tolist() == [3, 2] and b["lengths"].tolist() == [5, 5]
    assert b["input_ids"].dtype == torch.long and b["loss_mask"].dtype == torch.float32
    # the masked targets are exactly the response tokens, in order
    for i, (_, resp) in enumerate(rows):
        assert b["targets"][i][b["loss_mask"][i].bool()].tolist() == list(resp)
    assert collate_sequences(rows, 0, pad_multiple=1)["input_ids"].shape == (2, 5)
    assert collate_sequences(rows, 0, pad_multiple=8, length=16)["input_ids"].shape == (2, 16)
    with pytest.raises(ValueError, match="shorter than the longest row"):
        collate_sequences(rows, 0, length=4)


def test_collate_pairs_chosen_rows_first(wt):
    recs = [PreferenceRecord("p0", "a", "x", "y z", "f:1"), PreferenceRecord("p1", "b c d", "z", "x", "f:2")]
    pairs = [tokenize_pair(wt, r, 8, 8) for r in recs]
    batch = collate_pairs(pairs, 0, sample_idx=[17, 3], pad_multiple=4)
    assert batch["input_ids"].tolist() == [[1, 4, 9, 2, 0, 0, 0, 0],  # chosen 0
                                           [1, 5, 6, 7, 11, 2, 0, 0],  # chosen 1
                                           [1, 4, 10, 11, 2, 0, 0, 0],  # rejected 0
                                           [1, 5, 6, 7, 9, 2, 0, 0]]  # rejected 1
    assert batch["loss_mask"].sum(1).tolist() == [2, 2, 3, 2]
    assert batch["sample_idx"].tolist() == [17, 3] and batch["ids"] == ["p0", "p1"]


def test_masked_logprob_matches_transformers_label_shift():
    """sum(loss_mask * log p(targets)) on the right-padded pair batch == transformers' own loss on the
    unpadded sequence with the prompt labelled -100 (times the response length)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(ROOT / "assets" / "tiny" / "tokenizer"))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    cfg.initializer_range = 0.2
    model = LlamaForCausalLM(cfg).eval()
    recs = [PreferenceRecord("a", "\n\nHuman: What is 3 + 4?\n\nAssistant:", " 7", " I can't assist with that.", "f:1"),
            PreferenceRecord("b", "\n\nHuman: Reverse the word bomb.\n\nAssistant:", " bmob", " bomb", "f:2")]
    pairs = [tokenize_pair(tok, r, 48, 16) for r in recs]
    batch = collate_pairs(pairs, tok.pad_token_id, pad_multiple=8)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        ours = (torch.log_softmax(logits.double(), -1).gather(-1, batch["targets"][..., None])[..., 0]
                * batch["loss_mask"]).sum(-1)
        ref = []
        for resp_of in (lambda p: p.chosen_ids, lambda p: p.rejected_ids):
            for p in pairs:
                ids = torch.tensor([list(p.prompt_ids) + list(resp_of(p))])
                labels = ids.clone()
                labels[0, : len(p.prompt_ids)] = -100
                ref.append(-model(input_ids=ids, labels=labels).loss.double() * len(resp_of(p)))
    assert batch["input_ids"].shape[1] % 8 == 0 and batch["input_ids"].shape[0] == 4
    torch.testing.assert_close(ours, torch.stack(ref), rtol=0, atol=1e-5)
    assert (ours < 0).all()


def test_sft_dataset_collate(wt, tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"id": "u", "prompt": "a b", "response": "x"}\n{"id": "v", "prompt": "c", "response": "y z"}\n')
    ds = SFTDataset.from_file(path, wt, 8, 8)
    batch = ds.collate([1, 0], pad_multiple=1)
    assert batch["input_ids"].tolist() == [[1, 6, 10, 11, 2], [1, 4, 5, 9, 2]]
    assert batch["loss_mask"].tolist() == [[0, 1, 1, 1, 0], [0, 0, 1, 1, 0]]
    assert batch["ids"] == ["v", "u"] and batch["sample_idx"].tolist() == [1, 0]


def test_prompts_left_padded_for_generation(wt):
    b = collate_prompts([(1, 4, 5), (1, 6)], 0)
    assert b["input_ids"].tolist() == [[1, 4, 5], [0, 1, 6]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [0, 1, 1]]
    assert b["position_ids"].tolist() == [[0, 1, 2], [0, 0, 1]]
    assert collate_prompts([(1, 4, 5), (1, 6)], 0, side="right")["input_ids"].tolist() == [[1, 4, 5], [1, 6, 0]]
    assert decode_response(wt, [9, 10, 2, 11]) == "x y"


# ---------------------------------------------------------------- max_length / truncation_mode / on_truncation

def test_max_length_keep_end_cuts_the_prompt_from_the_left(wt):
    """TRL's DPOConfig.max_length (prompt + response) with truncation_mode=keep_end: the sequence
    keeps its end, so the prompt loses its start (after BOS) and the response stays whole."""
    ex = tokenize_example(wt, "a b c d", "x y z", 8, 8, max_length=6)
    assert (ex.prompt_ids, ex.response_ids) == ((1, 7), (9, 10, 11, 2))
    assert (ex.prompt_truncated, ex.response_truncated, ex.full_lengths) == (True, False, (5, 4))
    # the response alone leaves no room for a prompt token: it is cut too (BOS + one prompt token kept)
    ex = tokenize_example(wt, "a b c d", "x y z", 8, 8, max_length=4)
    assert (ex.prompt_ids, ex.response_ids, ex.response_truncated) == ((1, 7), (9, 10), True)
    # under the limit: untouched, as without max_length
    assert tokenize_example(wt, "a b", "x", 8, 8, max_length=5) == tokenize_example(wt, "a b", "x", 8, 8)


def test_max_length_keep_start_cuts_the_response_on_the_right(wt):
    ex = tokenize_example(wt, "a b", "x y z", 8, 8, max_length=6, truncation_mode="keep_start")
    assert (ex.prompt_ids, ex.response_ids, ex.prompt_truncated, ex.response_truncated) == \
        ((1, 4, 5), (9, 10, 11), False, True)  # lost its EOS
    # the prompt alone fills max_length: it yields (from the left) room for one response token
    ex = tokenize_example(wt, "a b c d e", "x y", 8, 8, max_length=4, truncation_mode="keep_start")
    assert (ex.prompt_ids, ex.response_ids) == ((1, 7, 8), (9,))
    with pytest.raises(ValueError, match="truncation_mode must be one of keep_end, keep_start"):
        tokenize_example(wt, "a b c", "x y", 8, 8, max_length=3, truncation_mode="left")


def test_pair_max_length_is_sized_by_the_longer_response(wt):
    rec = PreferenceRecord("r1", "a b c d", "x y z", "x", "f.jsonl:7")
    pair = tokenize_pair(wt, rec, 8, 8, max_length=6)  # keep_end: one shared prompt cut for both rows
    assert (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids) == ((1, 7), (9, 10, 11, 2), (9, 2))
    assert (pair.prompt_truncated, pair.chosen_truncated, pair.rejected_truncated) == (True, False, False)
    assert pair.full_lengths == (5, 4, 2)
    pair = tokenize_pair(wt, rec, 8, 8, max_length=7, truncation_mode="keep_start")
    assert (pair.chosen_ids, pair.rejected_ids, pair.chosen_truncated, pair.rejected_truncated) == \
        ((9, 10), (9, 2), True, False)  # only chosen lost its EOS
    with pytest.raises(DataFormatError, match=r"^f\.jsonl:7: field 'rejected': chosen and rejected are identical after "
                                              r"truncation to max_response_length=8, max_length=6; "):
        tokenize_pair(wt, rec, 8, 8, max_length=6, truncation_mode="keep_start")


TRUNC_ROWS = [PreferenceRecord("ok", "a b", "x y", "x z", "t.jsonl:1"),
              PreferenceRecord("long_prompt", "a b c d e", "x", "y", "t.jsonl:2"),
              PreferenceRecord("one_eos", "a", "x y z", "x", "t.jsonl:3"),
              PreferenceRecord("both_eos", "a", "x y z", "y z x", "t.jsonl:4")]


def test_on_truncation_warn_counts_and_says_how(wt):
    from fg_megatron.data import PreferenceDataset

    ds = PreferenceDataset(TRUNC_ROWS, wt, 4, 3)  # the default: warn, keep every row
    s = ds.summary()
    assert (s["samples"], s["truncated"], s["prompts_truncated"], s["pairs_missing_eos"], s["pairs_one_missing_eos"]) \
        == (4, 3, 1, 2, 1)
    assert s["length_percentiles"] == {"prompt": "2/6/6/6", "chosen": "3/4/4/4", "rejected": "2/4/4/4"}
    logged = []

    class Log:
        def info(self, fmt, line):
            logged.append(("info", line))

        def warning(self, fmt, line):
            logged.append(("warning", line))

    ds.log_summary(Log())
    assert logged[0] == ("info", "data t.jsonl: 4 pairs, records given directly")
    assert logged[1] == ("info", "  tokens before truncation p50/p90/p99/max: prompt 2/6/6/6, chosen 3/4/4/4, "
                                 "rejected 2/4/4/4")
    assert logged[2] == ("warning", "  WARNING: 3 of 4 pairs truncated by max_prompt_length=4, max_response_length=3: "
                                    "1 prompts cut from the left (keep their end); 2 pairs with a response cut on the "
                                    "right (lost its EOS; in 1 only one of the two, compared with a complete one) "
                                    "(data.on_truncation=drop drops them, =error refuses them)")


def test_on_truncation_drop_and_error(wt):
    from fg_megatron.data import PreferenceDataset, SFTDataset

    ds = PreferenceDataset(TRUNC_ROWS, wt, 4, 3, on_truncation="drop")
    assert [r.id for r in ds.records] == ["ok"] and len(ds.items) == 1 and ds.dropped == 3
    assert ds.summary_lines()[0] == "data t.jsonl: 1 pairs (3 truncated ones dropped of 4), records given directly"
    # a pair that truncation made identical is dropped too, not an error
    rows = [PreferenceRecord("fine", "a", "x", "y", "t.jsonl:5"), PreferenceRecord("same", "a", "x y", "x y z", "t.jsonl:6")]
    assert [r.id for r in PreferenceDataset(rows, wt, 4, 2, on_truncation="drop").records] == ["fine"]
    with pytest.raises(DataFormatError, match="identical after truncation"):
        PreferenceDataset(rows, wt, 4, 2)
    with pytest.raises(DataFormatError) as err:
        PreferenceDataset(TRUNC_ROWS, wt, 4, 3, on_truncation="error")
    assert str(err.value) == ("t.jsonl:2: prompt cut from the left by max_prompt_length=4, max_response_length=3 "
                              "(3 of 4 rows are truncated; data.on_truncation=error); raise the limits, or set "
                              "data.on_truncation to warn or drop")
    sft = [SFTRecord("a", "a b", "x", "s.jsonl:1"), SFTRecord("b", "a b", "x y z", "s.jsonl:2")]
    with pytest.raises(DataFormatError, match=r"^s\.jsonl:2: response cut on the right \(no EOS\) by "
                                              r"max_prompt_length=8, max_response_length=8, max_length=5 \(keep_start\)"):
        SFTDataset(sft, wt, 8, 8, max_length=5, truncation_mode="keep_start", on_truncation="error")
    assert [r.id for r in SFTDataset(sft, wt, 8, 8, max_length=5, on_truncation="drop").records] == ["a"]
