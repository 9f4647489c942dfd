"""The one tokenisation of a (prompt, response) used by SFT, DPO, scoring and generation.

Copies of this logic drift apart (TRL #2209: a copied ``tokenize_row`` truncated
wrongly), so every consumer goes through the two encoders below:

- prompt: encoded without special tokens, then the tokenizer's leading special
  tokens (BOS for Llama-style tokenizers) are put in front unless the text already
  starts with them (a chat-template rendering that contains BOS), so they are
  never doubled.  Too long a prompt loses tokens from the **left**, just after
  those leading special tokens: the model always sees BOS first and the end of the
  prompt, which is the part next to the response.
- response: encoded without special tokens, EOS appended, then cut on the
  **right** to ``max_response_length`` (a cut response has no EOS).

:func:`encode_prompts` and :func:`encode_responses` hold these rules; everything else
(pairs, SFT rows, prompts for generation) is composed from them.

An optional total limit ``max_length`` (prompt + response, TRL's ``DPOConfig.max_length``) is
applied after those per-part limits, as TRL's ``truncation_mode`` says:

- ``keep_end`` (TRL's default for DPO): the sequence keeps its end; the prompt loses tokens
  from the left (after its leading special tokens), the response stays whole.  Only when the
  response alone leaves no room for one prompt token is it cut on the right too.
- ``keep_start``: the sequence keeps its start; the response is cut on the right (losing its
  EOS).  Only when the prompt alone leaves no room for one response token does the prompt
  lose tokens from the left too.

A pair shares one prompt, so its cut is sized by the longer response.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field as dc_field
from typing import Any, Optional, Sequence

from fg_megatron.data.errors import DataFormatError
from fg_megatron.data.records import PreferenceRecord, PromptRecord, SFTRecord


@dataclass(frozen=True)
class TokenLayout:
    """Where a tokenizer puts its special tokens around a single text."""

    prefix: tuple[int, ...]  # added before the text (BOS)
    suffix: tuple[int, ...]  # added after it by add_special_tokens=True (never used for prompts)
    eos_id: int
    pad_id: int  # the pad token, or EOS for tokenizers without one (padding is masked anyway)


_LAYOUTS: "weakref.WeakKeyDictionary[Any, TokenLayout]" = weakref.WeakKeyDictionary()


def token_layout(tokenizer: Any) -> TokenLayout:
    """Probe ``tokenizer`` once (cached): which ids does ``add_special_tokens`` wrap a text in?"""
    try:
        return _LAYOUTS[tokenizer]
    except (KeyError, TypeError):
        pass
    probe = "a b"
    with_sp = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    at = next((i for i in range(len(with_sp) - len(plain) + 1) if with_sp[i:i + len(plain)] == plain), None)
    if at is None:
        raise ValueError(f"cannot locate the special tokens this tokenizer adds: {with_sp} does not contain {plain}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token; responses end with EOS: set tokenizer.eos_token")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    layout = TokenLayout(tuple(with_sp[:at]), tuple(with_sp[at + len(plain):]), int(eos), int(pad))
    try:
        _LAYOUTS[tokenizer] = layout
    except TypeError:  # not weak-referenceable: probe every time
        pass
    return layout


@dataclass(frozen=True)
class TokenizedExample:
    """Token ids of one prompt and one response (EOS included unless cut)."""

    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]
    prompt_truncated: bool = False
    response_truncated: bool = False
    full_lengths: tuple[int, ...] = dc_field(default=(), compare=False)  # (prompt, response) before any cut

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


@dataclass(frozen=True)
class TokenizedPair:
    """A preference pair sharing one tokenised prompt."""

    id: str
    prompt_ids: tuple[int, ...]
    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]
    prompt_truncated: bool = False
    response_truncated: bool = False  # either response was cut
    chosen_truncated: bool = False  # cut on the right: it lost its EOS
    rejected_truncated: bool = False
    full_lengths: tuple[int, ...] = dc_field(default=(), compare=False)  # (prompt, chosen, rejected) before any cut

    @property
    def length(self) -> int:
        """Sequence length of the longer of the two rows (what a batch pads to)."""
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


def _check_limits(layout: TokenLayout, max_prompt_length: int, max_response_length: int) -> None:
    if max_prompt_length < len(layout.prefix) + 1:
        raise ValueError(f"max_prompt_length={max_prompt_length} leaves no room for a prompt token after "
                         f"the {len(layout.prefix)} leading special token(s); use a larger value")
    if max_response_length < 1:
        raise ValueError(f"max_response_length must be >= 1, got {max_response_length}")


def _encode(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Plain token ids of each text (one batched call: the Rust tokenizer does the loop)."""
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


