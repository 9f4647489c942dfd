"""safetensors files read lazily and written one tensor at a time.

Reading parses the header and ``pread``s one tensor per ``get`` into memory
this process owns (see :class:`SafetensorsFile` for why not a memory map).  Writing
uses :class:`StreamingWriter`: the file's tensor list (names, dtypes, shapes)
is known in advance, so the header and every tensor's byte range are fixed
before any data arrives and tensors can then be written in any order, one at
a time.  Peak memory is one tensor, whatever the size of the file.

The layout written is the standard one (8-byte little-endian header length,
JSON header padded with spaces to 8 bytes, tensors back to back in header
order), so ``safetensors.safe_open`` and transformers read the files.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor

from fg_megatron.checkpoint.mapping import CheckpointMismatchError

ST_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
TORCH_DTYPES: dict[str, torch.dtype] = {v: k for k, v in ST_DTYPES.items()}


@dataclass(frozen=True)
class TensorSpec:
    """What a file will hold under one name: dtype and shape, no data."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        numel = 1
        for d in self.shape:
            numel *= d
        return numel * torch.empty((), dtype=self.dtype).element_size()

    def meta_tensor(self) -> Tensor:
        """A data-less tensor of this spec: conversions run on these to plan files."""
        return torch.empty(self.shape, dtype=self.dtype, device="meta")

    @classmethod
    def of(cls, name: str, tensor: Tensor) -> "TensorSpec":
        return cls(name, tensor.dtype, tuple(tensor.shape))


_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit


class SafetensorsFile:
    """One safetensors file opened lazily: header now, tensor data on ``get``.

    Data is read with ``pread`` into a fresh tensor rather than through the
    ``safetensors`` library's memory map: mapped pages of every tensor read
    would stay resident in this process for as long as the file is open, so a
    streamed conversion would look (and, under a memory cgroup, count) as big
    as the checkpoint.  The header is parsed and bounds-checked here; the tests
    check both directions against the library.
    """

    def __init__(self, path: Path) -> None:
        self._fd: Optional[int] = None
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointMismatchError(f"missing weights file {self.path}")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < n <= min(_MAX_HEADER_BYTES, size - 8):
                raise CheckpointMismatchError(f"{self.path}: not a safetensors file (bad header length)")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise CheckpointMismatchError(f"{self.path}: not a safetensors file ({exc})") from exc
        if not isinstance(header, dict):
            raise CheckpointMismatchError(f"{self.path}: not a safetensors file (header is not an object)")
        self._metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        self._entries: dict[str, tuple[TensorSpec, int]] = {}
        for name, entry in header.items():
            self._entries[name] = self._parse_entry(name, entry, size - self._data_start)

    def _parse_entry(self, name: str, entry, data_bytes: int) -> tuple[TensorSpec, int]:
        try:
            dtype = TORCH_DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointMismatchError(f"{self.path}: bad header entry for tensor {name!r} ({exc!r})") from exc
        spec = TensorSpec(name, dtype, shape)
        if min(shape, default=0) < 0 or not 0 <= begin <= end <= data_bytes or end - begin != spec.nbytes:
            raise CheckpointMismatchError(f"{self.path}: tensor {name!r} has inconsistent offsets "
                                          f"[{begin}, {end}) for {entry['dtype']} {list(shape)}")
        return spec, begin

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def metadata(self) -> dict[str, str]:
        return dict(self._metadata)

    def spec(self, name: str) -> TensorSpec:
        self._require(name)
        return self._entries[name][0]

    def get(self, name: str) -> Tensor:
        self._require(name)
        spec, begin = self._entries[name]
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        data = torch.empty(spec.nbytes, dtype=torch.uint8)
        view = memoryview(data.numpy())
        done = 0
        while done < spec.nbytes:
            n = os.preadv(self._fd, [view[done:]], self._data_start + begin + done)
            if n <= 0:
                raise CheckpointMismatchError(f"{self.path}: file ends inside tensor {name!r}")
            done += n
        return data.view(spec.dtype).reshape(spec.shape)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        self.close()

    def _require(self, name: str) -> None:
        if name not in self._entries:
            raise CheckpointMismatchError(f"{self.path}: no tensor named {name!r}")


class StreamingWriter:
    """Write one safetensors file whose tensor list is fixed up front.

    ``write`` may be called in any order, once per planned tensor; ``close``
    checks that every planned tensor arrived.  Use as a context manager: on an
    exception the partial file is closed and left for the caller's temporary
    directory to discard.
    """

    def __init__(self, path: Path, specs: Sequence[TensorSpec],
                 metadata: Optional[dict[str, str]] = None) -> None:
        assert sys.byteorder == "little", "safetensors stores little-endian data"
        header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
        self._slots: dict[str, tuple[TensorSpec, int]] = {}
        offset = 0
        for spec in specs:
            if spec.name in self._slots:
                raise ValueError(f"{path}: tensor {spec.name!r} planned twice")
            if spec.dtype not in ST_DTYPES:
                raise ValueError(f"{path}: tensor {spec.name!r} has unsupported dtype {spec.dtype}")
            end = offset + spec.nbytes
            header[spec.name] = {"dtype": ST_DTYPES[spec.dtype], "shape": list(spec.shape),
                                 "data_offsets": [offset, end]}
            self._slots[spec.name] = (spec, offset)
            offset = end
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # the format aligns the data start to 8 bytes
        self.path = Path(path)
        self._data_start = 8 + len(raw)
        self._written: set[str] = set()
        self._file = open(self.path, "wb")
        self._file.write(struct.pack("<Q", len(raw)))
        self._file.write(raw)
        self._file.truncate(self._data_start + offset)  # sparse until written
        self.nbytes = self._data_start + offset

    def write(self, name: str, tensor: Tensor) -> None:
        if name not in self._slots:
            raise RuntimeError(f"{self.path}: tensor {name!r} was not planned for this file")
        if name in self._written:
            raise RuntimeError(f"{self.path}: tensor {name!r} written twice")
        spec, offset = self._slots[name]
        if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise RuntimeError(
                f"{self.path}: tensor {name!r} is {tensor.dtype} {list(tensor.shape)}, "
                f"planned {spec.dtype} {list(spec.shape)}"
            )
        data = tensor.detach().to("cpu").contiguous()
        self._file.seek(self._data_start + offset)
        if data.numel():
            # Byte view of the tensor's own storage: no copy.
            self._file.write(data.reshape(-1).view(torch.uint8).numpy().data)
        self._written.add(name)

    def close(self) -> None:
        if self._file.closed:
            return
        missing = [n for n in self._slots if n not in self._written]
        if missing:
            self._file.close()
            raise RuntimeError(f"{self.path}: {len(missing)} planned tensors never written, e.g. {missing[0]!r}")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()

    def __enter__(self) -> "StreamingWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_file(path: Path, tensors: dict[str, Tensor], metadata: Optional[dict[str, str]] = None) -> int:
    """Write tensors already in memory (e.g. a live model's shard); returns bytes written."""
    specs = [TensorSpec.of(n, t) for n, t in tensors.items()]
    with StreamingWriter(path, specs, metadata) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)
    return writer.nbytes
