"""snapshotd as ``torch.distributed.checkpoint`` storage: ``dcp.save`` / ``dcp.async_save`` /
``dcp.load`` against the daemons' memory instead of files (issue 14, part 2).

Each rank writes the items DCP's planner gives it (its shards, and the replicated items it was
chosen to write) as one snapshot version of ``job`` at ``step`` in its node's daemon; the
coordinator adds DCP's global ``Metadata`` as version ``step`` of rank 0 of ``job + ".dcp-meta"``
(a job of one rank: retention keeps as many metadata versions as data versions).
A load reads the metadata, then every item it needs from the version of the rank that wrote it:
DCP's planners decide which saved chunks overlap which new shards, so a load at another world
size reshards. The versions are ordinary snapshots: coded across the nodes, rebuilt after a node
loss, kept by ``--keep`` like any other.

A load reads the ranks it needs from its own node's daemon, which fetches a rank held on
another node of the cluster from that node (``read(remote=True)``: verified by the holder,
checked on arrival). The metadata is read the same way (it is kept with rank 0's node). The
metadata is pickled, as DCP's own file storage does; it is unpickled only by the job's
loaders, never by the daemon.

Example (one process, no process group)::

    import torch, torch.distributed.checkpoint as dcp
    from snapshotd_client.dcp import SnapshotdReader, SnapshotdWriter

    state = {"w": torch.arange(8.0)}
    dcp.save(state, storage_writer=SnapshotdWriter("gpt-dcp", step=100), no_dist=True)
    back = {"w": torch.zeros(8)}
    dcp.load(back, storage_reader=SnapshotdReader("gpt-dcp", step=100), no_dist=True)
"""

from __future__ import annotations

import io
import os
import pickle
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    SavePlan,
    SavePlanner,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.futures import Future

from ._client import SnapshotClient, SnapshotError, log

__all__ = ["SnapshotdWriter", "SnapshotdReader", "META_SUFFIX"]

#: The job that holds a checkpoint's DCP metadata: ``job + META_SUFFIX``, rank 0.
META_SUFFIX = ".dcp-meta"


@dataclass(frozen=True)
class _Where:
    """Where one saved item lives: the rank whose version holds it, and its name there."""

    rank: int
    key: str


def _rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def _step(checkpoint_id: Any, default: int | None) -> int:
    if checkpoint_id is None:
        if default is None:
            raise ValueError("no step: pass step= to the storage, or checkpoint_id=<step> to "
                             "dcp.save / dcp.load")
        return default
    text = str(checkpoint_id).rsplit("/", 1)[-1]
    if not text.isdigit():
        raise ValueError(f"checkpoint_id {checkpoint_id!r}: snapshotd storage names a "
                         "checkpoint by its step (an int, or a path ending in one)")
    return int(text)


def _loud(exc: SnapshotError) -> SnapshotError:
    """Log the storage's error too: some torch versions replace it with their own message
    ("metadata is None") when it comes from read_metadata."""
    log.error("%s", exc)
    return exc


def _done(value: Any) -> Future:
    fut: Future = Future()
    fut.set_result(value)
    return fut


class SnapshotdWriter(StorageWriter):
    """``StorageWriter`` that saves into snapshotd (see the module docstring).

    Args:
        job: the job name the versions are saved under (use one apart from the job's
            ``TrainingState`` snapshots: both number versions by step).
        step: the step (the checkpoint's id); or give ``checkpoint_id=<step>`` to ``dcp.save``.
        endpoint: the daemon (default ``$SNAPSHOTD_ENDPOINT``).
        token: the job's token under ``--job-isolation``.
    """

    def __init__(self, job: str, step: int | None = None, *, endpoint: str | None = None,
                 token: str | None = None) -> None:
        super().__init__()
        self.job, self.endpoint, self.token = job, endpoint, token
        self._default = step
        self.step = step
        self.is_coordinator = False

    def reset(self, checkpoint_id: Any = None) -> None:
        self.step = _step(checkpoint_id, self._default)

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        return plans

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future:
        rank = _rank()
        items: dict[str, torch.Tensor] = {}
        results = []
        for i, item in enumerate(plan.items):
            data = planner.resolve_data(item)
            if item.type == WriteItemType.BYTE_IO:
                raw = data.getvalue() if isinstance(data, io.BytesIO) else bytes(data)
                tensor = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else \
                    torch.empty(0, dtype=torch.uint8)
            else:
                assert isinstance(data, torch.Tensor), type(data)
                tensor = data.detach().cpu().contiguous()
            items[str(i)] = tensor
            results.append(WriteResult(index=item.index,
                                       size_in_bytes=tensor.numel() * tensor.element_size(),
                                       storage_data=_Where(rank, str(i))))
        with SnapshotClient(self.endpoint, job=self.job, rank=rank, token=self.token,
                            copy="eager") as client:
            client.save(self._require_step(), {"items": items}).result()
        return _done(results)

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        metadata.storage_data = {r.index: r.storage_data for rs in results for r in rs}
        blob = pickle.dumps(metadata)
        with SnapshotClient(self.endpoint, job=self.job + META_SUFFIX, rank=0, token=self.token,
                            copy="eager") as client:
            # The metadata job has one rank, written by the coordinator alone: counted as the
            # job's world size (WORLD_SIZE, say 2) the daemons would wait for its rank 1, which
            # never comes, and keep every metadata version (issue 24, finding 10).
            client.world_size = 1
            client.save(self._require_step(),
                        {"metadata": torch.frombuffer(bytearray(blob), dtype=torch.uint8)}
                        ).result()

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=str(self.step)) if self.step is not None else None

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return str(checkpoint_id).rsplit("/", 1)[-1].isdigit()

    def _require_step(self) -> int:
        if self.step is None:
            raise ValueError("no step: pass step= or checkpoint_id=<step>")
        return self.step


