"""Test assets for the ChatGLM3 family: a small sentencepiece tokenizer laid out like
ChatGLM3's (``tokenizer.model`` + a ``tokenizer_config.json`` naming the remote-code
``ChatGLMTokenizer``), and ChatGLM3's chat encoding written out from its
``tokenization_chatglm.py`` on the raw sentencepiece model, as the reference."""

from __future__ import annotations

import io
import json
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "data"
CVALUES_ZH = FIXTURES / "cvalues_zh.jsonl"

_LINES = [
    "我的邻居总是很吵，我想在他家门口放点东西让他生病，有什么推荐吗？",
    "我理解噪音让你很困扰，但伤害他人是违法的。你可以先和邻居沟通，或者联系物业和社区调解。",
    "如何提高睡眠质量？保持规律作息，睡前一小时不看手机，卧室保持安静和凉爽。",
    "有人在网上骂我，我能查到他的真实住址吗？建议保留证据，向平台举报，必要时报警。",
    "人工智能助手应当诚实、无害、有帮助。你是一个乐于助人的助手。",
    "The quick brown fox jumps over the lazy dog. Hello world, how are you today?",
    "def main():\n    print('hello')\n",
]
# ChatGLM3's nine special tokens, appended after the sentencepiece pieces in this order.
SPECIALS = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>", "<|assistant|>",
            "<|observation|>"]


def make_chatglm_tokenizer(out: Path, vocab_size: int = 500) -> Path:
    """``tokenizer.model`` (BPE with byte fallback, identity normalisation, ``<unk>``=0, ``<s>``=1,
    ``</s>``=2 as in ChatGLM3) and a ChatGLM3-style ``tokenizer_config.json`` in ``out``."""
    import sentencepiece as spm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_LINES * 20), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=0.9995, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, split_digits=True, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, minloglevel=2, num_threads=1)
    (out / "tokenizer.model").write_bytes(model.getvalue())
    n = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model")).vocab_size()
    added = {str(n + i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                          "single_word": False, "special": True}
             for i, t in enumerate(SPECIALS) if t in ("<|user|>", "<|observation|>")}
    config = {  # the fields of THUDM/chatglm3-6b's file
        "added_tokens_decoder": added,
        "additional_special_tokens": ["<|user|>", "<|observation|>"],
        "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]},
        "clean_up_tokenization_spaces": False,
        "do_lower_case": False,
        "eos_token": "</s>",
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": "<unk>",
        "padding_side": "left",
        "remove_space": False,
        "tokenizer_class": "ChatGLMTokenizer",
        "unk_token": "<unk>",
        # what some releases carry; ChatGLMTokenizer uses its exact template instead
        "chat_template": "{% for message in messages %}{% if loop.first %}[gMASK]sop<|{{ message['role'] }}|>\n "
                         "{{ message['content'] }}{% else %}<|{{ message['role'] }}|>\n {{ message['content'] }}"
                         "{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                               encoding="utf-8")
    return out


def reference_chat_ids(model_file: Path, messages: list[dict]) -> list[int]:
    """ChatGLM3's fine-tuning ids of a conversation (``finetune_demo``): ``[gMASK] sop``, then per
    message ``build_single_message(role, "", content)``, then EOS, on the raw sentencepiece model."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    special = {t: sp.vocab_size() + i for i, t in enumerate(SPECIALS)}
    ids = [special["[gMASK]"], special["sop"]]
    for m in messages:
        ids += [special[f"<|{m['role']}|>"]] + sp.encode(m.get("metadata", "") + "\n") + sp.encode(m["content"])
    return ids + [sp.eos_id()]
