"""How entry points fail: one line naming what and where, a non-zero exit."""

from __future__ import annotations

import os
import sys
import time
from typing import Callable

# User-facing errors: bad config, data, checkpoint or layout.  Anything else is a
# bug and keeps its traceback.
def _user_errors() -> tuple[type[BaseException], ...]:
    from fg_megatron.checkpoint.mapping import CheckpointMismatchError
    from fg_megatron.config import ConfigError
    from fg_megatron.data import DataFormatError
    from fg_megatron.losses import LossArgumentError
    from fg_megatron.models.arch import ModelConfigError
    from fg_megatron.parallel import ParallelLayoutError
    from fg_megatron.trainers.engine import NonFiniteLossError

    errors: list[type[BaseException]] = [CheckpointMismatchError, ConfigError, DataFormatError,
                                         LossArgumentError, ModelConfigError, ParallelLayoutError,
                                         NonFiniteLossError, FileNotFoundError]
    try:
        from fg_megatron.checkpoint.atomic import OutputExistsError

        errors.append(OutputExistsError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


RANK0_GRACE_SECONDS = 2.0


def run_cli(fn: Callable[[], object]) -> None:
    """Run an entry point; user errors print ``error: <one line>`` (rank 0, or the
    failing rank) and exit with status 2."""
    try:
        fn()
    except _user_errors() as exc:
        rank = os.environ.get("RANK", "0")
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if rank != "0":
            # Most bad input fails on every rank at once; the first rank to exit makes torchrun
            # stop the others, so give rank 0 the moment it needs to say it once, unprefixed.
            time.sleep(RANK0_GRACE_SECONDS)
        print(f"error: {msg}" if rank == "0" else f"error (rank {rank}): {msg}", file=sys.stderr, flush=True)
        # Skip interpreter teardown: other ranks may still sit in a collective.
        sys.stderr.flush()
        os._exit(2)
