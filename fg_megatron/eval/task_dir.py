"""A verifiable task as a directory of data, and the generic judge of its answers.

A task directory plugs any checkable task into the flip study without code::

    DIR/sft.jsonl    prompt, response              (the recipe that makes pi0, when none is given)
    DIR/pref.jsonl   prompt, chosen, rejected      (DPO pairs; PPO takes their prompts)
    DIR/test.jsonl   prompt, answer, match         (held-out prompts and how to judge a response)

Other fields ride along (``id``, ``category``: the study breaks NFR down by
``category`` when every test row has one).  ``answer`` is a string, a list of
acceptable strings, or null (only with ``match: refusal``); ``match`` is
``number``, ``exact``, ``contains`` or ``refusal``, judged by
:mod:`fg_megatron.data.answers` on the generated text (``tools/generate.py``
cuts it at EOS).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Union

from fg_megatron.data.answers import INTEGER, MATCHES, answer_list
from fg_megatron.data.errors import DataFormatError
from fg_megatron.data.readers import json_type, read_rows

FILES = {"sft": ("prompt", "response"), "pref": ("prompt", "chosen", "rejected"), "test": ("prompt", "match")}


def _check_text(path: str, line: int, row: dict, key: str) -> None:
    if key not in row:
        raise DataFormatError(path, line, "missing", key)
    if not isinstance(row[key], str) or not row[key]:
        raise DataFormatError(path, line, f"expected a non-empty string, got {json_type(row[key])}", key)


def _check_test_row(path: str, line: int, row: dict) -> None:
    match = row["match"]
    if match not in MATCHES:
        raise DataFormatError(path, line, f"expected one of {', '.join(MATCHES)}, got {match!r}", "match")
    answer = row.get("answer")
    if match == "refusal":
        return
    ok = (isinstance(answer, str) and answer) or (
        isinstance(answer, list) and answer and all(isinstance(a, str) and a for a in answer))
    if not ok:
        raise DataFormatError(path, line, f"match {match!r} needs a non-empty string or list of strings, got "
                              f"{json_type(answer)}", "answer")
    if match == "number" and not all(INTEGER.fullmatch(a.strip()) for a in answer_list(answer)):
        raise DataFormatError(path, line, f"match 'number' needs integer answers, got {answer!r}", "answer")


@dataclass(frozen=True)
class TaskDir:
    root: Path

    @property
    def sft(self) -> Path:
        return self.root / "sft.jsonl"

    @property
    def pref(self) -> Path:
        return self.root / "pref.jsonl"

    @property
    def test(self) -> Path:
        return self.root / "test.jsonl"


def load_task(root: Union[str, Path], *, need_sft: bool = True) -> TaskDir:
    """Check a task directory's files row by row; errors name file, line and field."""
    task = TaskDir(Path(root))
    if not task.root.is_dir():
        raise DataFormatError(str(task.root), None, "not a directory (a task is DIR/{sft,pref,test}.jsonl)")
    for name, keys in FILES.items():
        path = task.root / f"{name}.jsonl"
        if name == "sft" and not need_sft:
            continue
        if not path.is_file():
            raise DataFormatError(str(path), None, "missing (a task is DIR/{sft,pref,test}.jsonl)")
        n = 0
        for line, row in read_rows(path):
            for key in keys:
                _check_text(str(path), line, row, key)
            if name == "test":
                _check_test_row(str(path), line, row)
            n += 1
        if n == 0:
            raise DataFormatError(str(path), None, "no rows")
    return task
