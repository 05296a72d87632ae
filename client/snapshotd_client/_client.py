"""The trainer-side client: asynchronous save into daemon memory, and restore."""

from __future__ import annotations

import logging
import mmap
import os
import threading
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch

from . import _protocol as p
from ._channel import Channel, DaemonError, SnapshotError
from ._cuda import DeviceCopier, mark_ready
from ._flatten import Layout, flatten, unflatten, view_of

__all__ = ["SnapshotClient", "SnapshotSkipped", "RestoreInfo", "ENV_ENDPOINT", "ENV_TOKEN",
           "agree_step"]

log = logging.getLogger("snapshotd_client")
ENV_ENDPOINT = "SNAPSHOTD_ENDPOINT"
ENV_TOKEN = "SNAPSHOTD_JOB_TOKEN"
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


class SnapshotSkipped(SnapshotError):
    """A save was not taken because the previous one is still waiting for the daemon."""


def _default_endpoint() -> str:
    base = os.environ.get("XDG_RUNTIME_DIR")
    return f"ipc://{os.path.join(base, 'snapshotd') if base else '/run/snapshotd'}/control.sock"


@dataclass(frozen=True)
class RestoreInfo:
    """What the last :meth:`SnapshotClient.restore` did: ``tier`` is ``memory`` (this node's
    memory, or rebuilt from the group into it) or ``disk`` (the persistence tier)."""

    step: int
    tier: str
    nbytes: int
    seconds: float


@dataclass
class _Job:
    step: int
    layout: Layout
    events: dict = field(default_factory=dict)
    future: Future = field(default_factory=Future)
    copying: threading.Event = field(default_factory=threading.Event)
    copied: threading.Event = field(default_factory=threading.Event)


