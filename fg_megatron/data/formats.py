"""Data shapes -> normalised records, with every row validated before training starts.

Recognised from a row's fields (or forced with ``data.format``):

==============  =====================================================================
format          fields
==============  =====================================================================
generic         ``prompt``, ``chosen``, ``rejected``: strings
hh_rlhf         ``chosen``, ``rejected``: full ``\\n\\nHuman: ... \\n\\nAssistant: ...``
                transcripts; the prompt is their common text up to and including the
                last ``\\n\\nAssistant:``, the responses are what follows
ultrafeedback   ``chosen``, ``rejected``: message lists ``[{role, content}]`` ending in the
                assistant's turn and sharing the turns before it; the prompt is those
                turns rendered with the tokenizer's chat template (generation prompt
                added), the responses the rest of the whole conversation's rendering (TRL's
                implicit prompt; EOS added later); or TRL's explicit prompt: ``prompt`` a
                message list, ``chosen``/``rejected`` the assistant's messages
tldr            summarize-from-feedback comparisons: ``info.post`` (+ ``info.title``,
                ``info.subreddit``), ``summaries: [{text}]`` (two), ``choice`` (index of
                the preferred one); the prompt is ``SUBREDDIT/TITLE/POST ... TL;DR:``
cvalues         CValues-Comparison: ``prompt``, ``pos_resp`` (chosen), ``neg_resp``
sft             ``prompt`` + ``response``; or ``messages`` (chat, rendered as above);
                or TRL's ``prompt`` + ``completion`` (strings, or message lists);
                or pre-tokenised ``prompt_ids`` + ``response_ids`` (used as given)
prompts         ``prompt`` (string, or a message list rendered with a generation prompt);
                or pre-tokenised ``prompt_ids`` (used as given; a row's ``response_ids``,
                e.g. in ``tools/generate.py`` output, are ignored)
==============  =====================================================================

An ``id`` field (string or integer) names a row; otherwise it is ``<file name>:<line>``.
Other fields are kept in the record's ``meta``.  A preference file also serves as SFT
data (``prompt`` + ``chosen``) and any file as prompts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

from fg_megatron.data.errors import DataFormatError
from fg_megatron.data.readers import PathLike, json_type, read_rows
from fg_megatron.data.records import PreferenceRecord, PromptRecord, SFTRecord

PREFERENCE_FORMATS = ("generic", "hh_rlhf", "ultrafeedback", "tldr", "cvalues")
FORMATS = PREFERENCE_FORMATS + ("sft", "prompts")
HH_MARKER = "\n\nAssistant:"
_HH_SHOWN = "\\n\\nAssistant:"  # error messages stay on one line

Kind = Literal["preference", "sft", "prompts"]

_SHAPES = ("prompt/chosen/rejected strings (generic), chosen/rejected transcripts (hh_rlhf), "
           "prompt + chosen/rejected message lists (ultrafeedback), info/summaries/choice (tldr), "
           "prompt/pos_resp/neg_resp (cvalues), prompt/response, messages or prompt_ids/response_ids (sft), "
           "prompt or prompt_ids (prompts)")


def detect_format(row: dict) -> Optional[str]:
    """The format a row's fields indicate, or None."""
    if "pos_resp" in row or "neg_resp" in row:
        return "cvalues"
    if "summaries" in row or "choice" in row:
        return "tldr"
    if "chosen" in row or "rejected" in row:
        if isinstance(row.get("chosen"), list) or isinstance(row.get("rejected"), list):
            return "ultrafeedback"
        return "generic" if "prompt" in row else "hh_rlhf"
    if ("prompt_ids" in row or "response_ids" in row or "response" in row or "messages" in row
            or "completion" in row):
        return "sft"
    if "prompt" in row:
        return "prompts"
    return None


