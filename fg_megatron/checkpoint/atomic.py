"""Atomic output directories: a failed write never leaves a half checkpoint.

Everything is written into a temporary directory next to the target (same
filesystem, so the final ``rename`` is atomic) and moved into place only once
complete.  An existing non-empty target is refused unless ``force``; with
``force`` the old directory is moved aside, the new one renamed in, and only
then the old one deleted.
"""

from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence


class OutputExistsError(ValueError):
    """The output directory already holds something and ``--force`` was not given."""


def check_output_dir(target: Path, force: bool = False, inputs: Sequence[Path] = ()) -> None:
    """Refuse targets that would destroy data: a non-empty dir (without ``force``),
    a file, or a directory that is (or contains) one of the ``inputs``."""
    target = Path(target)
    resolved = target.resolve()
    for src in inputs:
        src = Path(src).resolve()
        if src == resolved or resolved in src.parents:
            raise OutputExistsError(f"output {target} would overwrite the input {src}; choose another --out")
    if target.exists() and not target.is_dir():
        raise OutputExistsError(f"output {target} exists and is not a directory")
    if target.is_dir() and any(target.iterdir()) and not force:
        raise OutputExistsError(f"output directory {target} exists and is not empty; "
                                f"pass --force to replace it")


def temp_dir_for(target: Path, tag: Optional[str] = None) -> Path:
    target = Path(target)
    return target.parent / f".{target.name}.tmp-{tag or uuid.uuid4().hex[:12]}"


def commit_dir(tmp: Path, target: Path) -> None:
    """Move a finished temporary directory to ``target``, replacing what is there."""
    tmp, target = Path(tmp), Path(target)
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:12]}"
        os.rename(target, old)
    os.rename(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_output_dir(target: Path, force: bool = False, inputs: Sequence[Path] = ()) -> Iterator[Path]:
    """Yield a temporary directory; on normal exit it becomes ``target``, on error it is removed."""
    target = Path(target)
    check_output_dir(target, force, inputs)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_for(target)
    tmp.mkdir()
    try:
        yield tmp
        commit_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
