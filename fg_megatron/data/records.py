"""Normalised rows: whatever the file's shape, the rest of the pipeline sees these."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass(frozen=True)
class PreferenceRecord:
    """One preference pair.  ``prompt + chosen`` is the text the model sees
    (no EOS in ``chosen``/``rejected``: tokenisation appends it)."""

    id: str
    prompt: str
    chosen: str
    rejected: str
    source: str  # "path:line" of the row it came from
    meta: dict[str, Any] = field(default_factory=dict)  # the row's other fields (task labels, scores)


@dataclass(frozen=True)
class SFTRecord:
    """A prompt and its target response; or, pre-tokenised, their ids (used as given)."""

    id: str
    prompt: str
    response: str
    source: str
    meta: dict[str, Any] = field(default_factory=dict)
    prompt_ids: Optional[tuple[int, ...]] = None  # set for {"prompt_ids", "response_ids"} rows
    response_ids: Optional[tuple[int, ...]] = None


@dataclass(frozen=True)
class PromptRecord:
    """A prompt to generate from; ``meta`` carries what an oracle needs to judge it.  Pre-tokenised
    (``prompt_ids`` set), the ids are the prompt, used as given; ``prompt`` is then the row's text if any."""

    id: str
    prompt: str
    source: str
    meta: dict[str, Any] = field(default_factory=dict)
    prompt_ids: Optional[tuple[int, ...]] = None  # set for {"prompt_ids"} rows
