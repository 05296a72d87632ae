"""The trainer-side client: asynchronous save into daemon memory, and restore."""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import mmap
import operator
import os
import re
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch

from . import _protocol as p
from ._channel import Channel, DaemonError, SnapshotError
from ._cuda import DeviceCopier, mark_ready
from ._flatten import (
    Layout,
    LayoutCache,
    Placer,
    ShardingMismatch,
    flatten,
    local_tensor,
    unflatten,
    view_of,
)

__all__ = ["SnapshotClient", "SnapshotSkipped", "SnapshotTorn", "RestoreInfo", "SaveStats",
           "ENV_ENDPOINT", "ENV_TOKEN", "ENV_JOB", "ENV_RUN", "ENV_COPY_CPUS", "COPY_MODES",
           "MAX_META_BYTES", "job_name", "run_identity",
           "agree_step", "agree_timeline", "agree_token", "timeline_token", "newest_common_step"]

log = logging.getLogger("snapshotd_client")
ENV_ENDPOINT = "SNAPSHOTD_ENDPOINT"
ENV_TOKEN = "SNAPSHOTD_JOB_TOKEN"
#: The job's name where ``SnapshotClient(job=...)`` does not give one.
ENV_JOB = "SNAPSHOTD_JOB"
#: The job's run identity where it is not the launcher's run id: set it to an old run's id to
#: resume that run's snapshots in a job launched with another one (see :func:`run_identity`).
ENV_RUN = "SNAPSHOTD_RUN"
#: torchrun's (torchelastic's) id of the job's run: the same across its restarts.
ENV_RUN_ID = "TORCHELASTIC_RUN_ID"
#: CPUs (``0,2-3``) for the background copy thread: the cores a node leaves to snapshotting,
#: so the copies of a save do not run on the training thread's core. Unset: no pinning.
ENV_COPY_CPUS = "SNAPSHOTD_COPY_CPUS"
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)
#: ``copy=`` modes of :class:`SnapshotClient` (see its docstring).
COPY_MODES = ("auto", "lazy", "eager")
#: Largest JSON skeleton (every non-tensor value of a state) a save accepts: the restore reply
#: carries it in one control message with the tensor table.
MAX_META_BYTES = 16 << 20
#: Headroom per tensor row in the restore reply (checksum, JSON punctuation), and for the rest.
_ROW_BYTES, _REPLY_BYTES = 160, 64 << 10


class SnapshotSkipped(SnapshotError):
    """A save was superseded by a newer one before the daemon gave it memory (counted in
    :meth:`SnapshotClient.stats`; the newest save is always the one that goes ahead)."""


class SnapshotTorn(SnapshotError):
    """A tensor copied in the background was changed in place before its copy ended: the save
    is refused (its slot aborted, nothing committed) instead of storing a torn snapshot
    (counted in :meth:`SnapshotClient.stats` as ``torn``, and as ``failed``)."""


@dataclass
class SaveStats:
    """Counts of what happened to this client's saves (:meth:`SnapshotClient.stats`)."""

    saves: int = 0          #: save() calls
    committed: int = 0      #: committed by the daemon
    skipped: int = 0        #: superseded by a newer save before they got memory
    failed: int = 0         #: refused or failed (see last_error()), rejected ones included
    rejected: int = 0       #: refused at save() because a value cannot be stored (its path is
    #: named in the error, logged at ERROR level at the first one)
    eager_bytes: int = 0    #: bytes copied on the calling thread at save() (unguarded tensors)
    torn: int = 0           #: refused because a tensor copied in the background changed in
    #: place before its copy ended (SnapshotTorn; counted in failed too)


_RDZV_WARNED = False
_RDZV_ENV = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"