class _Row:
    """Typed access to one row's fields; every failure names file, line and field."""

    def __init__(self, path: str, line: int, row: dict, tokenizer: Any) -> None:
        self.path, self.line, self.row, self.tokenizer = path, line, row, tokenizer

    def error(self, field: Optional[str], message: str) -> DataFormatError:
        return DataFormatError(self.path, self.line, message, field)

    def value(self, field: str, container: Optional[dict] = None, shown: Optional[str] = None) -> Any:
        container = self.row if container is None else container
        if field not in container:
            have = ", ".join(sorted(container)) or "none"
            raise self.error(shown or field, f"missing (the row has: {have})")
        return container[field]

    def string(self, field: str, *, what: str = "text", container: Optional[dict] = None,
               shown: Optional[str] = None, required: bool = True) -> Optional[str]:
        shown = shown or field
        if not required and (container if container is not None else self.row).get(field) is None:
            return None
        value = self.value(field, container, shown)
        if not isinstance(value, str):
            raise self.error(shown, f"expected a string, got {json_type(value)}")
        if not value.strip():
            raise self.error(shown, f"empty {what}")
        return value

    def messages(self, field: str) -> list[dict]:
        value = self.value(field)
        if not isinstance(value, list):
            raise self.error(field, f"expected a list of messages, got {json_type(value)}")
        if not value:
            raise self.error(field, "empty message list")
        for i, msg in enumerate(value):
            if not isinstance(msg, dict):
                raise self.error(f"{field}[{i}]", f"expected a message object {{role, content}}, got {json_type(msg)}")
            for key in ("role", "content"):
                item = msg.get(key)
                if not isinstance(item, str):
                    raise self.error(f"{field}[{i}].{key}", f"expected a string, got {json_type(item)}")
        return value

    def split_conversation(self, field: str) -> tuple[list[dict], str]:
        """(messages before the final assistant turn, that turn's content)."""
        msgs = self.messages(field)
        roles = [m["role"] for m in msgs]
        if "assistant" not in roles:
            raise self.error(field, f"no assistant turn (roles: {', '.join(roles)})")
        if roles[-1] != "assistant":
            raise self.error(field, f"the last message must be the assistant's response (got role {roles[-1]!r})")
        if len(msgs) == 1:
            raise self.error(field, "no prompt turn before the assistant's response")
        content = msgs[-1]["content"]
        if not content.strip():
            raise self.error(f"{field}[{len(msgs) - 1}].content", "empty response")
        return msgs[:-1], content

    def render(self, messages: list[dict], field: str, generation_prompt: bool = True) -> str:
        """The chat-template text of ``messages`` followed by the assistant's generation prompt."""
        tok = self.tokenizer
        if tok is None:
            raise ValueError("message-list rows are rendered with a tokenizer's chat template: pass tokenizer=")
        if getattr(tok, "chat_template", None) is None:
            raise DataFormatError(self.path, None, "message-list rows need a tokenizer with a chat template, "
                                                   "and this tokenizer has none")
        msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
        try:
            return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as exc:  # templates raise their own errors (e.g. "roles must alternate")
            raise self.error(field, f"the tokenizer's chat template rejects this conversation: "
                                    f"{' '.join(str(exc).split())}") from None

    def conversation(self, prompt: list[dict], response: list[dict], field: str) -> tuple[str, str]:
        """(prompt text, response text) as TRL renders a conversation: the prompt turns with the
        generation prompt, the response the rest of the whole conversation's rendering (a trailing
        EOS left off: tokenisation appends it).  A template whose whole rendering does not start
        with the prompt's falls back to the response turn's content."""
        text = self.render(prompt, field)
        full = self.render(prompt + response, field, generation_prompt=False)
        eos = getattr(self.tokenizer, "eos_token", None)
        if full.startswith(text):
            rest = full[len(text):]
            if eos and rest.endswith(eos):
                rest = rest[: -len(eos)]
        else:
            rest = response[-1]["content"]
        if not rest.strip():
            raise self.error(f"{field}[{len(response) - 1}].content", "empty response")
        return text, rest

    def assistant_turns(self, field: str) -> list[dict]:
        """A response given as its own message list (TRL's conversational format): the last turn is the assistant's."""
        msgs = self.messages(field)
        if msgs[-1]["role"] != "assistant":
            raise self.error(field, f"the last message must be the assistant's response (got role {msgs[-1]['role']!r})")
        if not msgs[-1]["content"].strip():
            raise self.error(f"{field}[{len(msgs) - 1}].content", "empty response")
        return msgs

    def distinct(self, chosen: str, rejected: str, field: str = "rejected") -> None:
        if chosen == rejected:
            raise self.error(field, "identical to the chosen response (a pair needs two different responses)")


# ---- one parser per format: row -> (prompt, first response, second response | None, fields used)

