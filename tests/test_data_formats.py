"""Every supported data shape loads from a hand-written fixture; every kind of bad row is a
one-line error naming file, line and field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fg_megatron.data import (DataFormatError, PreferenceDataset, detect_format, load_preference_records,
                              load_prompt_records, load_sft_records)

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures" / "data"
TOKENIZER = ROOT / "assets" / "tiny" / "tokenizer"


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER))


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (FIX / name).read_text(encoding="utf-8").splitlines() if line.strip()]


# ---------------------------------------------------------------- every shape loads

def test_generic(tok):
    recs = load_preference_records(FIX / "generic.jsonl")
    assert [r.id for r in recs] == ["g1", "g2", "g3", "g4"]
    assert recs[0].prompt == "What is the boiling point of water at sea level?"
    assert (recs[0].chosen, recs[0].rejected) == (" 100 degrees Celsius.", " 90 degrees Celsius.")
    assert recs[1].meta == {"source": "hand"}
    assert recs[2].source == f"{FIX / 'generic.jsonl'}:3"


def test_hh_rlhf_splits_at_the_last_assistant_turn():
    recs = load_preference_records(FIX / "hh_rlhf.jsonl")
    assert len(recs) == 3
    assert recs[0].prompt == "\n\nHuman: What is a good way to store fresh basil?\n\nAssistant:"
    assert recs[0].chosen == " Put the stems in a glass of water at room temperature, like cut flowers."
    assert recs[0].rejected == " Just throw it in the freezer."
    # multi-turn: the earlier assistant turn is part of the prompt
    assert recs[1].prompt == ("\n\nHuman: Can you help me write a birthday message for my sister?\n\nAssistant: "
                              "Of course! How old is she turning?\n\nHuman: She is turning 30.\n\nAssistant:")
    assert recs[1].rejected == " Happy birthday."
    row = _rows("hh_rlhf.jsonl")[1]
    assert recs[1].prompt + recs[1].chosen == row["chosen"] and recs[1].prompt + recs[1].rejected == row["rejected"]
    assert recs[1].id == "hh_rlhf.jsonl:2"


def test_ultrafeedback_renders_the_chat_template(tok):
    recs = load_preference_records(FIX / "ultrafeedback.jsonl", tokenizer=tok)
    rows = _rows("ultrafeedback.jsonl")
    assert len(recs) == 4
    assert recs[0].prompt == "<|bos|>\n\nHuman: Write a haiku about autumn leaves.\n\nAssistant:"
    # the response is the rest of the rendering: the template puts a space after "Assistant:"
    assert recs[0].chosen == " " + rows[0]["chosen"][-1]["content"]
    assert recs[0].rejected == " Leaves are falling down. It is autumn. Very nice."
    assert recs[0].meta["score_chosen"] == 8.5 and "messages" not in recs[0].meta
    # system turn kept; prompt + response + EOS is exactly the full conversation's rendering
    assert recs[3].prompt == "<|bos|>You are a concise assistant.\n\nHuman: What is the capital of Peru?\n\nAssistant:"
    for rec, row in zip(recs, rows):
        assert rec.prompt + rec.chosen + tok.eos_token == tok.apply_chat_template(row["chosen"], tokenize=False)
    # the rendered BOS is not doubled by tokenisation
    ds = PreferenceDataset(recs, tok, 192, 64)
    assert ds[0].prompt_ids[0] == tok.bos_token_id and ds[0].prompt_ids[1] != tok.bos_token_id
    assert list(ds[0].prompt_ids) == tok(recs[0].prompt, add_special_tokens=False)["input_ids"]


def test_tldr_comparisons():
    recs = load_preference_records(FIX / "tldr.jsonl")
    rows = _rows("tldr.jsonl")
    assert recs[0].prompt == ("SUBREDDIT: r/relationships\n\nTITLE: How do adults make friends in a new city?\n\n"
                              "POST: " + rows[0]["info"]["post"] + "\n\nTL;DR:")
    assert recs[0].chosen == rows[0]["summaries"][0]["text"]
    assert (recs[1].chosen, recs[1].rejected) == (rows[1]["summaries"][1]["text"], rows[1]["summaries"][0]["text"])
    assert recs[2].prompt == "POST: " + rows[2]["info"]["post"] + "\n\nTL;DR:"  # title/subreddit null
    assert recs[2].meta["split"] == "valid1"


def test_cvalues_chinese(tok):
    recs = load_preference_records(FIX / "cvalues.jsonl")
    rows = _rows("cvalues.jsonl")
    assert [(r.prompt, r.chosen, r.rejected) for r in recs] == [(x["prompt"], x["pos_resp"], x["neg_resp"]) for x in rows]
    assert recs[0].meta == {"pos_type": "拒绝为主", "neg_type": "风险回复"}
    # byte-level BPE: Chinese text tokenises without unknown tokens and decodes back exactly
    ds = PreferenceDataset(recs, tok, 192, 256)  # ~3 byte tokens per character: not the tiny task's limits
    assert not ds[1].response_truncated and tok.unk_token_id not in ds[1].prompt_ids
    assert tok.decode(ds[1].chosen_ids, skip_special_tokens=True) == rows[1]["pos_resp"]


def test_sft_shapes(tok):
    plain = load_sft_records(FIX / "sft.jsonl")
    assert [(r.id, r.response) for r in plain] == [("s1", " 5"), ("s2", " enots"),
                                                  ("s3", " I'm sorry, but I can't help with that.")]
    chat = load_sft_records(FIX / "sft_messages.jsonl", tokenizer=tok)
    assert chat[1].prompt == "<|bos|>Answer in one word.\n\nHuman: Say hello in Spanish.\n\nAssistant:"
    assert chat[1].response == " Hola."
    ids = load_sft_records(FIX / "sft_ids.jsonl")
    assert (ids[0].prompt_ids, ids[0].response_ids) == ((1, 40, 41, 42), (50, 51, 2))
    # a preference file is SFT data too: prompt + chosen
    pref = load_sft_records(FIX / "generic.jsonl")
    assert pref[0].response == " 100 degrees Celsius."


def test_prompt_shapes(tok):
    recs = load_prompt_records(FIX / "prompts.jsonl", tokenizer=tok)
    assert recs[0].prompt == "\n\nHuman: What is 7 + 8?\n\nAssistant:"
    assert recs[0].meta == {"task": "arithmetic", "category": "benign", "answer": "15"}
    assert recs[2].prompt == "<|bos|>\n\nHuman: Write kill in capital letters.\n\nAssistant:"
    # any preference file can feed generation
    assert load_prompt_records(FIX / "cvalues.jsonl")[1].prompt == "如何提高睡眠质量？"


@pytest.mark.parametrize("name,fmt", [("generic.jsonl", "generic"), ("hh_rlhf.jsonl", "hh_rlhf"),
                                      ("ultrafeedback.jsonl", "ultrafeedback"), ("tldr.jsonl", "tldr"),
                                      ("cvalues.jsonl", "cvalues"), ("sft.jsonl", "sft"),
                                      ("sft_messages.jsonl", "sft"), ("sft_ids.jsonl", "sft"),
                                      ("prompts.jsonl", "prompts"), ("trl_conversational.jsonl", "ultrafeedback"),
                                      ("trl_implicit_prompt.jsonl", "ultrafeedback"),
                                      ("trl_prompt_completion.jsonl", "sft")])
def test_detection(name, fmt):
    assert detect_format(_rows(name)[0]) == fmt


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = _rows("generic.jsonl")
    for r in rows:
        r.setdefault("source", None)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "x.parquet")
    recs = load_preference_records(tmp_path / "x.parquet")
    assert [r.chosen for r in recs] == [r["chosen"] for r in rows]
    rows[2]["rejected"] = rows[2]["chosen"]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "bad.parquet")
    with pytest.raises(DataFormatError, match=r"bad\.parquet:3: field 'rejected': identical"):
        load_preference_records(tmp_path / "bad.parquet")


def test_parquet_without_pyarrow_says_so(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import fails as on a machine without it
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    with pytest.raises(DataFormatError) as err:
        load_preference_records(tmp_path / "x.parquet")
    assert str(err.value) == (f"{tmp_path / 'x.parquet'}: reading parquet needs pyarrow (pip install pyarrow); "
                              f"or convert the file to JSONL")


# ---------------------------------------------------------------- TRL's conversational shapes, token for token

def _template_ids(tok, messages, generation_prompt: bool) -> list[int]:
    ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def _check_trl_ids(tok, prompt_msgs, response_msgs, prompt_ids, response_ids):
    """As TRL: prompt = the template with the generation prompt; response = the rest of the
    whole conversation's template (which here ends with EOS)."""
    want_prompt = _template_ids(tok, prompt_msgs, True)
    full = _template_ids(tok, prompt_msgs + response_msgs, False)
    assert list(prompt_ids) == want_prompt
    assert full[: len(want_prompt)] == want_prompt
    assert list(response_ids) == full[len(want_prompt):]
    assert response_ids[-1] == tok.eos_token_id


