"""ChatGLM3's tokenizer and chat format, without ``trust_remote_code``.

A ChatGLM3 checkpoint ships ``tokenizer.model`` (sentencepiece) and a
``tokenizer_config.json`` naming ``ChatGLMTokenizer`` from its remote code.
:class:`ChatGLMTokenizer` reimplements that class (``tokenization_chatglm.py``)
on transformers' Python tokenizer base:

- ids ``0 .. n-1`` are the sentencepiece pieces; nine special tokens follow at
  ``n, n+1, ...``: ``[MASK] [gMASK] [sMASK] sop eop <|system|> <|user|>
  <|assistant|> <|observation|>`` (64789.. for the real 64789-piece model);
- EOS is ``</s>``, padding is ``<unk>``; ``add_special_tokens`` puts
  ``[gMASK] sop`` in front of a text (``get_prefix_tokens``);
- a chat is ``[gMASK] sop`` then, per message, ``<|role|>`` +
  ``sp.encode(metadata + "\\n")`` + ``sp.encode(content)``
  (``build_single_message``: three separate encodings).

The chat template renders that as text: ``[gMASK]sop<|user|>\\n{content}...``
with the generation prompt ``<|assistant|>\\n``, and this tokenizer encodes
text the same way ``build_single_message`` does (after a role token, the line
up to ``\\n`` and the rest are encoded separately), so ``prompt ids + response
ids + EOS`` from the data pipeline equal ChatGLM3's own fine-tuning ids
(``finetune_demo``: ``[gMASK] sop`` + messages + EOS).  The template is always
this exact one: the ``chat_template`` some ChatGLM3 releases carry approximates
the separate encodings with a space and ends the generation prompt before the
metadata line.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional

from transformers import PreTrainedTokenizer

TOKENIZER_CLASS = "ChatGLMTokenizer"
VOCAB_FILE = "tokenizer.model"
ROLES = ("system", "user", "assistant", "observation")
SPECIAL_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop") + tuple(f"<|{r}|>" for r in ROLES)
ROLE_TOKENS = frozenset(f"<|{r}|>" for r in ROLES)
# Special tokens recognised inside text: role tokens and [*MASK] anywhere; sop/eop only right
# after a mask token ("[gMASK]sop"), so the English word "sop" stays text.
_SPECIAL_RE = re.compile(r"(\[[gs]?MASK\])(sop|eop)?|(<\|(?:system|user|assistant|observation)\|>)")

CHAT_TEMPLATE = (
    "[gMASK]sop"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant', 'observation'] %}"
    "{{ raise_exception('ChatGLM3 roles are system, user, assistant, observation; got ' + message['role']) }}"
    "{% endif %}"
    "<|{{ message['role'] }}|>{{ message['metadata'] if message['metadata'] is defined else '' }}\n"
    "{{ message['content'] }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def is_chatglm_tokenizer_dir(directory: Path | str) -> bool:
    """True when ``tokenizer_config.json`` names ChatGLM3's remote-code tokenizer class."""
    path = Path(directory) / "tokenizer_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("tokenizer_class") == TOKENIZER_CLASS


