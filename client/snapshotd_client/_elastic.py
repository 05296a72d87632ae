"""Restore at another world size from memory (issue 14): the job's ranks read the saved shards
that overlap their new ones from the daemons that hold them, resharded by DCP's planners.

A job restarted with another number of ranks (a node lost and not replaced, a job scaled up or
down) finds its last layout's versions on the daemons of its nodes (a job restarted at the same
size with its ranks on other nodes restores each rank's own version, read through its daemon:
``TrainingState.restore``). :func:`survey` lists them on every rank (one
``all_gather_object``); the newest step that every rank of one saved layout holds somewhere is
restored:

1. Every old rank's version is read by one new rank whose daemon holds it (its *holder*: the
   lowest such rank). From the snapshots' skeletons and DTensor records (global shape, the
   shard's offsets: DCP's chunk metadata) the ranks build one DCP ``Metadata`` of the saved
   global state (replicated copies de-duplicated; a split replica's chunk comes from the rank
   that stored it), and check that every saved tensor is covered whole.
2. ``dcp.load`` into the new model's and optimizer's state dicts (``get_state_dict``) with a
   ``StorageReader`` whose ``read_data`` asks each holder for the byte ranges the planner chose
   (overlaps of saved chunks and new shards): one ``all_gather_object`` of the requests, then
   one point-to-point message per holder and reader over the job's process group.
3. The rest follows a documented rule: the step, the scheduler, the data position and the
   extra objects are job-wide (old rank 0's); the RNG states of a new rank that existed in the
   old layout are its own, and those of a new rank are derived from the step and its rank
   (``torch.manual_seed``, ``random.seed`` and ``numpy.random.seed`` of ``seed_for``).

Snapshots of both ``TrainingState`` state dicts are resharded. ``state_dicts="module"`` (the
default) keys the optimizer state by index, as ``optimizer.state_dict()`` numbers the parameters
(their order in the parameter groups); each index is renamed to the parameter's DCP name in the
new job's optimizer (the same code builds the same groups in the same order; the group sizes are
checked, and DCP checks every tensor's global shape), and the state is loaded through DCP's
``set_state_dict``. Strided shards (FSDP x TP) and ``Partial`` placements cannot be resharded.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any, cast

import torch

from . import _protocol as p
from ._client import RestoreInfo, SnapshotClient, SnapshotError, timeline_token
from ._flatten import sharding_of, unflatten
from ._replicas import collective_device, is_marker

log = logging.getLogger("snapshotd_client")

__all__ = ["Survey", "survey", "seed_for"]


@dataclass
class Survey:
    """What the daemons hold of the job. ``slots[r]`` is new rank ``r``'s daemon's node slot,
    ``held[r]`` what that daemon holds (exactly: ``{(old rank, step): world}``), and
    ``elsewhere`` what the other nodes of the cluster reported holding (their job-wide
    retention reports: a rank there holds each step its node lists for all its ranks)."""

    slots: list[int]
    held: list[dict[tuple[int, int], int]]
    elsewhere: dict[int, dict[tuple[int, int], int]] = field(default_factory=dict)
    #: Nodes that reported ranks of the job and did not answer a rank's daemon just now (of
    #: those, ``elsewhere`` lists only the steps they reported protected: decodable).
    down: set[int] = field(default_factory=set)
    #: The token naming the timeline a restore from this survey starts (the same on every
    #: rank: from every rank's random nonce, gathered in the survey).
    token: int = 0

    def _all(self) -> list[dict[tuple[int, int], int]]:
        return [*self.held, *self.elsewhere.values()]

    def _at(self, step: int, world: int) -> dict[int, list[int]]:
        """Old rank -> the new ranks whose own daemon holds its version ``step`` of a
        ``world``-rank layout (a version that does not say its world counts for any)."""
        out: dict[int, list[int]] = {}
        for new, held in enumerate(self.held):
            for (old, s), w in held.items():
                if s == step and w in (world, 0):
                    out.setdefault(old, []).append(new)
        return out

    def _remote(self, step: int, world: int) -> set[int]:
        """Old ranks of the layout held at ``step`` by other nodes of the cluster."""
        return {old for held in self.elsewhere.values() for (old, s), w in held.items()
                if s == step and w in (world, 0)}

    def choose(self) -> tuple[int, int] | None:
        """The newest ``(step, world)`` of which every rank is held by some daemon of the
        cluster (versions that do not say their world: the largest rank seen plus one)."""
        every = self._all()
        for step in sorted({s for h in every for (_, s) in h}, reverse=True):
            ranks = {o for h in every for (o, s) in h if s == step}
            worlds = {w for h in every for (o, s), w in h.items() if s == step and w}
            for world in sorted(worlds or {1 + max(ranks)}, reverse=True):
                if set(self._at(step, world)) | self._remote(step, world) >= set(range(world)):
                    return step, world
        return None

    def holders(self, step: int, world: int) -> dict[int, tuple[int, bool]]:
        """Old rank (< ``world``) -> (the new rank that reads it, whether from another node).
        A rank a daemon of the job holds is read there by one of that daemon's new ranks (the
        one nearest to the same place in rank order); the others are read through the daemon
        of the new rank nearest to that place, from a node that holds them."""
        local = self._at(step, world)
        # Among the new ranks on a daemon that holds it, the one whose new shard most likely
        # overlaps the saved one (the same place in rank order: new rank o * new / old), so
        # that it sends least and the reads spread over the ranks of a node.
        size = len(self.slots)

        def nearest(old: int, news: list[int]) -> int:
            return min(news, key=lambda n: (abs(n - old * size // max(world, 1)), n))

        out = {old: (nearest(old, news), False) for old, news in local.items() if old < world}
        for old in sorted(self._remote(step, world) - set(out)):
            if old < world:                     # through the daemon of the nearest new rank
                out[old] = (nearest(old, list(range(size))), True)
        return out

    def own(self, step: int, world: int, new_world: int) -> bool:
        """The layout is the job's own: as many ranks, each held by its own rank's daemon."""
        at = self._at(step, world)
        return world == new_world and all(rank in at.get(rank, ()) for rank in range(world))


def survey(client: SnapshotClient) -> Survey:
    """List, on every rank (a collective), what every rank's daemon holds of the job and
    what the other nodes of the cluster reported holding."""
    import torch.distributed as dist

    try:
        # Only the versions of this job's own run (the job's identity: issue 24, finding 1),
        # here and on the other nodes: another job of the same name is not this one.
        status = client._channel.call(p.Status(token=client._token))
        versions = client._channel.call(p.ListVersions(client.job, token=client._token,
                                                       run=client.run)).versions
        try:
            nodes = client._channel.call(p.Where(client.job, token=client._token,
                                                 run=client.run)).nodes
        except SnapshotError:
            nodes = ()                  # a daemon without peers, or one that predates Where
        reported = {n.slot: {(r, s): n.world for r in n.ranks for s in n.steps} for n in nodes}
        down = {n.slot for n in nodes if not n.up and n.ranks}
        mine: Any = (status.node_slot, {(v.rank, v.step): v.world for v in versions},
                     reported, down, os.urandom(8))
    except SnapshotError as exc:
        mine = f"{type(exc).__name__}: {exc}"
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    errors = [f"rank {r}: {x}" for r, x in enumerate(everyone) if isinstance(x, str)]
    if errors:
        raise SnapshotError("cannot survey the job's versions: " + "; ".join(errors))
    slots = [e[0] for e in everyone]
    elsewhere: dict[int, dict[tuple[int, int], int]] = {}
    for _, _, reported, _, _ in everyone:
        for slot, held in reported.items():
            if slot not in slots:                       # exact lists win over reports
                elsewhere.setdefault(slot, {}).update(held)
    down = set().union(*(e[3] for e in everyone)) - set(slots)
    return Survey(slots, [e[1] for e in everyone], elsewhere, down,
                  timeline_token(client.job, [e[4] for e in everyone]))


def seed_for(step: int, rank: int) -> int:
    """The seed of a rank that did not exist in the saved layout (deterministic)."""
    digest = hashlib.sha256(f"snapshotd-elastic:{step}:{rank}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


# ---------------------------------------------------------------------- reading old ranks


class _Same:
    """A stand-in Placer: a DTensor's local shard comes back as the (mapped) tensor itself."""

    def build(self, idx: int, local: torch.Tensor) -> torch.Tensor:
        return local


