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

A ``DTensor`` (FSDP2, tensor parallel, HSDP) is stored as the rank's local shard, with what places
it in the global tensor: global shape and stride, placements, the mesh (device type, dimension
names, the grid of global ranks), the rank's mesh coordinate and the shard's global offsets, the
facts ``torch.distributed.checkpoint`` records in its metadata (the offsets come from DCP's own
``__create_chunk_list__``). Meshes go into a table at the top of the skeleton, stored once.
On restore at the same world size and mesh a shard is put back into the live ``DTensor`` in
place, or wrapped in a new ``DTensor`` on a live mesh with the recorded placements
(:class:`Placer`); a different mesh, placement or global shape is refused (resharding is not
supported yet).
"""

from __future__ import annotations

import base64
import json
import math
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

try:  # numpy is optional: only needed to snapshot numpy arrays and RNG states
    import numpy as np
except ImportError:  # pragma: no cover
    np = None  # type: ignore[assignment]

from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from ._adapters import adapter_for, adapter_named
from ._protocol import DTYPE_SIZES

__all__ = ["Layout", "LayoutCache", "flatten", "unflatten", "dtype_name", "view_of", "key_name",
           "local_tensor", "is_dtensor", "sharding_of", "describe_mesh", "Placer",
           "ShardingMismatch"]

_ALIGN = 64
_TAGS = ("__tensor__", "__tuple__", "__bytes__", "__float__", "__dict__", "__np__",
         "__ndarray__", "__dtensor__", "__sharded__", "__object__")
#: Version of the ``__sharded__`` envelope (mesh table) around a skeleton holding DTensors.
SHARDED_FORMAT = 1
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


# ---------------------------------------------------------------------- DTensor

_DTENSOR: Any = None


def _dtensor_type() -> Any:
    """``torch.distributed.tensor.DTensor``, or None where torch has no distributed support."""
    global _DTENSOR
    if _DTENSOR is None:
        cls: Any
        try:
            from torch.distributed.tensor import DTensor as cls
        except ImportError:  # pragma: no cover - torch built without distributed
            cls = False
        _DTENSOR = cls
    return _DTENSOR or None


def is_dtensor(t: Any) -> bool:
    """``t`` is a ``torch.distributed.tensor.DTensor`` (without importing it for plain tensors)."""
    if type(t) is torch.Tensor or type(t) is torch.nn.Parameter:
        return False
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The tensor holding ``t``'s bytes on this rank: a DTensor's local shard, else ``t``.

    What the client copies, and so what identifies a tensor guarded by ``protect()``: the same
    parameter reached as ``model.state_dict()[k]`` (a detached DTensor) and as the optimizer's
    ``param`` (the DTensor parameter) has one local tensor storage."""
    if is_dtensor(t):
        return t._local_tensor  # type: ignore[attr-defined]
    return t


def _placement_text(p: Any, path: str) -> str:
    """A placement as text: ``S(0)``, ``_S(0, 2)`` (strided shard), ``R``, ``P(sum)``."""
    from torch.distributed.tensor.placement_types import Partial, Replicate, Shard, _StridedShard

    if isinstance(p, _StridedShard):
        return f"_S({int(p.dim)}, {int(p.split_factor)})"
    if isinstance(p, Shard):
        return f"S({int(p.dim)})"
    if isinstance(p, Replicate):
        return "R"
    if isinstance(p, Partial):
        return f"P({p.reduce_op})"
    raise TypeError(f"{path or '<state>'}: a DTensor placed {p!r} cannot be snapshotted (only "
                    "Shard, Replicate, Partial and strided-shard placements are known); "
                    "redistribute it, or store full_tensor()")


_PLACEMENT = re.compile(r"S\((\d+)\)|_S\((\d+), (\d+)\)|R|P\((\w+)\)")