class ChatGLMTokenizer(PreTrainedTokenizer):
    """ChatGLM3's sentencepiece tokenizer (see the module docstring)."""

    vocab_files_names = {"vocab_file": VOCAB_FILE}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str, padding_side: str = "left", clean_up_tokenization_spaces: bool = False,
                 **kwargs: Any) -> None:
        import sentencepiece

        if vocab_file is None or not os.path.isfile(vocab_file):
            raise ValueError(f"ChatGLMTokenizer: sentencepiece model {vocab_file!r} not found "
                             f"(expected {VOCAB_FILE} next to tokenizer_config.json)")
        self.vocab_file = str(vocab_file)
        self.sp = sentencepiece.SentencePieceProcessor(model_file=self.vocab_file)
        n = self.sp.vocab_size()
        self.special_ids = {tok: n + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self.special_tokens_by_id = {i: tok for tok, i in self.special_ids.items()}
        unk = self.sp.id_to_piece(self.sp.unk_id())
        for key, value in (("eos_token", self.sp.id_to_piece(self.sp.eos_id())), ("unk_token", unk),
                           ("pad_token", unk)):  # ChatGLM3 pads with <unk>
            kwargs.setdefault(key, value)
        kwargs.pop("chat_template", None)  # see the module docstring
        kwargs.pop("encode_special_tokens", None)
        super().__init__(padding_side=padding_side, clean_up_tokenization_spaces=clean_up_tokenization_spaces,
                         **kwargs)
        self.chat_template = CHAT_TEMPLATE

    # --- vocabulary -------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.sp.vocab_size() + len(SPECIAL_TOKENS)

    def get_vocab(self) -> dict[str, int]:
        vocab = {self.sp.id_to_piece(i): i for i in range(self.sp.vocab_size())}
        vocab.update(self.special_ids)
        vocab.update(getattr(self, "_added_tokens_encoder", {}))
        return vocab

    def get_command(self, token: str) -> int:
        """ChatGLM3's name for a special token's id (``[gMASK]``, ``<|user|>``, ``<eos>``...)."""
        aliases = {"<bos>": self.sp.bos_id(), "<eos>": self.sp.eos_id(), "<unk>": self.sp.unk_id(),
                   "<pad>": self.sp.unk_id()}
        if token in aliases:
            return aliases[token]
        if token not in self.special_ids:
            raise ValueError(f"{token!r} is not a ChatGLM3 special token ({', '.join(SPECIAL_TOKENS)})")
        return self.special_ids[token]

    def _convert_token_to_id(self, token: str) -> int:
        if token in self.special_ids:
            return self.special_ids[token]
        return self.sp.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        if index in self.special_tokens_by_id:
            return self.special_tokens_by_id[index]
        return self.sp.id_to_piece(index)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self.sp.decode_pieces(tokens)

    # --- encoding ---------------------------------------------------------------

    def text_ids(self, text: str) -> list[int]:
        """Ids of a text without added prefix: special tokens in it become their ids, and the
        text after a role token is encoded as ``build_single_message`` does (the metadata
        line up to ``\\n``, then the content, each on its own)."""
        ids: list[int] = []
        after_role = False
        pos = 0

        def plain(segment: str) -> None:
            if not segment:
                return
            if after_role:
                cut = segment.find("\n")
                if cut >= 0:
                    ids.extend(self.sp.encode(segment[:cut + 1]))
                    segment = segment[cut + 1:]
                    if not segment:
                        return
            ids.extend(self.sp.encode(segment))

        for match in _SPECIAL_RE.finditer(text):
            plain(text[pos:match.start()])
            if match.group(3):
                ids.append(self.special_ids[match.group(3)])
                after_role = True
            else:
                ids.append(self.special_ids[match.group(1)])
                if match.group(2):
                    ids.append(self.special_ids[match.group(2)])
                after_role = False
            pos = match.end()
        plain(text[pos:])
        return ids

    def tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return [self._convert_id_to_token(i) for i in self.text_ids(text)]

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return self.tokenize(text)

    def _encode_plus(self, text: Any, text_pair: Any = None, **kwargs: Any):
        # Strings go through text_ids (the piece -> id round trip is ambiguous for "sop");
        # ids, batches and pre-tokenised input through the base class.
        if isinstance(text, str) or isinstance(text_pair, str):
            first = self.text_ids(text) if isinstance(text, str) else text
            second = self.text_ids(text_pair) if isinstance(text_pair, str) else text_pair
            return self._prepare_ids(first, second, **kwargs)
        return super()._encode_plus(text, text_pair, **kwargs)

    def _prepare_ids(self, ids: list[int], pair_ids: Optional[list[int]], *, add_special_tokens: bool = True,
                     padding_strategy: Any = None, truncation_strategy: Any = None, max_length: Optional[int] = None,
                     stride: int = 0, pad_to_multiple_of: Optional[int] = None, padding_side: Optional[str] = None,
                     return_tensors: Any = None, return_token_type_ids: Optional[bool] = None,
                     return_attention_mask: Optional[bool] = None, return_overflowing_tokens: bool = False,
                     return_special_tokens_mask: bool = False, return_length: bool = False, verbose: bool = True,
                     **_: Any):
        return self.prepare_for_model(
            ids, pair_ids=pair_ids, add_special_tokens=add_special_tokens,
            padding=padding_strategy.value if padding_strategy is not None else False,
            truncation=truncation_strategy.value if truncation_strategy is not None else None,
            max_length=max_length, stride=stride, pad_to_multiple_of=pad_to_multiple_of, padding_side=padding_side,
            return_tensors=return_tensors, prepend_batch_axis=True, return_attention_mask=return_attention_mask,
            return_token_type_ids=return_token_type_ids, return_overflowing_tokens=return_overflowing_tokens,
            return_special_tokens_mask=return_special_tokens_mask, return_length=return_length, verbose=verbose)

    def get_prefix_tokens(self) -> list[int]:
        return [self.special_ids["[gMASK]"], self.special_ids["sop"]]

    def build_inputs_with_special_tokens(self, token_ids_0: list[int],
                                         token_ids_1: Optional[list[int]] = None) -> list[int]:
        ids = self.get_prefix_tokens() + list(token_ids_0)
        if token_ids_1 is not None:
            ids = ids + list(token_ids_1) + [self.sp.eos_id()]
        return ids

    def get_special_tokens_mask(self, token_ids_0: list[int], token_ids_1: Optional[list[int]] = None,
                                already_has_special_tokens: bool = False) -> list[int]:
        if already_has_special_tokens:
            specials = set(self.all_special_ids) | set(self.special_tokens_by_id)
            return [1 if t in specials else 0 for t in token_ids_0]
        mask = [1, 1] + [0] * len(token_ids_0)
        if token_ids_1 is not None:
            mask += [0] * len(token_ids_1) + [1]
        return mask

    def build_single_message(self, role: str, metadata: str, message: str) -> list[int]:
        """``<|role|>`` + ``metadata\\n`` + ``message``, each encoded on its own (ChatGLM3's method)."""
        if role not in ROLES:
            raise ValueError(f"ChatGLM3 role must be one of {', '.join(ROLES)}, got {role!r}")
        return [self.special_ids[f"<|{role}|>"]] + self.sp.encode(f"{metadata}\n") + self.sp.encode(message)

    # --- decoding ---------------------------------------------------------------

    def _decode(self, token_ids: Any, skip_special_tokens: bool = False,
                clean_up_tokenization_spaces: Optional[bool] = None, **kwargs: Any) -> str:
        ids = [token_ids] if isinstance(token_ids, int) else [int(t) for t in token_ids]
        skip = set(self.all_special_ids) | set(self.special_tokens_by_id) if skip_special_tokens else set()
        text, buffer = "", []
        for i in ids:
            if i in skip:
                continue
            if i in self.special_tokens_by_id:
                if buffer:
                    text += self.sp.decode(buffer)
                    buffer = []
                text += self.special_tokens_by_id[i]
            else:
                buffer.append(i)
        if buffer:
            text += self.sp.decode(buffer)
        return text

    # --- saving -----------------------------------------------------------------

    def save_vocabulary(self, save_directory: str, filename_prefix: Optional[str] = None) -> tuple[str, ...]:
        name = f"{filename_prefix}-{VOCAB_FILE}" if filename_prefix else VOCAB_FILE
        out = Path(save_directory) / name
        if Path(self.vocab_file).resolve() != out.resolve():
            shutil.copyfile(self.vocab_file, out)
        return (str(out),)


def load_chatglm_tokenizer(directory: Path | str, **kwargs: Any) -> ChatGLMTokenizer:
    """:class:`ChatGLMTokenizer` from a directory with ``tokenizer.model`` + ``tokenizer_config.json``."""
    return ChatGLMTokenizer.from_pretrained(str(directory), **kwargs)
