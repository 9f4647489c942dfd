"""The output directory of a run: usable, exclusive, and never silently reused.

- :func:`check_writable` refuses a ``train.save`` that is a file, lies under a
  file, or cannot be written, in one line and before anything slow happens.
- :class:`RunLock` makes a run the only one writing its directory: ``SAVE/.lock``
  is created exclusively and holds the owner's host, pid and process start
  time; a lock whose owner is gone (same host, the pid dead or reused) is stale
  and taken over; one held by a live process, or from another host, refuses
  the new run naming the owner.  The lock is removed when the run ends.
- :func:`earlier_output` names what an earlier run left (checkpoints, metrics,
  config, TensorBoard events): a fresh run refuses such a directory unless
  ``--resume`` continues it or ``--overwrite`` deletes it first.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Optional

from fg_megatron.config import ConfigError

LOCK_FILE = ".lock"
# What a run writes into its directory (trainers.loop, trainers.metrics, trainers.checkpointing).
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "config.yaml", "tb")


class RunDirectoryError(ConfigError):
    """``train.save`` cannot be used by this run."""


def check_writable(save: Path) -> None:
    """``save`` is, or can become, a directory this process can write."""
    save = Path(save)
    if save.exists() and not save.is_dir():
        raise RunDirectoryError(f"train.save={save} is a file, not a directory; choose another --save")
    existing = save
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise RunDirectoryError(f"train.save={save}: {existing} is a file, so no directory can be made under it")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RunDirectoryError(f"train.save={save}: {existing} is not writable by this user")


def _start_time(pid: int) -> Optional[str]:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    def __init__(self, path: Path, owner: dict, created: bool = False) -> None:
        self.path = path
        self.owner = owner
        self.created = created  # the run made the directory: a run that wrote nothing leaves none

    @classmethod
    def acquire(cls, save: Path) -> "RunLock":
        save = Path(save)
        created = not save.exists()
        save.mkdir(parents=True, exist_ok=True)
        path = save / LOCK_FILE
        owner = {"host": socket.gethostname(), "pid": os.getpid(), "start": _start_time(os.getpid()),
                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = cls._holder(path)
                if not cls._stale(holder):
                    raise RunDirectoryError(
                        f"train.save={save} is in use by pid {holder.get('pid')} on {holder.get('host')} (since "
                        f"{holder.get('since')}); wait for that run, or choose another --save (if that run is gone, "
                        f"delete {path})") from None
                path.unlink(missing_ok=True)  # its owner is gone: take it over
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(owner, f)
            return cls(path, owner, created)
        raise RunDirectoryError(f"train.save={save}: could not take {path}")

    @staticmethod
    def _holder(path: Path) -> dict:
        try:
            holder = json.loads(path.read_text(encoding="utf-8"))
            return holder if isinstance(holder, dict) else {}
        except (OSError, ValueError):
            return {}

    @staticmethod
    def _stale(holder: dict) -> bool:
        if holder.get("host") != socket.gethostname():
            return False  # cannot see another machine's processes
        pid = holder.get("pid")
        if not isinstance(pid, int) or not _alive(pid):
            return True
        return holder.get("start") is not None and _start_time(pid) != holder.get("start")

    def release(self) -> None:
        if self._holder(self.path).get("pid") == self.owner["pid"]:
            self.path.unlink(missing_ok=True)
            if self.created and not any(self.path.parent.iterdir()):
                self.path.parent.rmdir()


def earlier_output(save: Path) -> list[str]:
    """What an earlier run left in ``save``."""
    save = Path(save)
    return [name for name in RUN_OUTPUTS if (save / name).exists()]


def delete_earlier_output(save: Path) -> None:
    """``--overwrite``: remove an earlier run's output (only what a run writes)."""
    for name in earlier_output(save):
        target = Path(save) / name
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink()
