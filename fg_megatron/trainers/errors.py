"""How entry points fail: one line naming what and where, a non-zero exit."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

# User-facing errors: bad config, data, checkpoint or layout.  Anything else is a
# bug and keeps its traceback.
def _user_errors() -> tuple[type[BaseException], ...]:
    from fg_megatron.checkpoint.mapping import CheckpointMismatchError
    from fg_megatron.config import ConfigError
    from fg_megatron.data import DataFormatError
    from fg_megatron.losses import LossArgumentError
    from fg_megatron.models.arch import ModelConfigError
    from fg_megatron.parallel import ParallelLayoutError
    from fg_megatron.trainers.checkpointing import NonFiniteCheckpointError
    from fg_megatron.trainers.engine import NonFiniteLossError
    from fg_megatron.trainers.guard import DivergenceError

    errors: list[type[BaseException]] = [CheckpointMismatchError, ConfigError, DataFormatError,
                                         LossArgumentError, ModelConfigError, ParallelLayoutError,
                                         NonFiniteLossError, NonFiniteCheckpointError, DivergenceError,
                                         FileNotFoundError]
    try:
        from fg_megatron.checkpoint.atomic import OutputExistsError

        errors.append(OutputExistsError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


RANK0_GRACE_SECONDS = 2.0

# Where a training loop is, for the line printed on Ctrl-C (set by trainers.loop).
RUN_PROGRESS: dict = {}


def _collective_failure(exc: BaseException) -> Optional[str]:
    """One line for a collective that failed because of another rank (gloo's messages; NCCL's
    watchdog aborts the process itself after parallel.timeout_minutes)."""
    text = str(exc)
    if not isinstance(exc, RuntimeError):
        return None
    if "Timed out waiting" in text or ("timed out" in text.lower() and "collective" in text.lower()):
        return ("a collective operation timed out: another rank stalled, hung or died (waited "
                "parallel.timeout_minutes; lower it to fail sooner)")
    if "Connection closed by peer" in text or "Connection reset by peer" in text:
        return "another rank exited in the middle of a collective operation (its own error is above)"
    return None


def _interrupted_line() -> str:
    step = RUN_PROGRESS.get("step")
    where = f" at step {step}" if step is not None else ""
    save = RUN_PROGRESS.get("save")
    if save is None:
        return f"interrupted{where}"
    pointer = Path(save) / "checkpoints" / "latest"
    try:
        latest = pointer.read_text(encoding="utf-8").strip()
    except OSError:
        latest = "none"
    resume = "; continue with --resume" if latest != "none" else ""
    return f"interrupted{where}; latest checkpoint {latest}{resume}"


def _on_sigterm(signum, frame):  # torchrun stops workers with SIGTERM when it is interrupted
    raise KeyboardInterrupt


def run_cli(fn: Callable[[], object]) -> None:
    """Run an entry point; user errors print ``error: <one line>`` (rank 0, or the
    failing rank) and exit with status 2; Ctrl-C (or SIGTERM) prints one line on rank 0
    and exits with 130; a collective failed by another rank prints one line, exit 1."""
    rank = os.environ.get("RANK", "0")
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        fn()
    except KeyboardInterrupt:
        if rank == "0":
            print(_interrupted_line(), file=sys.stderr, flush=True)
        os._exit(130)
    except _user_errors() as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        _exit_with_line(rank, msg, 2)
    except RuntimeError as exc:
        msg = _collective_failure(exc)
        if msg is None:
            raise
        _exit_with_line(rank, msg, 1)


def _exit_with_line(rank: str, msg: str, code: int) -> None:
    if rank != "0":
        # Most bad input fails on every rank at once; the first rank to exit makes torchrun
        # stop the others, so give rank 0 the moment it needs to say it once, unprefixed.
        time.sleep(RANK0_GRACE_SECONDS)
    print(f"error: {msg}" if rank == "0" else f"error (rank {rank}): {msg}", file=sys.stderr, flush=True)
    # Skip interpreter teardown: other ranks may still sit in a collective.
    sys.stderr.flush()
    os._exit(code)
