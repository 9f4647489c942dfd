"""Negative flips and wins between two policies' responses to the same prompts (flipguard.md, Evaluation).

For each prompt, ``s0`` scores ``pi0``'s response and ``s1`` scores ``pi``'s:

    negative flip   s1 < s0 - margin      (pi0 handled it, pi handles it worse)
    win             s1 > s0 + margin
    tie             otherwise

Scores come either from a programmatic judge (``judge="tiny"``: the tiny task's
oracle, 1.0 right / 0.0 wrong, margin 0: a flip is pi0 right and pi wrong) or from
a numeric field of the rows (``score_field``: reward-model scores, margin 0.1 as
in the paper, which absorbs RM noise).  NFR, win rate and tie rate are fractions
of all prompts; a per-group breakdown (the tiny task's ``category``) shows where
flips happen.  The paper's pairwise judge-model protocol (two orders, both must
agree) needs a judge model and is not implemented here.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from fg_megatron.data.errors import DataFormatError
from fg_megatron.data.readers import read_rows

Judge = Callable[[Mapping[str, Any], str], float]
Row = tuple[str, int, dict]  # (path, line, row)

RM_MARGIN = 0.1  # the paper's margin for reward-model scores
OUTCOMES = ("flip", "win", "tie")


def _tiny_judge(row: Mapping[str, Any], response: str) -> float:
    from fg_megatron.data.tiny_task import judge

    return judge(row, response)


def _task_judge(row: Mapping[str, Any], response: str) -> float:
    from fg_megatron.data.answers import judge_row

    return judge_row(row, response)


# tiny: the bundled task's oracle; task: a task directory's test rows (answer + match)
JUDGES: dict[str, Judge] = {"tiny": _tiny_judge, "task": _task_judge}


def classify(s0: float, s1: float, margin: float) -> str:
    """``flip``, ``win`` or ``tie`` for one prompt (module docstring)."""
    if s1 < s0 - margin:
        return "flip"
    if s1 > s0 + margin:
        return "win"
    return "tie"


@dataclass
class FlipCounts:
    """Outcomes over a set of prompts; rates are fractions of ``n``."""

    n: int = 0
    flips: int = 0
    wins: int = 0
    ties: int = 0
    score_pi0: float = 0.0  # mean score of pi0's responses (accuracy under a 0/1 judge)
    score_pi: float = 0.0

    @property
    def nfr(self) -> float:
        return self.flips / self.n if self.n else 0.0

    @property
    def win_rate(self) -> float:
        return self.wins / self.n if self.n else 0.0

    @property
    def tie_rate(self) -> float:
        return self.ties / self.n if self.n else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "nfr": self.nfr, "win_rate": self.win_rate, "tie_rate": self.tie_rate}


def count(s0: Sequence[float], s1: Sequence[float], margin: float) -> FlipCounts:
    outcomes = [classify(a, b, margin) for a, b in zip(s0, s1)]
    n = len(outcomes)
    return FlipCounts(n=n, flips=outcomes.count("flip"), wins=outcomes.count("win"), ties=outcomes.count("tie"),
                      score_pi0=sum(s0) / n if n else 0.0, score_pi=sum(s1) / n if n else 0.0)


@dataclass
class FlipReport:
    """Overall counts, counts per group, and the per-prompt data behind them."""

    overall: FlipCounts
    groups: dict[str, FlipCounts]
    margin: float
    scorer: str  # "judge:tiny" or "field:<name>"
    group_by: Optional[str]
    ids: list[str] = field(default_factory=list)
    s0: list[float] = field(default_factory=list)
    s1: list[float] = field(default_factory=list)
    outcomes: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        """The JSON summary: settings, overall numbers, groups, and the ids of the flips and wins."""
        return {"scorer": self.scorer, "margin": self.margin, "group_by": self.group_by,
                **self.overall.as_dict(),
                "groups": {g: c.as_dict() for g, c in sorted(self.groups.items())},
                "flip_ids": [i for i, o in zip(self.ids, self.outcomes) if o == "flip"],
                "win_ids": [i for i, o in zip(self.ids, self.outcomes) if o == "win"]}


def load_rows(path: str | Path) -> list[Row]:
    return [(str(path), line, row) for line, row in read_rows(path)]


def _key(row: dict) -> Optional[str]:
    return None if row.get("id") is None else str(row["id"])


def pair_rows(pi0: Sequence[Row], pi: Sequence[Row]) -> list[tuple[Row, Row]]:
    """Match the two files' rows: by ``id`` when every row has one, else by position; the
    prompts of matched rows must be equal."""
    if all(_key(r) is not None for _, _, r in [*pi0, *pi]):
        by_id: dict[str, Row] = {}
        for item in pi:
            if _key(item[2]) in by_id:
                raise DataFormatError(item[0], item[1], f"duplicate id {_key(item[2])!r}", "id")
            by_id[_key(item[2])] = item
        pairs = []
        for item in pi0:
            other = by_id.pop(_key(item[2]), None)
            if other is None:
                raise DataFormatError(item[0], item[1], f"id {_key(item[2])!r} has no row in "
                                      f"{pi[0][0] if pi else 'the other file'}", "id")
            pairs.append((item, other))
        if by_id:
            extra = next(iter(by_id.values()))
            raise DataFormatError(extra[0], extra[1], f"id {_key(extra[2])!r} has no row in {pi0[0][0]}", "id")
    else:
        if len(pi0) != len(pi):
            raise DataFormatError(pi[0][0] if pi else "pi", None, f"{len(pi)} rows, but {pi0[0][0] if pi0 else 'pi0'} "
                                  f"has {len(pi0)}; rows without ids are matched by position")
        pairs = list(zip(pi0, pi))
    for a, b in pairs:
        if "prompt" in a[2] and "prompt" in b[2] and a[2]["prompt"] != b[2]["prompt"]:
            raise DataFormatError(b[0], b[1], f"prompt differs from {a[0]}:{a[1]} (the files must answer the same "
                                  f"prompts)", "prompt")
    return pairs


def _score(item: Row, judge: Optional[Judge], score_field: Optional[str]) -> float:
    path, line, row = item
    if judge is not None:
        response = row.get("response")
        if not isinstance(response, str):
            raise DataFormatError(path, line, f"expected the response text (a string), got "
                                  f"{type(response).__name__}", "response")
        try:
            return float(judge(row, response))
        except KeyError as exc:
            raise DataFormatError(path, line, "the judge needs this field of the prompt's metadata",
                                  str(exc.args[0])) from None
    value = row.get(score_field)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataFormatError(path, line, f"expected a finite number, got {json.dumps(value)}", score_field)
    return float(value)


def compare(pi0: Sequence[Row], pi: Sequence[Row], *, judge: Optional[str] = None,
            score_field: Optional[str] = None, margin: Optional[float] = None,
            group_by: Optional[str] = "auto") -> FlipReport:
    """Score both policies' rows and count flips / wins / ties, overall and per group.

    Exactly one of ``judge`` (a name in :data:`JUDGES`) and ``score_field``.  ``margin``
    defaults to 0 for a judge and 0.1 for scores.  ``group_by="auto"`` groups by
    ``category`` when every pi0 row has one; ``None`` turns groups off.
    """
    if (judge is None) == (score_field is None):
        raise ValueError("give exactly one of judge (e.g. 'tiny') and score_field")
    if judge is not None and judge not in JUDGES:
        raise ValueError(f"unknown judge {judge!r}; known: {', '.join(JUDGES)}")
    if margin is None:
        margin = 0.0 if judge is not None else RM_MARGIN
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    pairs = pair_rows(pi0, pi)
    if not pairs:
        raise DataFormatError(pi0[0][0] if pi0 else "pi0", None, "no rows to compare")
    if group_by == "auto":
        group_by = "category" if all("category" in a[2] for a, _ in pairs) else None
    fn = JUDGES[judge] if judge is not None else None
    s0 = [_score(a, fn, score_field) for a, _ in pairs]
    s1 = [_score(b, fn, score_field) for _, b in pairs]
    groups: dict[str, FlipCounts] = {}
    if group_by is not None:
        names = []
        for a, _ in pairs:
            if group_by not in a[2]:
                raise DataFormatError(a[0], a[1], "missing (used to group the results; --group-by none turns "
                                      "groups off)", group_by)
            names.append(str(a[2][group_by]))
        for g in sorted(set(names)):
            idx = [i for i, n in enumerate(names) if n == g]
            groups[g] = count([s0[i] for i in idx], [s1[i] for i in idx], margin)
    ids = [_key(a[2]) or f"{a[0]}:{a[1]}" for a, _ in pairs]
    return FlipReport(overall=count(s0, s1, margin), groups=groups, margin=margin,
                      scorer=f"judge:{judge}" if judge else f"field:{score_field}", group_by=group_by,
                      ids=ids, s0=s0, s1=s1, outcomes=[classify(a, b, margin) for a, b in zip(s0, s1)])


def format_table(report: FlipReport) -> str:
    """A plain-text table: one line overall, then one per group."""
    score = "acc" if report.scorer.startswith("judge") else "mean"
    head = (f"{'group':<14}{'n':>5}{'NFR':>8}{'win':>8}{'tie':>8}{'flips':>7}{'wins':>6}"
            f"{score + ' pi0':>10}{score + ' pi':>9}")
    lines = [f"scorer {report.scorer}, margin {report.margin:g}", head]
    for name, c in [("all", report.overall), *sorted(report.groups.items())]:
        lines.append(f"{name:<14}{c.n:>5}{c.nfr:>8.3f}{c.win_rate:>8.3f}{c.tie_rate:>8.3f}{c.flips:>7}{c.wins:>6}"
                     f"{c.score_pi0:>10.3f}{c.score_pi:>9.3f}")
    return "\n".join(lines)


def write_json(data: dict, path: str | Path) -> None:
    """Write ``data`` as indented JSON, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)
