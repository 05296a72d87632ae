"""The node's snapshot store: write slots, committed versions, read leases, retention, budget.

Lifecycle of one version (see docs/design.md section 3)::

    alloc(job, rank, step, nbytes, pid) -> Slot      segment reserved, invisible
    (client writes the bytes through its own mapping)
    commit(slot, tensors, meta)        -> Version     table checked, checksums stored,
                                                      manifest written last, then visible
    lease(job, rank, ...)              -> Lease       bytes pinned until release(lease)

A slot whose writer dies, or that is aborted, goes back to the free pool and is never listed.
Every public method is thread-safe; the slow parts (reserving memory, checksums) run outside the
lock so the daemon can serve other requests meanwhile.

Example::

    >>> import tempfile
    >>> store = Store(tempfile.mkdtemp(), memory_limit=1 << 20, keep=2)
    >>> _ = store.open()
    >>> slot = store.alloc("job", 0, 1, 0, pid=os.getpid())
    >>> store.commit(slot.number, (), "{}").step
    1
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import math
import os
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import psutil
import xxhash

from ..common import locks
from ..common.protocol import ProtocolError, TensorEntry, check_job, check_table, decode_as
from ._shm import SegmentDir, read_sealed, seal

log = logging.getLogger("snapshotd.store")

#: How far past the wall clock a saved or adopted stamp may be and still order this node's
#: commits and drops (Store._plausible): a clock stepped back by up to this much is handled.
STAMP_AHEAD = 7 * 86400

__all__ = ["Store", "StoreError", "Slot", "Version", "Lease", "Hold", "process_identity"]

#: Bookkeeping charged per version on top of its manifest (index entries, Python objects).
_VERSION_OVERHEAD = 4096
#: Free segments kept for reuse; reuse avoids re-faulting pages on every save.
_POOL_MAX = 64
#: Tables kept per (job, rank) for commits that name their layout by digest.
_LAYOUTS_KEPT = 4
_HEX = frozenset("0123456789abcdef")


class StoreError(ProtocolError):
    """A store operation that was refused; nothing stored was changed."""


def process_identity(pid: int) -> float | None:
    """A process's start (so a recycled pid is told apart), or None if it is gone (or a
    zombie: it writes nothing more).

    On Linux this is the start time in clock ticks since boot from ``/proc/PID/stat``: it does
    not move when the wall clock is stepped, whereas psutil's ``create_time`` is computed from
    the boot time, which is wall clock minus uptime, so a clock step would make every live
    writer and reader look like another process to the reaper."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except PermissionError:
        return -1.0
    except OSError:
        return _psutil_identity(pid)
    fields = stat[stat.rindex(b")") + 2:].split()    # after "pid (comm) "
    if fields[0] == b"Z":
        return None
    return float(fields[19])                         # field 22: starttime