TRUNCATION_MODES = ("keep_end", "keep_start")


def _prompts_full(tokenizer: Any, texts: Sequence[str],
                  max_prompt_length: int) -> list[tuple[tuple[int, ...], bool, int]]:
    """``(ids, truncated, length before the cut)`` per prompt (rules: :func:`encode_prompts`)."""
    layout = token_layout(tokenizer)
    _check_limits(layout, max_prompt_length, 1)
    pre = list(layout.prefix)
    room = max_prompt_length - len(pre)
    out = []
    for body in _encode(tokenizer, texts):
        if pre and body[: len(pre)] == pre:  # already rendered into the text (chat template)
            body = body[len(pre):]
        full = len(pre) + len(body)
        truncated = len(body) > room
        if truncated:
            body = body[-room:]
        out.append((tuple(pre + body), truncated, full))
    return out


def _responses_full(tokenizer: Any, texts: Sequence[str],
                    max_response_length: int) -> list[tuple[tuple[int, ...], bool, int]]:
    """``(ids, truncated, length before the cut)`` per response (rules: :func:`encode_responses`)."""
    layout = token_layout(tokenizer)
    _check_limits(layout, len(layout.prefix) + 1, max_response_length)
    out = []
    for body in _encode(tokenizer, texts):
        if body and body[-1] == layout.eos_id:  # the text spelled EOS out: do not add a second one
            body = body[:-1]
        ids = body + [layout.eos_id]
        out.append((tuple(ids[:max_response_length]), len(ids) > max_response_length, len(ids)))
    return out


def encode_prompts(tokenizer: Any, texts: Sequence[str], max_prompt_length: int) -> list[tuple[tuple[int, ...], bool]]:
    """``(ids, truncated)`` per prompt: leading special tokens once, then the text, cut from the left."""
    return [(ids, cut) for ids, cut, _ in _prompts_full(tokenizer, texts, max_prompt_length)]


def encode_responses(tokenizer: Any, texts: Sequence[str],
                     max_response_length: int) -> list[tuple[tuple[int, ...], bool]]:
    """``(ids, truncated)`` per response: the text, EOS, cut on the right to ``max_response_length``."""
    return [(ids, cut) for ids, cut, _ in _responses_full(tokenizer, texts, max_response_length)]


def fit_total_length(prompt: tuple[int, ...], responses: Sequence[tuple[int, ...]], max_length: Optional[int],
                     truncation_mode: str, n_prefix: int) -> tuple[tuple[int, ...], list[tuple[int, ...]]]:
    """Cut ``prompt + response`` (for each of ``responses``, sharing the prompt) to ``max_length``
    tokens as ``truncation_mode`` says (module docstring); ``n_prefix`` leading prompt tokens
    (BOS) are never cut."""
    if truncation_mode not in TRUNCATION_MODES:
        raise ValueError(f"truncation_mode must be one of {', '.join(TRUNCATION_MODES)}, got {truncation_mode!r}")
    longest = max(len(r) for r in responses)
    if max_length is None or len(prompt) + longest <= max_length:
        return prompt, list(responses)
    if max_length < n_prefix + 2:
        raise ValueError(f"max_length={max_length} leaves no room for one prompt and one response token after "
                         f"the {n_prefix} leading special token(s); use a larger value")
    if truncation_mode == "keep_end":
        keep = max(n_prefix + 1, max_length - longest)  # prompt tokens kept
    else:
        keep = min(len(prompt), max_length - 1)  # the prompt yields only what one response token needs
    if keep < len(prompt):
        prompt = prompt[:n_prefix] + prompt[len(prompt) - (keep - n_prefix):]
    room = max_length - len(prompt)
    return prompt, [r[:room] for r in responses]


