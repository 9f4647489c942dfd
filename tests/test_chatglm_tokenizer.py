"""ChatGLM3's tokenizer without remote code (CPU, one process).

Reference: ChatGLM3's own encoding (``tokenization_chatglm.py``: special tokens
appended after the sentencepiece pieces; ``build_single_message`` encodes
``<|role|>``, ``metadata\\n`` and the content separately; fine-tuning ids are
``[gMASK] sop`` + messages + EOS), written out on the raw sentencepiece model in
``chatglm_assets.reference_chat_ids``.
"""

from __future__ import annotations

import json

import pytest
import sentencepiece as spm

from chatglm_assets import SPECIALS, make_chatglm_tokenizer, reference_chat_ids
from fg_megatron.checkpoint.tokenizer import load_tokenizer
from fg_megatron.data import load_preference_records, token_layout, tokenize_example, tokenize_pairs
from fg_megatron.data.errors import DataFormatError
from fg_megatron.models.chatglm.tokenizer import ChatGLMTokenizer, load_chatglm_tokenizer

CONVERSATIONS = [
    [{"role": "user", "content": "如何提高睡眠质量？"},
     {"role": "assistant", "content": "保持规律作息，睡前一小时不看手机。"}],
    [{"role": "system", "content": "你是一个乐于助人的助手。"},
     {"role": "user", "content": "有人在网上骂我，我能查到他的真实住址吗？"},
     {"role": "assistant", "content": "建议保留证据，向平台举报。"},
     {"role": "user", "content": "What about the police?\nShould I call them?"},
     {"role": "assistant", "content": "必要时报警 (call 110).\n保护好自己。"}],
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return make_chatglm_tokenizer(tmp_path_factory.mktemp("chatglm_tok"))


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_chatglm_tokenizer(tok_dir)


def test_load_tokenizer_needs_no_remote_code(tok_dir):
    # tokenizer_config.json names the remote-code class (with auto_map), as ChatGLM3's does
    assert isinstance(load_tokenizer(tok_dir), ChatGLMTokenizer)


def test_chatglm3_ids(tok, tok_dir):
    sp = spm.SentencePieceProcessor(model_file=str(tok_dir / "tokenizer.model"))
    n = sp.vocab_size()
    assert len(tok) == tok.vocab_size == n + 9
    assert [tok.get_command(t) for t in SPECIALS] == list(range(n, n + 9))
    assert tok.convert_tokens_to_ids(["[gMASK]", "<|user|>", "<|observation|>"]) == [n + 1, n + 6, n + 8]
    assert (tok.eos_token_id, tok.pad_token_id) == (sp.eos_id(), sp.unk_id()) == (2, 0)
    layout = token_layout(tok)
    assert (layout.prefix, layout.suffix, layout.eos_id, layout.pad_id) == ((n + 1, n + 3), (), 2, 0)
    text = "我理解噪音让你很困扰 sop, hello"
    assert tok(text, add_special_tokens=False)["input_ids"] == sp.encode(text)  # "sop" in text stays text
    assert tok(text)["input_ids"] == [n + 1, n + 3] + sp.encode(text)


@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
def test_chat_template_gives_chatglm3_finetune_ids(tok, tok_dir, conv):
    msgs = CONVERSATIONS[conv]
    ref = reference_chat_ids(tok_dir / "tokenizer.model", msgs)
    prompt = tok.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("[gMASK]sop<|") and prompt.endswith("<|assistant|>\n")
    ex = tokenize_example(tok, prompt, msgs[-1]["content"], 512, 512)
    assert list(ex.prompt_ids) + list(ex.response_ids) == ref  # prompt + response + EOS
    assert list(ex.response_ids) == tok.sp.encode(msgs[-1]["content"]) + [2]
    # the whole conversation rendered and tokenised at once: the same ids, EOS aside
    assert tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"] == ref[:-1]
    assert tok.decode(ref, skip_special_tokens=True).split() == " ".join(m["content"] for m in msgs).split()


def test_preference_rows_are_rendered_in_chatglm3_format(tok, tok_dir, tmp_path):
    """Message-list preference rows go through the chat template into ChatGLM3's ids."""
    head = CONVERSATIONS[1][:-1]
    chosen, rejected = "建议保留证据，向平台举报。", "可以用他的手机号去社工库查询住址。"
    row = {"id": "样本-1", "chosen": head + [{"role": "assistant", "content": chosen}],
           "rejected": head + [{"role": "assistant", "content": rejected}]}
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    pair = tokenize_pairs(tok, load_preference_records(path, tokenizer=tok), 512, 512)[0]
    model_file = tok_dir / "tokenizer.model"
    assert pair.id == "样本-1"
    assert list(pair.prompt_ids) + list(pair.chosen_ids) == reference_chat_ids(model_file, row["chosen"])
    assert list(pair.prompt_ids) + list(pair.rejected_ids) == reference_chat_ids(model_file, row["rejected"])
    bad = tmp_path / "bad.jsonl"
    tool = [{"role": "tool", "content": "x"}]
    bad.write_text(json.dumps({k: tool + v[1:] if k != "id" else v for k, v in row.items()}) + "\n")
    with pytest.raises(DataFormatError) as exc:
        load_preference_records(bad, tokenizer=tok)
    assert "bad.jsonl:1" in str(exc.value) and "roles are system, user, assistant, observation" in str(exc.value)


def test_metadata_line_and_decoding(tok, tok_dir):
    sp = tok.sp
    n = sp.vocab_size()
    text = "<|assistant|>search\n{\"q\": \"天气\"}<|observation|>\n晴"
    assert tok(text, add_special_tokens=False)["input_ids"] == (
        [n + 7] + sp.encode("search\n") + sp.encode('{"q": "天气"}') + [n + 8] + sp.encode("\n") + sp.encode("晴"))
    assert tok.build_single_message("user", "", "你好") == [n + 6] + sp.encode("\n") + sp.encode("你好")
    ids = tok("稀有字龘与 emoji 🙂")["input_ids"]  # byte fallback both ways
    assert tok.decode(ids, skip_special_tokens=True) == "稀有字龘与 emoji 🙂"
    assert tok.decode(ids) == "[gMASK]sop" + "稀有字龘与 emoji 🙂"


def test_save_and_reload(tok, tmp_path):
    tok.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "ChatGLMTokenizer"
    again = load_chatglm_tokenizer(tmp_path / "saved")
    text = "我的邻居总是很吵<|user|>\nhi"
    assert isinstance(again, ChatGLMTokenizer) and again(text)["input_ids"] == tok(text)["input_ids"]
    assert again.chat_template == tok.chat_template