@dataclass
class _Old:
    """One old rank's version as its holder read it."""

    rank: int
    tensors: list[torch.Tensor]
    skeleton: Any
    records: dict[int, dict[str, Any]]
    remote_bytes: int = 0                                   # read from another node
    index: dict[int, int] = field(default_factory=dict)    # id(tensor) -> table index


def _read_old(client: SnapshotClient, rank: int, step: int, remote: bool,
              verify: bool = True) -> _Old:
    """Map a saved rank's version (zero copy; ``verify=False`` only where another rank of
    this restore verified the same version moments ago)."""
    with SnapshotClient(client.endpoint, job=client.job, rank=rank,
                        token=client._token, run=client.run or "") as reader:
        lease = reader._channel.call(p.Open(client.job, rank, os.getpid(), step,
                                            verify=verify, token=client._token, map=True,
                                            remote=remote, run=client.run))
        mapped = False
        try:
            tensors, mapped = reader._copy_out(lease, {}, True)
        finally:
            if not mapped:
                reader._release(lease.lease)
        meta = lease.meta
    skeleton = unflatten(meta, tensors, _Same())  # type: ignore[arg-type]
    old = _Old(rank, tensors, skeleton, sharding_of(meta),
               remote_bytes=lease.nbytes if lease.tier == "peer" else 0)
    old.index = {id(t): i for i, t in enumerate(tensors)}
    return old