def tokenize_examples(tokenizer: Any, prompts: Sequence[str], responses: Sequence[str], max_prompt_length: int,
                      max_response_length: int, max_length: Optional[int] = None,
                      truncation_mode: str = "keep_end") -> list[TokenizedExample]:
    """The one tokenisation of (prompt, response) rows (module docstring has the rules)."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    ps = _prompts_full(tokenizer, prompts, max_prompt_length)
    rs = _responses_full(tokenizer, responses, max_response_length)
    n_prefix = len(token_layout(tokenizer).prefix)
    out = []
    for (p, pt, pf), (r, rt, rf) in zip(ps, rs):
        p2, (r2,) = fit_total_length(p, [r], max_length, truncation_mode, n_prefix)
        out.append(TokenizedExample(p2, r2, pt or len(p2) < len(p), rt or len(r2) < len(r), (pf, rf)))
    return out


def tokenize_example(tokenizer: Any, prompt: str, response: str, max_prompt_length: int,
                     max_response_length: int, max_length: Optional[int] = None,
                     truncation_mode: str = "keep_end") -> TokenizedExample:
    """:func:`tokenize_examples` for one row."""
    return tokenize_examples(tokenizer, [prompt], [response], max_prompt_length, max_response_length, max_length,
                             truncation_mode)[0]


def tokenize_pairs(tokenizer: Any, records: Sequence[PreferenceRecord], max_prompt_length: int,
                   max_response_length: int, max_length: Optional[int] = None, truncation_mode: str = "keep_end",
                   identical: str = "error") -> list[TokenizedPair]:
    """Preference pairs: one prompt encoding shared by chosen and rejected, both responses
    through the same encoder as every other response.  A pair whose responses truncation
    made identical is an error (``identical="keep"``: kept, marked truncated, for the caller to drop)."""
    ps = _prompts_full(tokenizer, [r.prompt for r in records], max_prompt_length)
    cs = _responses_full(tokenizer, [r.chosen for r in records], max_response_length)
    rs = _responses_full(tokenizer, [r.rejected for r in records], max_response_length)
    n_prefix = len(token_layout(tokenizer).prefix)
    out = []
    for rec, (p, pt, pf), (c, ct, cf), (r, rt, rf) in zip(records, ps, cs, rs):
        p2, (c2, r2) = fit_total_length(p, [c, r], max_length, truncation_mode, n_prefix)
        pt, ct, rt = pt or len(p2) < len(p), ct or len(c2) < len(c), rt or len(r2) < len(r)
        if c2 == r2 and identical == "error":
            limits = f"max_response_length={max_response_length}"
            if max_length is not None:
                limits += f", max_length={max_length}"
            raise DataFormatError(*_source_line(rec.source),
                                  f"chosen and rejected are identical after truncation to "
                                  f"{limits}; raise it or drop the row", "rejected")
        out.append(TokenizedPair(rec.id, p2, c2, r2, pt, ct or rt, ct, rt, (pf, cf, rf)))
    return out


def tokenize_pair(tokenizer: Any, record: PreferenceRecord, max_prompt_length: int,
                  max_response_length: int, max_length: Optional[int] = None,
                  truncation_mode: str = "keep_end") -> TokenizedPair:
    """:func:`tokenize_pairs` for one record."""
    return tokenize_pairs(tokenizer, [record], max_prompt_length, max_response_length, max_length,
                          truncation_mode)[0]


def tokenize_sfts(tokenizer: Any, records: Sequence[SFTRecord], max_prompt_length: int,
                  max_response_length: int, max_length: Optional[int] = None,
                  truncation_mode: str = "keep_end") -> list[TokenizedExample]:
    """SFT rows; pre-tokenised rows (``prompt_ids``/``response_ids``) are used exactly as given."""
    texts = [r for r in records if r.prompt_ids is None]
    encoded = iter(tokenize_examples(tokenizer, [r.prompt for r in texts], [r.response for r in texts],
                                     max_prompt_length, max_response_length, max_length,
                                     truncation_mode) if texts else [])
    vocab = len(tokenizer)
    out = []
    for rec in records:
        if rec.prompt_ids is None:
            out.append(next(encoded))
            continue
        for field, ids in (("prompt_ids", rec.prompt_ids), ("response_ids", rec.response_ids)):
            bad = [t for t in ids if t >= vocab]
            if bad:
                raise DataFormatError(*_source_line(rec.source),
                                      f"token id {bad[0]} is outside the tokenizer's vocabulary of {vocab}", field)
        out.append(TokenizedExample(tuple(rec.prompt_ids), tuple(rec.response_ids),
                                    full_lengths=(len(rec.prompt_ids), len(rec.response_ids))))
    return out


def tokenize_sft(tokenizer: Any, record: SFTRecord, max_prompt_length: int,
                 max_response_length: int) -> TokenizedExample:
    """:func:`tokenize_sfts` for one record."""
    return tokenize_sfts(tokenizer, [record], max_prompt_length, max_response_length)[0]


def tokenize_prompts(tokenizer: Any, prompts: Sequence["str | PromptRecord"],
                     max_prompt_length: int) -> list[tuple[int, ...]]:
    """Prompt ids for generation: the prompt half of :func:`tokenize_examples`.  A pre-tokenised
    record's ``prompt_ids`` are used as given (no BOS added, never cut): an id outside the
    vocabulary, or more ids than ``max_prompt_length``, is a :class:`DataFormatError`."""
    return [ids for ids, _, _ in tokenize_prompts_full(tokenizer, prompts, max_prompt_length)]


def tokenize_prompts_full(tokenizer: Any, prompts: Sequence["str | PromptRecord"],
                          max_prompt_length: int) -> list[tuple[tuple[int, ...], bool, int]]:
    """:func:`tokenize_prompts` with ``(ids, truncated, length before the cut)`` per prompt."""
    given = [p.prompt_ids if isinstance(p, PromptRecord) else None for p in prompts]
    texts = [p.prompt if isinstance(p, PromptRecord) else p for p, ids in zip(prompts, given) if ids is None]
    encoded = iter(_prompts_full(tokenizer, texts, max_prompt_length))
    vocab = len(tokenizer) if any(ids is not None for ids in given) else 0
    out = []
    for p, ids in zip(prompts, given):
        if ids is None:
            out.append(next(encoded))
            continue
        bad = [t for t in ids if t >= vocab]
        if bad:
            raise DataFormatError(*_source_line(p.source),
                                  f"token id {bad[0]} is outside the tokenizer's vocabulary of {vocab}", "prompt_ids")
        if len(ids) > max_prompt_length:
            raise DataFormatError(*_source_line(p.source),
                                  f"{len(ids)} token ids, more than max_prompt_length={max_prompt_length} "
                                  f"(pre-tokenised prompts are used as given, never cut)", "prompt_ids")
        out.append((tuple(ids), False, len(ids)))
    return out


def tokenize_prompt(tokenizer: Any, prompt: "str | PromptRecord", max_prompt_length: int) -> tuple[int, ...]:
    return tokenize_prompts(tokenizer, [prompt], max_prompt_length)[0]


def decode_response(tokenizer: Any, ids: Sequence[int]) -> str:
    """Text of generated response ids, up to (not including) the first EOS."""
    eos = token_layout(tokenizer).eos_id
    ids = list(ids)
    if eos in ids:
        ids = ids[: ids.index(eos)]
    return tokenizer.decode(ids, skip_special_tokens=True)


def _source_line(source: str) -> tuple[str, Optional[int]]:
    path, _, line = source.rpartition(":")
    return (path, int(line)) if line.isdigit() else (source, None)
