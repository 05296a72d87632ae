"""Replicated state stored once per replica group (design section 3).

Under data parallelism (DDP) every rank of a replica group holds the same parameters and
optimizer state. Instead of ``d`` full copies, each rank stores only the tensors it *owns*: the
tensors are dealt out to the ``d`` ranks by size (largest first, each to the least loaded rank,
ties by name), the same way on every rank, and a rank's snapshot holds a small marker (owner,
dtype, shape) in place of every tensor another rank owns. Bytes copied per rank, daemon memory
and bytes coded across the nodes all fall by about ``d``. A restore (every rank restores the
same step) reads its own tensors from its daemon and receives the others from their owners
with one broadcast per owner over the replica group.

Tensors smaller than :data:`MIN_SPLIT_BYTES` stay whole on every rank (they cost more to
route than to keep). A split snapshot is only as safe as the coding behind it: one rank's
share exists on one node, so :class:`~snapshotd_client.TrainingState` splits only where every
rank's daemon codes its data across nodes (``m > 0``).

    >>> import torch
    >>> state = {"w": torch.zeros(1024), "b": torch.zeros(512), "s": torch.zeros(2)}
    >>> owners = plan(entries(state), size=2)
    >>> sorted((path[0], owner) for path, owner in owners.items())
    [('b', 1), ('w', 0)]
    >>> mine = split(state, owners, me=1)
    >>> mine["w"]["__snapshotd_replica__"], type(mine["b"]).__name__, type(mine["s"]).__name__
    (0, 'Tensor', 'Tensor')
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from ._flatten import is_dtensor, local_tensor

#: Tensors smaller than this stay whole on every replica.
MIN_SPLIT_BYTES = 1024
#: The key of the marker that stands for a tensor another replica stores.
MARK = "__snapshotd_replica__"

Path = tuple[Any, ...]


def is_marker(value: Any) -> bool:
    return isinstance(value, dict) and MARK in value


def _plain_leaf(obj: Any) -> bool:
    """A leaf of a data-parallel (DDP) split: a plain tensor or a marker of one."""
    return (is_marker(obj) and "mesh" not in obj) or (
        isinstance(obj, torch.Tensor) and not is_dtensor(obj))


def _dtensor_leaf(obj: Any) -> bool:
    """A leaf of a DTensor split: a DTensor replicated over a mesh dimension, or a marker of
    one."""
    return (is_marker(obj) and "mesh" in obj) or (is_dtensor(obj) and
                                                   replica_dim(obj) is not None)


def _walk(obj: Any, path: Path = (), leaf: Any = _plain_leaf) -> Iterator[tuple[Path, Any]]:
    """(path, leaf) for every leaf (plain tensors and their markers unless ``leaf`` says
    otherwise) in nested dicts, lists and tuples."""
    if leaf(obj):
        yield path, obj
    elif isinstance(obj, dict) and not is_marker(obj):
        for key, value in obj.items():
            yield from _walk(value, (*path, key), leaf)
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _walk(value, (*path, i), leaf)


def _describe(leaf: Any) -> tuple[str, tuple[int, ...]]:
    """dtype and shape of a leaf: a marker's record, a DTensor's local shard, a tensor."""
    if is_marker(leaf):
        return str(leaf["dtype"]), tuple(int(n) for n in leaf["shape"])
    leaf = local_tensor(leaf)
    return str(leaf.dtype).removeprefix("torch."), tuple(leaf.shape)


def _nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    numel = 1
    for n in shape:
        numel *= n
    return numel * torch.empty((), dtype=getattr(torch, dtype)).element_size()


def entries(state: Any, leaf: Any = _plain_leaf) -> list[tuple[Path, str, tuple[int, ...], int]]:
    """(path, dtype, shape, bytes) of every tensor or marker in ``state``."""
    out = []
    for path, value in _walk(state, (), leaf):
        dtype, shape = _describe(value)
        out.append((path, dtype, shape, _nbytes(dtype, shape)))
    return out


def plan(items: list[tuple[Path, str, tuple[int, ...], int]], size: int) -> dict[Path, int]:
    """Which replica (0..size-1) stores each tensor of at least :data:`MIN_SPLIT_BYTES`:
    largest first, each to the least loaded replica (ties: the lowest). The same on every
    replica, since it depends only on names, dtypes and shapes."""
    loads = [0] * size
    owners: dict[Path, int] = {}
    big = [e for e in items if e[3] >= MIN_SPLIT_BYTES]
    for path, _, _, nbytes in sorted(big, key=lambda e: (-e[3], repr(e[0]))):
        owner = loads.index(min(loads))
        owners[path] = owner
        loads[owner] += nbytes
    return owners


def _rebuild(obj: Any, path: Path, fn: Any, leaf: Any = _plain_leaf) -> Any:
    """A copy of the containers of ``obj`` with every leaf replaced by ``fn(path, leaf)``
    (the live state's own dicts, e.g. an optimizer's per-parameter state, are not touched)."""
    if leaf(obj):
        return fn(path, obj)
    if isinstance(obj, dict) and not is_marker(obj):
        return {key: _rebuild(value, (*path, key), fn, leaf) for key, value in obj.items()}
    if isinstance(obj, list):
        return [_rebuild(value, (*path, i), fn, leaf) for i, value in enumerate(obj)]
    if isinstance(obj, tuple):
        return tuple(_rebuild(value, (*path, i), fn, leaf) for i, value in enumerate(obj))
    return obj


def split(state: Any, owners: dict[Path, int], me: int) -> Any:
    """``state`` with a marker in place of every tensor another replica owns."""
    def keep_or_mark(path: Path, leaf: Any) -> Any:
        owner = owners.get(path)
        if owner is None or owner == me:
            return leaf
        dtype, shape = _describe(leaf)
        return {MARK: owner, "dtype": dtype, "shape": list(shape)}
    return _rebuild(state, (), keep_or_mark)


def collective_device(group: Any) -> torch.device:
    """Where tensors for collectives over ``group`` must live: the current CUDA device for
    NCCL, the CPU otherwise (gloo)."""
    import torch.distributed as dist

    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def reassemble(state: Any, group: Any, size: int) -> Any:
    """Fill every marker of ``state`` with the tensor its owner restored: one broadcast per
    owner over ``group`` (every replica calls this with the same step). Raises ValueError if
    the markers do not match the plan (snapshots of different layouts)."""
    import torch.distributed as dist

    me = dist.get_rank(group)
    items = entries(state)
    owners = plan(items, size)
    marked = {path: leaf[MARK] for path, leaf in _walk(state) if is_marker(leaf)}
    wrong = [path for path, owner in marked.items() if owners.get(path) != owner]
    mine_marked = [path for path, owner in marked.items() if owner == me]
    if wrong or mine_marked:
        raise ValueError(f"replica {me}: the snapshot's split does not match its layout "
                         f"(tensors {[p for p in wrong + mine_marked][:4]}); were the ranks' "
                         "snapshots taken with different models?")
    received = _broadcast_shares(owners, items, dict(_walk(state)), group, me, size)
    return _rebuild(state, (), lambda path, leaf: received.get(path, leaf))


def _broadcast_shares(owners: dict[Path, int], items: list[tuple[Path, str, tuple[int, ...], int]],
                      leaves: dict[Path, Any], group: Any, me: int, size: int
                      ) -> dict[Path, torch.Tensor]:
    """One broadcast per owner over ``group`` of the tensors it stores (concatenated bytes):
    the tensors other replicas stored, by path, as CPU tensors of their own memory."""
    import torch.distributed as dist

    shapes = {path: (dtype, shape, nbytes) for path, dtype, shape, nbytes in items}
    received: dict[Path, torch.Tensor] = {}
    device = collective_device(group)
    for owner in range(size):
        paths = sorted((p for p, o in owners.items() if o == owner), key=repr)
        total = sum(shapes[p][2] for p in paths)
        if not paths or total == 0:
            continue
        if owner == me:
            buf = torch.cat([local_tensor(leaves[p]).detach().contiguous().reshape(-1)
                             .view(torch.uint8) for p in paths]).to(device)
        else:
            buf = torch.empty(total, dtype=torch.uint8, device=device)
        dist.broadcast(buf, src=dist.get_global_rank(group, owner), group=group)
        if owner == me:
            continue
        buf = buf.cpu()
        offset = 0
        for p in paths:
            dtype, shape, nbytes = shapes[p]
            # A copy of the slice: its own (aligned) memory for the dtype's view.
            received[p] = buf[offset:offset + nbytes].clone().view(
                getattr(torch, dtype)).reshape(shape)
            offset += nbytes
    return received


# ---------------------------------------------------------------------- DTensor replicas


def replica_dim(t: Any) -> int | None:
    """The first mesh dimension over which DTensor ``t`` is replicated (a ``Replicate()``
    placement on a dimension of more than one rank), or None. The ranks that differ only in
    that coordinate hold the same local tensor: HSDP's replicate dimension, or a tensor-parallel
    dimension for a replicated bias or norm weight."""
    from torch.distributed.tensor.placement_types import Replicate

    mesh = t.device_mesh
    for dim, placement in enumerate(t.placements):
        if isinstance(placement, Replicate) and mesh.size(dim) > 1:
            return dim
    return None


def _group_key(desc: dict[str, Any], dim: int) -> str:
    return json.dumps([desc, dim], sort_keys=True)


def _describe_mesh(mesh: Any, cache: dict[int, tuple[Any, dict[str, Any]]]) -> dict[str, Any]:
    """``describe_mesh(mesh)``, once per mesh object (it costs ~0.2 ms: the rank grid is
    recomputed at every ``mesh.mesh``)."""
    from ._flatten import describe_mesh

    hit = cache.get(id(mesh))
    if hit is None or hit[0] is not mesh:
        hit = cache[id(mesh)] = (mesh, describe_mesh(mesh))
    return hit[1]


def _dtensor_groups(state: Any, meshes: Sequence[Any],
                    cache: dict[int, tuple[Any, dict[str, Any]]] | None = None
                    ) -> dict[str, tuple[Any, int, list[tuple[Path, str, tuple[int, ...], int]]]]:
    """The replicated DTensors (and their markers) of ``state`` by replica group: key ->
    (mesh, mesh dimension, entries). A marker's mesh is found among ``meshes`` by its
    description."""
    cache = {} if cache is None else cache
    known = [(_describe_mesh(m, cache), m) for m in meshes]
    groups: dict[str, tuple[Any, int, list]] = {}
    for path, leaf in _walk(state, (), _dtensor_leaf):
        if is_marker(leaf):
            dim = int(leaf["dim"])
            mesh = next((m for desc, m in known if desc == leaf["mesh"]), None)
            if mesh is None:
                raise ValueError(f"{path}: the snapshot's share of this tensor is held by the "
                                 f"rank at replica {leaf[MARK]} of a mesh no live DTensor is on "
                                 f"({leaf['mesh']}); restore inside the job, on the meshes it "
                                 "saved with")
            desc = leaf["mesh"]
        else:
            found = replica_dim(leaf)
            assert found is not None                        # _dtensor_leaf checked it
            mesh, dim = leaf.device_mesh, found
            desc = _describe_mesh(mesh, cache)
        dtype, shape = _describe(leaf)
        key = _group_key(desc, dim)
        groups.setdefault(key, (mesh, dim, []))[2].append(
            (path, dtype, shape, _nbytes(dtype, shape)))
    return groups


def split_dtensors(state: Any) -> Any:
    """``state`` with a marker in place of every replicated DTensor that another rank of its
    replica group stores. Each replica group (the ranks of one mesh dimension that hold the
    same local tensors) deals its tensors out by size with :func:`plan`, the same on each of
    its ranks; a marker records the DTensor (global shape, stride, placements, mesh) so that
    :func:`reassemble_dtensors` can rebuild it."""
    from ._flatten import _placement_text

    cache: dict[int, tuple[Any, dict[str, Any]]] = {}
    owners: dict[Path, tuple[int, int]] = {}          # path -> (owner, my index in the group)
    for mesh, dim, items in _dtensor_groups(state, (), cache).values():
        me = mesh.get_local_rank(dim)
        for path, owner in plan(items, mesh.size(dim)).items():
            owners[path] = (owner, me)

    def keep_or_mark(path: Path, leaf: Any) -> Any:
        owner, me = owners.get(path, (None, None))
        if owner is None or owner == me:
            return leaf
        dtype, shape = _describe(leaf)
        return {MARK: owner, "dtype": dtype, "shape": list(shape),
                "mesh": _describe_mesh(leaf.device_mesh, cache), "dim": replica_dim(leaf),
                "global": list(leaf.shape), "stride": list(leaf.stride()),
                "placements": [_placement_text(p, repr(path)) for p in leaf.placements]}
    return _rebuild(state, (), keep_or_mark, _dtensor_leaf)


def reassemble_dtensors(state: Any, meshes: Sequence[Any]) -> Any:
    """Fill every DTensor marker of ``state`` (from :func:`split_dtensors`) with the DTensor
    its owner restored: per replica group (in one order on every rank), one broadcast per
    owner over the mesh dimension's process group. Every rank of the job calls this with the
    same step. Raises ValueError if the markers do not match the plan."""

    from ._flatten import _dtensor_type, _placement

    received: dict[Path, Any] = {}
    groups = _dtensor_groups(state, meshes)
    leaves = dict(_walk(state, (), _dtensor_leaf))
    for key in sorted(groups):
        mesh, dim, items = groups[key]
        size, me, group = mesh.size(dim), mesh.get_local_rank(dim), mesh.get_group(dim)
        owners = plan(items, size)
        marked = {p: leaves[p][MARK] for p, *_ in items if is_marker(leaves[p])}
        wrong = [p for p, o in marked.items() if owners.get(p) != o or o == me]
        if wrong:
            raise ValueError(f"replica {me} of mesh dimension {dim}: the snapshot's split does "
                             f"not match its layout (tensors {wrong[:4]}); were the ranks' "
                             "snapshots taken with different models?")
        shares = _broadcast_shares(owners, items, leaves, group, me, size)
        for p, share in shares.items():
            mark = leaves[p]
            with torch.no_grad():
                received[p] = _dtensor_type().from_local(
                    share.to(mesh.device_type), mesh,
                    [_placement(t) for t in mark["placements"]], run_check=False,
                    shape=torch.Size(mark["global"]), stride=tuple(mark["stride"]))
    return _rebuild(state, (), lambda path, leaf: received.get(path, leaf), _dtensor_leaf)


def fill_from_owners(states: dict[int, Any]) -> list[str]:
    """Outside the job (``snapshotctl export``): fill the markers of each rank's snapshot
    (``states``: global rank -> the state a ``read(local_shards=True)`` gave, a TrainingState
    dict) with the owner rank's tensor, in place. A DDP split's owner is its rank in the DDP
    group, taken as the global rank (the default group); a DTensor's is the rank at this rank's
    mesh coordinate with the replica dimension's coordinate replaced. Returns what could not be
    filled (owner not among ``states``), one line per tensor."""
    missing: list[str] = []
    for rank, state in states.items():
        if not isinstance(state, dict) or "replicas" not in state:
            continue
        shared = {"model": state.get("model"), "optimizer": state.get("optimizer")}

        def fill(path: Path, leaf: Any, rank: int = rank) -> Any:
            if not is_marker(leaf):
                return leaf
            owner = _owner_rank(rank, leaf)
            value = states.get(owner) if owner is not None else None
            for key in path if value is not None else ():
                value = value[key] if isinstance(value, (dict, list, tuple)) else None
            if not isinstance(value, torch.Tensor):
                missing.append(f"rank {rank} {path}: stored by rank {owner}")
                return leaf
            return value

        filled = _rebuild(shared, (), fill, lambda o: is_marker(o) or isinstance(o, torch.Tensor))
        state["model"] = filled["model"]
        if state.get("optimizer") is not None:
            state["optimizer"] = filled["optimizer"]
        if not any(m.startswith(f"rank {rank} ") for m in missing):
            del state["replicas"]
    return missing


def _owner_rank(rank: int, marker: dict[str, Any]) -> int | None:
    """The global rank that stores what ``marker`` (in ``rank``'s snapshot) stands for."""
    owner = int(marker[MARK])
    if "mesh" not in marker:
        return owner
    grid = torch.tensor(marker["mesh"]["ranks"])
    where = (grid == rank).nonzero()
    if len(where) != 1:
        return None
    coordinate = where[0].tolist()
    coordinate[int(marker["dim"])] = owner
    return int(grid[tuple(coordinate)])


def marker_names(skeleton: Any) -> set[str]:
    """The snapshot names (as :func:`~snapshotd_client._flatten.flatten` gives them) of the
    tensors that split-replica markers in ``skeleton`` stand for: a restore ``into`` the live
    state leaves those tensors to the reassembly instead of refusing them as missing."""
    from ._flatten import flatten

    paths = [path for path, _ in _walk(skeleton, (), is_marker)]
    if not paths:
        return set()
    root: dict[Any, Any] = {}
    for path in paths:
        node = root
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = torch.empty(0)
    return {e["name"] for e in flatten(root).entries}