def _strip_markers(node: Any) -> Any:
    """The structure without split-replica markers (their tensors come from their owners)."""
    if is_marker(node):
        return None
    if isinstance(node, dict):
        out = {k: _strip_markers(v) for k, v in node.items()}
        return {k: v for k, v in out.items() if v is not None or node[k] is None}
    if isinstance(node, list):
        return [_strip_markers(v) for v in node]
    return node


def _chunks_of(old: _Old) -> tuple[list[tuple], dict[str, Any]]:
    """The tensor chunks of an old rank's model and optimizer state as DCP would name them:
    ``(fqn, dtype, global shape, offsets, sizes, table index)``, and its other leaves."""
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict

    sk = old.skeleton
    part = {"model": _strip_markers(sk.get("model")), "optimizer": _strip_markers(
        sk.get("optimizer"))}
    flat, _ = flatten_state_dict(part)
    chunks, values = [], {}
    for fqn, value in flat.items():
        if not isinstance(value, torch.Tensor):
            values[fqn] = value
            continue
        idx = old.index[id(value)]
        rec = old.records.get(idx)
        dtype = str(value.dtype).removeprefix("torch.")
        if rec is None:
            chunks.append((fqn, dtype, list(value.shape), [0] * value.dim(),
                           list(value.shape), idx))
            continue
        bad = [t for t in rec["placements"] if t.startswith(("_S(", "P("))]
        if bad:
            raise SnapshotError(f"{fqn}: a shard placed {rec['placements']} (strided or "
                                "partial) cannot be resharded; restore at the world size it "
                                "was saved at")
        chunks.append((fqn, dtype, list(rec["shape"]), list(rec["offsets"]),
                       list(value.shape), idx))
    return chunks, values


# ---------------------------------------------------------------------- the load


@dataclass
class Plan:
    """The agreed resharding: DCP metadata, where each saved chunk is, and the holders."""

    step: int
    world: int
    holders: dict[int, tuple[int, bool]]
    metadata: Any
    where: dict[Any, tuple[int, int]]           # MetadataIndex -> (old rank, table index)
    values: dict[str, Any]                      # bytes items (param groups, ...)
    rest: dict[int, dict[str, Any]]             # old rank -> its non-model/optimizer parts
    olds: dict[int, _Old]                       # the old ranks this rank holds
    slots: list[int] = field(default_factory=list)   # new rank -> its daemon's node slot
    client: Any = None