def _generic(r: _Row):
    prompt = r.string("prompt", what="prompt")
    chosen = r.string("chosen", what="response")
    rejected = r.string("rejected", what="response")
    r.distinct(chosen, rejected)
    return prompt, chosen, rejected, ("prompt", "chosen", "rejected")


def _hh_rlhf(r: _Row):
    full_c = r.string("chosen", what="transcript")
    full_r = r.string("rejected", what="transcript")
    ic, ir = full_c.rfind(HH_MARKER), full_r.rfind(HH_MARKER)
    if ic < 0:
        raise r.error("chosen", f"no '{_HH_SHOWN}' turn in the transcript")
    if ir < 0:
        raise r.error("rejected", f"no '{_HH_SHOWN}' turn in the transcript")
    prompt = full_c[: ic + len(HH_MARKER)]
    if full_r[: ir + len(HH_MARKER)] != prompt:
        raise r.error("rejected", f"does not share the chosen transcript's prompt (the text up to the last '{_HH_SHOWN}')")
    chosen, rejected = full_c[len(prompt):], full_r[len(prompt):]
    for name, resp in (("chosen", chosen), ("rejected", rejected)):
        if not resp.strip():
            raise r.error(name, f"empty response after the last '{_HH_SHOWN}'")
    r.distinct(chosen, rejected)
    return prompt, chosen, rejected, ("chosen", "rejected")


def _ultrafeedback(r: _Row):
    if isinstance(r.row.get("prompt"), list):  # TRL's explicit-prompt conversational shape
        head = r.messages("prompt")
        prompt, chosen = r.conversation(head, r.assistant_turns("chosen"), "chosen")
        _, rejected = r.conversation(head, r.assistant_turns("rejected"), "rejected")
        r.distinct(chosen, rejected)
        return prompt, chosen, rejected, ("prompt", "chosen", "rejected")
    # TRL's implicit-prompt shape: two whole conversations sharing every turn before the last
    head_c, _ = r.split_conversation("chosen")
    head_r, _ = r.split_conversation("rejected")
    strip = [(m["role"], m["content"]) for m in head_c]
    other = [(m["role"], m["content"]) for m in head_r]
    if strip != other:
        at = next((i for i, (a, b) in enumerate(zip(strip, other)) if a != b), min(len(strip), len(other)))
        raise r.error("rejected", f"the turns before the final response differ from 'chosen' at message {at} "
                                  f"(a pair must share its prompt)")
    prompt, chosen = r.conversation(head_c, r.row["chosen"][len(head_c):], "chosen")
    _, rejected = r.conversation(head_c, r.row["rejected"][len(head_c):], "rejected")
    r.distinct(chosen, rejected)
    return prompt, chosen, rejected, ("prompt", "chosen", "rejected", "messages")


def _tldr(r: _Row):
    info = r.value("info")
    if not isinstance(info, dict):
        raise r.error("info", f"expected an object with 'post', got {json_type(info)}")
    post = r.string("post", what="post", container=info, shown="info.post")
    title = r.string("title", container=info, shown="info.title", required=False)
    subreddit = r.string("subreddit", container=info, shown="info.subreddit", required=False)
    summaries = r.value("summaries")
    if not isinstance(summaries, list):
        raise r.error("summaries", f"expected a list of {{text}} objects, got {json_type(summaries)}")
    if len(summaries) != 2:
        raise r.error("summaries", f"expected 2 summaries to compare, got {len(summaries)}")
    texts = []
    for i, s in enumerate(summaries):
        if not isinstance(s, dict):
            raise r.error(f"summaries[{i}]", f"expected an object with 'text', got {json_type(s)}")
        texts.append(r.string("text", what="summary", container=s, shown=f"summaries[{i}].text"))
    choice = r.value("choice")
    if not isinstance(choice, int) or isinstance(choice, bool):
        raise r.error("choice", f"expected an integer index into 'summaries', got {json_type(choice)}")
    if not 0 <= choice < len(texts):
        raise r.error("choice", f"{choice} is out of range for {len(texts)} summaries (0 or 1)")
    parts = []
    if subreddit is not None:
        parts.append(f"SUBREDDIT: r/{subreddit}")
    if title is not None:
        parts.append(f"TITLE: {title}")
    parts.append(f"POST: {post}")
    prompt = "\n\n".join(parts) + "\n\nTL;DR:"
    chosen, rejected = texts[choice], texts[1 - choice]
    r.distinct(chosen, rejected, "summaries")
    return prompt, chosen, rejected, ("info", "summaries", "choice")