def _placement(text: str) -> Any:
    from torch.distributed.tensor.placement_types import Partial, Replicate, Shard, _StridedShard

    m = _PLACEMENT.fullmatch(text)
    if m is None:
        raise ValueError(f"snapshot holds DTensor placement {text!r}, which this client does "
                         "not know; restore with the client version that saved it")
    if m.group(1) is not None:
        return Shard(int(m.group(1)))
    if m.group(2) is not None:
        return _StridedShard(int(m.group(2)), split_factor=int(m.group(3)))
    if text == "R":
        return Replicate()
    return Partial(m.group(4))


def describe_mesh(mesh: Any) -> dict[str, Any]:
    """A ``DeviceMesh`` as JSON: device type, dimension names, the grid of global ranks."""
    names = mesh.mesh_dim_names
    return {"device": mesh.device_type, "dims": list(names) if names else None,
            "ranks": mesh.mesh.tolist()}


def _mesh_text(desc: Mapping[str, Any]) -> str:
    shape: list[int] = []
    ranks = desc["ranks"]
    while isinstance(ranks, list):
        shape.append(len(ranks))
        ranks = ranks[0] if ranks else None
    dims = desc.get("dims")
    names = f" {tuple(dims)}" if dims else ""
    return f"{desc['device']} mesh {'x'.join(map(str, shape)) or '()'}{names} ranks {desc['ranks']}"


#: (id(mesh), placements, global shape and stride, local shape) -> (mesh, record without the
#: mesh index): computing a shard's offsets costs tens of microseconds, and a state dict's
#: DTensors are new objects at every save (``detach()``) that share a handful of (mesh,
#: placements, shape). The stride is part of the key: it is part of the record.
_SHARD_CACHE: dict[tuple, tuple[Any, dict[str, Any]]] = {}


def _shard_record(t: Any, local: torch.Tensor, path: str) -> tuple[Any, dict[str, Any]]:
    """Where ``t``'s local shard sits in the global tensor (DCP's chunk metadata and more)."""
    mesh, placements = t.device_mesh, tuple(t.placements)
    key = (id(mesh), placements, tuple(t.shape), t.stride(), tuple(local.shape))
    hit = _SHARD_CACHE.get(key)
    if hit is not None and hit[0] is mesh:
        return hit
    texts = [_placement_text(p, path) for p in placements]
    coordinate = mesh.get_coordinate()
    if coordinate is None:
        raise TypeError(f"{path or '<state>'}: a DTensor on a mesh this rank is not part of "
                        "holds nothing here and cannot be snapshotted; leave it out")
    if any(text.startswith("P(") for text in texts):
        # DCP refuses Partial placements (its chunk list needs a reduction first); the local
        # value is still exactly restorable on the same mesh.
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        sizes, offsets = compute_local_shape_and_global_offset(t.shape, mesh, placements)
    else:
        (chunk,) = t.__create_chunk_list__()          # DCP's ChunkStorageMetadata of the shard
        sizes, offsets = chunk.sizes, chunk.offsets
    if tuple(sizes) != tuple(local.shape):
        raise TypeError(f"{path or '<state>'}: DTensor's local shard has shape "
                        f"{list(local.shape)}, but its placements {texts} on its mesh give "
                        f"{list(sizes)}; it cannot be placed in the global tensor, so it is "
                        "not snapshotted (redistribute it or store full_tensor())")
    record = {"shape": list(t.shape), "stride": list(t.stride()), "placements": texts,
              "coordinate": [int(c) for c in coordinate], "offsets": [int(o) for o in offsets]}
    if len(_SHARD_CACHE) >= 4096:
        _SHARD_CACHE.clear()
    _SHARD_CACHE[key] = (mesh, record)
    return mesh, record


def _sharding_text(rec: Mapping[str, Any], mesh: Mapping[str, Any] | None) -> str:
    where = _mesh_text(mesh) if mesh is not None else "an unknown mesh"
    return (f"global {list(rec['shape'])} placed {rec['placements']} on {where} at coordinate "
            f"{rec['coordinate']} (offsets {rec['offsets']})")


class ShardingMismatch(ValueError):
    """A snapshot's DTensor shards do not fit the live job (another mesh, placement or shape)."""