def named_optimizer(optim: Any, names: list[str] | None) -> dict[str, Any]:
    """A module optimizer state dict (state keyed by index, groups listing indices) keyed by
    the parameters' DCP names instead: ``names[i]`` is index ``i``'s (the live optimizer's
    parameters in group order, named as DCP's ``get_state_dict`` names them).

    >>> named = named_optimizer({"state": {1: {"m": 0}}, "param_groups": [{"params": [0, 1]}]},
    ...                         ["a.weight", "b.weight"])
    >>> named["state"], named["param_groups"][0]["params"]
    ({'b.weight': {'m': 0}}, ['a.weight', 'b.weight'])
    """
    if not isinstance(optim, dict):
        raise SnapshotError("the snapshot's optimizer state is not a dict")
    groups = optim.get("param_groups", [])
    indices = [i for g in groups for i in g.get("params", [])]
    if names is None or sorted(int(i) for i in indices) != list(range(len(names))):
        raise SnapshotError(
            f"the snapshot's optimizer numbers {len(indices)} parameters and the job's "
            f"optimizer has {'no names for its' if names is None else len(names)} parameters "
            "(state_dicts='module' state is matched by position): restore into the "
            "optimizer the job saved with (same parameter groups, same order)")
    state = {names[int(k)]: v for k, v in optim.get("state", {}).items()}
    return {"state": state, "param_groups": [
        dict(g, params=[names[int(i)] for i in g.get("params", [])]) for g in groups]}


def plan(client: SnapshotClient, found: Survey, step: int, world: int,
         names: list[str] | None = None) -> Plan:
    """Read this rank's old ranks and agree on the global metadata (a collective).
    ``names``: the DCP names of the live optimizer's parameters in group order, which key a
    ``state_dicts="module"`` snapshot's optimizer state (saved by index)."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorProperties,
        TensorStorageMetadata,
    )

    me = dist.get_rank()
    holders = found.holders(step, world)
    olds: dict[int, _Old] = {}
    mine: Any
    try:
        payload = {}
        for old_rank, (holder, remote) in sorted(holders.items()):
            if holder != me:
                continue
            old = olds[old_rank] = _read_old(client, old_rank, step, remote)
            sk = old.skeleton
            if not isinstance(sk, dict) or sk.get("format") is None:
                raise SnapshotError(f"rank {old_rank} step {step}: not a TrainingState "
                                    "snapshot")
            if sk.get("state_dicts", "dcp") != "dcp" and "optimizer" in sk:
                # Keyed by index: renamed (the same tensors) to DCP's names.
                sk["optimizer"] = named_optimizer(sk["optimizer"], names)
                sk["state_dicts"] = "dcp"
            chunks, leaves = _chunks_of(old)
            rest = {k: v for k, v in sk.items() if k not in ("model", "optimizer")}
            payload[old_rank] = (chunks, leaves if old_rank == min(holders) else {}, rest)
        mine = payload
    except Exception as exc:  # noqa: BLE001 - every rank must raise the same way
        mine = f"rank {me}: {type(exc).__name__}: {exc}"
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    errors = [x for x in everyone if isinstance(x, str)]
    if errors:
        raise SnapshotError("cannot restore at another world size: " + "; ".join(errors))
    merged: dict[int, Any] = {}
    for part in everyone:
        merged.update(part)
    saved_world = {int(rest.get("world", 0)) for _, _, rest in merged.values()}
    if world and saved_world - {0, world}:
        raise SnapshotError(f"step {step}: snapshots say the job had {sorted(saved_world)} "
                            f"ranks, the daemons list {world}")

    sd_meta: dict[str, Any] = {}
    where: dict[Any, tuple[int, int]] = {}
    seen: dict[tuple[str, tuple[int, ...]], int] = {}
    volume: dict[str, int] = {}
    values: dict[str, Any] = {}
    for old_rank in sorted(merged):
        chunks, vals, _ = merged[old_rank]
        for fqn, value in vals.items():
            values.setdefault(fqn, value)
        for fqn, dtype, shape, offsets, sizes, idx in chunks:
            key = (fqn, tuple(offsets))
            if key in seen:                     # a replica of a chunk already listed
                continue
            seen[key] = old_rank
            entry = sd_meta.get(fqn)
            if entry is None:
                entry = sd_meta[fqn] = TensorStorageMetadata(
                    properties=TensorProperties(dtype=getattr(torch, dtype)),
                    size=torch.Size(shape), chunks=[])
            entry.chunks.append(ChunkStorageMetadata(offsets=torch.Size(offsets),
                                                     sizes=torch.Size(sizes)))
            where[MetadataIndex(fqn, torch.Size(offsets))] = (old_rank, idx)
            n = 1
            for s in sizes:
                n *= s
            volume[fqn] = volume.get(fqn, 0) + n
    partial = []
    for fqn, entry in sd_meta.items():
        total = 1
        for s in entry.size:
            total *= s
        if volume[fqn] != total:
            partial.append(f"{fqn} ({volume[fqn]} of {total} elements)")
    if partial:
        raise SnapshotError(f"step {step}: the saved tensors are not all held whole by the "
                            f"job's daemons: {'; '.join(partial[:4])}")
    for fqn in values:
        if fqn not in sd_meta:
            sd_meta[fqn] = BytesStorageMetadata()
            where[MetadataIndex(fqn)] = (-1, -1)
    rest = {old_rank: r for old_rank, (_, _, r) in merged.items()}
    return Plan(step, world or len(holders), holders, Metadata(state_dict_metadata=sd_meta),
                where, values, rest, olds, list(found.slots), client)


def _reader(found: Plan) -> Any:
    from torch.distributed.checkpoint.planner import LoadItemType
    from torch.distributed.checkpoint.storage import StorageReader
    from torch.futures import Future

    class ElasticReader(StorageReader):
        """DCP StorageReader over the old ranks' versions (see the module docstring)."""

        def __init__(self) -> None:
            super().__init__()
            self.received = 0

        def reset(self, checkpoint_id: Any = None) -> None:
            pass

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            return found.metadata

        def set_up_storage_reader(self, *args: Any, **kwargs: Any) -> None:
            pass

        def prepare_local_plan(self, plan: Any) -> Any:
            return plan

        def prepare_global_plan(self, plans: Any) -> Any:
            return plans

        def read_data(self, plan: Any, planner: Any) -> Future:
            self.received = _exchange(found, plan, planner, LoadItemType)
            fut: Future = Future()
            fut.set_result(None)
            return fut

        @classmethod
        def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
            return True

    return ElasticReader()