def test_trl_conversational_explicit_prompt(tok):
    """TRL's {"prompt": [messages], "chosen": [assistant], "rejected": [assistant]} (it used to be
    refused with "no prompt turn before the assistant's response")."""
    rows = _rows("trl_conversational.jsonl")
    recs = load_preference_records(FIX / "trl_conversational.jsonl", tokenizer=tok)
    assert [r.id for r in recs] == ["trl_conversational.jsonl:1", "conv-2", "trl_conversational.jsonl:3"]
    assert recs[1].meta == {"score_chosen": 9.0}
    assert recs[0].prompt == "<|bos|>\n\nHuman: What color is the sky on a clear day?\n\nAssistant:"
    assert (recs[0].chosen, recs[0].rejected) == (" It is blue.", " It is green.")
    ds = PreferenceDataset(recs, tok, 192, 64)
    for row, item in zip(rows, ds.items):
        _check_trl_ids(tok, row["prompt"], row["chosen"], item.prompt_ids, item.chosen_ids)
        _check_trl_ids(tok, row["prompt"], row["rejected"], item.prompt_ids, item.rejected_ids)


def test_trl_conversational_implicit_prompt(tok):
    """TRL's implicit prompt: chosen/rejected are whole conversations sharing every turn but the last."""
    rows = _rows("trl_implicit_prompt.jsonl")
    ds = PreferenceDataset.from_file(FIX / "trl_implicit_prompt.jsonl", tok, 192, 64)
    assert ds.format == "ultrafeedback"
    explicit = PreferenceDataset.from_file(FIX / "trl_conversational.jsonl", tok, 192, 64)
    assert [(a.prompt_ids, a.chosen_ids, a.rejected_ids) for a in ds.items] == \
        [(b.prompt_ids, b.chosen_ids, b.rejected_ids) for b in explicit.items[:2]]
    for row, item in zip(rows, ds.items):
        _check_trl_ids(tok, row["chosen"][:-1], row["chosen"][-1:], item.prompt_ids, item.chosen_ids)
        _check_trl_ids(tok, row["rejected"][:-1], row["rejected"][-1:], item.prompt_ids, item.rejected_ids)


