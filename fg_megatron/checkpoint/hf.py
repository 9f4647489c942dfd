"""The HF side of a checkpoint: ``config.json``, weight files, tokenizer files.

Weights are read one tensor at a time from safetensors (a single
``model.safetensors``, an index ``model.safetensors.index.json`` with its
shards, or unindexed ``*.safetensors`` files).  Nothing is ever unpickled:
:func:`open_hf_weights` is the one place that picks a reader; sharded ``.bin``
files are read only for original ChatGLM checkpoints (``model_type: chatglm``),
through ``torch.load(weights_only=True, mmap=True)``
(:mod:`fg_megatron.checkpoint.chatglm_io`).
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch
from torch import Tensor

from fg_megatron.checkpoint.mapping import CheckpointMismatchError, read_json_object
from fg_megatron.checkpoint.safetensors_io import SafetensorsFile, StreamingWriter, TensorSpec

CONFIG_FILE = "config.json"
SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3  # transformers' default max_shard_size
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".npz")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def read_hf_config(hf_dir: Path) -> dict:
    return read_json_object(Path(hf_dir) / CONFIG_FILE,
                            f"{hf_dir}: no {CONFIG_FILE} (not an HF model directory)")


class HFWeights:
    """HF tensors by name, read lazily from safetensors files."""

    def __init__(self, location: dict[str, Path], source: Path) -> None:
        self._location = location  # HF name -> file that holds it
        self._files: dict[Path, SafetensorsFile] = {}
        self.source = source

    def names(self) -> list[str]:
        return list(self._location)

    def __contains__(self, name: str) -> bool:
        return name in self._location

    def _file(self, name: str) -> SafetensorsFile:
        path = self._location[name]
        if path not in self._files:
            self._files[path] = SafetensorsFile(path)
        handle = self._files[path]
        if name not in handle:
            raise CheckpointMismatchError(f"{self.source}: {SAFE_INDEX} puts {name!r} in {path.name}, "
                                          f"which does not contain it")
        return handle

    def spec(self, name: str) -> TensorSpec:
        return self._file(name).spec(name)

    def get(self, name: str) -> Optional[Tensor]:
        """The tensor, or None when the checkpoint has no such name."""
        return self._file(name).get(name) if name in self._location else None

    def get_meta(self, name: str) -> Optional[Tensor]:
        """A data-less stand-in with the tensor's dtype and shape (for planning)."""
        return self.spec(name).meta_tensor() if name in self._location else None

    def dtype(self) -> torch.dtype:
        """The floating dtype of the weights; an error when they mix several."""
        counts = Counter(self.spec(n).dtype for n in self._location)
        floats = {d: c for d, c in counts.items() if d.is_floating_point}
        if len(floats) != 1:
            found = ", ".join(f"{d} x{c}" for d, c in counts.items()) or "no tensors"
            raise CheckpointMismatchError(
                f"{self.source}: weights mix dtypes ({found}); pass --dtype to convert them to one"
            )
        return next(iter(floats))


def open_hf_weights(hf_dir: Path) -> HFWeights:
    """The weights of an HF directory, whichever safetensors layout it uses."""
    hf_dir = Path(hf_dir)
    index = hf_dir / SAFE_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointMismatchError(f"{index}: not a safetensors index with a 'weight_map' ({exc})") from exc
        location = {name: hf_dir / fname for name, fname in weight_map.items()}
        for path in sorted(set(location.values())):
            if not path.is_file():
                raise CheckpointMismatchError(f"{hf_dir}: shard {path.name} listed in {SAFE_INDEX} is missing")
        return HFWeights(location, hf_dir)
    files = sorted(hf_dir.glob("*.safetensors"))
    if files:
        location: dict[str, Path] = {}
        for path in files:
            for name in SafetensorsFile(path).names():
                if name in location:
                    raise CheckpointMismatchError(
                        f"{hf_dir}: tensor {name!r} is in both {location[name].name} and {path.name} "
                        f"and there is no {SAFE_INDEX} to say which one to use"
                    )
                location[name] = path
        return HFWeights(location, hf_dir)
    pickles = sorted(p.name for p in hf_dir.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        from fg_megatron.checkpoint import chatglm_io

        if chatglm_io.reads_bin(hf_dir):  # original ChatGLM: .bin shards via torch.load(weights_only=True)
            return chatglm_io.open_bin_weights(hf_dir)
        raise CheckpointMismatchError(
            f"{hf_dir}: weights are only in PyTorch pickle files ({', '.join(pickles[:3])}); fg_megatron reads "
            f"safetensors and never unpickles. Re-save the model with "
            f"save_pretrained(dir, safe_serialization=True) first"
        )
    raise CheckpointMismatchError(f"{hf_dir}: no weights found (expected {SAFE_SINGLE} or {SAFE_INDEX})")


def shard_plan(specs: Sequence[TensorSpec], max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> dict[str, list[TensorSpec]]:
    """HF file name -> its tensors, in order, each file at most ``max_shard_bytes``
    (a single tensor larger than that gets a file of its own)."""
    groups: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if groups[-1] and size + spec.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += spec.nbytes
    if len(groups) == 1:
        return {SAFE_SINGLE: groups[0]}
    n = len(groups)
    return {f"model-{i + 1:05d}-of-{n:05d}.safetensors": g for i, g in enumerate(groups)}


def write_hf_weights(out_dir: Path, specs: Sequence[TensorSpec], tensors: Iterable[tuple[str, Tensor]],
                     max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[Path]:
    """Stream ``tensors`` (in any order) into HF safetensors shards planned from ``specs``."""
    plan = shard_plan(specs, max_shard_bytes)
    file_of = {spec.name: fname for fname, group in plan.items() for spec in group}
    writers = {fname: StreamingWriter(Path(out_dir) / fname, group) for fname, group in plan.items()}
    try:
        for name, tensor in tensors:
            writers[file_of[name]].write(name, tensor)
        for writer in writers.values():
            writer.close()
    finally:
        for writer in writers.values():
            writer.abort()
    if len(plan) > 1:
        index = {"metadata": {"total_size": sum(s.nbytes for s in specs)}, "weight_map": file_of}
        (Path(out_dir) / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return [Path(out_dir) / fname for fname in plan]


def is_weight_file(path: Path) -> bool:
    return path.suffix in _WEIGHT_SUFFIXES or path.name.endswith(".index.json")


def copy_side_files(src_dir: Path, dst_dir: Path, skip: Sequence[str] = ()) -> list[str]:
    """Copy the non-weight top-level files of a model directory (tokenizer files,
    ``config.json``, ``generation_config.json``, chat templates, ...)."""
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    copied = []
    if not src_dir.is_dir():
        return copied
    for path in sorted(src_dir.iterdir()):
        if not path.is_file() or path.name.startswith(".") or is_weight_file(path) or path.name in skip:
            continue
        dst_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dst_dir / path.name)
        copied.append(path.name)
    return copied
