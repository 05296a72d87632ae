"""Turn a nested training state into a tensor table plus a JSON skeleton, and back.

Tensors (and numpy arrays) are laid out one after another in a slot, each 64-byte aligned; every
other value goes into a JSON skeleton in which a tensor is ``{"__tensor__": index}``. JSON cannot
execute code when loaded, unlike pickle. Tagged forms keep what JSON would lose: tuples, bytes,
non-finite floats, dicts with non-string keys, numpy scalars and arrays.
"""

from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass
from typing import Any

import torch

try:  # numpy is optional: only needed to snapshot numpy arrays and RNG states
    import numpy as np
except ImportError:  # pragma: no cover
    np = None  # type: ignore[assignment]

__all__ = ["Layout", "flatten", "unflatten", "dtype_name", "view_of"]

_ALIGN = 64
_TAGS = ("__tensor__", "__tuple__", "__bytes__", "__float__", "__dict__", "__np__",
         "__ndarray__")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype:
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"snapshot holds dtype {name!r}, which this torch does not know")
    return value


@dataclass
class Layout:
    """Where each tensor goes: ``entries`` are protocol rows (without checksums)."""

    tensors: list[torch.Tensor]
    entries: list[dict[str, Any]]
    meta: str
    nbytes: int


def flatten(state: Any) -> Layout:
    """Lay out ``state``; raise TypeError naming the path of a value that cannot be stored."""
    tensors: list[torch.Tensor] = []
    entries: list[dict[str, Any]] = []
    offset = 0
    names: set[str] = set()

    def add(t: torch.Tensor, path: str) -> int:
        nonlocal offset
        if t.layout != torch.strided or t.is_quantized:
            raise TypeError(f"{path}: only dense tensors can be snapshotted, got {t.layout}")
        name = path if path not in names else f"{path}#{len(tensors)}"
        names.add(name)
        nbytes = t.numel() * t.element_size()
        entries.append({"name": name, "dtype": dtype_name(t.dtype), "shape": list(t.shape),
                        "offset": offset, "nbytes": nbytes})
        tensors.append(t.detach())
        offset += -(-nbytes // _ALIGN) * _ALIGN
        return len(tensors) - 1

    def walk(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            return {"__tensor__": add(value, path)}
        if np is not None and isinstance(value, np.ndarray):
            return {"__ndarray__": add(torch.from_numpy(np.ascontiguousarray(value)), path)}
        if value is None or isinstance(value, (bool, int, str)):
            return value
        if isinstance(value, float):
            return value if math.isfinite(value) else {"__float__": repr(value)}
        if np is not None and isinstance(value, np.generic):
            return {"__np__": value.dtype.str, "v": walk(value.item(), path)}
        if isinstance(value, (bytes, bytearray)):
            return {"__bytes__": base64.b64encode(value).decode()}
        if isinstance(value, tuple):
            return {"__tuple__": [walk(v, f"{path}/{i}") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [walk(v, f"{path}/{i}") for i, v in enumerate(value)]
        if isinstance(value, dict):
            if all(isinstance(k, str) and k not in _TAGS for k in value):
                return {k: walk(v, f"{path}/{k}") for k, v in value.items()}
            return {"__dict__": [[walk(k, f"{path}/<key>"), walk(v, f"{path}/{k}")]
                                 for k, v in value.items()]}
        raise TypeError(f"{path or '<state>'}: cannot snapshot a value of type "
                        f"{type(value).__name__}; convert it to tensors or plain values "
                        "(int, float, str, bool, None, bytes, list, tuple, dict)")

    skeleton = walk(state, "")
    return Layout(tensors, entries, json.dumps(skeleton, separators=(",", ":")), offset)


def unflatten(meta: str, tensors: list[torch.Tensor]) -> Any:
    """Rebuild the state from its skeleton and the restored tensors (in table order)."""

    def build(node: Any) -> Any:
        if isinstance(node, list):
            return [build(v) for v in node]
        if not isinstance(node, dict):
            return node
        if "__tensor__" in node:
            return tensors[node["__tensor__"]]
        if "__ndarray__" in node:
            return tensors[node["__ndarray__"]].numpy()
        if "__tuple__" in node:
            return tuple(build(v) for v in node["__tuple__"])
        if "__bytes__" in node:
            return base64.b64decode(node["__bytes__"])
        if "__float__" in node:
            return float(node["__float__"])
        if "__np__" in node:
            return np.dtype(node["__np__"]).type(build(node["v"]))
        if "__dict__" in node:
            return {_hashable(build(k)): build(v) for k, v in node["__dict__"]}
        return {k: build(v) for k, v in node.items()}

    return build(json.loads(meta))


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, list) else key


def view_of(buf: Any, entry: dict[str, Any]) -> torch.Tensor:
    """A tensor viewing ``entry``'s bytes inside a mapped slot (no copy)."""
    dtype = _dtype(entry["dtype"])
    if entry["nbytes"] == 0:
        return torch.empty(entry["shape"], dtype=dtype)
    raw = torch.frombuffer(buf, dtype=torch.uint8, count=entry["nbytes"], offset=entry["offset"])
    return raw.view(dtype).view(entry["shape"])
