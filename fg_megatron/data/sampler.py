"""Global batches grouped by length, and their split over DP ranks and micro-batches.

One optimizer step consumes one *global batch* of ``G`` sample indices, the same for
every parallel layout.  Each epoch:

1. drop ``n mod G`` samples of a seeded permutation (different ones each epoch), so
   every global batch is full;
2. cut the permutation into buffers of ``group_batches * G`` samples and sort each
   buffer by length: neighbours in a buffer have similar lengths, so a global batch
   cut from it (and each micro-batch) wastes little padding;
3. cut the buffers into global batches and shuffle their order (seeded), so long and
   short batches alternate instead of drifting through the epoch.

A global batch lists its samples by length; :func:`split_global_batch` cuts it into
``G / mbs`` micro-batches of consecutive samples and deals them round-robin to the DP
ranks.  The micro-batches are therefore the same for any DP size (and TP/PP never
changes them): only which rank runs which differs.

The position ``(epoch, batch)`` is the whole state: :meth:`GlobalBatchSampler.state_dict`
and ``load_state_dict`` resume exactly.
"""

from __future__ import annotations

from typing import Iterator, Optional, Sequence

import numpy as np

from fg_megatron.data.errors import DataFormatError


class GlobalBatchSampler:
    """Deterministic, resumable, length-grouped global batches of dataset indices."""

    def __init__(self, lengths: Sequence[int], global_batch_size: int, *, seed: int, shuffle: bool = True,
                 group_batches: int = 16, source: Optional[str] = None,
                 batch_field: str = "train.global_batch_size") -> None:
        """``source`` (the data file) and ``batch_field`` (the config field that set ``global_batch_size``)
        name what to fix when the data holds less than one batch."""
        self.lengths = np.asarray(lengths, dtype=np.int64)
        n = len(self.lengths)
        if global_batch_size < 1:
            raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
        if n < global_batch_size:
            raise DataFormatError(source or "the dataset", None,
                                  f"{n} sample{'s' if n != 1 else ''}, fewer than one global batch "
                                  f"({batch_field}={global_batch_size}); lower {batch_field} or add data")
        if group_batches < 0:
            raise ValueError(f"group_batches must be >= 0 (0: no length grouping), got {group_batches}")
        self.global_batch_size = global_batch_size
        self.seed = int(seed)
        self.shuffle = shuffle
        self.group_batches = group_batches
        self.epoch = 0
        self.batch_in_epoch = 0
        self._cache: tuple[int, list[list[int]]] = (-1, [])

    @property
    def batches_per_epoch(self) -> int:
        return len(self.lengths) // self.global_batch_size

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """All global batches of ``epoch``, each sorted by length (ties keep the permutation order)."""
        if self._cache[0] == epoch:
            return self._cache[1]
        g, n = self.global_batch_size, len(self.lengths)
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        order = order[: n - n % g]
        if self.group_batches > 0:
            buf = self.group_batches * g
            chunks = [order[i:i + buf] for i in range(0, len(order), buf)]
            order = np.concatenate([c[np.argsort(self.lengths[c], kind="stable")] for c in chunks])
        batches = order.reshape(-1, g)
        if self.shuffle:
            batches = batches[rng.permutation(len(batches))]
        out = [b[np.argsort(self.lengths[b], kind="stable")].tolist() for b in batches]
        self._cache = (epoch, out)
        return out

    def next_batch(self) -> list[int]:
        """The next global batch; advances the position (and the epoch at its end)."""
        batches = self.epoch_batches(self.epoch)
        batch = batches[self.batch_in_epoch]
        self.batch_in_epoch += 1
        if self.batch_in_epoch == len(batches):
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        return batch

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "seed": self.seed,
                "global_batch_size": self.global_batch_size, "num_samples": len(self.lengths),
                "shuffle": self.shuffle, "group_batches": self.group_batches}

    def load_state_dict(self, state: dict) -> None:
        """Resume at ``state``'s position.  The order depends on the seed, batch size, data size and
        grouping: a checkpoint taken with different ones would silently see other samples, so refuse."""
        mine = self.state_dict()
        for key in ("seed", "global_batch_size", "num_samples", "shuffle", "group_batches"):
            if state.get(key) != mine[key]:
                raise ValueError(f"cannot resume the data order: the checkpoint has {key}={state.get(key)!r}, "
                                 f"this run has {mine[key]!r}")
        if not 0 <= state["batch_in_epoch"] < self.batches_per_epoch:
            raise ValueError(f"data position batch_in_epoch={state['batch_in_epoch']} is outside the epoch "
                             f"of {self.batches_per_epoch} batches")
        self.epoch, self.batch_in_epoch = int(state["epoch"]), int(state["batch_in_epoch"])


def split_global_batch(batch: Sequence[int], dp_size: int, dp_rank: int, micro_batch_size: int) -> list[list[int]]:
    """This DP rank's micro-batches of a global batch.

    Micro-batch ``k`` is ``batch[k*mbs:(k+1)*mbs]`` and runs on rank ``k % dp_size``; so the
    micro-batches, and their union over ranks, are the same for every ``dp_size``.
    """
    g = len(batch)
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} is outside 0..{dp_size - 1}")
    if micro_batch_size < 1 or g % (dp_size * micro_batch_size):
        raise ValueError(f"train.global_batch_size={g} must be a multiple of data-parallel size {dp_size} x "
                         f"train.micro_batch_size={micro_batch_size}")
    micro = [list(batch[k:k + micro_batch_size]) for k in range(0, g, micro_batch_size)]
    return micro[dp_rank::dp_size]