def _cvalues(r: _Row):
    prompt = r.string("prompt", what="prompt")
    chosen = r.string("pos_resp", what="response")
    rejected = r.string("neg_resp", what="response")
    r.distinct(chosen, rejected, "neg_resp")
    return prompt, chosen, rejected, ("prompt", "pos_resp", "neg_resp")


def _token_ids(r: _Row, field: str, allow_empty: bool) -> tuple[int, ...]:
    value = r.value(field)
    if not isinstance(value, list):
        raise r.error(field, f"expected a list of token ids, got {json_type(value)}")
    if not value and not allow_empty:
        raise r.error(field, "empty list of token ids")
    for i, t in enumerate(value):
        if not isinstance(t, int) or isinstance(t, bool) or t < 0:
            raise r.error(f"{field}[{i}]", f"expected a non-negative integer token id, got {t!r}")
    return tuple(value)


def _sft(r: _Row):
    if "prompt_ids" in r.row or "response_ids" in r.row:
        ids = (_token_ids(r, "prompt_ids", allow_empty=False), _token_ids(r, "response_ids", allow_empty=False))
        return None, ids, None, ("prompt_ids", "response_ids")
    if "messages" in r.row and "response" not in r.row:
        head, _ = r.split_conversation("messages")
        prompt, response = r.conversation(head, r.row["messages"][len(head):], "messages")
        return prompt, response, None, ("messages",)
    if "completion" in r.row and "response" not in r.row:  # TRL's prompt-completion shape
        if isinstance(r.row.get("prompt"), list) or isinstance(r.row.get("completion"), list):
            prompt, response = r.conversation(r.messages("prompt"), r.assistant_turns("completion"), "completion")
            return prompt, response, None, ("prompt", "completion")
        return (r.string("prompt", what="prompt"), r.string("completion", what="response"), None,
                ("prompt", "completion"))
    return r.string("prompt", what="prompt"), r.string("response", what="response"), None, ("prompt", "response")


def _prompts(r: _Row):
    if isinstance(r.row.get("prompt"), list) or ("messages" in r.row and "prompt" not in r.row):
        field = "prompt" if "prompt" in r.row else "messages"
        msgs = r.messages(field)
        if msgs[-1]["role"] == "assistant":  # a finished conversation: generate its last turn anew
            msgs = msgs[:-1]
        if not msgs:
            raise r.error(field, "no turn before the assistant's response")
        return r.render(msgs, field), None, None, (field,)
    return r.string("prompt", what="prompt"), None, None, ("prompt",)


_PARSERS = {"generic": _generic, "hh_rlhf": _hh_rlhf, "ultrafeedback": _ultrafeedback, "tldr": _tldr,
            "cvalues": _cvalues, "sft": _sft, "prompts": _prompts}
_USABLE_AS = {"preference": PREFERENCE_FORMATS, "sft": PREFERENCE_FORMATS + ("sft",), "prompts": FORMATS}


def _row_id(r: _Row, name: str) -> str:
    value = r.row.get("id")
    if value is None:
        return f"{name}:{r.line}"
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise r.error("id", f"expected a string or integer, got {json_type(value)}")
    return str(value)


def _unique_id(r: _Row, name: str, seen_ids: dict[str, int]) -> str:
    """The row's id (:func:`_row_id`); an explicit ``id`` must not repeat one seen before in the file."""
    rid = _row_id(r, name)
    if "id" in r.row:
        if rid in seen_ids:
            raise r.error("id", f"duplicate id {rid!r} (first used on line {seen_ids[rid]})")
        seen_ids[rid] = r.line
    return rid


# Formats whose prompt can be a plain string (rather than a rendered conversation or a transcript).
_PLAIN_PROMPT_FORMATS = ("generic", "tldr", "cvalues", "sft", "prompts")