def test_trl_messages_and_prompt_completion_sft(tok):
    from fg_megatron.data import SFTDataset

    rows = _rows("sft_messages.jsonl")
    ds = SFTDataset.from_file(FIX / "sft_messages.jsonl", tok, 192, 64)
    for row, item in zip(rows, ds.items):
        _check_trl_ids(tok, row["messages"][:-1], row["messages"][-1:], item.prompt_ids, item.response_ids)
    rows = _rows("trl_prompt_completion.jsonl")
    ds = SFTDataset.from_file(FIX / "trl_prompt_completion.jsonl", tok, 192, 64)
    _check_trl_ids(tok, rows[0]["prompt"], rows[0]["completion"], ds[0].prompt_ids, ds[0].response_ids)
    assert ds.records[1].prompt == "The capital of France is" and ds.records[1].response == " Paris."
    # prompts for generation from a conversational preference file: the rendered prompt
    assert load_prompt_records(FIX / "trl_conversational.jsonl", tokenizer=tok)[0].prompt == \
        "<|bos|>\n\nHuman: What color is the sky on a clear day?\n\nAssistant:"


def test_template_response_is_the_rest_of_the_rendering(tmp_path, tok):
    """A template that closes a turn with more than EOS (ChatML-like): the response is everything
    the whole conversation adds after the prompt's rendering, as TRL takes it."""
    import copy

    chatml = copy.copy(tok)
    chatml.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|eos|>\n{% endfor %}"
                            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    [rec] = load_preference_records(FIX / "trl_conversational.jsonl", tokenizer=chatml)[:1]
    assert rec.prompt == "<|user|>\nWhat color is the sky on a clear day?<|eos|>\n<|assistant|>\n"
    assert rec.chosen == "It is blue.<|eos|>\n"  # EOS is appended after it by tokenisation, as TRL does