def _check_torchrun_env() -> None:
    """Warn once per process when a restarted torchrun worker runs without
    ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``: torchrun shares its rendezvous store with the
    workers across restarts without a per-attempt prefix, so a restarted worker can read the
    previous attempt's addresses and hang or fail to connect (pytorch issue 135712), which
    looks like a failed restore."""
    global _RDZV_WARNED
    try:
        restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    except ValueError:
        restarted = False
    if _RDZV_WARNED or not restarted or os.environ.get(_RDZV_ENV) == "1":
        return
    _RDZV_WARNED = True
    message = (f"snapshotd: this torchrun worker was restarted and {_RDZV_ENV} is not set "
               "to 1: restarted workers can read the previous attempt's rendezvous "
               "keys and hang or fail to connect (pytorch issue 135712); export "
               "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 where torchrun is launched")
    log.warning(message)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def _world_size() -> int:
    """The job's number of ranks: torch.distributed's, else ``$WORLD_SIZE``, else 0."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return int(dist.get_world_size())
    except (ImportError, RuntimeError):
        pass
    try:
        return max(0, int(os.environ.get("WORLD_SIZE", "0")))
    except ValueError:
        return 0


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
    #: Restored at another world size (issue 14): the number of ranks the state was saved
    #: with (None: the same as now), and the bytes received from other ranks (read from
    #: their daemons, which hold the saved ranks this rank needed).
    world_from: int | None = None
    bytes_from_peers: int = 0


@dataclass
class _Job:
    step: int
    layout: Layout
    events: dict = field(default_factory=dict)
    future: Future = field(default_factory=Future)
    copying: threading.Event = field(default_factory=threading.Event)
    copied: threading.Event = field(default_factory=threading.Event)
    superseded: bool = False
    started: float = field(default_factory=time.monotonic)
    #: The spare slot the tensors copied at save() went straight into, and their indices in
    #: the layout (the background copy skips them).
    spare: _Spare | None = None
    written: frozenset = frozenset()
    #: Every layout tensor's ``_version`` (its in-place change counter) when save() was
    #: called, compared when the background copy ends (None: everything copied at save()).
    versions: list[int] | None = None


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

    ``save`` never blocks on the daemon and never raises: its future carries any error, the
    first failure is logged as a warning, every one is counted in :meth:`stats`, and
    :meth:`last_error` keeps the newest one. ``restore`` raises :class:`SnapshotError` only.

    **What a snapshot holds.** A save is exactly the state at the moment ``save()`` was called,
    provided the tensors copied in the background do not change before their copy ends.
    ``copy`` chooses which tensors are copied in the background:

    - ``"auto"`` (default): the parameters and state of optimizers passed to :meth:`protect`
      (whose ``step()`` then waits for the copy), and the parameters of modules passed to it,
      are copied in the background; every other tensor (module buffers such as BatchNorm's
      running statistics, which the next forward changes in place, and anything not guarded)
      is copied at ``save()`` on the calling thread. Without ``protect`` every tensor is.
    - ``"lazy"``: everything is copied in the background; the caller promises not to change any
      tensor until :meth:`wait_copied`. A change made earlier through the tensor (its
      ``_version`` counter moves) fails that save with :class:`SnapshotTorn` (nothing
      committed); one that bypasses the counter (``.data``, another tensor over the same
      storage, fused optimizers) is silently part of the snapshot.
    - ``"eager"``: everything is copied at ``save()`` (strict: costs a copy of the state in
      memory and time on the training thread, like ``torch.save`` to memory).

    Saves are taken in order by one background thread. A save handed in while the previous one
    still waits for the daemon's memory supersedes any other save still waiting (counted as
    ``skipped``); the newest save is never dropped, and :meth:`close` flushes it. Calls from
    several threads are safe; :meth:`wait_copied` covers every save that returned before it.

    **Timelines.** Restoring a step starts a new timeline from it: after a successful restore of
    step ``s`` the daemon drops this rank's versions newer than ``s`` (on every node, parity
    included), so a crash later can never resume from the abandoned steps. A save of a step
    older than one the daemon holds is refused (``stale_step``): restore that step first.

    ``token`` (default: ``$SNAPSHOTD_JOB_TOKEN``) is the job's secret on a daemon started with
    ``--job-isolation``: the first writer binds the job to it, on every node of the cluster,
    and requests for the job without it are refused (``forbidden``). Give every rank of a job
    the same one.

    **The job's identity** (docs/design.md section 6). ``job`` names it: ``job=``, else
    ``$SNAPSHOTD_JOB``, else the launcher's run id (``$TORCHELASTIC_RUN_ID``); there is no
    default name (two unrelated jobs would share it). ``run`` is the run identity recorded with
    every version this client saves (see :func:`run_identity`): ``run=``, else
    ``$SNAPSHOTD_RUN``, else ``$TORCHELASTIC_RUN_ID``; restores, reads and drops take only
    versions of the same job name *and* run, so a torchrun restart (same run id) resumes its
    job, and another job of the same name (another run id) never restores its state. To resume
    a run under a new launch, set ``SNAPSHOTD_RUN`` to the old run's id.
    """

    def __init__(self, endpoint: str | None = None, job: str | None = None,
                 rank: int | None = None, *, timeout: timedelta = timedelta(seconds=30),
                 context: Any = None, token: str | None = None, copy: str = "auto",
                 run: str | None = None) -> None:
        if copy not in COPY_MODES:
            raise ValueError(f"copy={copy!r}: choose one of {COPY_MODES}")
        self.copy_mode = copy
        self.endpoint = endpoint or os.environ.get(ENV_ENDPOINT) or _default_endpoint()
        self.job = job_name(job)
        #: The run identity this client's versions carry and its restores take (None: any
        #: run, for operators' tools that read whatever a job name holds; saves send "").
        self.run: str | None = run_identity(run)
        self._token = os.environ.get(ENV_TOKEN, "") if token is None else token
        self.rank = int(os.environ.get("RANK", "0")) if rank is None else rank
        self.local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        #: How many ranks the job has (``WORLD_SIZE``, or torch.distributed's): the daemons
        #: keep the steps a slower rank may still report until they heard of every rank.
        self.world_size = _world_size()
        _check_torchrun_env()
        self._channel = Channel(self.endpoint, timeout, context)
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="snapshotd-save",
                                          initializer=_pin_copy_thread)
        self._cuda = torch.cuda.is_available()
        self._device = DeviceCopier()
        self._maps = _MapCache(on_close=self._device.unpin if self._cuda else None)
        self._current: _Job | None = None
        self._lock = threading.RLock()                # save(), restore() and close()
        self._handoff = threading.Lock()              # superseding vs. the worker's start
        self._stats = SaveStats()
        self._stats_lock = threading.Lock()
        self._guards: list[Any] = []                  # protected optimizers and modules
        self._guarded: tuple[tuple, frozenset] | None = None   # (signature, data_ptrs)
        self._last_error: BaseException | None = None
        self._warned = False
        self._warned_skip = False
        self._closed = False
        #: Seconds ``optimizer.step()`` waits for a save's copy to start before giving it up.
        self.step_grace = 1.0
        self._daemon_slow = False
        #: Set by every successful :meth:`restore`.
        self.last_restore: RestoreInfo | None = None
        self._releaser = _Releaser(self._channel)
        self._layouts = LayoutCache()
        self._layout_lock = threading.Lock()
        #: Ask the daemon, at each commit, for a spare slot for the next save (one round trip
        #: per save instead of two: Alloc + Commit).
        self.spare_slots = True
        self._spare: _Spare | None = None
        self._last_step: int | None = None       # newest step committed or restored here
        self._warned_pinned = False
        #: Whether the copy thread was placed after the daemon's CPUs (first Alloc).
        self._copy_placed = False
        self._pinned_from = 100                  # warn of mapped leases alive from this step
        #: The token of the timeline the next restore starts, where the caller agreed on it
        #: with the other ranks (TrainingState's survey); 0: the restore derives it.
        self._next_timeline = 0

    # ------------------------------------------------------------------ saving

    def save(self, step: int, state: Any, *, copy_now: Any = ()) -> Future:
        """Snapshot ``state`` as version ``step``; return a future that resolves to ``step``.

        Returns after laying out the state and copying the tensors that are not guarded (see
        the class docstring); the rest is copied on a background thread. Never raises: a
        state that cannot be stored, a bad step or a refusal by the daemon fails the future.
        """
        with self._stats_lock:
            self._stats.saves += 1
        try:
            return self._save(step, state, copy_now)
        except Exception as exc:  # noqa: BLE001 - anything unforeseen: the future, not the step
            return self._failed(step if isinstance(step, int) else -1, SnapshotError(
                f"step {step} not saved: {type(exc).__name__}: {exc}"), stacklevel=4)

    def _save(self, step: Any, state: Any, copy_now: Any) -> Future:
        if self._closed:
            return self._failed(step, SnapshotError("save() on a closed SnapshotClient"))
        try:
            step = _step(step)
        except SnapshotError as exc:
            return self._failed(-1, exc)
        try:
            with self._layout_lock:
                layout = self._layouts.flatten(state)
            _check_size(layout)
        except (TypeError, ValueError, OverflowError, SnapshotError) as exc:
            return self._rejected(step, exc if isinstance(exc, SnapshotError) else SnapshotError(
                f"step {step} not saved: {exc}"))
        with self._lock:
            if self._closed:
                return self._failed(step, SnapshotError("save() on a closed SnapshotClient"))
            prev = self._current
            if prev is not None and not prev.copied.is_set():
                with self._handoff:
                    if not prev.copying.is_set():
                        prev.superseded = True  # still waiting for memory: the newer one wins
                if prev.copying.is_set():
                    prev.copied.wait()          # a local memcpy, never the network
            try:
                job = _Job(step, layout)
                eager = self._eager_copies(job, copy_now, prev)
                if self.copy_mode != "eager":
                    job.versions = _versions(layout.tensors)
                if self._cuda:
                    job.events = mark_ready(layout.tensors)
            except (RuntimeError, MemoryError) as exc:   # e.g. no memory for the copies
                if job.spare is not None:
                    self._abort(job.spare.slot)
                return self._failed(step, SnapshotError(
                    f"step {step} not saved: copying its unguarded tensors at save() failed: "
                    f"{exc}; free memory, or protect() the optimizer so they are copied in "
                    "the background"))
            self._current = job
            self._worker.submit(self._run, job)
        if eager:
            with self._stats_lock:
                self._stats.eager_bytes += eager
        if self._releaser.held and not self._warned_pinned and job.step >= self._pinned_from:
            self._warned_pinned = True
            log.warning("snapshotd: %d restored version(s) stay leased in the daemon's memory "
                        "because tensors that restore() returned (copy-on-write views) are "
                        "still alive 100 saves later; clone() what you keep, or restore with "
                        "zero_copy=False", len(self._releaser.held))
        return job.future

    def _eager_copies(self, job: _Job, copy_now: Any = (), prev: _Job | None = None) -> int:
        """Copy the tensors of ``job`` that cannot wait for the background copy; return their
        bytes. Where the previous save is done and the spare slot its commit reserved fits,
        they go straight into that slot (memory the daemon already faulted in: one memcpy,
        and the job then uses the slot); else each is replaced in the layout by a clone."""
        layout = job.layout
        now = {local_tensor(t).data_ptr() for t in copy_now if local_tensor(t).numel()}
        if self.copy_mode == "lazy" and not now:
            return 0
        if self.copy_mode == "lazy":
            guarded = frozenset(t.data_ptr() for t in layout.tensors) - now
        elif self.copy_mode == "auto":
            guarded = self._guarded_ptrs() - now
        else:
            guarded = frozenset()
        todo = [i for i, t in enumerate(layout.tensors)
                if t.numel() and t.data_ptr() not in guarded]
        if not todo:
            return 0
        copied = sum(layout.tensors[i].numel() * layout.tensors[i].element_size() for i in todo)
        with torch.no_grad():
            if (prev is None or prev.future.done()) and self._spare is not None \
                    and not any(layout.tensors[i].is_cuda for i in todo):
                # The worker is idle (the previous save is done): the spare is ours to take.
                job.spare = self._take_spare(job)
            if job.spare is not None:
                try:
                    dst = self._maps.some_views(job.spare.path, layout, job.spare.mm, todo)
                    _copy_all(dst, [layout.tensors[i] for i in todo])
                except BaseException:
                    spare, job.spare = job.spare, None
                    if spare is not None:
                        self._abort(spare.slot)
                    raise
                job.written = frozenset(todo)
                return copied
            for i in todo:
                layout.tensors[i] = layout.tensors[i].clone()
        return copied

    def _guarded_ptrs(self) -> frozenset:
        """Data pointers of the tensors :meth:`protect` guards (cached until they change)."""
        tensors: list[Any] = []
        signature: list[tuple] = []
        for guard in self._guards:
            if isinstance(guard, torch.optim.Optimizer):
                params = [p for g in guard.param_groups for p in g["params"]]
                signature.append((id(guard), len(params), len(guard.state),
                                  getattr(guard, "_snapshotd_loads", 0)))
            else:
                params = list(guard.parameters())
                signature.append((id(guard), len(params)))
        key = tuple(signature)
        if self._guarded is not None and self._guarded[0] == key:
            return self._guarded[1]
        for guard in self._guards:
            if isinstance(guard, torch.optim.Optimizer):
                tensors += [p for g in guard.param_groups for p in g["params"]]
                tensors += [v for st in guard.state.values() for v in st.values()
                            if isinstance(v, torch.Tensor)]
            else:
                tensors += list(guard.parameters())
        # A DTensor (FSDP2, tensor parallel) is guarded by its local shard, which is what a
        # save copies: the optimizer's DTensor parameter and model.state_dict()'s detached
        # DTensor are two objects over one local storage.
        locals_ = (local_tensor(t) for t in tensors)
        ptrs = frozenset(t.data_ptr() for t in locals_ if t.numel())
        self._guarded = (key, ptrs)
        return ptrs

    def _refused(self, step: Any, exc: SnapshotError, cause: BaseException | None = None
                 ) -> Future:
        """A save that failed before it reached :meth:`save` (``TrainingState.save``
        gathering the state): counted as a save and a failure, logged, never raised."""
        with self._stats_lock:
            self._stats.saves += 1
        exc.__cause__ = cause
        return self._failed(step if isinstance(step, int) else -1, exc, stacklevel=5)

    def _failed(self, step: int, exc: BaseException, stacklevel: int = 3) -> Future:
        future: Future = Future()
        future.set_exception(exc)
        self._record(exc, stacklevel)
        return future

    def _rejected(self, step: int, exc: SnapshotError) -> Future:
        """A state that cannot be stored: refused at save(), before any copy, and loud (it
        fails the same way at every step until the script changes, so training is unprotected
        from the start): logged at ERROR level at the first one and every 100th."""
        with self._stats_lock:
            self._stats.rejected += 1
            count = self._stats.rejected
        if count == 1 or count % 100 == 0:
            log.error("snapshotd: the training state cannot be snapshotted, so training goes "
                      "on UNPROTECTED (%d saves refused so far): %s", count, exc)
        return self._failed(step, exc, stacklevel=6)   # the warning points at save()'s caller

    def _run(self, job: _Job) -> None:
        slot = job.spare.slot if job.spare is not None else None
        try:
            if job.superseded:
                raise SnapshotSkipped(f"step {job.step} not saved: superseded (a newer save, or "
                                      "an optimizer step that could not wait) while it waited "
                                      "for snapshotd")
            spare = job.spare if job.spare is not None else self._take_spare(job)
            if spare is not None:                 # reserved at the last commit: no Alloc
                slot, path, nbytes, mapping = spare.slot, spare.path, spare.nbytes, spare.mm
            else:
                reply = self._channel.call(p.Alloc(
                    self.job, self.rank, job.step, job.layout.nbytes, os.getpid(),
                    self.local_world_size, token=self._token, world_size=self.world_size,
                    run=self.run or ""))
                slot, path, nbytes, mapping = reply.slot, reply.path, reply.nbytes, None
                if not self._copy_placed:
                    self._copy_placed = True
                    _follow_daemon_cpus(reply.cpus)
            self._daemon_slow = False
            with self._handoff:
                if job.superseded:
                    raise SnapshotSkipped(f"step {job.step} not saved: a newer save superseded "
                                          "it while it waited for snapshotd")
                job.copying.set()
            self._copy_in(path, nbytes, job.layout, job.events, mapping, job.written)
            self._check_untorn(job)           # before copied: the training may go on after
            job.copied.set()
            job.layout.tensors.clear()            # release eager copies early
            self._commit(slot, job.layout, job.step, job.started)
            slot = None
            self._last_step = job.step
            with self._stats_lock:
                self._stats.committed += 1
            job.future.set_result(job.step)
        except BaseException as exc:  # noqa: BLE001 - reported through the future
            job.copied.set()
            job.layout.tensors.clear()
            if slot is not None:
                self._abort(slot)
            self._record(exc)
            job.future.set_exception(exc)

    def _check_untorn(self, job: _Job) -> None:
        """Refuse the save if a tensor copied in the background changed in place since save()
        (its version counter moved): the bytes copied may mix before and after."""
        if job.versions is None:
            return
        now = _versions(job.layout.tensors)
        torn = [i for i, (a, b) in enumerate(zip(job.versions, now)) if a != b
                and i not in job.written]
        if not torn:
            return
        names = [job.layout.entries[i]["name"] for i in torn]
        raise SnapshotTorn(
            f"step {job.step} not saved: tensor {names[0]!r}"
            + (f" (and {len(names) - 1} more: {names[1:4]})" if len(names) > 1 else "")
            + " was changed in place while it was being copied in the background, so the "
            "snapshot would be torn (nothing was committed). Do not change a saved tensor "
            "until its copy ends: protect() the optimizer that changes it (its step() waits), "
            "call client.wait_copied() before changing it (copy='lazy'), pass it to "
            "save(copy_now=...), or use copy='eager'")

    def _take_spare(self, job: _Job) -> _Spare | None:
        """The spare slot the last commit reserved, if this save can use it: same size, a
        newer step than this client's last (a re-save or an older step goes through
        ``Alloc``, which refuses a stale step before any copy), and still the daemon's file
        (a daemon restart removes it). One that cannot be used is given back."""
        spare, self._spare = self._spare, None
        if spare is None:
            return None
        usable = (spare.nbytes == job.layout.nbytes and not spare.mm.closed
                  and (self._last_step is None or job.step > self._last_step))
        if usable:
            try:
                usable = os.stat(spare.path).st_ino == spare.inode
            except FileNotFoundError:
                return None                       # the daemon that reserved it is gone
        if usable:
            return spare
        self._abort(spare.slot)
        return None

    def _drop_spare(self) -> None:
        spare, self._spare = self._spare, None
        if spare is not None:
            self._abort(spare.slot)

    def _commit(self, slot: int, layout: Layout, step: int, started: float = -1.0) -> None:
        """Commit with the table, or, for a layout the daemon has seen, only its digest; ask
        for a spare slot for the next save of this size (kept in ``self._spare``)."""
        plan = layout.plan
        table = plan.get("table")
        if table is None:
            table = tuple(p.TensorEntry(e["name"], e["dtype"], tuple(e["shape"]), e["offset"],
                                        e["nbytes"]) for e in layout.entries)
            digest = hashlib.blake2b(p.encode(p.Commit(0, table, "")), digest_size=16)
            plan["table"], plan["digest"] = table, digest.hexdigest()
        # A spare is asked for from this client's second commit on: a client that saves once
        # (a DCP writer, export tools) would only have it made, mapped and given back.
        with self._stats_lock:
            again = self._stats.committed > 0
        nbytes = layout.nbytes if self.spare_slots and again and layout.nbytes else 0
        took = time.monotonic() - started if started >= 0 else -1.0
        if not table:
            self._spare_from(self._channel.call(p.Commit(slot, (), layout.meta, "", step,
                                                         nbytes, took)))
            return
        if plan.get("known") is self._channel:
            try:
                self._spare_from(self._channel.call(
                    p.Commit(slot, (), layout.meta, plan["digest"], step, nbytes, took)))
                return
            except DaemonError as exc:
                if exc.code != "unknown_layout":
                    raise
        self._spare_from(self._channel.call(
            p.Commit(slot, table, layout.meta, plan["digest"], step, nbytes, took)))
        plan["known"] = self._channel

    def _spare_from(self, reply: p.CommitReply) -> None:
        if not reply.next_slot:
            return
        try:
            mm = self._maps.get(reply.next_path, reply.next_nbytes)
            inode = self._maps.inode(reply.next_path)
        except OSError:
            self._abort(reply.next_slot)
            return
        self._spare = _Spare(reply.next_slot, reply.next_path, reply.next_nbytes, mm, inode)

    def _copy_in(self, path: str, nbytes: int, layout: Layout, events: dict,
                 mapping: mmap.mmap | None = None, written: frozenset = frozenset()) -> None:
        """Copy ``layout``'s tensors into the slot ``path``, but those at the indices
        ``written`` (copied there at ``save()``)."""
        if nbytes == 0:
            return
        mm, views = self._maps.views(path, nbytes, layout, mapping)
        on_device = []
        dst: list[torch.Tensor] = []
        src: list[torch.Tensor] = []
        with torch.no_grad():
            for i, (tensor, view) in enumerate(zip(layout.tensors, views)):
                if view is None or i in written:
                    continue
                if tensor.is_cuda:
                    on_device.append((view, tensor))
                else:
                    dst.append(view)
                    src.append(tensor)
            _copy_all(dst, src)
            if on_device:
                self._device.copy(on_device, events, mm)

    def _abort(self, slot: int) -> None:
        try:
            self._channel.call(p.Abort(slot), timeout=timedelta(seconds=5))
        except SnapshotError:
            pass

    def _record(self, exc: BaseException, stacklevel: int = 3) -> None:
        skipped = isinstance(exc, SnapshotSkipped)
        torn = 0
        with self._stats_lock:
            if skipped:
                self._stats.skipped += 1
            else:
                self._stats.failed += 1
            if isinstance(exc, SnapshotTorn):
                self._stats.torn += 1
                torn = self._stats.torn
            count = self._stats.skipped if skipped else self._stats.failed
        self._last_error = exc
        if torn:
            if torn == 1 or torn % 100 == 0:
                log.warning("snapshotd: %d save(s) refused as torn so far: %s", torn, exc)
            return
        if skipped:
            if not self._warned_skip or count % 100 == 0:
                self._warned_skip = True
                log.warning("snapshot skipped (%d so far; saves come faster than snapshotd "
                            "takes them): %s", count, exc)
            return
        if not self._warned:
            self._warned = True
            warnings.warn(f"snapshotd: a snapshot failed and training goes on: {exc}",
                          RuntimeWarning, stacklevel=stacklevel)
        log.warning("snapshot failed (%d so far): %s", count, exc)

    def stats(self) -> SaveStats:
        """Counts of saves taken, committed, skipped and failed so far (a copy)."""
        with self._stats_lock:
            return SaveStats(**self._stats.__dict__)

    def wait_copied(self) -> None:
        """Block until the bytes of every save handed in so far are copied (the state may
        change then). Saves are copied in order, so waiting for the newest one is enough."""
        job = self._current
        if job is not None:
            job.copied.wait()

    def _before_step(self) -> None:
        """``optimizer.step()``'s hook: wait for the copy in flight, never for the daemon.

        A save whose copy has not started (its memory request is still with the daemon) gets
        ``step_grace`` seconds to start, then is given up (counted as skipped) so the step goes
        on; while the daemon stays that slow, later such saves are given up at once."""
        job = self._current
        if job is None or job.copied.is_set():
            return
        if not job.copying.wait(0 if self._daemon_slow else self.step_grace):
            with self._handoff:
                if not job.copying.is_set():
                    job.superseded = True
                    self._daemon_slow = True
                    return
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

    def protect(self, optimizer: torch.optim.Optimizer | None = None,
                *modules: torch.nn.Module) -> None:
        """Guard tensors so that they can be copied in the background.

        ``optimizer.step()`` waits for copies in flight, so the optimizer's parameters and
        state may be copied after ``save()`` returns (a wrapper whose ``.optimizer`` is the torch
        optimizer, like accelerate's ``AcceleratedOptimizer``, is looked through: the hook goes
        on the optimizer it steps). ``modules``: their parameters change only
        in ``optimizer.step()`` (frozen ones never), so they may be too; their buffers are
        always copied at ``save()``. Calling it again with the same objects does nothing.
        """
        from ._training import unwrap_optimizer

        added = False
        optimizers = (unwrap_optimizer(optimizer),) if optimizer is not None else ()
        for guard in optimizers + modules:
            if any(g is guard for g in self._guards):
                continue
            added = True
            if isinstance(guard, torch.optim.Optimizer):
                guard.register_step_pre_hook(lambda *_: self._before_step())
                guard.register_load_state_dict_post_hook(_count_load)
            elif not isinstance(guard, torch.nn.Module):
                raise TypeError(f"protect() takes an optimizer and modules, got "
                                f"{type(guard).__name__}")
            self._guards.append(guard)
        if added:
            self._guarded = None

    def last_error(self) -> BaseException | None:
        """The newest error of a save, or None."""
        return self._last_error

    # ------------------------------------------------------------------ restoring

    def coding(self) -> tuple[int, int]:
        """The erasure coding ``(k, m)`` of the daemon's group: ``m`` nodes of a group of
        ``k + m`` can be lost without losing data; ``m = 0``: a node loss loses this node's
        snapshots (no peers, or replication off). ``(0, 0)`` from a daemon that does not say."""
        reply = self._channel.call(p.Status(token=self._token))
        return reply.group_k, reply.group_m

    def steps(self) -> list[int]:
        """Committed steps of this rank held by the daemon, oldest first."""
        reply = self._channel.call(p.ListVersions(self.job, self.rank, token=self._token,
                                                  run=self.run))
        return [v.step for v in reply.versions]

    def latest(self) -> int | None:
        """This rank's newest committed step, or None."""
        steps = self.steps()
        return steps[-1] if steps else None

    def restore(self, step: int | None = None, into: Any = None,
                check: Callable[[Any], None] | None = None, *,
                meshes: Sequence[Any] = (), local_shards: bool = False,
                zero_copy: bool = True, remote: bool = False) -> tuple[int, Any] | None:
        """Return ``(step, state)`` of the newest version (or of ``step``), or None if none.

        Inside a job with ``torch.distributed`` initialised and ``step`` None, every rank
        restores the same step: the newest one that all ranks hold (see :func:`agree_step`).
        Saves in flight are finished first. A successful restore of step ``s`` starts a new
        timeline: this rank's versions newer than ``s`` are dropped.

        ``into``: an existing state (e.g. ``{"model": model.state_dict()}``); each of its
        tensors is filled in place and returned instead of a fresh one. Every tensor of
        ``into`` must be in the snapshot with the same dtype and shape, and be writable (not
        an ``expand()``-ed view); otherwise nothing is written and ``SnapshotError`` names
        every mismatch. Tensors of the snapshot not in ``into`` come back freshly allocated.

        ``check``: called with the state's structure, its tensors on the ``meta`` device,
        before anything is copied; raise from it to refuse the snapshot unchanged. A DTensor
        appears there as a ``meta`` tensor of its global shape.

        **DTensors** (FSDP2, tensor parallel, HSDP) come back as DTensors: a DTensor of
        ``into`` is filled in place (its local shard) and returned; any other (an optimizer's
        moments in a fresh process) is rebuilt with ``DTensor.from_local`` on the live mesh
        with the recorded ranks, taken from ``meshes`` (a sequence of ``DeviceMesh``) and from
        the DTensors of ``into``. Every shard must sit where it was saved: the same global
        shape, placements, mesh and coordinate of this rank; otherwise nothing is written and
        ``SnapshotError`` names every mismatch (resharding is not supported yet). With
        ``local_shards=True`` a DTensor not in ``into`` comes back as this rank's local shard,
        a plain tensor (outside the job: no mesh needed).

        ``zero_copy`` (default): the tensors that come back fresh (not in ``into``) are
        copy-on-write mappings of the daemon's memory: nothing is copied, a page is copied
        privately only when it is first written, and the daemon's copy is never changed. The
        version stays leased (held by the daemon, in its memory budget) until the last of those
        tensors is freed; keep them briefly (``load_state_dict`` into a model, ``.to(device)``)
        or ``clone()`` them. ``zero_copy=False`` copies them into fresh memory instead and
        returns the lease at once. Checksums are verified before either way.

        ``remote`` (``step`` named): where this node's daemon does not hold this rank's
        version, it fetches it from the node of the cluster that does (the job's ranks moved
        to other nodes at the same world size); the new timeline's drop then reaches every
        node that holds the rank (``Drop(everywhere=True)``).
        """
        step = None if step is None else _step(step)
        with self._lock:
            self.wait()
            return self._restore(step, into, check, tuple(meshes), local_shards,
                                 zero_copy=zero_copy, remote=remote)

    def read(self, step: int | None = None, *, local_shards: bool = True,
             zero_copy: bool = True, remote: bool = False) -> tuple[int, Any] | None:
        """Return ``(step, state)`` of this rank's version ``step`` (newest when None), or
        None: a copy for inspection or export, not a restore. It starts no new timeline (the
        rank's newer versions stay) and agrees with no other rank. DTensors come back as this
        rank's local shards unless ``local_shards=False`` (then the job's meshes must exist).
        ``zero_copy``: as in :meth:`restore` (the tensors map the version, leased until freed).
        ``remote``: where this node's daemon does not hold the version (``step`` named), it
        fetches it from the node of the cluster that does (verified there, checked on arrival).

        Example::

            with SnapshotClient(job="gpt", rank=3) as client:
                got = client.read(120)             # rank 3's step 120, newer steps untouched
        """
        step = None if step is None else _step(step)
        with self._lock:
            self.wait()
            return self._restore(step, None, None, (), local_shards, timeline=False,
                                 zero_copy=zero_copy, remote=remote)

    def _restore(self, step: int | None, into: Any, check: Callable[[Any], None] | None,
                 meshes: tuple = (), local_shards: bool = False,
                 timeline: bool = True, zero_copy: bool = True,
                 remote: bool = False) -> tuple[int, Any] | None:
        token, self._next_timeline = self._next_timeline, 0
        if step is None and timeline and _distributed():
            step, token = agree_timeline(self)
            if step is None:
                self._start_over(token)
                return None
        try:
            lease = self._channel.call(p.Open(self.job, self.rank, os.getpid(), step,
                                              token=self._token, map=zero_copy,
                                              remote=remote and step is not None,
                                              run=self.run))
        except DaemonError as exc:
            if exc.code == "not_found" and step is None:
                return None
            raise
        started = time.perf_counter()
        mapped = False                  # the lease went to the tensors that map the version
        try:
            try:
                targets, placer = _targets(into, lease, meshes, local_shards)
                if check is not None:
                    check(unflatten(lease.meta, [view_of(None, e.__dict__, device="meta")
                                                 for e in lease.tensors]))
            except SnapshotError:
                raise
            except Exception as exc:  # noqa: BLE001 - refused before anything is written
                raise SnapshotError(f"snapshot of job {self.job!r} rank {self.rank} step "
                                    f"{lease.step} does not fit: {exc}; nothing was "
                                    "restored") from exc
            # The restored step is where this rank's timeline continues: what was saved after
            # it is abandoned and must never be served again (here, in parity, after a crash).
            # Dropped before anything is written, so a failure here leaves the live state as is.
            # Sent even when nothing is newer: the drop names the new timeline (the same
            # token on every rank of this restore), which the daemon's retention reports carry.
            if timeline:
                self._channel.call(p.Drop(self.job, self.rank, newer_than=lease.step,
                                          token=self._token, everywhere=remote,
                                          timeline=token or timeline_token(self.job,
                                                                           lease.step),
                                          run=self.run))
            tensors, mapped = self._copy_out(lease, targets, zero_copy)
        finally:
            if not mapped:
                self._release(lease.lease)
        if timeline:
            self._last_step = lease.step          # the timeline continues from here
            self._pinned_from = lease.step + 100
            self.last_restore = RestoreInfo(
                lease.step, lease.tier, lease.nbytes, time.perf_counter() - started,
                bytes_from_peers=lease.nbytes if lease.tier == "peer" else 0)
            log.info("restored job %r rank %d step %d from %s (%d bytes)", self.job,
                     self.rank, lease.step, lease.tier, lease.nbytes)
        return lease.step, unflatten(lease.meta, tensors, placer)

    def _start_over(self, token: int = 0) -> None:
        """The job has no common step and starts from scratch: a new timeline from nothing, so
        this rank's older versions must not be served again (nor block its new saves).
        ``token``: the timeline's, as the restore's agreement named it."""
        self._warn_other_runs()
        # Sent even when this rank holds nothing: the drop names the new timeline, and a node
        # that does not take it would hold back the job's retention (review of the
        # timelines, F1: no pin rose again on any node).
        self._channel.call(p.Drop(self.job, self.rank, token=self._token,
                                  timeline=token or timeline_token(self.job, -1)))
        self._last_step = None

    def _warn_other_runs(self) -> None:
        """Say so where this rank's daemon holds versions of the job name written by other
        runs: they are not this job's (issue 24, finding 1), and the start from scratch drops
        this rank's; a user who meant to resume one names its run."""
        if self.run is None:
            return
        try:
            held = self._channel.call(p.ListVersions(self.job, self.rank, token=self._token,
                                                     run=None)).versions
        except SnapshotError:
            return
        others = sorted({v.run for v in held if v.run != self.run})
        if others:
            log.warning("job %r rank %d: this daemon holds versions of the job name from other "
                        "runs %s, not restored by this run (%r) and dropped as it starts from "
                        "scratch; to resume one, set SNAPSHOTD_RUN to its id", self.job,
                        self.rank, others[:4], self.run)

    def _release(self, lease: int) -> None:
        try:
            self._channel.call(p.Release(lease), timeout=timedelta(seconds=10))
        except SnapshotError as exc:
            log.warning("could not release restore lease %d: %s (the daemon frees it "
                        "when this process exits)", lease, exc)

    def _copy_out(self, lease: p.OpenReply, targets: dict[str, torch.Tensor],
                  zero_copy: bool = True) -> tuple[list[torch.Tensor], bool]:
        """The restored tensors in table order, and whether they map the version (then the
        lease is returned when the last of them is freed, not now).

        The segment is mapped privately (copy-on-write): tensors of ``targets`` are filled
        from it, and with ``zero_copy`` every other tensor is a view of it (a page is copied
        when first written, never the daemon's copy); without, they are copied out."""
        if lease.nbytes == 0:
            return [view_of(b"", e.__dict__) for e in lease.tensors], False
        fresh = [e for e in lease.tensors if e.nbytes and e.name not in targets]
        fd = os.open(lease.path, os.O_RDONLY)
        try:
            mm = mmap.mmap(fd, lease.nbytes, mmap.MAP_PRIVATE,
                           mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        out = []
        with torch.no_grad():
            for entry in lease.tensors:
                src = view_of(mm, entry.__dict__)
                dst = targets.get(entry.name)
                if dst is not None:
                    out.append(dst.copy_(src))
                elif zero_copy or not entry.nbytes:
                    out.append(src)
                else:
                    out.append(torch.empty_like(src).copy_(src))
                del src
        if zero_copy and fresh:
            self._releaser.watch(mm, lease.lease)
            return out, True
        _close(mm)
        return out, False

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Flush: wait until the newest save is committed (or failed, which is logged), then
        release the connection."""
        if self._closed:
            return
        with self._lock:
            self.wait()
            job = self._current
            self._closed = True
        if job is not None and job.future.exception() is not None:
            log.warning("snapshotd client closed: the last save (step %d) was NOT committed: "
                        "%s", job.step, job.future.exception())
        self._worker.shutdown(wait=True)
        self._drop_spare()
        self._maps.clear()
        self._channel.close()

    def __enter__(self) -> SnapshotClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@dataclass
class _Spare:
    """A slot the daemon reserved at the last commit for the next save (no ``Alloc``)."""

    slot: int
    path: str
    nbytes: int
    mm: mmap.mmap
    inode: int


class _Releaser:
    """Returns the leases of restored versions whose tensors map them, once the mapping is gone.

    ``watch(mm, lease)`` ties a lease to a mapping; when the mapping object is freed (after
    ``munmap``: every tensor viewing it is gone) the lease id is queued, and a background
    thread sends ``Release``. The callback only appends to a deque and writes a byte to a pipe
    (no lock), because it runs wherever the last tensor happens to be freed, possibly inside a
    lock of the client or of ZeroMQ. A lease that is never returned (the process exits with
    the tensors alive) is reclaimed by the daemon when the process is gone.
    """

    def __init__(self, channel: Channel) -> None:
        self._channel = channel
        self._queue: collections.deque[int] = collections.deque()
        self._pipe: tuple[int, int] | None = None
        self._start = threading.Lock()
        #: Leases currently held by live mappings (ids), for tests and stats.
        self.held: set[int] = set()

    def watch(self, mm: mmap.mmap, lease: int) -> None:
        with self._start:
            if self._pipe is None:
                self._pipe = os.pipe()
                threading.Thread(target=self._run, args=(self._pipe[0],), daemon=True,
                                 name="snapshotd-release").start()
        self.held.add(lease)
        finalizer = weakref.finalize(mm, _queue_release, self._queue, self._pipe[1], lease)
        finalizer.atexit = False

    def _run(self, fd: int) -> None:
        while True:
            try:
                os.read(fd, 4096)
            except OSError:      # pragma: no cover - the pipe is never closed
                return
            while self._queue:
                lease = self._queue.popleft()
                self.held.discard(lease)
                try:
                    self._channel.call(p.Release(lease), timeout=timedelta(seconds=10))
                except SnapshotError as exc:
                    log.warning("could not release restore lease %d: %s (the daemon frees it "
                                "when this process exits)", lease, exc)


def _queue_release(queue: collections.deque[int], fd: int, lease: int) -> None:
    queue.append(lease)
    try:
        os.write(fd, b"x")
    except OSError:              # pragma: no cover - a full pipe: the reader drains it anyway
        pass


class _MapCache:
    """Write mappings of recently used slots, kept so a recycled segment is not re-faulted.

    The daemon recycles a rank's segments, so the same few come back save after save. A mapping
    whose file was replaced or removed is dropped at the next lookup; at most ``size`` are kept.
    The tensor views of a layout into a mapping are kept with it (a state of the same
    structure, saved again into the same segment, reuses them), and dropped before it.
    """

    def __init__(self, size: int = 4, on_close: Any | None = None) -> None:
        self._size = size
        self._on_close = on_close
        self._maps: dict[str, tuple[int, mmap.mmap]] = {}
        self._views: dict[str, tuple[list, list[torch.Tensor | None], mmap.mmap]] = {}

    def _drop(self, path: str) -> None:
        self._views.pop(path, None)
        mm = self._maps.pop(path)[1]
        if self._on_close is not None:
            self._on_close(mm)
        _close(mm)

    def views(self, path: str, nbytes: int, layout: Layout, mapping: mmap.mmap | None = None
              ) -> tuple[mmap.mmap, list[torch.Tensor | None]]:
        """The mapping of ``path`` (``mapping``, when the caller holds it already: a spare
        slot mapped when it was reserved, never re-mapped by path) and a view of it per table
        entry (None: an empty tensor)."""
        mm = mapping if mapping is not None else self.get(path, nbytes)
        known = self._cached_views(path, layout, mm)
        if known is not None:
            return mm, known
        views = [view_of(mm, e) if e["nbytes"] else None for e in layout.entries]
        if self._maps.get(path, (0, None))[1] is mm:       # kept only with a cached mapping
            self._views[path] = (layout.entries, views, mm)
        return mm, views

    def some_views(self, path: str, layout: Layout, mm: mmap.mmap, indices: list[int]
                   ) -> list[torch.Tensor]:
        """Views of ``mm`` for the table entries at ``indices`` only (none of them empty):
        the cached ones when this layout's views of ``path`` are cached, else made for these
        entries alone (a layout whose views of ``path`` are not cached, as with FSDP2 states, would
        otherwise have every view made on the training thread, not just these)."""
        known = self._cached_views(path, layout, mm)
        if known is not None:
            return [known[i] for i in indices]  # type: ignore[misc]
        return [view_of(mm, layout.entries[i]) for i in indices]

    def _cached_views(self, path: str, layout: Layout, mm: mmap.mmap
                      ) -> list[torch.Tensor | None] | None:
        """The views of ``mm`` made for ``layout``'s table, if still cached for ``path``."""
        known = self._views.get(path)
        if known is not None and known[0] is layout.entries and known[2] is mm:
            return known[1]
        return None

    def inode(self, path: str) -> int:
        """The inode of the cached mapping of ``path``."""
        return self._maps[path][0]

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


def _launcher_run_id() -> str:
    """The launcher's run id (``$TORCHELASTIC_RUN_ID``), "" where there is none: torchrun's
    default ``--rdzv-id`` ``none`` names no run (every job launched without one has it)."""
    run = os.environ.get(ENV_RUN_ID, "").strip()
    return "" if run.lower() in ("", "none") else run


def job_name(job: str | None = None) -> str:
    """The job's name: ``job``, else ``$SNAPSHOTD_JOB``, else the launcher's run id (made a
    valid job name: characters other than ``A-Z a-z 0-9 _ . -`` become ``-``, at most 128).
    Raise :class:`SnapshotError` saying how to name the job where none of them is set: a
    default name would let two unrelated jobs restore each other's state (issue 24)."""
    if job is None:
        job = os.environ.get(ENV_JOB, "").strip() or None
    if job is None:
        run = _launcher_run_id()
        if run:
            job = re.sub(r"[^A-Za-z0-9_.-]", "-", run)[:128]
            job = job if job not in (".", "..") else f"run{job}"
    if not job:
        raise SnapshotError(
            "the job has no name: pass SnapshotClient(job=\"my-job\") or set SNAPSHOTD_JOB "
            "(the same on every rank of the job, and one no other job of the cluster uses), "
            "or launch with torchrun --rdzv-id (TORCHELASTIC_RUN_ID names the job)")
    return job


def run_identity(run: str | None = None) -> str:
    """The job's run identity, recorded with every version it saves: ``run``, else
    ``$SNAPSHOTD_RUN``, else the launcher's run id (``$TORCHELASTIC_RUN_ID``; the same across
    torchrun's restarts of one job), else "" (none: every run of the job name is one)."""
    if run is None:
        run = os.environ.get(ENV_RUN, "").strip() or _launcher_run_id()
    return run


def timeline_token(*parts: Any) -> int:
    """A nonzero 63-bit token naming a timeline: the same on every rank given the same parts.

    >>> timeline_token("gpt", 7) == timeline_token("gpt", 7) != timeline_token("gpt", 8)
    True
    """
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1 or 1


def agree_step(client: SnapshotClient, group: Any = None) -> int | None:
    """The newest step that every rank of ``group`` holds, or None if there is none.

    Each rank lists the steps its daemon holds and the lists are exchanged (one
    ``all_gather_object``). Comparing only the newest steps (a MIN all-reduce) is not enough:
    a daemon keeps a few versions per rank (the newest ones and the newest protected one), so
    when ranks' newest steps are far apart, or a replacement node rebuilt an older protected
    version, the minimum of the newest steps can be a step some rank no longer holds. If any
    rank cannot list its steps, every rank raises the same ``SnapshotError``.
    """
    return agree_timeline(client, group)[0]


def newest_common_step(client: SnapshotClient, group: Any = None, *,
                       backend: str | None = None) -> int | None:
    """The newest step that every rank of the job holds, or None: what a restore would
    load, without restoring. A collective: call it on every rank.

    Usable before a framework starts: where ``torch.distributed`` is not initialised yet and
    the launcher's environment names several ranks (``WORLD_SIZE`` > 1, as torchrun sets it),
    the default process group is initialised first from that environment (``env://``) with
    ``backend`` (default: torch's choice, gloo for CPU tensors and NCCL for CUDA ones where
    CUDA is available). Frameworks that start the process group themselves (Lightning,
    accelerate) find it initialised and use it. In a single process it is the newest step
    this rank's daemon holds.

    Example, before ``trainer.fit`` (under torchrun)::

        client = SnapshotClient(job="gpt")
        step = newest_common_step(client)          # e.g. 41, or None: nothing to resume
    """
    import torch.distributed as dist

    if not _distributed():
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            dist.init_process_group(backend=backend)
        else:
            held = client.steps()
            return max(held) if held else None
    return agree_step(client, group)


def agree_token(step: int, group: Any = None) -> int:
    """The token of a new timeline from ``step`` that the ranks of ``group`` restore together
    (an explicit step, which needs no agreement on the step): every rank's random nonce,
    gathered (a collective: every rank calls it)."""
    import torch.distributed as dist

    everyone: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, os.urandom(8), group=group)
    return timeline_token(step, everyone)


