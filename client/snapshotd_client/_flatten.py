"""Turn a nested training state into a tensor table plus a JSON skeleton, and back.

Tensors (and numpy arrays) are laid out one after another in a slot, each 64-byte aligned; every
other value goes into a JSON skeleton in which a tensor is ``{"__tensor__": index}``. JSON cannot
execute code when loaded, unlike pickle. Tagged forms keep what JSON would lose: tuples, bytes,
non-finite floats, dicts with non-string keys, numpy scalars and arrays (0-d and non-native byte
order included).

Every tensor has a *name*, its path in the state, which ``restore(into=...)`` matches on. Names
are unambiguous: each path component is a dict key or a list/tuple index, a ``/`` or ``%`` inside
a string key is percent-escaped, a string key made only of digits has its first digit escaped
(so ``{"0": a}`` and ``{0: a}`` differ) and any other key type is written as ``%type:repr``.
The same tensor reached by two paths (tied weights) is stored once and comes back as one tensor.
"""

from __future__ import annotations

import base64
import json
import math
import re
from dataclasses import dataclass
from typing import Any

import torch

try:  # numpy is optional: only needed to snapshot numpy arrays and RNG states
    import numpy as np
except ImportError:  # pragma: no cover
    np = None  # type: ignore[assignment]

from ._protocol import DTYPE_SIZES

__all__ = ["Layout", "flatten", "unflatten", "dtype_name", "view_of", "key_name"]

_ALIGN = 64
_TAGS = ("__tensor__", "__tuple__", "__bytes__", "__float__", "__dict__", "__np__",
         "__ndarray__")
_DIGITS = re.compile(r"-?[0-9]+")
#: Largest list, tuple or dict kept as plain values: a larger one belongs in a tensor (a
#: 10-million-element permutation would cost seconds on the training thread, every save).
MAX_CONTAINER = 1 << 20


