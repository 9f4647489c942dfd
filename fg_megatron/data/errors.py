"""The error types of the data layer: bad input, located to file, line and field; an output
file that cannot be written."""

from __future__ import annotations

from typing import Optional


class DataFormatError(ValueError):
    """A data file or row that cannot be used, as one line: ``path:line: field 'f': what``.

    ``line`` is the 1-based line of a JSONL file (the 1-based row of a parquet
    file); ``field`` is a dotted path into the row (``chosen[1].content``).
    """

    def __init__(self, path: str, line: Optional[int], message: str, field: Optional[str] = None) -> None:
        self.path = str(path)
        self.line = line
        self.field = field
        self.message = message
        where = self.path if line is None else f"{self.path}:{line}"
        what = message if field is None else f"field '{field}': {message}"
        super().__init__(f"{where}: {what}")


class OutputPathError(DataFormatError):
    """An output file that cannot be written, found before the work that would fill it: ``path: what``."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(path, None, message)