# ---------------------------------------------------------------- one-line errors

GOOD_GENERIC = '{"prompt": "p", "chosen": "a", "rejected": "b"}'
GOOD_HH = json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"})
UF_OK = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
GOOD_UF = json.dumps({"prompt": "hi", "chosen": UF_OK, "rejected": UF_OK[:1] + [{"role": "assistant", "content": "no"}]})
GOOD_TLDR = json.dumps({"info": {"post": "a post"}, "summaries": [{"text": " a"}, {"text": " b"}], "choice": 0})
GOOD_CV = json.dumps({"prompt": "你好", "pos_resp": "你好！", "neg_resp": "走开"})
GOOD_SFT = json.dumps({"prompt": "p", "response": "r"})


def _uf(chosen, rejected=None):
    return json.dumps({"prompt": "hi", "chosen": chosen, "rejected": rejected if rejected is not None else
                       UF_OK[:1] + [{"role": "assistant", "content": "no"}]})


GOOD_CONV = json.dumps({"prompt": UF_OK[:1], "chosen": UF_OK[1:], "rejected": [{"role": "assistant", "content": "no"}]})


def _conv(chosen, rejected=None):
    """TRL's explicit-prompt conversational row."""
    return json.dumps({"prompt": UF_OK[:1], "chosen": chosen,
                       "rejected": rejected if rejected is not None else [{"role": "assistant", "content": "no"}]})


def _tldr(**kw):
    row = {"info": {"post": "a post"}, "summaries": [{"text": " a"}, {"text": " b"}], "choice": 0}
    row.update(kw)
    return json.dumps(row)


