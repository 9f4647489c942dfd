"""Build the bundled tiny assets: the task's data splits and a tokenizer trained on them.

``python tools/make_tiny_assets.py`` calls :func:`build_tiny_assets`; the result is a pure
function of the seed (a test regenerates it and compares file hashes).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Union

from fg_megatron.data.readers import write_jsonl
from fg_megatron.data.tiny_task import SIZES, generate

PAD, BOS, EOS, UNK = "<|pad|>", "<|bos|>", "<|eos|>", "<|unk|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK) + ROLE_TOKENS  # ids 0..6, in this order

# The tiny models were trained on HH-RLHF text ("\n\nHuman: ...\n\nAssistant: ..."), so the
# template renders [{role, content}] as exactly that: BOS, then "\n\nHuman: content" per user
# turn, "\n\nAssistant: content" + EOS per assistant turn (a system message: its content as
# is).  A generation prompt ends with "\n\nAssistant:", so
#   render(messages[:-1], add_generation_prompt=True) + " " + content + EOS == render(messages)
# and chat-formatted prompts give the model the very ids it learned (the role tokens of
# ROLE_TOKENS stay in the vocabulary, unused by the template).
CHAT_TEMPLATE = (  # newlines inside {{ }}: transformers renders with trim_blocks, which eats "%}\n"
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '\\n\\nHuman: ' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '\\n\\nAssistant: ' + message['content'] + eos_token }}"
    "{% else %}{{ message['content'] }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\n\\nAssistant:' }}{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> Any:
    """A byte-level BPE tokenizer (digits split one by one, like Llama's) trained on ``texts``,
    wrapped as a ``PreTrainedTokenizerFast`` that adds BOS and carries :data:`CHAT_TEMPLATE`.

    Byte-level: any UTF-8 text (Chinese included) encodes without unknown tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   unk_token=UNK, chat_template=CHAT_TEMPLATE, model_max_length=512)


def save_tokenizer(tokenizer: Any, out: Union[str, Path]) -> None:
    """``save_pretrained``, with the generic class name so older transformers (4.x) load it too.
    (The role tokens need no entry in the config: tokenizer.json marks them special.)"""
    out = Path(out)
    tokenizer.save_pretrained(str(out))
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg.pop("backend", None)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def corpus(splits: dict[str, list[dict]]) -> list[str]:
    """The texts the tokenizer learns from: every prompt and response of every split."""
    texts = []
    for rows in splits.values():
        for row in rows:
            texts += [row[k] for k in ("prompt", "response", "chosen", "rejected") if k in row]
    return texts


# The bundled task as a task directory (fg_megatron/eval/task_dir.py) for the flip study:
# relative links to the splits, so the data has one home.
TASK_FILES = {"sft.jsonl": "sft_train.jsonl", "pref.jsonl": "pref_train.jsonl", "test.jsonl": "test_prompts.jsonl"}


def link_task_dir(out: Union[str, Path]) -> Path:
    """``out/task/{sft,pref,test}.jsonl`` -> ``../data/...`` (replacing what is there)."""
    task = Path(out) / "task"
    task.mkdir(parents=True, exist_ok=True)
    for name, split in TASK_FILES.items():
        link = task / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(Path("..") / "data" / split)
    return task


def build_tiny_assets(out: Union[str, Path], seed: int = 0, vocab_size: int = 1024,
                      sizes: dict[str, int] = SIZES) -> dict[str, Path]:
    """Write ``out/data/{sft_train,pref_train,pref_eval,test_prompts}.jsonl``, ``out/tokenizer/``
    and the task directory ``out/task/`` (links to the splits)."""
    out = Path(out)
    (out / "data").mkdir(parents=True, exist_ok=True)
    splits = generate(seed, sizes)
    files = {}
    for name, rows in splits.items():
        files[name] = out / "data" / f"{name}.jsonl"
        write_jsonl(rows, files[name])
    tokenizer = train_tokenizer(corpus(splits), vocab_size)
    save_tokenizer(tokenizer, out / "tokenizer")
    files["tokenizer"] = out / "tokenizer"
    files["task"] = link_task_dir(out)
    return files