def _exchange(found: Plan, plan: Any, planner: Any, byte_io: Any) -> int:
    """Serve and receive the planner's byte ranges; return the bytes received from others."""
    import torch.distributed as dist

    me, world = dist.get_rank(), dist.get_world_size()
    wants: list[tuple[int, int, int, list[int], list[int]]] = []   # holder, old, idx, off, len
    tensor_reqs = []
    for req in plan.items:
        if req.type == byte_io.BYTE_IO:
            raw = io.BytesIO()
            torch.save(found.values[req.storage_index.fqn], raw)
            raw.seek(0)
            planner.load_bytes(req, raw)
            continue
        old, idx = found.where[req.storage_index]
        wants.append((found.holders[old][0], old, idx, list(req.storage_offsets),
                      list(req.lengths)))
        tensor_reqs.append(req)
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, wants)

    def shared(reader: int, holder: int, old: int) -> bool:
        """The reader maps the saved rank itself: on the holder's node, held there."""
        return (reader != holder and found.slots[reader] == found.slots[holder]
                and not found.holders[old][1])

    mapped: dict[int, _Old] = {}                    # saved ranks this rank maps itself

    def piece(old: int, idx: int, offsets: list[int], lengths: list[int]) -> torch.Tensor:
        source = found.olds.get(old) or mapped.get(old)
        if source is None:          # verified by its holder (plan()), on this node's daemon
            source = mapped[old] = _read_old(found.client, old, found.step, False, False)
        t = source.tensors[idx]
        for dim, (start, length) in enumerate(zip(offsets, lengths, strict=True)):
            t = t.narrow(dim, start, length)
        return t

    def nbytes(old: int, idx: int, lengths: list[int], dtypes: dict) -> int:
        n = 1
        for s in lengths:
            n *= s
        return n * dtypes[(old, idx)]

    # Element sizes of every saved chunk, to size the receive buffers: from the metadata
    # every rank holds.
    meta = found.metadata.state_dict_metadata
    dtypes = {where: meta[index.fqn].properties.dtype.itemsize
              for index, where in found.where.items() if where[0] >= 0}

    device = collective_device(None)
    works: list[Any] = []
    inbox: dict[int, torch.Tensor] = {}
    outbox: dict[int, torch.Tensor] = {}               # kept alive until sent
    problem = ""
    try:                              # everything that can fail, before any message moves
        for reader, asked in enumerate(everyone):
            mine = [w for w in asked if w[0] == me and not shared(reader, me, w[1])]
            if reader != me and mine:
                outbox[reader] = torch.cat([
                    piece(o, i, off, ln).contiguous().reshape(-1).view(torch.uint8)
                    for _, o, i, off, ln in mine]).to(device)
        for holder, old, idx, offsets, lengths in wants:
            if shared(me, holder, old):
                piece(old, idx, offsets, lengths)           # mapped now: fails here if at all
        for holder in range(world):
            mine = [w for w in wants if w[0] == holder and not shared(me, holder, w[1])]
            if holder != me and mine:
                total = sum(nbytes(o, i, ln, dtypes) for _, o, i, _, ln in mine)
                inbox[holder] = torch.empty(total, dtype=torch.uint8, device=device)
    except Exception as exc:  # noqa: BLE001 - every rank must stop together
        problem = f"rank {me}: {type(exc).__name__}: {exc}"
    flag = torch.tensor([0 if problem else 1], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    if not flag.item():
        raise SnapshotError("cannot move the resharded chunks between ranks: "
                            + (problem or "another rank failed (see its error)"))
    for reader, buf in outbox.items():
        works.append(dist.isend(buf, dst=reader))
    for holder, buf in inbox.items():
        works.append(dist.irecv(buf, src=holder))
    for work in works:
        work.wait()
    received = sum(b.numel() for b in inbox.values())
    cursor = {h: 0 for h in inbox}
    for (holder, old, idx, offsets, lengths), req in zip(wants, tensor_reqs, strict=True):
        if holder == me or shared(me, holder, old):
            src = piece(old, idx, offsets, lengths)
        else:
            n = nbytes(old, idx, lengths, dtypes)
            got = inbox[holder][cursor[holder]:cursor[holder] + n].cpu()
            cursor[holder] += n
            dtype = found.metadata.state_dict_metadata[req.storage_index.fqn].properties.dtype
            src = got.clone().view(dtype).reshape(lengths)
        target = planner.resolve_tensor(req).detach()
        if tuple(target.size()) != tuple(src.size()):
            raise SnapshotError(f"{req.storage_index.fqn}: chunk of shape {tuple(src.size())} "
                                f"for a target of {tuple(target.size())}")
        target.copy_(src)
        planner.commit_tensor(req, target)
    mapped.clear()                                  # the mappings (and leases) go now
    return received


def load(state: Any, client: SnapshotClient, found: Survey, step: int, world: int) -> int:
    """Restore ``state`` (a TrainingState) from the ``world``-rank layout's step ``step``;
    return the step. Every rank calls this (collectives)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from ._training import _unwrap

    started = time.perf_counter()
    model = _unwrap(state.model)
    names: list[str] | None = None
    if state.optimizer is not None:
        msd, osd = get_state_dict(model, state.optimizer)
        # DCP's names of the optimizer's parameters in group order (what index i of a
        # state_dicts="module" snapshot is): DCP lists each group's parameters in order.
        named = [list(g["params"]) for g in cast(list, osd["param_groups"])]
        if [len(g) for g in named] == [len(g["params"]) for g in state.optimizer.param_groups]:
            names = [fqn for group in named for fqn in group]
    agreed = plan(client, found, step, world, names)
    me = dist.get_rank()
    if state.optimizer is not None:
        # DCP created state for every parameter of a fresh optimizer (a step with zero
        # gradients); a parameter the saved layout holds no state of (it had received no
        # gradient) gets none here either, as in the run that saved it (TrainingState.load).
        # Only where the saved groups name this optimizer's parameters, group by group: a
        # layout of an optimizer over other parameters is left to DCP's load to refuse.
        saved = agreed.metadata.state_dict_metadata
        held: dict[str, Any] = cast(dict, osd["state"])
        groups = cast(list, osd["param_groups"])
        if [set(g["params"]) for g in groups] == [
                set(agreed.values.get(f"optimizer.param_groups.{i}.params", ()))
                for i in range(len(groups))]:
            for fqn in [fqn for fqn, entries in held.items() if not any(
                    f"optimizer.state.{fqn}.{name}" in saved for name in entries)]:
                del held[fqn]
        # The other way round: state the layout holds of a parameter this optimizer holds
        # none of (it holds some already: DCP created none) would never be read, and the
        # parameter restored without it. Refused below, on every rank.
        with_state = {key.removeprefix("optimizer.state.").rsplit(".", 1)[0]
                      for key in saved if key.startswith("optimizer.state.")}
        unread = sorted(fqn for fqn in with_state & set(msd) if fqn not in held)
        target: dict[str, Any] = {"model": msd, "optimizer": osd}
    else:
        unread = []
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        target = {"model": get_model_state_dict(model)}
    # The rest: job-wide from old rank 0; the RNGs this rank's own where it existed.
    base = dict(agreed.rest[0])
    full: dict[str, Any] = {**base, "model": target["model"]}
    if "optimizer" in target:
        full["optimizer"] = target["optimizer"]
    if state.rng:
        own = agreed.rest.get(me)
        if own is not None and "rng" in own:
            full["rng"] = own["rng"]
        else:
            full.pop("rng", None)
    if own_gens := agreed.rest.get(me, {}).get("generators"):
        full["generators"] = own_gens
    full.pop("replicas", None)
    full["state_dicts"] = "dcp"             # the target's dicts are DCP's, whatever was saved
    # Everything that does not fit is found on some rank before any rank writes a byte.
    problem = ""
    try:
        state.check(full)
        if unread:
            raise ValueError(f"the optimizer holds state for some parameters but none for "
                             f"{unread[:4]}, whose saved state would not be read; restore "
                             "into an optimizer that holds no state yet (a new process's)")
    except Exception as exc:  # noqa: BLE001 - every rank must stop together
        problem = f"rank {me}: {exc}"
    flag = torch.tensor([0 if problem else 1], device=collective_device(None))
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    if not flag.item():
        raise SnapshotError(f"the {agreed.world}-rank layout's step {step} does not fit the "
                            "job, nothing was written: "
                            + (problem or "another rank refused it (see its error)"))
    reader = _reader(agreed)
    dcp.load(target, storage_reader=reader)
    loaded = state.load(full)
    if state.rng and agreed.rest.get(me) is None:
        seed = seed_for(step, me)
        torch.manual_seed(seed)
        random.seed(seed)
        try:
            import numpy as np

            np.random.seed(seed)
        except ImportError:
            pass
    dist.barrier()                  # every rank has read what it needed from the holders
    remote = sum(o.remote_bytes for o in agreed.olds.values())
    read = [o for o, (reader, _) in agreed.holders.items() if reader == me]
    agreed.olds.clear()             # the old ranks' mappings (and their leases) go now
    # A new timeline from ``step``: the versions newer than it, of this rank and of the saved
    # ranks it read, are abandoned wherever they are (this node and every node that reported
    # them): a newer step some saved rank lacked, which a later restore must never combine
    # with this timeline's own saves of that step; and this rank's next save (``step + 1``)
    # would be refused as older than its newest.
    for rank in sorted({me, *read}):
        client._channel.call(p.Drop(client.job, rank=rank, newer_than=step,
                                    token=client._token, everywhere=True,
                                    timeline=found.token or timeline_token(client.job, step),
                                    run=client.run))
    client.last_restore = RestoreInfo(step, "memory", sum(
        t.numel() * t.element_size() for t in _tensors(target)), time.perf_counter() - started,
        world_from=agreed.world, bytes_from_peers=reader.received + remote)
    client._last_step = step
    client._pinned_from = step + 100
    log.info("restored job %r rank %d step %d from the %d-rank layout (%d bytes from other "
             "ranks' daemons)", client.job, me, step, agreed.world, reader.received)
    return loaded


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []
