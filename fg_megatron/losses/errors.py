"""Argument checks shared by the loss functions.

Losses are pure functions called by trainers with tensors the trainer built;
a wrong shape or an impossible hyperparameter is caught here with one line
that names the argument, its value and the fix.
"""

from __future__ import annotations

from torch import Tensor


class LossArgumentError(ValueError):
    """A loss function was called with a value or tensor it cannot use."""


def check_per_sample(fn: str, **tensors: Tensor) -> None:
    """Every tensor is 1-D ``[B]`` with the same ``B`` (one value per sample)."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    first = next(iter(shapes.values()))
    for name, shape in shapes.items():
        if len(shape) != 1 or shape != first:
            listed = ", ".join(f"{n}={s}" for n, s in shapes.items())
            raise LossArgumentError(
                f"{fn}: per-sample inputs must all be 1-D [B] of one size, got {listed}; "
                f"pass sequence log-likelihoods (sum over response tokens), one per sample")


def check_choice(fn: str, name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise LossArgumentError(f"{fn}: {name}={value!r} is not one of {allowed}")