def agree_timeline(client: SnapshotClient, group: Any = None) -> tuple[int | None, int]:
    """:func:`agree_step`, and the token that names the timeline the restore starts (from
    every rank's random nonce, gathered in the same exchange: the same on every rank, and
    another one for every restore)."""
    import torch.distributed as dist

    try:
        mine: Any = sorted(set(client.steps()))
    except SnapshotError as exc:
        mine = f"{type(exc).__name__}: {exc}"
    everyone: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, (client.rank, mine, os.urandom(8)), group=group)
    errors = [f"rank {rank}: {held}" for rank, held, _ in everyone if isinstance(held, str)]
    if errors:
        raise SnapshotError("cannot agree on a step to restore: " + "; ".join(errors))
    common = set(everyone[0][1])
    for _, held, _ in everyone[1:]:
        common &= set(held)
    step = max(common) if common else None
    return step, timeline_token(step, [nonce for _, _, nonce in everyone])


def restore_agreed(client: SnapshotClient) -> tuple[int, Any] | None:
    """Restore, copied out (``zero_copy=False``), the newest step every rank holds, starting
    its timeline (:func:`agree_timeline` in a ``torch.distributed`` job, else the newest step
    held); None, after starting a timeline from nothing, when no such step exists. A
    collective where a process group is up: the framework integrations' resume."""
    if _distributed():
        step, token = agree_timeline(client)
    else:
        held = client.steps()
        step, token = (max(held) if held else None), 0
    if step is None:
        client._start_over(token)
        return None
    client._next_timeline = token
    restored = client.restore(step, zero_copy=False)
    if restored is None:
        raise SnapshotError(f"job {client.job!r}: step {step}, which every rank held, is "
                            "gone; restart the job")
    return step, restored[1]