class SnapshotdReader(StorageReader):
    """``StorageReader`` that loads from snapshotd (see the module docstring); ``step`` None:
    the newest checkpoint whose metadata the daemon holds."""

    def __init__(self, job: str, step: int | None = None, *, endpoint: str | None = None,
                 token: str | None = None) -> None:
        super().__init__()
        self.job, self.endpoint, self.token = job, endpoint, token
        self._default = step
        self.step = step
        self.storage_data: dict[MetadataIndex, _Where] = {}

    def reset(self, checkpoint_id: Any = None) -> None:
        self.step = _step(checkpoint_id, self._default) if (
            checkpoint_id is not None or self._default is not None) else None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        with SnapshotClient(self.endpoint, job=self.job + META_SUFFIX, rank=0,
                            token=self.token) as client:
            try:
                got = client.read(self.step, remote=self.step is not None)
            except SnapshotError as exc:
                if getattr(exc, "code", "") != "not_found":
                    raise
                got = None
        if got is None:
            raise _loud(SnapshotError(
                f"no DCP checkpoint of job {self.job!r} "
                f"{'' if self.step is None else f'at step {self.step} '}on this node's daemon "
                "(its metadata is kept with rank 0's node)"))
        self.step, state = got
        metadata = pickle.loads(state["metadata"].numpy().tobytes())  # noqa: S301 - the job's own
        if not isinstance(metadata, Metadata):
            raise SnapshotError(f"job {self.job!r} step {self.step}: not DCP metadata")
        return metadata

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any,
                              **kwargs: Any) -> None:
        self.storage_data = dict(metadata.storage_data or {})

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future:
        per_rank: dict[int, list[Any]] = {}
        for req in plan.items:
            per_rank.setdefault(self.storage_data[req.storage_index].rank, []).append(req)
        for rank, reqs in sorted(per_rank.items()):
            items = self._items_of(rank)
            for req in reqs:
                saved = items[self.storage_data[req.storage_index].key]
                if req.type == LoadItemType.BYTE_IO:
                    planner.load_bytes(req, io.BytesIO(saved.numpy().tobytes()))
                    continue
                tensor = saved
                for dim, (start, length) in enumerate(zip(req.storage_offsets, req.lengths,
                                                          strict=True)):
                    tensor = tensor.narrow(dim, start, length)
                target = planner.resolve_tensor(req).detach()
                if target.size() != tensor.size():
                    raise SnapshotError(f"job {self.job!r} step {self.step}: item "
                                        f"{req.storage_index} has shape {tuple(tensor.size())}, "
                                        f"the load wants {tuple(target.size())}")
                target.copy_(tensor)
                planner.commit_tensor(req, target)
        return _done(None)

    def _items_of(self, rank: int) -> dict[str, torch.Tensor]:
        with SnapshotClient(self.endpoint, job=self.job, rank=rank, token=self.token) as client:
            try:
                got = client.read(self.step, remote=True)
            except SnapshotError as exc:
                got, why = None, str(exc)
            else:
                why = ""
        if got is None or got[0] != self.step:
            raise _loud(SnapshotError(
                f"job {self.job!r} step {self.step}: rank {rank}'s items are held neither by "
                f"this node's daemon nor by a node of the cluster it can reach"
                f"{f' ({why})' if why else ''}"))
        return got[1]["items"]

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return str(checkpoint_id).rsplit("/", 1)[-1].isdigit()