class SnapshotClient:
    """Hands snapshots of one rank's state to the node's snapshotd, and gets them back.

    Example::

        client = SnapshotClient(job="gpt", rank=0)
        client.protect(optimizer)             # optimizer.step() waits for copies in flight
        restored = client.restore()
        if restored is not None:
            step, state = restored
            model.load_state_dict(state["model"])
        for step in range(...):
            ...                                # forward, backward, optimizer.step()
            client.save(step, {"model": model.state_dict(), "step": step})
        client.close()

    ``save`` never blocks on the daemon and never raises: its future carries any error, and
    :meth:`last_error` keeps the newest one. ``restore`` raises :class:`SnapshotError`.

    ``token`` (default: ``$SNAPSHOTD_JOB_TOKEN``) is the job's secret on a daemon started with
    ``--job-isolation``: the first writer binds the job to it, and requests for the job without
    it are refused (``forbidden``). Give every rank of a job the same one.
    """

    def __init__(self, endpoint: str | None = None, job: str = "default",
                 rank: int | None = None, *, timeout: timedelta = timedelta(seconds=30),
                 context: Any = None, token: str | None = None) -> None:
        self.endpoint = endpoint or os.environ.get(ENV_ENDPOINT) or _default_endpoint()
        self.job = job
        self._token = os.environ.get(ENV_TOKEN, "") if token is None else token
        self.rank = int(os.environ.get("RANK", "0")) if rank is None else rank
        self.local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        self._channel = Channel(self.endpoint, timeout, context)
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="snapshotd-save")
        self._cuda = torch.cuda.is_available()
        self._device = DeviceCopier()
        self._maps = _MapCache(on_close=self._device.unpin if self._cuda else None)
        self._current: _Job | None = None
        self._last_error: BaseException | None = None
        self._warned = False
        self._closed = False
        #: Set by every successful :meth:`restore`.
        self.last_restore: RestoreInfo | None = None

    # ------------------------------------------------------------------ saving

    def save(self, step: int, state: Any) -> Future:
        """Snapshot ``state`` as version ``step``; return a future that resolves to ``step``.

        Returns after laying out the state (no copy). The bytes are copied on a background
        thread: do not modify the tensors until :meth:`wait_copied` (or use :meth:`protect`).
        """
        if self._closed:
            raise SnapshotError("save() on a closed SnapshotClient")
        prev = self._current
        if prev is not None and not prev.copied.is_set():
            if not prev.copying.is_set():
                return self._failed(step, SnapshotSkipped(
                    f"step {step} not saved: step {prev.step} is still waiting for snapshotd"))
            prev.copied.wait()
        try:
            layout = flatten(state)
        except TypeError as exc:
            return self._failed(step, exc)
        job = _Job(step, layout, mark_ready(layout.tensors) if self._cuda else {})
        self._current = job
        self._worker.submit(self._run, job)
        return job.future

    def _failed(self, step: int, exc: BaseException) -> Future:
        future: Future = Future()
        future.set_exception(exc)
        self._record(exc)
        return future

    def _run(self, job: _Job) -> None:
        slot = None
        try:
            reply = self._channel.call(p.Alloc(self.job, self.rank, job.step, job.layout.nbytes,
                                               os.getpid(), self.local_world_size,
                                               token=self._token))
            slot = reply.slot
            job.copying.set()
            self._copy_in(reply.path, reply.nbytes, job.layout, job.events)
            job.copied.set()
            tensors = tuple(p.TensorEntry(e["name"], e["dtype"], tuple(e["shape"]), e["offset"],
                                          e["nbytes"]) for e in job.layout.entries)
            self._channel.call(p.Commit(slot, tensors, job.layout.meta))
            slot = None
            job.future.set_result(job.step)
        except BaseException as exc:  # noqa: BLE001 - reported through the future
            job.copied.set()
            if slot is not None:
                self._abort(slot)
            self._record(exc)
            job.future.set_exception(exc)

    def _copy_in(self, path: str, nbytes: int, layout: Layout, events: dict) -> None:
        if nbytes == 0:
            return
        mm = self._maps.get(path, nbytes)
        on_device = []
        with torch.no_grad():
            for tensor, entry in zip(layout.tensors, layout.entries):
                if not entry["nbytes"]:
                    continue
                if tensor.is_cuda:
                    on_device.append((view_of(mm, entry), tensor))
                else:
                    view_of(mm, entry).copy_(tensor)
            if on_device:
                self._device.copy(on_device, events, mm)

    def _abort(self, slot: int) -> None:
        try:
            self._channel.call(p.Abort(slot), timeout=timedelta(seconds=5))
        except SnapshotError:
            pass

    def _record(self, exc: BaseException) -> None:
        self._last_error = exc
        if not self._warned:
            self._warned = True
            warnings.warn(f"snapshotd: a snapshot failed and training goes on: {exc}",
                          RuntimeWarning, stacklevel=3)
        log.warning("snapshot failed: %s", exc)

    def wait_copied(self) -> None:
        """Block until the bytes of the save in flight are copied (the state may change then)."""
        job = self._current
        if job is not None:
            job.copied.wait()

    def wait(self) -> None:
        """Block until every save handed in so far is committed or failed."""
        job = self._current
        if job is not None:
            job.copied.wait()
            try:
                job.future.result()
            except BaseException:  # noqa: BLE001 - recorded in last_error()
                pass

    def protect(self, optimizer: torch.optim.Optimizer) -> Any:
        """Make ``optimizer.step()`` wait for copies in flight; returns the hook handle."""
        return optimizer.register_step_pre_hook(lambda *_: self.wait_copied())

    def last_error(self) -> BaseException | None:
        """The newest error of a save, or None."""
        return self._last_error

    # ------------------------------------------------------------------ restoring

    def steps(self) -> list[int]:
        """Committed steps of this rank held by the daemon, oldest first."""
        reply = self._channel.call(p.ListVersions(self.job, self.rank, token=self._token))
        return [v.step for v in reply.versions]

    def latest(self) -> int | None:
        """This rank's newest committed step, or None."""
        steps = self.steps()
        return steps[-1] if steps else None

    def restore(self, step: int | None = None, into: Any = None) -> tuple[int, Any] | None:
        """Return ``(step, state)`` of the newest version (or of ``step``), or None if none.

        Inside a job with ``torch.distributed`` initialised and ``step`` None, every rank
        restores the same step: the newest one that all ranks hold (see :func:`agree_step`).

        ``into``: an existing state of the same structure (e.g. ``model.state_dict()``); its
        tensors with the same path, dtype and shape are filled in place and returned instead of
        freshly allocated ones, which skips the page faults of new memory.
        """
        if step is None and _distributed():
            step = self._agree()
            if step is None:
                return None
        try:
            lease = self._channel.call(p.Open(self.job, self.rank, os.getpid(), step,
                                              token=self._token))
        except DaemonError as exc:
            if exc.code == "not_found" and step is None:
                return None
            raise
        targets = _targets(into)
        started = time.perf_counter()
        try:
            tensors = self._copy_out(lease, targets)
        finally:
            self._channel.call(p.Release(lease.lease))
        self.last_restore = RestoreInfo(lease.step, lease.tier, lease.nbytes,
                                        time.perf_counter() - started)
        log.info("restored job %r rank %d step %d from %s (%d bytes)", self.job, self.rank,
                 lease.step, lease.tier, lease.nbytes)
        if _distributed():
            self._channel.call(p.Drop(self.job, self.rank, newer_than=lease.step,
                                      token=self._token))
        return lease.step, unflatten(lease.meta, tensors)

    def _agree(self) -> int | None:
        return agree_step(self)

    def _copy_out(self, lease: p.OpenReply,
                  targets: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        if lease.nbytes == 0:
            return [view_of(b"", e.__dict__) for e in lease.tensors]
        fd = os.open(lease.path, os.O_RDONLY)
        try:
            mm = mmap.mmap(fd, lease.nbytes, mmap.MAP_SHARED | _POPULATE, mmap.PROT_READ)
        finally:
            os.close(fd)
        out = []
        with warnings.catch_warnings():  # the mapping is read-only on purpose
            warnings.filterwarnings("ignore", "The given buffer is not writable")
            for entry in lease.tensors:
                src = view_of(mm, entry.__dict__)
                dst = targets.get(entry.name)
                if dst is None or dst.dtype != src.dtype or dst.shape != src.shape:
                    dst = torch.empty_like(src)
                with torch.no_grad():
                    out.append(dst.copy_(src))
                del src
        _close(mm)
        return out

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Wait for saves in flight, then release the connection."""
        if self._closed:
            return
        self.wait()
        self._closed = True
        self._worker.shutdown(wait=True)
        self._maps.clear()
        self._channel.close()

    def __enter__(self) -> SnapshotClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _MapCache:
    """Write mappings of recently used slots, kept so a recycled segment is not re-faulted.

    The daemon recycles a rank's segments, so the same few come back save after save. A mapping
    whose file was replaced or removed is dropped at the next lookup; at most ``size`` are kept.
    """

    def __init__(self, size: int = 4, on_close: Any | None = None) -> None:
        self._size = size
        self._on_close = on_close
        self._maps: dict[str, tuple[int, mmap.mmap]] = {}

    def _drop(self, path: str) -> None:
        mm = self._maps.pop(path)[1]
        if self._on_close is not None:
            self._on_close(mm)
        _close(mm)

    def get(self, path: str, nbytes: int) -> mmap.mmap:
        for known, (inode, mm) in list(self._maps.items()):
            try:
                alive = os.stat(known).st_ino == inode
            except FileNotFoundError:
                alive = False
            if not alive or (known == path and len(mm) < nbytes):
                self._drop(known)
        if path in self._maps:
            self._maps[path] = self._maps.pop(path)  # most recently used last
            return self._maps[path][1]
        fd = os.open(path, os.O_RDWR)
        try:
            inode, size = os.fstat(fd).st_ino, os.fstat(fd).st_size
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED | _POPULATE, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self._maps[path] = (inode, mm)
        while len(self._maps) > self._size:
            self._drop(next(iter(self._maps)))
        return mm

    def clear(self) -> None:
        while self._maps:
            self._drop(next(iter(self._maps)))


def agree_step(client: SnapshotClient, group: Any = None) -> int | None:
    """The newest step that every rank of ``group`` holds, or None if there is none.

    Each rank lists the steps its daemon holds and the lists are exchanged (one
    ``all_gather_object``). Comparing only the newest steps (a MIN all-reduce) is not enough:
    a daemon keeps a few versions per rank (the newest ones and the newest protected one), so
    when ranks' newest steps are far apart, or a replacement node rebuilt an older protected
    version, the minimum of the newest steps can be a step some rank no longer holds. If any
    rank cannot list its steps, every rank raises the same ``SnapshotError``.
    """
    import torch.distributed as dist

    try:
        mine: Any = sorted(set(client.steps()))
    except SnapshotError as exc:
        mine = f"{type(exc).__name__}: {exc}"
    everyone: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, (client.rank, mine), group=group)
    errors = [f"rank {rank}: {held}" for rank, held in everyone if isinstance(held, str)]
    if errors:
        raise SnapshotError("cannot agree on a step to restore: " + "; ".join(errors))
    common = set(everyone[0][1])
    for _, held in everyone[1:]:
        common &= set(held)
    return max(common) if common else None



def _targets(into: Any) -> dict[str, torch.Tensor]:
    if into is None:
        return {}
    layout = flatten(into)
    return {e["name"]: t for e, t in zip(layout.entries, layout.tensors) if not t.is_cuda}


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _close(mm: mmap.mmap) -> None:
    try:
        mm.close()
    except BufferError:  # a tensor view is still alive somewhere; the GC unmaps it later
        pass