def _targets(into: Any, lease: p.OpenReply, meshes: tuple = (),
             local_shards: bool = False) -> tuple[dict[str, torch.Tensor], Placer]:
    """The tensors of ``into`` by name (a DTensor's local shard), each checked against the
    snapshot's table, and the :class:`Placer` of the snapshot's DTensors (checked too)."""
    table = lease.tensors
    layout = flatten(into) if into is not None else Layout([], [], "", 0)
    live = {layout.entries[i]["name"]: t for i, t in layout.dtensors.items()}
    for entry, tensor in zip(layout.entries, layout.tensors):
        live.setdefault(entry["name"], tensor)
    try:
        placer = Placer(lease.meta, [t.name for t in table], [t.shape for t in table], live,
                        meshes, local_shards=local_shards)
    except ShardingMismatch as exc:
        raise SnapshotError(f"restore does not fit the live job, nothing was written: "
                            f"{exc}") from None
    held = {t.name: t for t in table}
    problems, targets = [], {}
    split = set()
    if any(entry["name"] not in held for entry in layout.entries):
        # A tensor another replica stored (split replicas, TrainingState): left to the
        # reassembly that follows the restore.
        from ._replicas import marker_names

        split = marker_names(unflatten(lease.meta, [view_of(None, e.__dict__, device="meta")
                                                    for e in table]))
    for entry, tensor in zip(layout.entries, layout.tensors):
        name, row = entry["name"], held.get(entry["name"])
        if row is None and name in split:
            continue
        if row is None:
            problems.append(f"{name}: not in the snapshot")
        elif row.dtype != entry["dtype"] or tuple(row.shape) != tuple(entry["shape"]):
            problems.append(f"{name}: snapshot has {row.dtype}{list(row.shape)}, into has "
                            f"{entry['dtype']}{entry['shape']}")
        elif tensor.numel() > 1 and not _writable(tensor):
            problems.append(f"{name}: the into tensor overlaps itself (expand()ed or "
                            "as_strided view) and cannot be filled")
        else:
            targets[name] = tensor
    if problems:
        raise SnapshotError(f"restore(into=...) does not match the snapshot, nothing was "
                            f"written: {'; '.join(problems[:8])}"
                            + (f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""))
    return targets, placer


