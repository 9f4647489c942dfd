"""Rows of a data file with their line numbers: JSONL (UTF-8), or parquet when pyarrow is present.

Reading is strict: a line that is not valid UTF-8 or not a JSON object is a
:class:`DataFormatError` naming the file and line (and the JSON error's column); so is
a string holding a lone UTF-16 surrogate (a JSON escape such as ``\\ud800`` without
its pair), which no tokenizer can encode: the error names its field.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Union

from fg_megatron.data.errors import DataFormatError, OutputPathError

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


# A JSON escape of a UTF-16 surrogate (\\uD800-\\uDFFF): the only way a lone surrogate gets into a row
# (raw surrogate bytes are invalid UTF-8).  Rows without one skip the walk below.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _surrogate_field(value: Any, where: str = "") -> Optional[tuple[str, str]]:
    """``(field, character)`` of the first string (or key) in ``value`` with a lone surrogate, or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")  # fails exactly on surrogates
        except UnicodeEncodeError as exc:
            return where, value[exc.start]
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            shown = str(key).encode("utf-8", "backslashreplace").decode("utf-8")  # printable even if bad itself
            name = f"{where}.{shown}" if where else shown
            found = _surrogate_field(str(key), name) or _surrogate_field(item, name)
            if found:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = _surrogate_field(item, f"{where}[{i}]")
            if found:
                return found
    return None


def check_text(row: dict, path: str, line: int) -> None:
    """Raise :class:`DataFormatError` at the first field of ``row`` holding a lone surrogate."""
    found = _surrogate_field(row)
    if found:
        field, char = found
        raise DataFormatError(path, line, f"lone UTF-16 surrogate \\u{ord(char):04x} (half of a pair, not a "
                                          f"character; no tokenizer can encode it): fix or drop the escape", field)


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
            if _SURROGATE_ESCAPE.search(text):
                check_text(row, shown, lineno)
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
        check_text(row, shown, rowno)
        yield rowno, row


def read_rows(path: PathLike) -> Iterator[tuple[int, dict]]:
    """``(line, row)`` for each row of ``path``; ``line`` is 1-based (the row number for parquet)."""
    p = Path(path)
    shown = str(path)
    if p.is_dir():
        raise DataFormatError(shown, None, "is a directory; expected a data file (JSONL, or parquet: "
                                           "*.parquet / *.pq)")
    if not p.is_file():
        raise DataFormatError(shown, None, "file not found")
    if p.suffix.lower() in (".parquet", ".pq"):
        return _parquet_rows(p, shown)
    return _jsonl_rows(p, shown)


def check_output_file(path: PathLike, flag: str = "--out") -> None:
    """Fail now, not after the work whose result goes to ``path``, when ``path`` cannot be written:
    it is a directory, or its folder cannot be made or written (a file in the way, no permission).
    Writers here make missing folders and write a temporary file next to the target, so the
    nearest existing folder on the way must be a writable directory.  Nothing is created."""
    p = Path(path)
    shown = f"{flag} {path}"
    if p.is_dir():
        raise OutputPathError(shown, "is a directory; expected a file path")
    folder = p.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise OutputPathError(shown, f"cannot be written: {folder} is a file, not a directory")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputPathError(shown, f"cannot be written: no permission to write in {folder}")


def write_jsonl(rows: Iterable[dict], path: PathLike) -> None:
    """Write rows as UTF-8 JSON lines; atomically (a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)
