"""Rows of a data file with their line numbers: JSONL (UTF-8), or parquet when pyarrow is present.

Reading is strict: a line that is not valid UTF-8 or not a JSON object is a
:class:`DataFormatError` naming the file and line (and the JSON error's column).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Iterator, Union

from fg_megatron.data.errors import DataFormatError

PathLike = Union[str, Path]


def json_type(value: Any) -> str:
    """The JSON name of a value's type, for error messages (``null``, ``string``...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _jsonl_rows(path: Path, shown: str) -> Iterator[tuple[int, dict]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8").rstrip("\r\n")  # so JSON errors report this line's column
            except UnicodeDecodeError as exc:
                raise DataFormatError(shown, lineno, f"not valid UTF-8 ({exc.reason} at byte {exc.start + 1})") from None
            if not text.strip():
                continue  # blank lines (a trailing newline, separators) carry no row
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                raise DataFormatError(shown, lineno, f"invalid JSON: {exc.msg} (column {exc.colno})") from None
            if not isinstance(row, dict):
                raise DataFormatError(shown, lineno, f"expected a JSON object per line (JSONL), got {json_type(row)}")
            yield lineno, row


def _parquet_rows(path: Path, shown: str) -> Iterator[tuple[int, dict]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataFormatError(shown, None, "reading parquet needs pyarrow (pip install pyarrow); "
                                           "or convert the file to JSONL") from None
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise DataFormatError(shown, None, f"cannot read parquet: {exc}") from None
    for rowno, row in enumerate(table.to_pylist(), start=1):
        yield rowno, row


def read_rows(path: PathLike) -> Iterator[tuple[int, dict]]:
    """``(line, row)`` for each row of ``path``; ``line`` is 1-based (the row number for parquet)."""
    p = Path(path)
    shown = str(path)
    if not p.is_file():
        raise DataFormatError(shown, None, "file not found")
    if p.suffix.lower() in (".parquet", ".pq"):
        return _parquet_rows(p, shown)
    return _jsonl_rows(p, shown)


def write_jsonl(rows: Iterable[dict], path: PathLike) -> None:
    """Write rows as UTF-8 JSON lines; atomically (a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)