def _step(step: Any) -> int:
    """``step`` as an int: ints and integer scalars (numpy, 0-d tensors), never bool/float."""
    if not isinstance(step, (bool, float)) and not (isinstance(step, torch.Tensor) and (
            step.is_floating_point() or step.dtype == torch.bool)):
        try:
            value = operator.index(step)
        except TypeError:
            pass
        else:
            if 0 <= value < 1 << 63:
                return value
    raise SnapshotError(f"step must be an integer in [0, 2**63), got {step!r} "
                        f"({type(step).__name__}); pass the integer training step")


def _writable(t: torch.Tensor) -> bool:
    """No two elements of ``t`` share memory (so ``copy_`` into it is defined)."""
    reach = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz > 1):
        if stride < reach:
            return False
        reach = stride * size
    return True


def _check_size(layout: Layout) -> None:
    """Refuse, before any copy, a state whose restore reply could not be carried."""
    meta = len(layout.meta)
    if meta > MAX_META_BYTES:
        raise SnapshotError(f"the non-tensor part of the state is {meta} bytes of JSON, over "
                            f"the {MAX_META_BYTES}-byte limit; keep large data (lists of "
                            "numbers, permutations) in tensors, e.g. torch.tensor(values)")
    names = layout.plan.get("name_bytes")
    if names is None:
        names = layout.plan["name_bytes"] = sum(
            len(n) if n.isascii() else len(json.dumps(n)) for n in (e["name"] for e in
                                                                   layout.entries))
    reply = meta * 2 + names * 2 + _ROW_BYTES * len(layout.entries) + _REPLY_BYTES
    if reply > p.MAX_MESSAGE_BYTES:
        raise SnapshotError(f"the state's table ({len(layout.entries)} tensors) and non-tensor "
                            f"values would need a {reply}-byte restore reply, over the "
                            f"{p.MAX_MESSAGE_BYTES}-byte limit; merge small tensors")