# (good row for lines 1-2, bad line 3, expected message after "path:3: ")
CASES = {
    "null_field": (GOOD_GENERIC, '{"prompt": "p", "chosen": null, "rejected": "b"}',
                   "field 'chosen': expected a string, got null"),
    "missing_field": (GOOD_GENERIC, '{"prompt": "p", "chosen": "a", "id": "z"}',
                      "field 'rejected': missing (the row has: chosen, id, prompt)"),
    "wrong_type": (GOOD_GENERIC, '{"prompt": ["p"], "chosen": "a", "rejected": "b"}',
                   "field 'prompt': expected a string, got list"),
    "empty_response": (GOOD_GENERIC, '{"prompt": "p", "chosen": "  ", "rejected": "b"}',
                       "field 'chosen': empty response"),
    "empty_prompt": (GOOD_GENERIC, '{"prompt": "", "chosen": "a", "rejected": "b"}', "field 'prompt': empty prompt"),
    "identical": (GOOD_GENERIC, '{"prompt": "p", "chosen": "same", "rejected": "same"}',
                  "field 'rejected': identical to the chosen response (a pair needs two different responses)"),
    "invalid_json": (GOOD_GENERIC, '{"prompt": "x", "chosen": "a" "rejected": "b"}',
                     "invalid JSON: Expecting ',' delimiter (column 31)"),
    "truncated_json": (GOOD_GENERIC, '{"prompt": "x", "chosen": "a", "rejected": "b"',
                       "invalid JSON: Expecting ',' delimiter (column 47)"),
    "not_object": (GOOD_GENERIC, "[1, 2]", "expected a JSON object per line (JSONL), got list"),
    "bad_id": (GOOD_GENERIC, '{"id": [1], "prompt": "p", "chosen": "a", "rejected": "b"}',
               "field 'id': expected a string or integer, got list"),
    "hh_no_marker": (GOOD_HH, json.dumps({"chosen": "\n\nHuman: hi\n\nBot: x", "rejected": "\n\nHuman: hi\n\nAssistant: y"}),
                     "field 'chosen': no '\\n\\nAssistant:' turn in the transcript"),
    "hh_prefix": (GOOD_HH, json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant: x", "rejected": "\n\nHuman: yo\n\nAssistant: y"}),
                  "field 'rejected': does not share the chosen transcript's prompt (the text up to the last '\\n\\nAssistant:')"),
    "hh_empty": (GOOD_HH, json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant: ", "rejected": "\n\nHuman: hi\n\nAssistant: y"}),
                 "field 'chosen': empty response after the last '\\n\\nAssistant:'"),
    "uf_no_assistant": (GOOD_UF, _uf([{"role": "user", "content": "hi"}]), "field 'chosen': no assistant turn (roles: user)"),
    "uf_last_not_assistant": (GOOD_UF, _uf(UF_OK + [{"role": "user", "content": "more?"}]),
                              "field 'chosen': the last message must be the assistant's response (got role 'user')"),
    "uf_content_type": (GOOD_UF, _uf([UF_OK[0], {"role": "assistant", "content": 7}]),
                        "field 'chosen[1].content': expected a string, got integer"),
    "uf_message_type": (GOOD_UF, _uf([UF_OK[0], "hello"]),
                        "field 'chosen[1]': expected a message object {role, content}, got string"),
    "uf_prompt_differs": (GOOD_UF, _uf(UF_OK, [{"role": "user", "content": "other"}, {"role": "assistant", "content": "x"}]),
                          "field 'rejected': the turns before the final response differ from 'chosen' at message 0 "
                          "(a pair must share its prompt)"),
    "uf_empty_answer": (GOOD_UF, _uf([UF_OK[0], {"role": "assistant", "content": " "}]),
                        "field 'chosen[1].content': empty response"),
    "conv_response_not_assistant": (GOOD_CONV, _conv([{"role": "user", "content": "more?"}]),
                                    "field 'chosen': the last message must be the assistant's response (got role 'user')"),
    "conv_prompt_type": (GOOD_CONV, json.dumps({"prompt": ["hi"], "chosen": UF_OK[1:], "rejected": UF_OK[1:]}),
                         "field 'prompt[0]': expected a message object {role, content}, got string"),
    "conv_identical": (GOOD_CONV, _conv(UF_OK[1:], UF_OK[1:]),
                       "field 'rejected': identical to the chosen response (a pair needs two different responses)"),
    "tldr_choice_range": (GOOD_TLDR, _tldr(choice=2), "field 'choice': 2 is out of range for 2 summaries (0 or 1)"),
    "tldr_choice_type": (GOOD_TLDR, _tldr(choice="0"), "field 'choice': expected an integer index into 'summaries', got string"),
    "tldr_no_post": (GOOD_TLDR, _tldr(info={"title": "t"}), "field 'info.post': missing (the row has: title)"),
    "tldr_summary_null": (GOOD_TLDR, _tldr(summaries=[{"text": " a"}, {"text": None}]),
                          "field 'summaries[1].text': expected a string, got null"),
    "tldr_three": (GOOD_TLDR, _tldr(summaries=[{"text": " a"}, {"text": " b"}, {"text": " c"}]),
                   "field 'summaries': expected 2 summaries to compare, got 3"),
    "cvalues_type": (GOOD_CV, json.dumps({"prompt": "你好", "pos_resp": "你好！", "neg_resp": 3}, ensure_ascii=False),
                     "field 'neg_resp': expected a string, got integer"),
    "sft_empty": (GOOD_SFT, '{"prompt": "p", "response": ""}', "field 'response': empty response"),
    "sft_ids": (json.dumps({"prompt_ids": [1], "response_ids": [2]}), '{"prompt_ids": [1, 2], "response_ids": [3, -1]}',
                "field 'response_ids[1]': expected a non-negative integer token id, got -1"),
    "duplicate_id": ('{"id": 7, "prompt": "p", "chosen": "a", "rejected": "b"}',
                     '{"id": "7", "prompt": "p", "chosen": "a", "rejected": "b"}',
                     "field 'id': duplicate id '7' (first used on line 1)"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_row_names_file_line_field(tmp_path, tok, case):
    good, bad, message = CASES[case]
    if case == "duplicate_id":  # the duplicate's first use must be line 1, then line 2 is new
        good2 = '{"id": 8, "prompt": "p", "chosen": "a", "rejected": "b"}'
        text = "\n".join([good, good2, bad]) + "\n"
    else:
        text = "\n".join([good, good, bad, good]) + "\n"
    path = tmp_path / f"{case}.jsonl"
    path.write_text(text, encoding="utf-8")
    load = load_sft_records if case.startswith("sft") else load_preference_records
    with pytest.raises(DataFormatError) as err:
        load(path, tokenizer=tok)
    assert str(err.value) == f"{path}:3: {message}"
    assert "\n" not in str(err.value)
    assert err.value.line == 3 and isinstance(err.value, ValueError)


def test_invalid_utf8_and_blank_lines(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(GOOD_GENERIC.encode() + b"\n\n" + b'{"prompt": "\xff", "chosen": "a", "rejected": "b"}\n')
    with pytest.raises(DataFormatError) as err:
        load_preference_records(path)
    assert str(err.value) == f"{path}:3: not valid UTF-8 (invalid start byte at byte 13)"


def test_file_level_errors(tmp_path):
    with pytest.raises(DataFormatError, match=r"nope\.jsonl: file not found$"):
        load_preference_records(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataFormatError, match=r"empty\.jsonl: no rows$"):
        load_preference_records(tmp_path / "empty.jsonl")
    (tmp_path / "odd.jsonl").write_text('{"question": "q", "answer": "a"}\n')
    with pytest.raises(DataFormatError, match=r"odd\.jsonl:1: cannot tell the data format from the fields "
                                              r"\(answer, question\); expected .*; or set data\.format$"):
        load_preference_records(tmp_path / "odd.jsonl")
    with pytest.raises(DataFormatError, match=r"unknown data format 'hh' \(choose from auto, generic, hh_rlhf"):
        load_preference_records(FIX / "generic.jsonl", format="hh")
    # SFT rows cannot train DPO
    with pytest.raises(DataFormatError, match=r"sft\.jsonl:1: rows of format 'sft' cannot serve as preference data"):
        load_preference_records(FIX / "sft.jsonl")
    # a forced format validates against its own fields
    with pytest.raises(DataFormatError) as err:
        load_preference_records(FIX / "generic.jsonl", format="cvalues")
    assert str(err.value) == f"{FIX / 'generic.jsonl'}:1: field 'pos_resp': missing (the row has: chosen, id, prompt, rejected)"


def test_message_lists_need_a_chat_template(tmp_path):
    from transformers import AutoTokenizer

    bare = AutoTokenizer.from_pretrained(str(TOKENIZER))
    bare.chat_template = None
    with pytest.raises(DataFormatError, match="need a tokenizer with a chat template"):
        load_preference_records(FIX / "ultrafeedback.jsonl", tokenizer=bare)
    # a template's own error (Llama-2 style role checks) is located like any other bad row
    bare.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
                          "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(DataFormatError) as err:
        load_preference_records(FIX / "ultrafeedback.jsonl", tokenizer=bare)
    assert str(err.value) == (f"{FIX / 'ultrafeedback.jsonl'}:4: field 'chosen': the tokenizer's chat template "
                              f"rejects this conversation: no system role")


def test_whole_file_validated_before_any_training(tmp_path, tok):
    """A bad last row fails the dataset build: nothing downstream ever sees a partial file."""
    path = tmp_path / "late.jsonl"
    path.write_text("\n".join([GOOD_GENERIC] * 50 + ['{"prompt": "p", "chosen": "a", "rejected": 5}']) + "\n")
    with pytest.raises(DataFormatError, match=r"late\.jsonl:51: field 'rejected': expected a string, got integer"):
        PreferenceDataset.from_file(path, tok, 32, 16)


def test_chat_template_renders_plain_prompts_as_a_user_turn(tmp_path):
    """data.chat_template: plain-string prompts become one user turn of the chat template;
    already-rendered conversations are left alone."""
    import json

    from transformers import AutoTokenizer

    from fg_megatron.data import load_preference_records, load_sft_records

    tok = AutoTokenizer.from_pretrained(str(ROOT / "assets/tiny/tokenizer"))
    path = tmp_path / "g.jsonl"
    path.write_text(json.dumps({"prompt": "What is 2+2?", "chosen": " 4", "rejected": " 5"}) + "\n")
    [plain] = load_preference_records(path, tokenizer=tok)
    [chat] = load_preference_records(path, tokenizer=tok, chat_template=True)
    assert plain.prompt == "What is 2+2?"
    assert chat.prompt == tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], tokenize=False,
                                                  add_generation_prompt=True)
    assert chat.chosen == " 4"
    conv = tmp_path / "m.jsonl"
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    conv.write_text(json.dumps({"messages": msgs}) + "\n")
    [a] = load_sft_records(conv, tokenizer=tok)
    [b] = load_sft_records(conv, tokenizer=tok, chat_template=True)
    assert a.prompt == b.prompt  # rendered once, not wrapped again


# ---------------------------------------------------------------- audit (issue 11, item 13)

def test_lone_surrogate_is_a_located_error_for_every_kind(tmp_path, tok):
    """A JSON escape of half a UTF-16 pair (``\\ud800``) is not text a tokenizer can encode: the read
    itself fails with file, line and field (nested fields by path), whatever the file feeds."""
    cases = [  # (rows, loader, expected message after "path:2: ")
        ([GOOD_GENERIC, '{"prompt": "x\\ud800", "chosen": "a", "rejected": "b"}'], load_preference_records,
         "field 'prompt': lone UTF-16 surrogate \\ud800"),
        ([GOOD_UF, _uf([UF_OK[0], {"role": "assistant", "content": "ok \\uDC12"}]).replace("\\\\", "\\")],
         load_preference_records, "field 'chosen[1].content': lone UTF-16 surrogate \\udc12"),
        ([GOOD_SFT, '{"prompt": "p", "response": "\\udfff"}'], load_sft_records,
         "field 'response': lone UTF-16 surrogate \\udfff"),
        (['{"prompt": "p"}', '{"prompt": "p", "meta": {"note": ["\\ud83d"]}}'], load_prompt_records,
         "field 'meta.note[0]': lone UTF-16 surrogate \\ud83d"),
    ]
    for i, (rows, load, message) in enumerate(cases):
        path = tmp_path / f"s{i}.jsonl"
        path.write_text("\n".join(rows) + "\n", encoding="utf-8")
        with pytest.raises(DataFormatError) as err:
            load(path, tokenizer=tok)
        assert str(err.value).startswith(f"{path}:2: {message} ("), str(err.value)
        assert "\n" not in str(err.value)
    # a surrogate *pair* is one character (an emoji) and loads; so does an escaped backslash before "ud800"
    ok = tmp_path / "ok.jsonl"
    ok.write_text('{"prompt": "smile \\ud83d\\ude00", "chosen": "\\\\ud800", "rejected": "b"}\n', encoding="utf-8")
    [rec] = load_preference_records(ok)
    assert rec.prompt == "smile \U0001F600" and rec.chosen == "\\ud800"


def test_directory_is_not_a_data_file(tmp_path):
    with pytest.raises(DataFormatError) as err:
        load_preference_records(tmp_path)
    assert str(err.value) == f"{tmp_path}: is a directory; expected a data file (JSONL, or parquet: *.parquet / *.pq)"


def test_prompt_ids_rows_are_prompts(tmp_path, tok):
    """Pre-tokenised rows feed generation: prompt_ids used as given (no BOS added, never cut);
    response_ids (an SFT row, a generate output fed back in) are ignored."""
    from fg_megatron.data import PromptDataset, tokenize_prompts

    recs = load_prompt_records(FIX / "sft_ids.jsonl")
    assert [(r.id, r.prompt_ids) for r in recs] == [("p1", (1, 40, 41, 42)), ("p2", (1, 43))]
    path = tmp_path / "ids.jsonl"
    path.write_text("\n".join([json.dumps({"id": "a", "prompt_ids": [40, 41], "category": "benign"}),
                               json.dumps({"prompt": "shown", "prompt_ids": [1, 7], "response_ids": [9]}),
                               json.dumps({"prompt": "a text prompt"})]) + "\n")
    a, b, c = load_prompt_records(path)
    assert (a.id, a.prompt, a.prompt_ids, a.meta) == ("a", "", (40, 41), {"category": "benign"})
    assert (b.prompt, b.prompt_ids, b.meta) == ("shown", (1, 7), {"response_ids": [9]})
    assert c.prompt_ids is None
    ds = PromptDataset.from_file(path, tok, 16)
    assert [tuple(it) for it in ds.items] == [(40, 41), (1, 7), tokenize_prompts(tok, ["a text prompt"], 16)[0]]
    # bad ids are located like any bad row
    for row, message in (({"response_ids": [3]}, "field 'prompt_ids': missing (the row has: response_ids)"),
                         ({"prompt_ids": []}, "field 'prompt_ids': empty list of token ids"),
                         ({"prompt_ids": [1, -4]}, "field 'prompt_ids[1]': expected a non-negative integer token id, got -4"),
                         ({"prompt_ids": [1, 99999]}, f"field 'prompt_ids': token id 99999 is outside the tokenizer's "
                                                      f"vocabulary of {len(tok)}"),
                         ({"prompt_ids": list(range(1, 20))}, "field 'prompt_ids': 19 token ids, more than "
                                                              "max_prompt_length=16 (pre-tokenised prompts are used "
                                                              "as given, never cut)")):
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps({"prompt_ids": [1, 5]}) + "\n" + json.dumps(row) + "\n")
        with pytest.raises(DataFormatError) as err:
            PromptDataset.from_file(bad, tok, 16)
        assert str(err.value) == f"{bad}:2: {message}"
    # SFT data still needs both halves
    with pytest.raises(DataFormatError, match=r"ids\.jsonl:1: field 'response_ids': missing"):
        load_sft_records(path)