def key_name(key: Any) -> str:
    """The path component of a dict key; distinct keys always give distinct components."""
    if isinstance(key, str):
        name = key.replace("%", "%25").replace("/", "%2F")
        if _DIGITS.fullmatch(name):
            name = f"%{ord(name[0]):02X}{name[1:]}"
        return name
    if isinstance(key, int) and not isinstance(key, bool):
        return str(key)
    return f"%{type(key).__name__}:" + repr(key).replace("%", "%25").replace("/", "%2F")


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
    """Lay out ``state``; raise TypeError naming the path of a value that cannot be stored.

    Nothing is copied: ``Layout.tensors`` are the caller's tensors (detached).
    """
    tensors: list[torch.Tensor] = []
    entries: list[dict[str, Any]] = []
    offset = 0
    seen: dict[tuple, int] = {}   # tensor identity -> index (tied weights are stored once)
    names: set[str] = set()

    def add(t: torch.Tensor, path: str) -> int:
        nonlocal offset
        if t.layout != torch.strided or t.is_quantized:
            raise TypeError(f"{path}: only dense tensors can be snapshotted, got {t.layout}")
        dtype = dtype_name(t.dtype)
        if dtype not in DTYPE_SIZES:
            raise TypeError(f"{path}: tensors of dtype {t.dtype} cannot be snapshotted (no "
                            f"copy kernel or byte layout for it); convert it, e.g. "
                            f".view(torch.uint8) or .to(torch.float32)")
        ident = (t.data_ptr(), t.device, t.dtype, tuple(t.shape), t.stride(), t.is_conj(),
                 t.is_neg()) if t.numel() else None
        if ident is not None and ident in seen:
            return seen[ident]
        if path in names:
            raise TypeError(f"{path}: two values of the state have this same name (dict keys "
                            "with equal text, such as two NaN keys); make the keys distinct")
        names.add(path)
        nbytes = t.numel() * t.element_size()
        entries.append({"name": path, "dtype": dtype, "shape": list(t.shape),
                        "offset": offset, "nbytes": nbytes})
        tensors.append(t.detach())
        offset += -(-nbytes // _ALIGN) * _ALIGN
        if ident is not None:
            seen[ident] = len(tensors) - 1
        return len(tensors) - 1

    def array(value: Any, path: str) -> dict[str, Any]:
        if value.dtype.byteorder == ">" or (value.dtype.byteorder == "=" and
                                           not np.little_endian):
            native = value.astype(value.dtype.newbyteorder("="))
        else:
            native = value
        if value.ndim and not native.flags.c_contiguous:
            native = np.ascontiguousarray(native)
        try:
            tensor = torch.from_numpy(native)
        except TypeError:
            raise TypeError(f"{path}: numpy arrays of dtype {value.dtype} have no torch "
                            "equivalent and cannot be snapshotted; convert them (e.g. "
                            ".astype(np.float64))") from None
        out: dict[str, Any] = {"__ndarray__": add(tensor, path)}
        if native.dtype.str != value.dtype.str:
            out["dtype"] = value.dtype.str
        return out

    def walk(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            return {"__tensor__": add(value, path)}
        if isinstance(value, (list, tuple, dict)) and len(value) > MAX_CONTAINER:
            raise TypeError(f"{path or '<state>'}: a {type(value).__name__} of {len(value)} "
                            f"elements (over {MAX_CONTAINER}) is too large for plain values; "
                            "store it as a tensor, e.g. torch.tensor(values)")
        if np is not None and isinstance(value, np.ndarray):
            return array(value, path)
        if np is not None and isinstance(value, np.generic):
            item = value.item()
            if isinstance(item, np.generic) or not isinstance(
                    item, (bool, int, float, complex, str, bytes)):
                raise TypeError(f"{path or '<state>'}: numpy scalars of type "
                                f"{type(value).__name__} cannot be snapshotted; convert it "
                                "(e.g. float(x))")
            if isinstance(item, complex):
                return {"__np__": value.dtype.str, "c": [walk(item.real, path),
                                                          walk(item.imag, path)]}
            return {"__np__": value.dtype.str, "v": walk(item, path)}
        if value is None or isinstance(value, (bool, int, str)):
            return value
        if isinstance(value, float):
            return value if math.isfinite(value) else {"__float__": repr(float(value))}
        if isinstance(value, (bytes, bytearray)):
            return {"__bytes__": base64.b64encode(value).decode()}
        if isinstance(value, tuple):
            return {"__tuple__": [walk(v, f"{path}/{i}") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [walk(v, f"{path}/{i}") for i, v in enumerate(value)]
        if isinstance(value, dict):
            if all(isinstance(k, str) and k not in _TAGS for k in value):
                return {k: walk(v, f"{path}/{key_name(k)}") for k, v in value.items()}
            return {"__dict__": [[walk(k, f"{path}/<key>"), walk(v, f"{path}/{key_name(k)}")]
                                 for k, v in value.items()]}
        raise TypeError(f"{path or '<state>'}: cannot snapshot a value of type "
                        f"{type(value).__name__}; convert it to tensors or plain values "
                        "(int, float, str, bool, None, bytes, list, tuple, dict)")

    try:
        skeleton = walk(state, "")
    except RecursionError:
        raise TypeError("<state>: nested too deeply (or contains a reference cycle) to be "
                        "snapshotted") from None
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
            held = tensors[node["__ndarray__"]]
            if held.is_meta:          # a structure-only restore (shapes, no bytes)
                return held
            array = held.numpy()
            return array.astype(node["dtype"]) if "dtype" in node else array
        if "__tuple__" in node:
            return tuple(build(v) for v in node["__tuple__"])
        if "__bytes__" in node:
            return base64.b64decode(node["__bytes__"])
        if "__float__" in node:
            return float(node["__float__"])
        if "__np__" in node:
            if "c" in node:
                return np.dtype(node["__np__"]).type(complex(*map(build, node["c"])))  # type: ignore[arg-type]
            return np.dtype(node["__np__"]).type(build(node["v"]))
        if "__dict__" in node:
            return {_hashable(build(k)): build(v) for k, v in node["__dict__"]}
        return {k: build(v) for k, v in node.items()}

    return build(json.loads(meta))


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, list) else key


def view_of(buf: Any, entry: dict[str, Any], device: str | None = None) -> torch.Tensor:
    """A tensor viewing ``entry``'s bytes inside a mapped slot (no copy); with
    ``device="meta"``, a tensor of its dtype and shape holding no bytes."""
    dtype = _dtype(entry["dtype"])
    if device == "meta":
        return torch.empty(entry["shape"], dtype=dtype, device="meta")
    if entry["nbytes"] == 0:
        return torch.empty(entry["shape"], dtype=dtype)
    raw = torch.frombuffer(buf, dtype=torch.uint8, count=entry["nbytes"], offset=entry["offset"])
    return raw.view(dtype).view(entry["shape"])