def _count_load(optimizer: Any) -> None:
    """load_state_dict replaces the optimizer's state tensors: guarded pointers change."""
    optimizer._snapshotd_loads = getattr(optimizer, "_snapshotd_loads", 0) + 1


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _pin_copy_thread() -> None:
    """Pin the calling thread (the save worker) to ``$SNAPSHOTD_COPY_CPUS``, if set (``any``:
    left where the scheduler puts it, even where the daemon is pinned)."""
    spec = os.environ.get(ENV_COPY_CPUS, "").strip()
    if not spec or spec == "any" or not hasattr(os, "sched_setaffinity"):
        return
    try:
        cpus: set[int] = set()
        for part in spec.split(","):
            lo, _, hi = part.partition("-")
            cpus.update(range(int(lo), int(hi or lo) + 1))
        os.sched_setaffinity(0, cpus)          # 0: this thread (Linux affinity is per thread)
    except (ValueError, OSError) as exc:
        log.warning("%s=%r not applied: %s", ENV_COPY_CPUS, spec, exc)


def _follow_daemon_cpus(cpus: Sequence[int]) -> None:
    """Move the calling thread (the save worker) to the CPUs the daemon is pinned to, unless
    ``$SNAPSHOTD_COPY_CPUS`` is set: the cores an operator leaves to snapshotd take the copy,
    not the trainer's (one trainer per core: 1-2% of the step instead of 6-7%)."""
    if not cpus or os.environ.get(ENV_COPY_CPUS, "").strip() \
            or not hasattr(os, "sched_setaffinity"):
        return
    try:
        os.sched_setaffinity(0, set(cpus))
        log.info("snapshotd: the copy thread runs on the daemon's CPUs %s (%s=any: not moved)",
                 list(cpus), ENV_COPY_CPUS)
    except OSError as exc:              # e.g. outside this process's cpuset
        log.info("snapshotd: the copy thread stays where it is (daemon's CPUs %s: %s)",
                 list(cpus), exc)


def _versions(tensors: list[torch.Tensor]) -> list[int]:
    """Each tensor's in-place change counter (``Tensor._version``, which ``add_``, ``copy_``
    and the optimizers' foreach ops bump; shared by a tensor's views and ``detach()``es).
    An inference tensor keeps none: -1, never seen to change."""
    try:
        return [t._version for t in tensors]
    except RuntimeError:              # an inference-mode tensor among them
        out = []
        for t in tensors:
            try:
                out.append(t._version)
            except RuntimeError:
                out.append(-1)
        return out


def _copy_all(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    """``d.copy_(s)`` for every pair, in one call where torch has it (hundreds of small tensors
    cost a few microseconds each through Python)."""
    foreach = getattr(torch, "_foreach_copy_", None)
    if foreach is not None and dst:
        try:
            foreach(dst, src)
            return
        except (RuntimeError, TypeError):   # pragma: no cover - an older torch's limits
            pass
    for d, s in zip(dst, src):
        d.copy_(s)


def _close(mm: mmap.mmap) -> None:
    try:
        mm.close()
    except BufferError:  # a tensor view is still alive somewhere; the GC unmaps it later
        pass

