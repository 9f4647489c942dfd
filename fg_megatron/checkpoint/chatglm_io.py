"""Original ChatGLM checkpoints in sharded PyTorch ``.bin`` files, read without unpickling code.

THUDM published ChatGLM2/3 as ``pytorch_model-0000N-of-0000M.bin`` shards plus
``pytorch_model.bin.index.json``.  Those are pickles; they are read here only
with ``torch.load(weights_only=True)`` (PyTorch's restricted unpickler: tensors,
dicts and primitive values, never arbitrary objects), memory-mapped where the
file format allows, one file at a time, and only for ``model_type: chatglm``
directories: every other family keeps refusing pickles
(:func:`fg_megatron.checkpoint.hf.open_hf_weights`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from fg_megatron.checkpoint.hf import CONFIG_FILE, HFWeights
from fg_megatron.checkpoint.mapping import CheckpointMismatchError
from fg_megatron.checkpoint.safetensors_io import TensorSpec

BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"


def reads_bin(hf_dir: Path) -> bool:
    """True for an original-layout ChatGLM directory (the only one whose ``.bin`` files we read)."""
    try:
        config = json.loads((Path(hf_dir) / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("model_type") == "chatglm"


def load_bin_file(path: Path) -> dict[str, Tensor]:
    """A ``torch.save``'d dict of tensors, through the restricted unpickler (never plain pickle)."""
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            # Files in the legacy (pre-zip) format cannot be memory-mapped.
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for anything but plain tensors, truncated files, ...
        msg = " ".join(str(exc).split())[:300]
        raise CheckpointMismatchError(f"{path}: not a plain tensor checkpoint readable with "
                                      f"torch.load(weights_only=True): {msg}") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise CheckpointMismatchError(f"{path}: expected a dict of tensor name -> tensor")
    return state


class BinWeights(HFWeights):
    """HF tensors by name from ``.bin`` shards: one file loaded (memory-mapped) at a time."""

    def __init__(self, location: dict[str, Path], source: Path) -> None:
        super().__init__(location, source)
        self._specs: dict[str, TensorSpec] = {}
        self._open: tuple[Optional[Path], dict[str, Tensor]] = (None, {})

    def _state(self, path: Path) -> dict[str, Tensor]:
        if self._open[0] != path:
            self._open = (None, {})  # drop the previous file before mapping the next
            state = load_bin_file(path)
            for name, tensor in state.items():
                self._specs.setdefault(name, TensorSpec.of(name, tensor))
            self._open = (path, state)
        return self._open[1]

    def _tensor(self, name: str) -> Tensor:
        path = self._location[name]
        state = self._state(path)
        if name not in state:
            raise CheckpointMismatchError(f"{self.source}: {BIN_INDEX} puts {name!r} in {path.name}, "
                                          f"which does not contain it")
        return state[name]

    def spec(self, name: str) -> TensorSpec:
        if name not in self._specs:
            self._tensor(name)
        return self._specs[name]

    def get(self, name: str) -> Optional[Tensor]:
        if name not in self._location:
            return None
        return self._tensor(name).clone()  # own memory: the mapping is released with the file


def open_bin_weights(hf_dir: Path) -> BinWeights:
    """The weights of a ChatGLM directory stored as ``.bin`` shards (indexed) or one ``pytorch_model.bin``."""
    hf_dir = Path(hf_dir)
    index = hf_dir / BIN_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            location = {str(name): hf_dir / str(fname) for name, fname in weight_map.items()}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointMismatchError(f"{index}: not a weight index with a 'weight_map' ({exc})") from None
        for path in sorted(set(location.values())):
            if path.parent != hf_dir:
                raise CheckpointMismatchError(f"{index}: shard {path.name!r} must be a file in {hf_dir}")
            if not path.is_file():
                raise CheckpointMismatchError(f"{hf_dir}: shard {path.name} listed in {BIN_INDEX} is missing")
        return BinWeights(location, hf_dir)
    single = hf_dir / BIN_SINGLE
    if single.is_file():
        return BinWeights({name: single for name in load_bin_file(single)}, hf_dir)
    raise CheckpointMismatchError(f"{hf_dir}: no {BIN_INDEX} or {BIN_SINGLE} for the .bin weights")
