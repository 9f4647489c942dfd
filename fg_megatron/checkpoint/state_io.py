"""Nested training state (optimizer, scheduler, RNG, data position) <-> safetensors + JSON.

Optimizer and RNG states are nests of dicts/lists/tuples holding tensors and
plain numbers.  ``torch.save`` would pickle them; instead tensors go into a
safetensors file and the structure into JSON, so loading a checkpoint never
unpickles anything.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file


def flatten_state(obj: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """(tensors by key, JSON-able skeleton with ``{"__tensor__": key}`` placeholders)."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            key = f"t{len(tensors)}"
            tensors[key] = x.detach().cpu().contiguous()
            return {"__tensor__": key}
        if isinstance(x, np.ndarray):
            return {"__ndarray__": x.tolist(), "dtype": str(x.dtype)}
        if isinstance(x, dict):
            return {"__dict__": [[walk(k), walk(v)] for k, v in x.items()]}
        if isinstance(x, tuple):
            return {"__tuple__": [walk(v) for v in x]}
        if isinstance(x, list):
            return [walk(v) for v in x]
        if isinstance(x, (np.integer,)):
            return int(x)
        if isinstance(x, (np.floating,)):
            return float(x)
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise TypeError(f"cannot serialise {type(x).__name__} in training state")

    return tensors, walk(obj)


def unflatten_state(tensors: dict[str, torch.Tensor], skeleton: Any) -> Any:
    def walk(x: Any) -> Any:
        if isinstance(x, dict):
            if "__tensor__" in x:
                return tensors[x["__tensor__"]]
            if "__ndarray__" in x:
                return np.array(x["__ndarray__"], dtype=x["dtype"])
            if "__dict__" in x:
                return {walk(k): walk(v) for k, v in x["__dict__"]}
            if "__tuple__" in x:
                return tuple(walk(v) for v in x["__tuple__"])
            raise ValueError(f"unexpected node in training state: {list(x)}")
        if isinstance(x, list):
            return [walk(v) for v in x]
        return x

    return walk(skeleton)


def save_state(obj: Any, path: Path) -> None:
    """Write ``path.safetensors`` (tensors) and ``path.json`` (structure)."""
    tensors, skeleton = flatten_state(obj)
    path = Path(path)
    save_file(tensors, str(path.with_suffix(".safetensors")))
    path.with_suffix(".json").write_text(json.dumps(skeleton), encoding="utf-8")


def load_state(path: Path) -> Any:
    path = Path(path)
    tensors = load_file(str(path.with_suffix(".safetensors")))
    skeleton = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    return unflatten_state(tensors, skeleton)