@dataclass
class Layout:
    """Where each tensor goes: ``entries`` are protocol rows (without checksums).

    ``dtensors`` maps the table index of each DTensor's local shard to the DTensor itself, and
    ``sharding`` to its record (the skeleton's ``__dtensor__`` node, with the mesh inline)."""

    tensors: list[torch.Tensor]
    entries: list[dict[str, Any]]
    meta: str
    nbytes: int
    dtensors: dict[int, Any] = field(default_factory=dict)
    sharding: dict[int, dict[str, Any]] = field(default_factory=dict)
    #: What the client derives from ``entries`` once (the protocol table, its digest, views
    #: into recycled segments); shared by every layout :class:`LayoutCache` reuses.
    plan: dict[str, Any] = field(default_factory=dict)


def flatten(state: Any) -> Layout:
    """Lay out ``state``; raise TypeError naming the path of a value that cannot be stored.

    Nothing is copied: ``Layout.tensors`` are the caller's tensors (detached).
    """
    return _flatten(state)[0]


def _flatten(state: Any) -> tuple[Layout, list[dict[str, Any]], dict[str, Any] | None]:
    """:func:`flatten`; the skeleton's tensor nodes (``__tensor__``, ``__ndarray__``,
    ``__dtensor__``) in walk order, one per tensor reached (a tied one at each path); the
    ``__sharded__`` header (the mesh table), None without DTensors."""
    tensors: list[torch.Tensor] = []
    entries: list[dict[str, Any]] = []
    offset = 0
    seen: dict[tuple, int] = {}   # tensor identity -> index (tied weights are stored once)
    names: set[str] = set()

    meshes: list[dict[str, Any]] = []
    mesh_index: dict[int, tuple[Any, int]] = {}        # id(mesh) -> (mesh, table index)
    dtensors: dict[int, Any] = {}
    sharding: dict[int, dict[str, Any]] = {}
    nodes: list[dict[str, Any]] = []

    def add(t: torch.Tensor, path: str) -> int:
        nonlocal offset
        if t.layout != torch.strided or t.is_quantized:
            raise TypeError(f"{path}: only dense tensors can be snapshotted, got {t.layout}")
        if type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter and (
                is_traceable_wrapper_subclass(t)):
            raise TypeError(f"{path}: a tensor of subclass {type(t).__name__} cannot be "
                            "snapshotted (its bytes are not one dense tensor); store plain "
                            "tensors (DTensors are supported)")
        if t.is_meta:
            raise TypeError(f"{path}: a tensor on the meta device holds no data and cannot be "
                            "snapshotted; materialise it first (e.g. to_empty() and init)")
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
        nodes.append(out)
        return out

    def dtensor(value: Any, path: str) -> dict[str, Any]:
        local = local_tensor(value)           # to_local() without autograd's view
        if is_dtensor(local):
            raise TypeError(f"{path}: a DTensor whose local tensor is a DTensor cannot be "
                            "snapshotted")
        mesh, record = _shard_record(value, local, path)
        known = mesh_index.get(id(mesh))
        if known is None or known[0] is not mesh:
            desc = describe_mesh(mesh)
            index = next((i for i, m in enumerate(meshes) if m == desc), None)
            if index is None:
                meshes.append(desc)
                index = len(meshes) - 1
            mesh_index[id(mesh)] = known = (mesh, index)
        idx = add(local, path)
        node = {"__dtensor__": idx, "mesh": known[1], **record}
        if idx not in dtensors:
            dtensors[idx] = value
            sharding[idx] = {**node, "mesh": meshes[known[1]]}
        nodes.append(node)
        return node

    def walk(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            if is_dtensor(value):
                return dtensor(value, path)
            node = {"__tensor__": add(value, path)}
            nodes.append(node)
            return node
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
        adapter = adapter_for(type(value))
        if adapter is not None:            # snapshotd_client.register_type
            return {"__object__": adapter.name,
                    "v": walk(adapter.to_plain(value), f"{path}/<{adapter.name}>")}
        raise TypeError(f"{path or '<state>'}: cannot snapshot a value of type "
                        f"{type(value).__name__}; convert it to tensors or plain values "
                        "(int, float, str, bool, None, bytes, list, tuple, dict), or "
                        "register an adapter for its type (snapshotd_client.register_type)")

    try:
        skeleton = walk(state, "")
    except RecursionError:
        raise TypeError("<state>: nested too deeply (or contains a reference cycle) to be "
                        "snapshotted") from None
    header = None
    if meshes:
        header = {"format": SHARDED_FORMAT, "meshes": meshes}
        skeleton = {"__sharded__": header, "state": skeleton}
    return Layout(tensors, entries, json.dumps(skeleton, separators=(",", ":")), offset,
                  dtensors, sharding), nodes, header


class _Fallback(Exception):
    """A value the fast scan does not handle: :func:`flatten` lays the state out instead."""


_PLAIN_TOKEN = 0
_FAST_TENSORS = (torch.Tensor, torch.nn.Parameter)
_TAG_SET = frozenset(_TAGS)
_STR, _INT, _STR_INT = {str}, {int}, {str, int}
#: What the fast scan puts where a tensor's skeleton node goes. The skeleton's JSON text is cut
#: at the marker's JSON form, and the nodes' texts (kept per structure) go in between; a plain
#: value of the state that holds the marker shows as one cut too many (laid out afresh then).
_HOLE = "\x00snapshotd:tensor\x00"
_HOLE_JSON = json.dumps(_HOLE)


def _scan(state: Any) -> _Scan:
    """Walk ``state`` the way :func:`flatten` does, for the common value types only (tensors,
    DTensors whose local tensor is a plain tensor, numpy arrays of native byte order, dicts
    with str or int keys, lists, tuples, None, bool, int, str, finite floats); raise
    :class:`_Fallback` on anything else.

    The walk's ``sig`` is the structure's signature (container kinds, keys, each tensor's
    dtype, shape, layout and device, and for a DTensor its mesh, placements, global shape and
    stride; a token per plain value); ``leaves`` the tensors in walk order (a DTensor's local
    tensor) and ``kinds`` their skeleton tags; ``skeleton`` the JSON skeleton with
    :data:`_HOLE` in place of every tensor's node."""
    scan = _Scan()
    try:
        scan.skeleton = scan.walk(state)
    except RecursionError:
        raise _Fallback from None
    return scan


class _Scan:
    """One walk of :func:`_scan` (a method, not a recursive closure: a closure that calls
    itself is a reference cycle, and would keep the state's tensors until the next GC)."""

    def __init__(self) -> None:
        self.sig: list[Any] = []
        self.leaves: list[torch.Tensor] = []
        self.kinds: list[str] = []
        self.skeleton: Any = None
        #: (walk position, DTensor) of every DTensor reached, and their meshes.
        self.dtensors: list[tuple[int, Any]] = []
        self.meshes: list[Any] = []
        self._dtensor = _dtensor_type()

    def walk(self, value: Any) -> Any:
        kind = type(value)
        if kind in _FAST_TENSORS:
            self.sig.append((value.dtype, value.shape, value.layout, value.device))
            self.leaves.append(value)
            self.kinds.append("__tensor__")
            return _HOLE
        if kind is self._dtensor:
            local = value._local_tensor
            if type(local) not in _FAST_TENSORS:
                raise _Fallback
            spec = value._spec
            # The mesh by identity: the cache that compares signatures holds the meshes, so
            # an equal id is the same mesh.
            self.sig.append(("dt", local.dtype, local.shape, local.layout, local.device,
                             id(spec.mesh), spec.placements, value.shape, value.stride()))
            self.dtensors.append((len(self.leaves), value))
            self.meshes.append(spec.mesh)
            self.leaves.append(local)
            self.kinds.append("__dtensor__")
            return _HOLE
        if kind is dict or kind is OrderedDict:
            if len(value) > MAX_CONTAINER:
                raise _Fallback
            keys = tuple(value)
            self.sig.append(keys)
            types = set(map(type, keys))
            if (not types or types == _STR) and _TAG_SET.isdisjoint(keys):
                return {k: self.walk(v) for k, v in value.items()}
            if not types <= _STR_INT:
                raise _Fallback
            self.sig.append(tuple(type(k) is int for k in keys))    # 1 and "1" differ
            return {"__dict__": [[k, self.walk(v)] for k, v in value.items()]}
        if kind is list or kind is tuple:
            if len(value) > MAX_CONTAINER:
                raise _Fallback
            if value and set(map(type, value)) == _INT:   # e.g. Python's RNG state
                self.sig.append((kind, len(value), int))
                items = list(value)
                return items if kind is list else {"__tuple__": items}
            self.sig.append((kind, len(value)))
            items = [self.walk(v) for v in value]
            return items if kind is list else {"__tuple__": items}
        if value is None or kind is bool or kind is int or kind is str:
            self.sig.append(_PLAIN_TOKEN)
            return value
        if kind is float:
            if not math.isfinite(value):
                raise _Fallback
            self.sig.append(_PLAIN_TOKEN)
            return value
        if np is not None and kind is np.ndarray:
            if value.dtype.byteorder == ">" or (value.dtype.byteorder == "=" and
                                                not np.little_endian):
                raise _Fallback
            if value.ndim and not value.flags.c_contiguous:
                raise _Fallback
            try:
                tensor = torch.from_numpy(value)
            except TypeError:
                raise _Fallback from None
            self.sig.append(("nd", tensor.dtype, tensor.shape))
            self.leaves.append(tensor)
            self.kinds.append("__ndarray__")
            return _HOLE
        raise _Fallback


def _ident(t: torch.Tensor) -> tuple | None:
    """What makes two tensors of a state one stored tensor (tied weights); see flatten."""
    return (t.data_ptr(), t.device, t.dtype, tuple(t.shape), t.stride(), t.is_conj(),
            t.is_neg()) if t.numel() else None


@dataclass
class _Cached:
    sig: list[Any]
    index: list[int]               # walk position -> table index
    first: list[int]               # table index -> walk position of its tensor
    entries: list[dict[str, Any]]
    nbytes: int
    plan: dict[str, Any]
    texts: list[str]               # walk position -> its node's JSON (a DTensor's record)
    prefix: str                    # the JSON before the skeleton's (the mesh table), and after
    suffix: str
    sharding: dict[int, dict[str, Any]]
    meshes: list[Any]              # held: the signature names them by id


_SEPARATORS = (",", ":")


class LayoutCache:
    """Lays out states of one structure once: a later state whose structure (containers, keys,
    tensor dtypes, shapes, devices, which tensors are tied; for a DTensor also its mesh,
    placements, global shape and stride) is the same reuses the table, the tensors' skeleton
    nodes (a DTensor's record) and the mesh table, and only the JSON of the plain values is
    rebuilt. Anything else (numpy scalars, tagged values, tensor subclasses other than DTensor,
    a changed structure) goes through :func:`flatten`, whose result is kept for the next
    state. Not thread-safe: one per client, used under its lock."""

    def __init__(self) -> None:
        self._last: _Cached | None = None
        self.hits = 0

    def flatten(self, state: Any) -> Layout:
        """Like :func:`flatten` (same table, skeleton and errors), faster for a state of the
        structure of the previous one."""
        try:
            scan = _scan(state)
        except _Fallback:
            self._last = None
            return flatten(state)
        leaves = scan.leaves
        last = self._last
        if last is not None and last.sig == scan.sig and self._same_ties(leaves, last):
            parts = json.dumps(scan.skeleton, separators=_SEPARATORS).split(_HOLE_JSON)
            if len(parts) == len(last.texts) + 1:     # else a plain value holds the marker
                pieces = [""] * (2 * len(parts) - 1)
                pieces[0::2] = parts
                pieces[1::2] = last.texts
                dtensors: dict[int, Any] = {}
                for pos, value in scan.dtensors:
                    dtensors.setdefault(last.index[pos], value)
                self.hits += 1
                return Layout([leaves[i] for i in last.first], last.entries,
                              last.prefix + "".join(pieces) + last.suffix, last.nbytes,
                              dtensors, last.sharding, plan=last.plan)
        layout, nodes, header = _flatten(state)
        index: list[int] = []
        first: list[int] = []
        seen: dict[tuple, int] = {}
        for pos, t in enumerate(leaves):
            ident = _ident(t)
            if ident is not None and ident in seen:
                index.append(seen[ident])
                continue
            if ident is not None:
                seen[ident] = len(first)
            index.append(len(first))
            first.append(pos)
        if not self._same_walk(scan, index, first, layout, nodes):
            self._last = None                       # not the walk flatten took: no caching
            return layout
        prefix, suffix = "", ""
        if header is not None:
            prefix = '{"__sharded__":' + json.dumps(header, separators=_SEPARATORS) + ',"state":'
            suffix = "}"
        texts = [json.dumps(node, separators=_SEPARATORS) for node in nodes]
        self._last = _Cached(scan.sig, index, first, layout.entries, layout.nbytes, layout.plan,
                             texts, prefix, suffix, layout.sharding, scan.meshes)
        return layout

    @staticmethod
    def _same_walk(scan: _Scan, index: list[int], first: list[int], layout: Layout,
                   nodes: list[dict[str, Any]]) -> bool:
        """The scan met the tensors :func:`flatten` laid out, in its order: each node of
        the same kind and table index, each first one the tensor flatten stored."""
        if len(first) != len(layout.entries) or len(nodes) != len(scan.leaves):
            return False
        for kind, node, idx in zip(scan.kinds, nodes, index):
            if next(iter(node)) != kind or node[kind] != idx:
                return False
        return all(scan.leaves[pos].data_ptr() == t.data_ptr()
                   for pos, t in zip(first, layout.tensors))

    @staticmethod
    def _same_ties(leaves: list[torch.Tensor], last: _Cached) -> bool:
        """The same tensors are tied as in ``last`` (and no others)."""
        firsts = [leaves[i] for i in last.first]
        ptrs = [t.data_ptr() for t in firsts]
        if len(set(ptrs)) != len(ptrs):
            # Some tensors share an address: empty ones (address 0 or anything), a new tie, or
            # two views at one address. Only the non-empty ones decide.
            full = [p for p, t in zip(ptrs, firsts) if t.numel()]
            if len(set(full)) != len(full):
                return False
        for pos, idx in enumerate(last.index):
            if last.first[idx] != pos and _ident(leaves[pos]) != _ident(firsts[idx]):
                return False
        return True


def _envelope(meta: str) -> tuple[Any, list[dict[str, Any]]]:
    """The skeleton and the mesh table of a meta string."""
    root = json.loads(meta)
    if isinstance(root, dict) and "__sharded__" in root:
        header = root["__sharded__"]
        if header.get("format") != SHARDED_FORMAT:
            raise ValueError(f"snapshot holds sharded state of format {header.get('format')!r}"
                             f"; this client reads format {SHARDED_FORMAT}")
        return root["state"], header["meshes"]
    return root, []


def sharding_of(meta: str) -> dict[int, dict[str, Any]]:
    """The DTensor records of a snapshot, by table index (the mesh inline, not an index)."""
    skeleton, meshes = _envelope(meta)
    out: dict[int, dict[str, Any]] = {}

    def visit(node: Any) -> None:
        if isinstance(node, list):
            for v in node:
                visit(v)
        elif isinstance(node, dict):
            if "__dtensor__" in node:
                out.setdefault(node["__dtensor__"], {**node, "mesh": meshes[node["mesh"]]})
                return
            for v in node.values():
                visit(v)

    visit(skeleton)
    return out


def unflatten(meta: str, tensors: list[torch.Tensor], placer: Placer | None = None) -> Any:
    """Rebuild the state from its skeleton and the restored tensors (in table order).

    A DTensor comes back through ``placer`` (the live DTensor filled in place, or a new one on a
    live mesh). Without one, and for a structure-only restore (``meta`` tensors), it comes back
    as a ``meta`` tensor of its global shape."""
    skeleton, _ = _envelope(meta)
    # A module-level function, not a recursive closure: a closure that calls itself is a
    # reference cycle, and restored tensors that map a leased version would stay (and keep
    # the lease) until the next GC run.
    return _build(skeleton, tensors, placer)


def _build(node: Any, tensors: list[torch.Tensor], placer: Placer | None) -> Any:
    if isinstance(node, list):
        return [_build(v, tensors, placer) for v in node]
    if not isinstance(node, dict):
        return node
    if "__tensor__" in node:
        return tensors[node["__tensor__"]]
    if "__dtensor__" in node:
        held = tensors[node["__dtensor__"]]
        if held.is_meta or placer is None:
            return torch.empty(node["shape"], dtype=held.dtype, device="meta")
        return placer.build(node["__dtensor__"], held)
    if "__ndarray__" in node:
        held = tensors[node["__ndarray__"]]
        if held.is_meta:          # a structure-only restore (shapes, no bytes)
            return held
        array = held.numpy()
        return array.astype(node["dtype"]) if "dtype" in node else array
    if "__tuple__" in node:
        return tuple(_build(v, tensors, placer) for v in node["__tuple__"])
    if "__bytes__" in node:
        return base64.b64decode(node["__bytes__"])
    if "__float__" in node:
        return float(node["__float__"])
    if "__np__" in node:
        if "c" in node:
            parts = [_build(v, tensors, placer) for v in node["c"]]
            return np.dtype(node["__np__"]).type(complex(*parts))  # type: ignore[arg-type]
        return np.dtype(node["__np__"]).type(_build(node["v"], tensors, placer))
    if "__object__" in node:
        value = _build(node["v"], tensors, placer)
        if isinstance(value, torch.Tensor) and value.is_meta:
            return value                      # a structure-only restore (shapes, no bytes)
        return adapter_named(node["__object__"]).from_plain(value)
    if "__dict__" in node:
        return {_hashable(_build(k, tensors, placer)): _build(v, tensors, placer)
                for k, v in node["__dict__"]}
    return {k: _build(v, tensors, placer) for k, v in node.items()}


_RESHARD = ("restoring onto another mesh, placement or global shape at the same world size is "
            "not supported (issue 14: at another world size, TrainingState.restore reshards "
            "from memory): restore with the parallelism the job was saved with")


def _same_sharding(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    keys = ("shape", "placements", "coordinate", "offsets", "mesh")
    return all(a[k] == b[k] for k in keys)


class Placer:
    """Puts a snapshot's DTensor shards back, after checking that every one fits the live job.

    Args:
        meta: the snapshot's skeleton (its ``meta`` string).
        names: the snapshot's tensor names, in table order.
        shapes: the local shapes of its tensors, in table order.
        live: the tensors of ``restore(into=...)`` by name; a DTensor among them is filled in
            place (its local tensor) and returned as is.
        meshes: the live ``DeviceMesh`` objects on which a DTensor not in ``live`` (an
            optimizer's moments in a fresh process) is rebuilt with ``DTensor.from_local``;
            the meshes of ``live`` DTensors are candidates too.
        local_shards: return a DTensor not in ``live`` as its local shard, a plain tensor
            (outside the job, e.g. ``snapshotctl export``), instead of rebuilding it.

    Raises :class:`ShardingMismatch` naming every DTensor that does not fit: another global
    shape, placement or mesh, another coordinate of this rank in it, no live mesh with the
    recorded ranks, or a plain tensor where the snapshot holds a DTensor (and vice versa).
    """

    def __init__(self, meta: str, names: Sequence[str], shapes: Sequence[Sequence[int]],
                 live: Mapping[str, Any], meshes: Sequence[Any] = (), *,
                 local_shards: bool = False) -> None:
        records = sharding_of(meta)
        self.local_shards = local_shards
        self._into: dict[int, Any] = {}
        self._place: dict[int, tuple[Any, list[Any], dict[str, Any]]] = {}
        self._built: dict[int, Any] = {}
        candidates: list[Any] = list(meshes) + [t.device_mesh for t in live.values()
                                                if is_dtensor(t)]
        descs: list[tuple[dict[str, Any], Any]] = []
        for mesh in candidates:
            if not any(known is mesh for _, known in descs):
                descs.append((describe_mesh(mesh), mesh))
        problems: list[str] = []
        meshless: dict[str, list[str]] = {}             # mesh text -> names on it
        index = {n: i for i, n in enumerate(names)}
        for idx, rec in records.items():
            name = names[idx]
            target = live.get(name)
            if local_shards and target is None:
                continue
            if target is not None and not is_dtensor(target):
                problems.append(f"{name}: the snapshot holds a DTensor shard "
                                f"({_sharding_text(rec, rec['mesh'])}), the live tensor is a "
                                "plain tensor")
            elif target is not None:
                mesh, mine = _shard_record(target, local_tensor(target), name)
                mine = {**mine, "mesh": describe_mesh(mesh)}
                if _same_sharding(rec, mine):
                    self._into[idx] = target
                else:
                    problems.append(f"{name}: the snapshot holds a shard of "
                                    f"{_sharding_text(rec, rec['mesh'])}, the live tensor is "
                                    f"{_sharding_text(mine, mine['mesh'])}")
            elif not any(desc == rec["mesh"] for desc, _ in descs):
                meshless.setdefault(_mesh_text(rec["mesh"]), []).append(name)
            else:
                problem = self._plan(idx, rec, list(shapes[idx]), descs, name)
                if problem:
                    problems.append(problem)
        for name, t in live.items():
            if is_dtensor(t) and name in index and index[name] not in records:
                problems.append(f"{name}: the live tensor is a DTensor, the snapshot holds a "
                                "plain tensor")
        if problems:
            raise ShardingMismatch(f"{'; '.join(problems[:8])}"
                                   + (f" (and {len(problems) - 8} more)" if len(problems) > 8
                                      else "") + f"; {_RESHARD}")
        if meshless:
            known = "; ".join(_mesh_text(d) for d, _ in descs) or "none"
            held = "; ".join(f"{len(n)} on the {m} ({', '.join(n[:3])}"
                             + (", ..." if len(n) > 3 else "") + ")"
                             for m, n in meshless.items())
            raise ShardingMismatch(
                f"the snapshot holds DTensor shards on meshes that no live DTensor or mesh "
                f"given has: {held} (live meshes: {known}); restore inside the job with its "
                "meshes (TrainingState.restore passes the model's; or restore(meshes=[...]) / "
                "into= the live DTensors), or restore(local_shards=True) for the local shards "
                "as plain tensors")

    def _plan(self, idx: int, rec: dict[str, Any], local_shape: list[int],
              descs: list[tuple[dict[str, Any], Any]], name: str) -> str | None:
        mesh = next(m for desc, m in descs if desc == rec["mesh"])
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        placements = [_placement(p) for p in rec["placements"]]
        coordinate = mesh.get_coordinate()
        sizes, offsets = compute_local_shape_and_global_offset(rec["shape"], mesh, placements)
        if ([int(c) for c in coordinate or ()] != rec["coordinate"]
                or list(sizes) != local_shape or [int(o) for o in offsets] != rec["offsets"]):
            return (f"{name}: the snapshot holds the shard of {_sharding_text(rec, rec['mesh'])}"
                    f" with shape {local_shape}; this rank is at coordinate {coordinate} of that "
                    f"mesh, where the shard has shape {list(sizes)} at offsets {list(offsets)}")
        self._place[idx] = (mesh, placements, rec)
        return None

    def build(self, idx: int, local: torch.Tensor) -> Any:
        """The DTensor for table entry ``idx`` whose restored local shard is ``local``."""
        target = self._into.get(idx)
        if target is not None:
            return target
        if self.local_shards:
            return local
        built = self._built.get(idx)
        if built is not None:                          # tied: one DTensor reached twice
            return built
        mesh, placements, rec = self._place[idx]
        cls = _dtensor_type()
        if local.device.type != mesh.device_type:      # restored on the CPU, mesh on a GPU
            local = local.to(mesh.device_type)
        with torch.no_grad():
            built = cls.from_local(local, mesh, placements, run_check=False,
                                   shape=torch.Size(rec["shape"]), stride=tuple(rec["stride"]))
        self._built[idx] = built
        return built


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
