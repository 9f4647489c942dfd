"""GPU memory sizes and the allowance the planner keeps free on them.

Sizes are the total capacity torch reports (``torch.cuda.get_device_properties(0).total_memory``,
as printed in its out-of-memory messages), not the marketing GB.  The planner's
``peak_bytes`` models what ``torch.cuda.max_memory_allocated`` measures; the verdict keeps
a reserve on top: ``RESERVE_FIXED`` for the CUDA context, cuBLAS workspaces and NCCL
communicator buffers (none of which the caching allocator counts) plus
``RESERVE_FRACTION`` of the peak for allocator fragmentation.
"""

from __future__ import annotations

from typing import Optional

GiB = 1 << 30

GPUS: dict[str, int] = {
    "a100-40g": int(39.39 * GiB),
    "a100-80g": int(79.15 * GiB),
    "h100-80g": int(79.11 * GiB),
    "h200": int(139.80 * GiB),
}
RESERVE_FIXED = 2 * GiB
RESERVE_FRACTION = 0.05


def required_bytes(peak_bytes: int) -> int:
    """Device memory a process with this allocator peak needs."""
    return int(peak_bytes * (1 + RESERVE_FRACTION)) + RESERVE_FIXED


def fits(peak_bytes: int, gpu: Optional[str]) -> Optional[bool]:
    return None if gpu is None else required_bytes(peak_bytes) <= GPUS[gpu]
