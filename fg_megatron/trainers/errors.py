"""How entry points fail: one line naming what and where, a non-zero exit.

Under torchrun the failing worker also writes that line to torch elastic's error
file (``TORCHELASTIC_ERROR_FILE``, the JSON that torch's ``record`` decorator
writes), so torchrun's failure summary ends with ``traceback : error: <the
line>`` instead of a pointer to the docs; a bug's traceback goes there too.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import traceback
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


# How long a rank other than 0 waits before reporting a user error: most bad input fails on
# every rank at once, and rank 0 (which may be slower under load) should be the one to say it.
RANK0_GRACE_SECONDS = 10.0

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
            _write_error_file(None)
            raise
        _exit_with_line(rank, msg, 1, consequence=True)
    except Exception:  # a bug: torchrun's summary shows its traceback
        _write_error_file(None)
        raise


def _write_error_file(line: Optional[str], consequence: bool = False) -> None:
    """Write torch elastic's error file (when torchrun asked for one) in the format of
    ``torch.distributed.elastic.multiprocessing.errors.ErrorHandler.record_exception``:
    ``line`` as the message and the traceback torchrun prints, or (None) the exception
    being handled with its traceback.  torchrun names the failure with the earliest timestamp
    (whole seconds; ties go to the lower rank) as the root cause: a ``consequence`` of another
    rank's failure is dated a second later so that rank's own error wins."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    if line is None:
        exc = sys.exc_info()[1]
        line, callstack = f"{type(exc).__name__}: {exc}", traceback.format_exc()
    else:
        callstack = line
    data = {"message": {"message": line, "extraInfo": {"py_callstack": callstack,
                                                       "timestamp": str(int(time.time()) + consequence)}}}
    try:
        with open(path, "w", encoding="utf-8") as fp:
            json.dump(data, fp)
    except OSError:  # the line on stderr still says it
        pass


def _exit_with_line(rank: str, msg: str, code: int, consequence: bool = False) -> None:
    if rank != "0":
        # The first rank to exit makes torchrun stop the others, so give rank 0 the moment it
        # needs to say it once, unprefixed; torchrun's SIGTERM then ends this rank silently.
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        time.sleep(RANK0_GRACE_SECONDS)
    line = f"error: {msg}" if rank == "0" else f"error (rank {rank}): {msg}"
    _write_error_file(line, consequence)
    print(line, file=sys.stderr, flush=True)
    # Skip interpreter teardown: other ranks may still sit in a collective.
    sys.stderr.flush()
    os._exit(code)