def _psutil_identity(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        return None
    except psutil.AccessDenied:
        return -1.0


def checksum(buf: memoryview) -> str:
    """The checksum stored per tensor: XXH3-64, hex."""
    return xxhash.xxh3_64_hexdigest(buf)


#: Bytes from which checksums are computed by several threads (xxhash releases the GIL).
_PARALLEL_BYTES = 32 << 20
_HASHERS = max(1, min(4, os.cpu_count() or 1))
_hash_pool: ThreadPoolExecutor | None = None
_hash_pool_lock = locks.lock("hash-pool")


def _hash_span(view: memoryview, tensors: tuple[TensorEntry, ...] | list[TensorEntry]
               ) -> list[str]:
    digest = xxhash.xxh3_64_hexdigest
    return [digest(view[t.offset:t.offset + t.nbytes]) for t in tensors]


def _checksums(view: memoryview, tensors: tuple[TensorEntry, ...]) -> list[str]:
    """The checksum of each tensor's bytes inside a slot, in table order.

    Large tables are cut into runs of tensors of about equal bytes, hashed by a few threads at
    once (a restore waits for these before it may read a byte)."""
    total = sum(t.nbytes for t in tensors)
    if _HASHERS == 1 or total < _PARALLEL_BYTES or len(tensors) < 2:
        return _hash_span(view, tensors)
    global _hash_pool
    with _hash_pool_lock:
        if _hash_pool is None:
            _hash_pool = ThreadPoolExecutor(_HASHERS, thread_name_prefix="snapshotd-xxh3")
        pool = _hash_pool
    runs: list[list[TensorEntry]] = [[]]
    share, acc = total / _HASHERS, 0
    for t in tensors:
        if acc >= share * len(runs) and len(runs) < _HASHERS:
            runs.append([])
        runs[-1].append(t)
        acc += t.nbytes
    futures = [pool.submit(_hash_span, view, run) for run in runs[1:]]
    out = _hash_span(view, runs[0])          # this thread takes the first run itself
    for future in futures:
        out += future.result()
    return out


#: id(table) -> (table, JSON of each row up to its checksum's opening quote): a table that
#: commits of one layout share is encoded once.
_ROW_PREFIXES: dict[int, tuple[tuple[TensorEntry, ...], list[str]]] = {}


def _tensors_json(table: tuple[TensorEntry, ...], checksums: list[str]) -> str:
    """The manifest's ``tensors`` array: ``table``'s rows with ``checksums`` (hex digits)."""
    hit = _ROW_PREFIXES.get(id(table))
    if hit is not None and hit[0] is table:
        prefixes = hit[1]
    else:
        prefixes = [json.dumps(t.__dict__ | {"checksum": ""}, separators=(",", ":"))[:-2]
                    for t in table]                # ends with "checksum":"
        if len(_ROW_PREFIXES) >= 64:
            _ROW_PREFIXES.clear()
        _ROW_PREFIXES[id(table)] = (table, prefixes)
    return "[" + ",".join([f'{pre}{c}"}}' for pre, c in zip(prefixes, checksums)]) + "]"


def _with_checksum(t: TensorEntry, checksum: str) -> TensorEntry:
    """``t`` with its checksum: ``TensorEntry(t.name, ..., checksum)``, built without the
    frozen dataclass's ``__init__`` (a microsecond or two per field, per tensor, per commit)."""
    out = object.__new__(TensorEntry)
    fields = out.__dict__
    fields.update(t.__dict__)
    fields["checksum"] = checksum
    return out


@dataclass(frozen=True)
class ManifestRecord:
    """A version's manifest (``seg-N.json``) as a daemon restarted on its memory reads it back:
    decoded with the protocol's typed decoding (:func:`~snapshotd.common.protocol.decode_as`),
    so a field of the wrong type refuses the manifest instead of reaching the index."""

    format: int
    job: str
    rank: int
    step: int
    nbytes: int
    meta: str
    committed_at: float
    local_world_size: int
    protected: bool
    world_size: int
    owner: str
    tensors: tuple[TensorEntry, ...]
    #: The seal (see ``_shm.seal``): checked before the fields are decoded.
    check: str = ""
    #: The run identity of the job that wrote it (``Alloc.run``; absent from older daemons').
    run: str = ""


def _manifest_version(number: int, size: int, m: dict[str, Any]) -> Version:
    """The version a manifest ``m`` of segment ``number`` (``size`` bytes) describes; raise
    :class:`ProtocolError` naming what is wrong with it."""
    r = decode_as(ManifestRecord, m, "manifest")
    if r.format != 1:
        raise ProtocolError("malformed", f"manifest format {r.format}, this daemon reads 1")
    check_job(r.job)
    for name in ("rank", "step", "nbytes", "world_size"):
        if getattr(r, name) < 0:
            raise ProtocolError("malformed", f"manifest.{name} is {getattr(r, name)} (< 0)")
    if r.local_world_size < 1:
        raise ProtocolError("malformed", f"manifest.local_world_size is {r.local_world_size}")
    if not math.isfinite(r.committed_at) or r.committed_at < 0:
        raise ProtocolError("malformed", f"manifest.committed_at is {r.committed_at}")
    if r.nbytes > size:
        raise ProtocolError("malformed", f"manifest.nbytes is {r.nbytes}, the segment holds "
                            f"{size} bytes (truncated?)")
    try:
        json.loads(r.meta)
    except ValueError as exc:
        raise ProtocolError("malformed", f"manifest.meta is not JSON: {exc}") from None
    check_table(r.tensors, r.nbytes)
    for t in r.tensors:
        if len(t.checksum) != 16 or not set(t.checksum) <= _HEX:
            raise ProtocolError("malformed", f"tensor {t.name!r}: checksum {t.checksum!r} is "
                                "not an XXH3-64 in hex")
    return Version(number, r.job, r.rank, r.step, r.nbytes, size, r.tensors, r.meta,
                   r.committed_at, _VERSION_OVERHEAD + len(r.meta), r.local_world_size,
                   r.protected, world_size=r.world_size, mapped=True, run=r.run)


def _named(m: dict[str, Any] | None) -> str:
    """The job, rank and step a manifest names, as far as they can be read (for warnings)."""
    if not isinstance(m, dict):
        return ""
    said = [f"{key} {m[key]!r}" for key in ("job", "rank", "step") if key in m]
    return f" (it says {', '.join(said)})" if said else ""


@dataclass
class Slot:
    number: int
    job: str
    rank: int
    step: int
    nbytes: int
    size: int
    pid: int
    pid_start: float | None
    created: float
    local_world_size: int = 1
    committing: bool = False
    #: How many ranks the whole job has (``WORLD_SIZE``; 0: not said).
    world_size: int = 0
    #: What the client gets and names the slot by: an unguessable capability, not the segment
    #: number (which the segment's path shows), so one client cannot abort another's write.
    handle: int = 0
    #: The writer's run identity (``Alloc.run``), recorded with the version.
    run: str = ""


@dataclass
class Version:
    number: int
    job: str
    rank: int
    step: int
    nbytes: int
    size: int
    tensors: tuple[TensorEntry, ...]
    meta: str
    committed_at: float
    book: int
    local_world_size: int = 1
    protected: bool = False
    leases: int = 0
    doomed: bool = False
    #: The commit time of the version of this step it replaced (a re-commit), else 0.
    replaces: float = 0.0
    #: How many ranks the whole job has (0: not said): see Protector.job_wide.
    world_size: int = 0
    #: A reader may map the segment privately (copy-on-write): its unwritten pages show the
    #: file, so the file is never reused for another write once the version is freed (it is
    #: unlinked instead; a mapping outlives the unlink). Adopted versions are treated so too:
    #: their readers' leases did not survive the restart.
    mapped: bool = False
    #: The manifest's ``tensors`` array as JSON text (written once, reused by rewrites).
    tensors_json: str = field(default="", repr=False, compare=False)
    #: The run identity of the job that wrote it (``Alloc.run``; docs/design.md section 6):
    #: a client's surveys, reads and drops take only versions of its own run.
    run: str = ""

    @property
    def state(self) -> str:
        return "protected" if self.protected else "local"


@dataclass
class Lease:
    id: int
    version: Version
    pid: int
    pid_start: float | None
    opened: float = 0.0
    #: Live versions of the same (job, rank) newer than the leased one, when it was leased.
    newer: int = 0


@dataclass
class Hold:
    """A reader to lease a version to as it is published (:meth:`Store.install`): a step
    loaded from disk that is older than those retention keeps would be evicted at once."""

    pid: int
    mapped: bool = False
    #: The lease, set once the version is published.
    lease: Lease | None = None


@dataclass
class _Pool:
    free: dict[int, tuple[int, float]] = field(default_factory=dict)  # number -> (size, since)

    def take(self, nbytes: int) -> tuple[int, int] | None:
        """Take the smallest free segment that fits ``nbytes`` without wasting over 25%."""
        fits = [(size, n) for n, (size, _) in self.free.items()
                if nbytes <= size <= nbytes + nbytes // 4 + (1 << 20)]
        if not fits:
            return None
        size, number = min(fits)
        del self.free[number]
        return number, size


class Store:
    """Thread-safe index of one daemon's slots, versions and leases over a SegmentDir."""

    def __init__(self, shm_dir: str, memory_limit: int, keep: int = 2, *,
                 clock: Callable[[], float] = time.time,
                 identity: Callable[[int], float | None] = process_identity,
                 pool_idle: float = 60.0) -> None:
        self.dir = SegmentDir(shm_dir)
        self.memory_limit = memory_limit
        self.keep = keep
        self.accepting = True
        self._clock = clock
        self._identity = identity
        self._pool_idle = pool_idle
        self._lock = locks.lock("store")
        self._next = 1
        self._slots: dict[int, Slot] = {}
        self._versions: dict[tuple[str, int], dict[int, Version]] = {}
        self._leases: dict[int, Lease] = {}
        self._pool = _Pool()
        #: slot handle -> segment number (see Slot.handle)
        self._handles: dict[int, int] = {}
        #: (job, rank) -> layout digest -> (table, slot bytes it was checked against)
        self._layouts: dict[tuple[str, int], dict[str, tuple[tuple[TensorEntry, ...], int]]] = {}
        #: job -> hex SHA-256 of the token it is bound to (``--job-isolation``).
        self._owners: dict[str, str] = {}
        #: Bytes held outside the segments, by kind (``parity`` kept, ``encoding``: in flight
        #: in the encode pipeline); set by the protection layer. All of it is in the budget.
        self.extra_kinds: Callable[[], dict[str, int]] = lambda: {"parity": 0}
        #: job -> the job-wide step every rank can restore (set by the protection layer from
        #: all nodes' reports): retention never evicts it.
        self.pins: dict[str, int] = {}
        self._retaining = True
        #: Whether a job without a pin yet keeps every version (a daemon with peers: the
        #: first round of reports has not said which steps the other nodes hold).
        self.hold_unpinned = False
        self._shed_jobs: set[str] = set()
        #: The newest commit or drop stamp given (see :meth:`stamp`): never lower after a
        #: restart (the adopted manifests and ``stamp.json``) nor after a rebuild (install).
        self._stamp_hw = 0.0

    # ------------------------------------------------------------------ start and stop

    def open(self, adopt: bool = True, retain: bool = True) -> dict[str, int]:
        """Prepare the directory and deal with what a crashed daemon left behind.

        Committed segments (with a manifest) are adopted when ``adopt``; everything else is removed.
        A manifest that cannot be trusted (empty, not JSON, its checksum does not match, written
        by an older daemon without one, a field of the wrong type, a table that does not fit its
        segment) is discarded with its segment, each with a warning naming the file, what it
        says of its job, rank and step, and what was wrong; the rest are adopted.
        Retention runs on the adopted versions unless ``retain`` is False (then the caller runs
        :meth:`retain_all` once it knows the job-wide steps: see ``Protector``'s floors).
        Returns counts: ``adopted``, ``removed`` (``discarded`` of them had a manifest that
        could not be trusted), ``bytes_removed``.
        """
        self.dir.prepare()
        self._retaining = retain
        report = {"adopted": 0, "removed": 0, "discarded": 0, "bytes_removed": 0}
        for left in self.dir.scan():
            self._next = max(self._next, left.number + 1)
            version, why = self._adoptable(left) if adopt else (None, "")
            if version is None:
                if why:
                    report["discarded"] += 1
                    log.warning("discarded %s and its %d-byte segment%s: %s; that version is "
                                "lost on this node (a coded group rebuilds it from its peers)",
                                self.dir.manifest_path(left.number), left.size,
                                _named(left.manifest), why)
                self.dir.unlink(left.number)
                report["removed"] += 1
                report["bytes_removed"] += left.size
                continue
            held = self._versions.setdefault((version.job, version.rank), {})
            twin = held.get(version.step)
            if twin is not None:
                # Two manifests for one step: a crash between a re-commit of the step and the
                # eviction of the old version. The newer commit wins; the other is removed
                # (never left on the tmpfs outside the index and the budget).
                if twin.committed_at > version.committed_at:
                    twin, version = version, twin
                self.dir.unlink(twin.number)
                report["removed"] += 1
                report["bytes_removed"] += twin.size
                report["adopted"] -= 1
            held[version.step] = version
            if left.manifest and left.manifest["owner"]:
                self._owners.setdefault(version.job, left.manifest["owner"])
            report["adopted"] += 1
        for name in os.listdir(self.dir.path):       # a stamp write cut short
            if name.startswith("stamp.json.") and name.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.dir.path, name))
        self._stamp_hw = max([self._stamp_hw, self._saved_stamp()] + [
            at for vs in self._versions.values() for v in vs.values()
            if self._plausible(at := v.committed_at, "an adopted manifest's committed_at")])
        if retain:
            self.retain_all()
        return report

    # ------------------------------------------------------------------ stamps

    def stamp(self, durable: bool = False) -> float:
        """A time for a commit or a drop on this node: the wall clock, but never at or below
        one given before, by this daemon or (through the manifests and ``stamp.json``) an
        earlier one on this memory. Drops and commits of one node are ordered by their
        stamps (a holder refuses the fragments of a version committed before its node's drop
        of the step): a wall clock stepped back (NTP) must not make a new commit look older
        than a drop (issue 25, finding 3). ``durable``: kept in ``stamp.json`` (a drop: the
        versions it removes take their stamps with them)."""
        with self._lock:
            now = self._stamp_hw = max(self._clock(), self._stamp_hw + 1e-6)
        if durable:
            self._save_stamp(now)
        return now

    def raise_stamp(self, at: float, what: str = "a rebuilt version's committed_at") -> None:
        """Stamps from now on come after ``at``: a stamp this node gave before, kept somewhere
        that outlives this memory (a version rebuilt with its original's; the persistence
        tier's drop logs and markers, read at start: a memory lost with a wall clock stepped
        back must not stamp new commits below them), unless ``at`` is not plausible
        (:meth:`_plausible`)."""
        if self._plausible(at, what):
            with self._lock:
                self._stamp_hw = max(self._stamp_hw, at)

    def _plausible(self, at: float, what: str) -> bool:
        """Whether ``at`` may order this node's stamps: a finite time at most
        :data:`STAMP_AHEAD` past the wall clock. A value further ahead is damage (a flipped
        digit, ``Infinity``), not a clock: taken, it would stamp every later commit in
        another century, or stop the stamps rising at all (at 1e17 s, 1 us is below the
        float's resolution). Refused with a warning."""
        if isinstance(at, int | float) and math.isfinite(at) and \
                at <= self._clock() + STAMP_AHEAD:
            return True
        log.warning("%s %r is not a plausible time (more than %d days past this node's wall "
                    "clock, or not finite): not used to order commits and drops", what, at,
                    STAMP_AHEAD // 86400)
        return False

    def _stamp_path(self) -> str:
        return os.path.join(self.dir.path, "stamp.json")

    def _saved_stamp(self) -> float:
        """The stamp ``stamp.json`` keeps (sealed like every record in the directory), or 0
        with a warning when it is damaged, mistyped or not plausible."""
        record, problem = read_sealed(self._stamp_path())
        if record is None and not problem:
            return 0.0                                  # never written
        value = None if record is None else record.get("stamp")
        if problem or isinstance(value, bool) or not isinstance(value, int | float):
            log.warning("%s: %s; ignored (the adopted manifests still order new commits "
                        "after every one held)", self._stamp_path(),
                        problem or f"'stamp' is {value!r}, not a number")
            return 0.0
        return float(value) if self._plausible(value, f"{self._stamp_path()}: the stamp") \
            else 0.0

    def _save_stamp(self, at: float) -> None:
        tmp = self._stamp_path() + f".{threading.get_ident()}.tmp"
        try:
            with open(tmp, "w") as fh:
                fh.write(seal(json.dumps({"stamp": at}, separators=(",", ":"))))
            os.replace(tmp, self._stamp_path())
        except OSError as exc:
            log.warning("could not keep the newest drop stamp in %s (%s): after a restart "
                        "with a wall clock stepped back, new commits may be refused by the "
                        "parity holders until the clock passes it", self._stamp_path(), exc)

    def retain_all(self) -> None:
        """Apply retention to every (job, rank) held (after adoption)."""
        with self._lock:
            self._retaining = True
            for key in list(self._versions):
                self._retain(key)

    def retain_job(self, job: str) -> None:
        """Apply retention to every rank of ``job`` (the job-wide steps changed); nothing
        before :meth:`retain_all` when the adoption deferred it."""
        with self._lock:
            if self._retaining:
                for key in [key for key in self._versions if key[0] == job]:
                    self._retain(key)

    @staticmethod
    def _adoptable(left: Any) -> tuple[Version | None, str]:
        """The version a leftover segment holds, or None and why it cannot be adopted (''
        for a segment without a manifest: a write that never committed, a free one)."""
        if left.manifest is None or left.problem:
            return None, left.problem
        try:
            return _manifest_version(left.number, left.size, left.manifest), ""
        except ProtocolError as exc:
            return None, exc.message

    def close(self) -> None:
        """Release every segment (graceful shutdown)."""
        with self._lock:
            self.accepting = False
            numbers = list(self._slots) + list(self._pool.free) + [
                v.number for vs in self._versions.values() for v in vs.values()]
            self._slots.clear()
            self._versions.clear()
            self._pool.free.clear()
            self._leases.clear()
        for number in numbers:
            self.dir.unlink(number)

    # ------------------------------------------------------------------ writing

    def alloc(self, job: str, rank: int, step: int, nbytes: int, pid: int,
              local_world_size: int = 1, *, older: bool = False, world_size: int = 0,
              run: str = "") -> Slot:
        """Reserve a write slot of ``nbytes``; refuse over the memory limit.

        A step older than the newest one held for (job, rank) is refused (``stale_step``):
        restoring an older step starts a new timeline, and the client drops the newer steps
        then, so a save below the newest held step means that did not happen. Re-saving the
        newest step replaces it. ``older`` lets a rebuild or a load from disk install one.
        """
        try:
            check_job(job)
        except ProtocolError as exc:
            raise StoreError(exc.code, exc.message) from None
        for name, value in (("rank", rank), ("step", step), ("nbytes", nbytes), ("pid", pid)):
            if value < 0:
                raise StoreError("bad_request", f"{name} must be >= 0, got {value}")
        pid_start = self._identity(pid)
        if pid_start is None:
            raise StoreError("bad_request", f"writer pid {pid} is not a running process")
        with self._lock:
            if not self.accepting:
                raise StoreError("shutting_down", "the daemon is shutting down; retry on restart")
            held = [s for s, v in self._versions.get((job, rank), {}).items() if not v.doomed]
            if not older and held and step < max(held):
                raise StoreError(
                    "stale_step", f"job {job!r} rank {rank}: step {step} is older than step "
                    f"{max(held)} already held; restore(step={step}) first to start a new "
                    f"timeline from it, or drop the newer steps (snapshotctl drop --job {job} "
                    f"--newer-than {step})")
            reused = self._pool.take(nbytes)
            fresh = reused is None
            if reused is None:
                number, size = self._reserve(nbytes, job, rank, step), nbytes
            else:
                number, size = reused
            slot = Slot(number, job, rank, step, nbytes, size, pid, pid_start, self._clock(),
                        max(1, local_world_size), handle=self._new_handle(self._handles),
                        world_size=max(0, world_size), run=run)
            self._slots[number] = slot
            self._handles[slot.handle] = number
        if fresh:
            try:
                self.dir.create(number, nbytes)
            except OSError as exc:
                with self._lock:
                    self._pop_slot(number)
                raise StoreError("memory_full", f"cannot reserve {nbytes} bytes in "
                                 f"{self.dir.path}: {exc.strerror}; free memory or lower "
                                 "--memory-limit") from None
        return slot

    def alloc_spare(self, like: Slot, nbytes: int) -> Slot | None:
        """A slot of ``nbytes`` for the next save of ``like``'s writer (its job, rank, pid),
        reserved without a step (it is named at commit, and checked then like ``alloc``
        checks it); None when it does not fit the budget without evicting a version (the
        writer then asks with ``Alloc``). The writer's death or ``Abort`` frees it as any slot.

        A spare cannot be taken back (its writer may be filling it), so one is given only
        while the budget keeps room for another slot of its size besides (an ``Alloc`` of
        another rank, a rebuild): under a tight budget saves go through ``Alloc`` as before.
        """
        fresh = False
        with self._lock:
            if not self.accepting or nbytes <= 0:
                return None
            reused = self._pool.take(nbytes)
            if reused is None:
                if self._used() + 2 * nbytes > self.memory_limit:
                    return None
                number, size = self._next, nbytes
                self._next += 1
                fresh = True
            else:
                number, size = reused
                if self._used() + nbytes > self.memory_limit:
                    self._pool.free[number] = (size, self._clock())   # put back
                    return None
            slot = Slot(number, like.job, like.rank, -1, nbytes, size, like.pid, like.pid_start,
                        self._clock(), like.local_world_size,
                        handle=self._new_handle(self._handles), world_size=like.world_size,
                        run=like.run)
            self._slots[number] = slot
            self._handles[slot.handle] = number
        if fresh:
            try:
                self.dir.create(number, nbytes)
            except OSError:
                with self._lock:
                    self._pop_slot(number)
                return None
        return slot

    def open_slot(self, number: int) -> Slot | None:
        """The open slot ``number`` (None when it is not open)."""
        with self._lock:
            return self._slots.get(number)

    def _reserve(self, nbytes: int, job: str, rank: int, step: int) -> int:
        while self._used() + nbytes > self.memory_limit and self._pool.free:
            victim = next(iter(self._pool.free))
            del self._pool.free[victim]
            self.dir.unlink(victim)
        if self._used() + nbytes > self.memory_limit:
            self._shed(nbytes)
        used = self._used()
        if used + nbytes > self.memory_limit:
            raise StoreError(
                "memory_full", f"save of {nbytes} bytes for job {job!r} rank {rank} step {step} "
                f"refused: memory limit is {self.memory_limit} bytes and {used} are in use; "
                "raise --memory-limit, lower --keep, or save less state")
        number = self._next
        self._next += 1
        return number

    def slot_age(self, number: int) -> float | None:
        """Seconds since a slot was allocated (None if it is not open)."""
        with self._lock:
            slot = self._slots.get(number)
            return None if slot is None else self._clock() - slot.created

    def commit(self, number: int, tensors: tuple[TensorEntry, ...], meta: str,
               committed_at: float | None = None, protected: bool = False,
               layout: str = "", step: int = -1, hold: Hold | None = None,
               hold_start: float | None = None) -> Version:
        """Check the table, store checksums, write the manifest, and publish the version.

        ``committed_at`` (default: now) identifies the version across the group (a rebuilt
        version keeps the original's, so it matches the parity holders' records).
        ``layout``: the client's digest of its table; with a table, the table is kept under it
        for the slot's (job, rank) (checked once); without (``tensors`` empty), the kept one is
        used, or ``unknown_layout`` is raised (the client then sends the table).
        ``step``: the step of a spare slot (reserved without one, :meth:`alloc_spare`); it is
        refused ``stale_step`` here as ``alloc`` would, and the slot stays open (to abort).
        ``hold``: lease the version to that reader (started at ``hold_start``) before retention
        runs; the lease is set on it."""
        with self._lock:
            slot = self._slots.get(number)
            if slot is None or slot.committing:
                raise StoreError("unknown_slot", f"slot {number} is not open for writing "
                                 "(never allocated, already committed, aborted or reclaimed)")
            if slot.step < 0:
                if step < 0:
                    raise StoreError("bad_request", f"slot {number} was reserved without a "
                                     "step: its commit must name the step")
                held = [s for s, v in self._versions.get((slot.job, slot.rank), {}).items()
                        if not v.doomed]
                if held and step < max(held):
                    raise StoreError(
                        "stale_step", f"job {slot.job!r} rank {slot.rank}: step {step} is "
                        f"older than step {max(held)} already held; restore(step={step}) "
                        "first to start a new timeline from it")
            elif step >= 0 and step != slot.step:
                raise StoreError("bad_request", f"slot {number} is for step {slot.step}, the "
                                 f"commit names step {step}")
            known = self._layouts.get((slot.job, slot.rank), {})
            if layout and not tensors:
                kept = known.get(layout)
                if kept is None or kept[1] > slot.nbytes:
                    raise StoreError("unknown_layout", f"layout {layout!r} is not known for "
                                     f"job {slot.job!r} rank {slot.rank}; send the table")
                tensors = kept[0]
                checked = kept[1] == slot.nbytes
            else:
                checked = False
            try:
                if not checked:
                    check_table(tensors, slot.nbytes)
                json.loads(meta)
            except ValueError as exc:
                raise StoreError("bad_table", f"slot {number} meta is not JSON: {exc}") from None
            if layout and tensors and layout not in known:
                if len(known) >= _LAYOUTS_KEPT:
                    known.pop(next(iter(known)))
                known[layout] = (tensors, slot.nbytes)
                self._layouts[(slot.job, slot.rank)] = known
            if slot.step < 0:
                slot.step = step
            slot.committing = True
        try:
            version = self._seal(slot, tensors, meta, committed_at, protected)
        except BaseException:
            with self._lock:
                self._pop_slot(number)
                self._to_pool(number, slot.size)
            raise
        with self._lock:
            self._pop_slot(number)
            old = self._versions.setdefault((slot.job, slot.rank), {}).get(slot.step)
            self._versions[(slot.job, slot.rank)][slot.step] = version
            if old is not None:
                version.replaces = old.committed_at
                self._evict(old)
            if hold is not None:
                version.leases += 1
                version.mapped = version.mapped or hold.mapped
                newer = sum(1 for s, v in self._versions[(slot.job, slot.rank)].items()
                            if s > slot.step and not v.doomed)
                hold.lease = Lease(self._new_handle(self._leases), version, hold.pid,
                                   hold_start, time.monotonic(), newer)
                self._leases[hold.lease.id] = hold.lease
            self._retain((slot.job, slot.rank))
        return version

    def _seal(self, slot: Slot, tensors: tuple[TensorEntry, ...], meta: str,
              committed_at: float | None, protected: bool) -> Version:
        view = self.dir.view(slot.number, slot.size)
        try:
            summed = tuple(map(_with_checksum, tensors, _checksums(view, tensors)))
        finally:
            view.release()
        if committed_at is None:
            now = self.stamp()
        else:
            now = committed_at
            self.raise_stamp(committed_at)
        version = Version(slot.number, slot.job, slot.rank, slot.step, slot.nbytes, slot.size,
                          summed, meta, now, 0, slot.local_world_size, protected,
                          world_size=slot.world_size, run=slot.run)
        version.book = self._write_manifest(version, tensors) + _VERSION_OVERHEAD
        return version

    def _write_manifest(self, v: Version, table: tuple[TensorEntry, ...] | None = None) -> int:
        """Write a version's manifest (atomically); return its size. ``protected`` is in it,
        so a daemon restarted on its memory keeps the newest protected step (retention).
        ``table``: the table ``v.tensors`` were checksummed from (its JSON is cached)."""
        manifest = {"format": 1, "job": v.job, "rank": v.rank, "step": v.step,
                    "nbytes": v.nbytes, "meta": v.meta, "committed_at": v.committed_at,
                    "local_world_size": v.local_world_size, "protected": v.protected,
                    "world_size": v.world_size,
                    "owner": self._owners.get(v.job, ""), "run": v.run}
        if not v.tensors_json:
            v.tensors_json = _tensors_json(table if table is not None else v.tensors,
                                           [t.checksum for t in v.tensors])
        text = json.dumps(manifest, separators=(",", ":"))[:-1] + ',"tensors":' + \
            v.tensors_json + "}"
        return self.dir.write_manifest_text(v.number, text)

    def install(self, job: str, rank: int, step: int, nbytes: int,
                tensors: tuple[TensorEntry, ...], meta: str, local_world_size: int,
                fill: Callable[[memoryview], None], committed_at: float | None = None,
                protected: bool = True, owner: str = "", world_size: int = 0,
                hold: Hold | None = None, run: str = "") -> Version:
        """Publish a version rebuilt from peers: reserve, ``fill`` the bytes, verify, commit.

        The tensor checksums come with the table; bytes that do not match them are refused
        (``checksum_mismatch``, naming the tensors) and nothing is published; nor when
        ``fill`` raises (the slot is aborted). ``hold``: see :meth:`commit`.
        """
        hold_start = None
        if hold is not None:
            hold_start = self._identity(hold.pid)
            if hold_start is None:
                raise StoreError("bad_request", f"reader pid {hold.pid} is not a running "
                                 "process")
        if owner:
            with self._lock:
                bound = self._owners.setdefault(job, owner)
            if not hmac.compare_digest(bound, owner):
                # The version belongs to another token than the one this node bound the job
                # to meanwhile (a tenant that squatted on the name before the rebuild):
                # never published under that binding (second review of issue 24, F2).
                raise StoreError("forbidden", f"rebuilt job {job!r} rank {rank} step {step} "
                                 "belongs to another token than the one this node bound the "
                                 "job to; not installed (drop the job here as an admin, then "
                                 "restart this node to rebuild it)")
        slot = self.alloc(job, rank, step, nbytes, os.getpid(), local_world_size, older=True,
                          world_size=world_size, run=run)
        view = self.dir.view(slot.number, slot.size)
        try:
            fill(view[:nbytes])
            bad = [t.name for t, c in zip(tensors, _checksums(view, tensors)) if c != t.checksum]
        except BaseException:
            view.release()
            self.abort(slot.number)
            raise
        view.release()
        if bad:
            self.abort(slot.number)
            raise StoreError("checksum_mismatch", f"rebuilt job {job!r} rank {rank} step {step}: "
                             f"tensors {bad} do not match their checksums")
        return self.commit(slot.number, tuple(TensorEntry(t.name, t.dtype, t.shape, t.offset,
                                                           t.nbytes) for t in tensors), meta,
                           committed_at, protected, hold=hold, hold_start=hold_start)

    def abort(self, number: int) -> None:
        with self._lock:
            slot = self._slots.get(number)
            if slot is None or slot.committing:
                raise StoreError("unknown_slot", f"slot {number} is not open for writing")
            self._pop_slot(number)
            self._to_pool(number, slot.size)

    # ------------------------------------------------------------------ reading

    def ranks(self, job: str, world: int = 0) -> set[int]:
        """Every rank of ``job`` this node holds a version of, or is writing one for; with
        ``world``, only those of the layout of that many ranks (a version or slot that does
        not say its world counts for any): after a job restarted at another world size, the
        old layout's ranks left here are not part of the new layout's node versions."""
        def fits(w: int) -> bool:
            return not world or w in (world, 0)
        with self._lock:
            held = {r for (j, r), vs in self._versions.items()
                    if j == job and any(not v.doomed and fits(v.world_size)
                                        for v in vs.values())}
            return held | {s.rank for s in self._slots.values()
                           if s.job == job and fits(s.world_size)}

    def at_step(self, job: str, step: int) -> list[Version]:
        """The live versions of ``job`` at ``step``, one per rank holding it, by rank (what a
        commit's follow-up needs, without sorting every version held)."""
        with self._lock:
            found = [vs[step] for (j, _), vs in self._versions.items()
                     if j == job and step in vs and not vs[step].doomed]
        return sorted(found, key=lambda v: v.rank)

    def versions(self, job: str | None = None, rank: int | None = None) -> list[Version]:
        with self._lock:
            return sorted((v for (j, r), vs in self._versions.items() for v in vs.values()
                           if (job is None or j == job) and (rank is None or r == rank)
                           and not v.doomed),
                          key=lambda v: (v.job, v.rank, v.step))

    def lease(self, job: str, rank: int, pid: int, step: int | None = None,
              max_step: int | None = None, mapped: bool = False,
              run: str | None = None) -> Lease:
        """Pin a version for reading: ``step``, or the newest one not above ``max_step``;
        with ``run``, only a version of that run identity (another job's is not found).

        ``mapped``: the reader maps the segment privately and may keep the mapping as long as
        it holds the lease; the segment's file is then never reused (see ``Version.mapped``)."""
        if pid <= 0:
            raise StoreError("bad_request", f"reader pid must be > 0, got {pid}")
        pid_start = self._identity(pid)
        if pid_start is None:
            raise StoreError("bad_request", f"reader pid {pid} is not a running process")
        with self._lock:
            held = {s: v for s, v in self._versions.get((job, rank), {}).items()
                    if not v.doomed and (run is None or v.run == run)}
            if step is not None:
                version = held.get(step)
            else:
                eligible = [s for s in held if max_step is None or s <= max_step]
                version = held[max(eligible)] if eligible else None
            if version is None:
                want = f"step {step}" if step is not None else "any version"
                raise StoreError("not_found", f"job {job!r} rank {rank} has no {want} here; "
                                 f"held steps: {sorted(held) or 'none'}")
            version.leases += 1
            version.mapped = version.mapped or mapped
            lease = Lease(self._new_handle(self._leases), version, pid, pid_start,
                          time.monotonic(), sum(1 for s in held if s > version.step))
            self._leases[lease.id] = lease
            return lease

    def verify(self, version: Version, lo: int = 0, hi: int | None = None) -> list[str]:
        """Recompute checksums (of the tensors overlapping bytes [lo, hi) only, if given);
        return the names of tensors whose bytes do not match."""
        tensors = tuple(t for t in version.tensors
                        if hi is None or (t.offset < hi and t.offset + t.nbytes > lo))
        view = self.dir.view(version.number, version.size)
        try:
            return [t.name for t, c in zip(tensors, _checksums(view, tensors))
                    if c != t.checksum]
        finally:
            view.release()

    def release(self, lease_id: int) -> Lease:
        with self._lock:
            lease = self._leases.pop(lease_id, None)
            if lease is None:
                raise StoreError("unknown_lease", f"lease {lease_id} is not held")
            self._unpin(lease.version)
            return lease

    def drop(self, job: str, rank: int | None = None, step: int | None = None,
             newer_than: int | None = None, run: str | None = None) -> int:
        """Drop versions of a job (with ``run``: only those of that run identity); return
        how many were dropped."""
        with self._lock:
            doomed = [v for (j, r), vs in self._versions.items() for v in vs.values()
                      if j == job and (rank is None or r == rank)
                      and (step is None or v.step == step)
                      and (run is None or v.run == run)
                      and (newer_than is None or v.step > newer_than) and not v.doomed]
            for version in doomed:
                self._evict(version)
            return len(doomed)

    # ------------------------------------------------------------------ housekeeping

    def reap(self) -> int:
        """Reclaim slots and leases whose process is gone; trim idle pool segments."""
        with self._lock:
            slots = [s for s in self._slots.values() if not s.committing]
            leases = list(self._leases.values())
        dead_slots = [s for s in slots if not self._alive(s.pid, s.pid_start)]
        dead_leases = [le for le in leases if not self._alive(le.pid, le.pid_start)]
        with self._lock:
            for slot in dead_slots:
                if self._slots.get(slot.number) is slot and not slot.committing:
                    self._pop_slot(slot.number)
                    self._to_pool(slot.number, slot.size)
            for lease in dead_leases:
                if self._leases.pop(lease.id, None) is not None:
                    self._unpin(lease.version)
            now = self._clock()
            for number, (_, since) in list(self._pool.free.items()):
                if now - since > self._pool_idle:
                    del self._pool.free[number]
                    self.dir.unlink(number)
        return len(dead_slots) + len(dead_leases)

    def _alive(self, pid: int, start: float | None) -> bool:
        now = self._identity(pid)
        return start is not None and now is not None and now == start

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"bytes_used": self._used(), "open_slots": len(self._slots),
                    "open_leases": len(self._leases), "pool_segments": len(self._pool.free),
                    "versions": sum(len(vs) for vs in self._versions.values())}

    def bytes_by_kind(self) -> dict[str, int]:
        """Bytes held: committed ``data``, ``writing`` slots, free ``pool``, ``bookkeeping``,
        kept ``parity`` and, with peers, ``encoding`` (fragments in flight)."""
        with self._lock:
            versions = [v for vs in self._versions.values() for v in vs.values()]
            return {"data": sum(v.size for v in versions),
                    "writing": sum(s.size for s in self._slots.values()),
                    "pool": sum(size for size, _ in self._pool.free.values()),
                    "bookkeeping": sum(v.book for v in versions)} | self.extra_kinds()

    def extra_usage(self) -> int:
        return sum(self.extra_kinds().values())

    def owner(self, job: str) -> str:
        """The token digest ``job`` is bound to ('' when unbound)."""
        with self._lock:
            return self._owners.get(job, "")

    def authorize(self, job: str, digest: str, bind: bool = False) -> None:
        """Refuse (``forbidden``) a request for ``job`` whose token digest is not the one the
        job is bound to; with ``bind``, an unbound job becomes bound to ``digest``."""
        with self._lock:
            owner = self._owners.get(job)
            if owner is None:
                if bind:
                    self._owners[job] = digest
                return
        if not hmac.compare_digest(owner, digest):
            raise StoreError("forbidden", f"job {job!r} belongs to another token; use the "
                             "job's own SNAPSHOTD_JOB_TOKEN (or snapshotctl --admin-token-file)")

    def mark_protected(self, job: str, rank: int, step: int,
                       committed_at: float | None = None) -> None:
        """Mark (job, rank, step) protected (only the version committed at ``committed_at``,
        when given: a re-commit of the step is another version); the manifest says so too."""
        with self._lock:
            version = self._versions.get((job, rank), {}).get(step)
            if version is None or version.protected or version.doomed or (
                    committed_at is not None and version.committed_at != committed_at):
                return
            version.protected = True
            self._write_manifest(version)
            self._retain((job, rank))

    def slot_number(self, handle: int) -> int:
        """The segment number of the open slot a client names by ``handle``."""
        with self._lock:
            number = self._handles.get(handle)
        if number is None:
            raise StoreError("unknown_slot", f"slot {handle} is not open for writing (never "
                             "allocated, already committed, aborted or reclaimed)")
        return number

    # ------------------------------------------------------------------ internals (lock held)

    @staticmethod
    def _new_handle(taken: Any) -> int:
        """A fresh unguessable handle (62 random bits: a JSON integer in every language)."""
        while True:
            handle = secrets.randbits(62) | 1
            if handle not in taken:
                return handle

    def _pop_slot(self, number: int) -> Slot | None:
        slot = self._slots.pop(number, None)
        if slot is not None:
            self._handles.pop(slot.handle, None)
        return slot

    def _used(self) -> int:
        data = sum(s.size for s in self._slots.values())
        data += sum(size for size, _ in self._pool.free.values())
        data += sum(v.size + v.book for vs in self._versions.values() for v in vs.values())
        return data + self.extra_usage()

    def _retain(self, key: tuple[str, int]) -> None:
        core, held = self._kept(key)
        for version in self._live(key):
            if id(version) not in core and id(version) not in held:
                self._evict(version)

    def _live(self, key: tuple[str, int]) -> list[Version]:
        versions = self._versions.get(key, {})
        return sorted((v for v in versions.values() if not v.doomed), key=lambda v: -v.step)

    def _kept(self, key: tuple[str, int]) -> tuple[set[int], set[int]]:
        """The versions of (job, rank) retention keeps (as ids): the newest ``keep``, the
        newest protected one and the job-wide step (the *pin*); and, apart, the versions newer
        than the pin (every one, or every one while no pin is known on a daemon with peers),
        which a node keeps so that the pin only moves to a step every node still holds
        (docs/protocol.md, job-wide retention). Those give way when memory is needed, once
        the job has a pin (before, a save that needs room is refused)."""
        live = self._live(key)
        protected = [v for v in live if v.protected]
        core = set(id(v) for v in live[:self.keep])
        if protected:
            core.add(id(protected[0]))
        pinned = self.pins.get(key[0])
        core |= {id(v) for v in live if v.step == pinned}
        if pinned is None and not self.hold_unpinned:
            return core, set()
        low = -1 if pinned is None else pinned
        return core, {id(v) for v in live if v.step > low and id(v) not in core}

    def make_room(self, nbytes: int) -> None:
        """Evict versions kept above the job-wide step, newest first, until ``nbytes`` more
        fit in the budget (for parity and fragments being encoded; Alloc does it itself)."""
        with self._lock:
            if self._used() + nbytes > self.memory_limit:
                self._shed(nbytes)

    def _shed(self, nbytes: int) -> None:
        """Evict versions kept above the job-wide step, newest first, until ``nbytes`` more
        fit (lock held): they are kept only while memory allows."""
        extra = []
        for key in list(self._versions):
            if key[0] not in self.pins:
                # No job-wide step known yet: any version may be the one the job falls back
                # to (a node that shed down to its oldest step lost the step the others were
                # about to agree on): keep them all; the save that needs room is refused.
                continue
            ids = self._kept(key)[1]
            extra += [v for v in self._live(key) if id(v) in ids and v.leases == 0]
        for version in sorted(extra, key=lambda v: -v.step):
            if self._used() + nbytes <= self.memory_limit:
                return
            if version.job not in self._shed_jobs:
                self._shed_jobs.add(version.job)
                log.warning("memory limit: job %r: versions newer than the job-wide step are "
                            "evicted to make room (the nodes' steps differ by more than the "
                            "budget holds: saves faster than a heartbeat round, or a peer "
                            "down); raise --memory-limit to keep them", version.job)
            log.debug("memory limit: job %r rank %d step %d evicted", version.job,
                      version.rank, version.step)
            self._evict(version)

    def _evict(self, version: Version) -> None:
        version.doomed = True
        self.dir.drop_manifest(version.number)
        if version.leases == 0:
            self._forget(version)

    def _forget(self, version: Version) -> None:
        held = self._versions.get((version.job, version.rank), {})
        if held.get(version.step) is version:
            del held[version.step]
            if not held:
                del self._versions[(version.job, version.rank)]
                self._layouts.pop((version.job, version.rank), None)
        if version.mapped:
            self.dir.unlink(version.number)
            return
        self._to_pool(version.number, version.size)

    def _unpin(self, version: Version) -> None:
        version.leases -= 1
        if version.leases == 0 and version.doomed:
            self._forget(version)

    def _to_pool(self, number: int, size: int) -> None:
        self.dir.drop_manifest(number)
        if len(self._pool.free) >= _POOL_MAX:
            self.dir.unlink(number)
            return
        self._pool.free[number] = (size, self._clock())