def load_records(path: PathLike, kind: Kind, format: str = "auto", tokenizer: Any = None,
                 chat_template: bool = False, info: Optional[dict] = None) -> list:
    """Validate every row of ``path`` and return its records (see the module docstring).

    ``kind`` says what the caller needs: ``preference`` -> :class:`PreferenceRecord`,
    ``sft`` -> :class:`SFTRecord` (preference rows give ``prompt`` + ``chosen``),
    ``prompts`` -> :class:`PromptRecord`.  ``tokenizer`` renders message lists with its chat
    template; with ``chat_template`` plain-string prompts are rendered too, as one user
    turn followed by the assistant's generation prompt (for chat models such as ChatGLM3).
    Raises :class:`DataFormatError` at the first bad row.  ``info``, if given, gets the file's
    ``format`` (detected from its first row, or the one forced).
    """
    shown = str(path)
    if format != "auto" and format not in _PARSERS:
        raise DataFormatError(shown, None, f"unknown data format {format!r} (choose from auto, {', '.join(FORMATS)})")
    name = Path(path).name
    records: list = []
    seen_ids: dict[str, int] = {}
    fmt = None if format == "auto" else format
    for line, row in read_rows(path):
        r = _Row(shown, line, row, tokenizer)
        if fmt is None:
            fmt = detect_format(row)
            if fmt is None:
                have = ", ".join(sorted(row)) or "none"
                raise r.error(None, f"cannot tell the data format from the fields ({have}); expected {_SHAPES}; "
                                    f"or set data.format")
        if fmt not in _USABLE_AS[kind]:
            need = {"preference": "prompt/chosen/rejected pairs", "sft": "prompt/response rows or pairs"}[kind]
            raise r.error(None, f"rows of format '{fmt}' cannot serve as {kind} data: it needs {need} "
                                f"(the supported shapes: {_SHAPES})")
        if kind == "prompts" and fmt in ("sft", "prompts") and ("prompt_ids" in row or "response_ids" in row):
            # pre-tokenised: generate from the prompt ids as given (response ids, if any, are not needed)
            prompt_ids = _token_ids(r, "prompt_ids", allow_empty=False)
            text = row.get("prompt") if isinstance(row.get("prompt"), str) else ""
            meta = {k: v for k, v in row.items() if k not in ("prompt", "prompt_ids", "id")}
            records.append(PromptRecord(_unique_id(r, name, seen_ids), text, f"{shown}:{line}", meta,
                                        prompt_ids=prompt_ids))
            continue
        # prompts from SFT-shaped rows: the prompt alone counts (a response, if any, is not needed)
        prompt, first, second, used = (_prompts if kind == "prompts" and fmt == "sft" else _PARSERS[fmt])(r)
        if (chat_template and isinstance(prompt, str) and fmt in _PLAIN_PROMPT_FORMATS
                and "messages" not in used and not isinstance(row.get("prompt"), list)):
            prompt = r.render([{"role": "user", "content": prompt}], "prompt")
        rid = _unique_id(r, name, seen_ids)
        meta = {k: v for k, v in row.items() if k not in used and k != "id"}
        source = f"{shown}:{line}"
        if kind == "preference":
            records.append(PreferenceRecord(rid, prompt, first, second, source, meta))
        elif kind == "sft":
            if fmt == "sft" and prompt is None:  # pre-tokenised
                records.append(SFTRecord(rid, "", "", source, meta, prompt_ids=first[0], response_ids=first[1]))
            else:
                records.append(SFTRecord(rid, prompt, first, source, meta))
        else:
            records.append(PromptRecord(rid, prompt, source, meta))
    if not records:
        raise DataFormatError(shown, None, "no rows")
    if info is not None:
        info["format"] = fmt
    return records


def load_preference_records(path: PathLike, format: str = "auto", tokenizer: Any = None,
                            chat_template: bool = False, info: Optional[dict] = None) -> list[PreferenceRecord]:
    return load_records(path, "preference", format, tokenizer, chat_template, info)


def load_sft_records(path: PathLike, format: str = "auto", tokenizer: Any = None,
                     chat_template: bool = False, info: Optional[dict] = None) -> list[SFTRecord]:
    return load_records(path, "sft", format, tokenizer, chat_template, info)


def load_prompt_records(path: PathLike, format: str = "auto", tokenizer: Any = None,
                        chat_template: bool = False, info: Optional[dict] = None) -> list[PromptRecord]:
    return load_records(path, "prompts", format, tokenizer, chat_template, info)
