"""Checksums of checkpoint files: a ``SHA256SUMS`` manifest, checked on load.

A training checkpoint's ``step_N/SHA256SUMS`` lists the sha256 of every file
under ``step_N/`` (model shards and metadata, optimizer states, RNG states,
``trainer_state.json``), in the format of coreutils' ``sha256sum``, so
``cd step_N && sha256sum -c SHA256SUMS`` checks it without this package.
It is written last, before the checkpoint is renamed into place: a checkpoint
with a manifest is complete.

Loading verifies against the nearest manifest that lists the files being read
(``--resume`` checks the whole ``step_N``; a model loaded from ``step_N/model``,
by a trainer, ``score.py`` or ``generate.py``, is checked against
``step_N/SHA256SUMS``); a file whose digest differs, or that is missing, is a
:class:`ChecksumMismatchError` naming it.
``tools/convert_checkpoint.py verify --ckpt DIR`` checks a whole checkpoint.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable, Optional

from fg_megatron.checkpoint.mapping import CheckpointMismatchError

MANIFEST = "SHA256SUMS"
_CHUNK = 1 << 22


class ChecksumMismatchError(CheckpointMismatchError):
    """A checkpoint file whose content is not what was saved."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def digests(root: Path, files: Iterable[Path]) -> dict[str, str]:
    """``{path relative to root: sha256}`` of ``files``."""
    root = Path(root)
    return {Path(f).relative_to(root).as_posix(): file_sha256(Path(f)) for f in files}


def files_under(root: Path) -> list[Path]:
    """Every regular file under ``root`` except the manifest itself, sorted."""
    root = Path(root)
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(root: Path, entries: dict[str, str]) -> Path:
    path = Path(root) / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.tmp")
    tmp.write_text("".join(f"{entries[name]}  {name}\n" for name in sorted(entries)), encoding="utf-8")
    tmp.replace(path)
    return path


def read_manifest(path: Path) -> dict[str, str]:
    entries = {}
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64 or not name:
            raise ChecksumMismatchError(f"{path}:{i}: not a sha256sum line: {line[:80]!r}")
        entries[name.lstrip("*")] = digest
    return entries


def find_manifest(path: Path) -> Optional[tuple[Path, str]]:
    """The manifest covering ``path`` (a checkpoint directory or file): the nearest
    ``SHA256SUMS`` in ``path`` or its parents, and ``path``'s prefix inside it."""
    path = Path(path).resolve()
    for depth, folder in enumerate([path] + list(path.parents)[:3]):
        manifest = folder / MANIFEST
        if manifest.is_file():
            prefix = path.relative_to(folder).as_posix() if depth else ""
            return manifest, "" if prefix == "." else prefix
    return None


def verify_files(manifest: Path, names: Iterable[str]) -> None:
    """Check that each name (relative to the manifest's folder) is listed and matches."""
    entries = read_manifest(manifest)
    root = Path(manifest).parent
    for name in names:
        if name not in entries:
            raise ChecksumMismatchError(f"{root / name}: not listed in {manifest}")
        target = root / name
        if not target.is_file():
            raise ChecksumMismatchError(f"{target}: listed in {manifest} but missing")
        actual = file_sha256(target)
        if actual != entries[name]:
            raise ChecksumMismatchError(f"{target}: sha256 {actual[:12]}... does not match {entries[name][:12]}... "
                                        f"recorded in {manifest}: the file changed or is corrupt")


def check_share(path: Path, rank: int = 0, world_size: int = 1) -> Optional[str]:
    """Verify rank ``rank``'s share (every ``world_size``-th file) of the files of checkpoint
    ``path`` that a manifest lists; return the first problem as one line, or None (also when
    no manifest covers ``path``).  Ranks call it together and agree on the result
    (:func:`fg_megatron.parallel.first_error`), so each file is hashed once."""
    found = find_manifest(path)
    if found is None:
        return None
    manifest, prefix = found
    try:
        names = sorted(n for n in read_manifest(manifest) if not prefix or n.startswith(prefix + "/"))
        verify_files(manifest, names[rank::world_size])
    except ChecksumMismatchError as exc:
        return str(exc)
    return None


def verify_tree(root: Path) -> tuple[Path, int]:
    """Verify every file under ``root`` against the manifest covering it; every listed file
    must exist and every file present must be listed.  Returns (manifest, files checked)."""
    root = Path(root)
    found = find_manifest(root)
    if found is None:
        raise ChecksumMismatchError(f"{root}: no {MANIFEST} in it or its parents (checkpoints written before "
                                    f"checksums, or not by a training run, cannot be verified)")
    manifest, prefix = found
    base = manifest.parent
    listed = [n for n in read_manifest(manifest) if not prefix or n == prefix or n.startswith(prefix + "/")]
    present = [p.relative_to(base).as_posix() for p in files_under(root)]
    unlisted = sorted(set(present) - set(listed))
    if unlisted:
        raise ChecksumMismatchError(f"{base / unlisted[0]}: present but not listed in {manifest}")
    verify_files(manifest, listed)
    return manifest, len(listed)
