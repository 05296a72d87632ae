"""The persistence tier: node versions written to a directory, in the background, throttled.

The daemon has no torch, so it writes its own format, the segment layout on disk. The directory
may be shared by every node of the cluster (NFS): nothing one node writes is renamed over or
removed by another, except where a drop of a rank removes that rank's files (docs/protocol.md,
"Persistence tier")::

    DIR/<job>/owner                           hex SHA-256 of the job's token (--job-isolation)
    DIR/<job>/drops/rank-3.json               rank 3's drops: its timeline (newest 64)
    DIR/<job>/step-000000000120/rank-3.bin    the rank's slot bytes
    DIR/<job>/step-000000000120/rank-3.json   its manifest (tensors with checksums, meta,
                                              commit time, timeline, owner)
    DIR/<job>/step-000000000120/node-<node>.done
                                              the writing node's marker, written last: the
                                              ranks it wrote, their commit times, the world

Every file is written under a temporary name unique to the node and process
(``.<name>.<node>.<pid>.<random>.tmp``) and renamed; a failed write removes its temporaries,
and a daemon removes those of its node (a daemon killed mid-persist) when it starts. A step is
*complete* when the markers name every rank of its world (``world_size``; the markers' ranks
where the job did not say) and each rank's manifest is there; only complete steps are listed,
restored and exported. A rank's version is *abandoned* when its rank's drop log holds a drop
made after it was committed that selects its step (a restore of an older step starts a new
timeline): it is removed by the drop, and never served should a persist in flight have
written it after. ``snapshotctl export`` turns any version (in memory or here) into a
``torch.distributed.checkpoint`` directory. When memory cannot serve a restore (every daemon
restarted empty, or more than ``m`` nodes lost), the newest complete persisted step is loaded
back, checked against its checksums (a damaged one is set aside and the next older one tried),
and served with tier ``disk``.

Example::

    persister = Persister(store, "/var/lib/snapshotd", every=100, keep=2, rate=200e6).start()
    persister.request("gpt", 1200)              # on demand
"""

from __future__ import annotations

import errno
import json
import logging
import os
import queue
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from ..common.protocol import TensorEntry
from ..node.store import Hold, Lease, Store, StoreError, Version

__all__ = ["Persister", "node_name"]

log = logging.getLogger("snapshotd.persist")
_STEP_RE = re.compile(r"step-(\d{12})")
_RANK_RE = re.compile(r"rank-(\d+)\.json")
_PIECE = 8 << 20
#: Drops kept per rank in its drop log (older ones cannot select a version still on disk).
_DROPS_KEPT = 64
#: Temporaries of other nodes older than this are removed at start too (a node gone for good).
_STALE_TMP_S = 24 * 3600.0
_FORMAT = 2


def node_name(slot: int) -> str:
    """This node's name in the persistence tier: host name and node slot (the temporaries and
    markers of two nodes sharing the directory never collide)."""
    host = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"
    return f"{host}-{slot}"


def _disk_error(exc: OSError, what: str) -> StoreError:
    """The error a failed disk operation answers: ``disk_full`` or ``disk_error``."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreError("disk_full", f"{what}: the --persist-dir is full ({exc.strerror}); "
                          "free space there, lower --persist-keep, or persist less often")
    return StoreError("disk_error", f"{what}: {exc.strerror or exc} ({exc.filename or ''}); "
                      "check the --persist-dir (mounted, writable)")


class Persister:
    """Writes node versions to ``root`` on a background thread at no more than ``rate`` B/s."""

    def __init__(self, store: Store, root: str, *, every: int = 0, keep: int = 2,
                 rate: float = 200e6, metrics: Any = None,
                 sleep: Callable[[float], None] = time.sleep, node: str = "") -> None:
        self.store, self.root, self.every, self.keep, self.rate = store, root, every, keep, rate
        self.metrics = metrics
        self.node = node or node_name(0)
        self._sleep = sleep
        self._queue: queue.Queue[tuple[str, int, list[Lease] | None] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="snapshotd-persist", daemon=True)
        #: Guards the drop logs' read-modify-write and ``_failing``.
        self._lock = threading.Lock()
        #: (job, rank) -> drops made here since the start (also in the drop logs on disk,
        #: where writing them may fail: a full disk)
        self._drops: dict[tuple[str, int], list[dict[str, Any]]] = {}
        self._failing = ""        # the code of the failure streak under way ('' when none)
        os.makedirs(root, mode=0o700, exist_ok=True)
        removed = self._remove_temporaries()
        if removed:
            log.warning("removed %d temporaries of persists that did not finish in %s: %s",
                        len(removed), root, ", ".join(removed[:8]))

    def start(self) -> Persister:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=60)

    def maybe(self, job: str, step: int) -> None:
        """Called when a node version is complete (every local rank committed the step). Its
        versions are leased now, so retention cannot evict them before the background write
        reaches them (a trainer saving faster than the disk tier writes)."""
        if self.every and step % self.every == 0:
            self._queue.put((job, step, self._hold(job, step)))

    def request(self, job: str, step: int) -> None:
        self._queue.put((job, step, None))

    def _hold(self, job: str, step: int) -> list[Lease]:
        """Lease this node's versions of (job, step) for a write."""
        leases = []
        for v in self.store.at_step(job, step):
            try:
                leases.append(self.store.lease(job, v.rank, os.getpid(), step=step))
            except StoreError:
                continue                   # evicted or dropped meanwhile
        return leases

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                self.write(item[0], item[1], item[2])
            except StoreError:
                pass                       # logged and counted by write
            except Exception as exc:  # noqa: BLE001 - a failed write never stops the daemon
                log.error("persisting job %r step %d failed: %s", item[0], item[1], exc)

    # ------------------------------------------------------------------ writing

    def write(self, job: str, step: int, held: list[Lease] | None = None) -> str:
        """Write every local rank's version of (job, step) and this node's marker; return the
        step directory. ``held``: leases of the versions, taken before (released here).
        Raises StoreError: ``disk_full``, ``disk_error``, ``forbidden`` (the job's directory
        belongs to another token), ``not_found``."""
        leases = self._hold(job, step) if held is None else held
        try:
            final = self._write(job, step, [lease.version for lease in leases])
        except StoreError as exc:
            self._failed(job, step, exc)
            raise
        except OSError as exc:
            err = _disk_error(exc, f"persisting job {job!r} step {step}")
            self._failed(job, step, err)
            raise err from None
        finally:
            for lease in leases:
                self.store.release(lease.id)
        with self._lock:
            if self._failing:
                log.info("persisting works again (job %r step %d)", job, step)
            self._failing = ""
        return final

    def _failed(self, job: str, step: int, exc: StoreError) -> None:
        """Count a failed persist; log it once per streak of one kind (a full disk fails every
        persist until space is freed: one line, not one per step)."""
        if self.metrics is not None:
            self.metrics.persist_failures.labels(reason=exc.code).inc()
        with self._lock:
            first, self._failing = self._failing != exc.code, exc.code
        log.log(logging.ERROR if first else logging.DEBUG, "persisting job %r step %d failed: "
                "%s%s", job, step, exc, " (the next failures of this kind are counted in "
                "snapshotd_persist_failures_total, not logged)" if first else "")

    def _write(self, job: str, step: int, versions: list[Version]) -> str:
        if not versions:
            raise StoreError("not_found", f"job {job!r} step {step} is not in memory here")
        self._claim(job, self.store.owner(job))
        final = self.step_dir(job, step)
        os.makedirs(final, mode=0o700, exist_ok=True)
        started = time.perf_counter()
        tag = secrets.token_hex(3)              # this write's temporaries
        written: list[Version] = []
        fresh = 0
        try:
            marked = self._markers(final)
            for v in versions:
                if self._abandoned(job, v.rank, step, v.committed_at):
                    continue               # dropped since (a new timeline)
                if marked.get(v.rank, {}).get("committed_at") == v.committed_at and \
                        os.path.exists(os.path.join(final, f"rank-{v.rank}.json")):
                    written.append(v)      # persisted already
                    continue
                self._write_rank(final, v, tag)
                written.append(v)
                fresh += v.nbytes
            # A drop that came while the bytes were written: those ranks are abandoned.
            gone = [v for v in written if self._abandoned(job, v.rank, step, v.committed_at)]
            for v in gone:
                self._remove_rank(final, v.rank)
            written = [v for v in written if v not in gone]
            if written:
                self._write_marker(final, written, tag)
        finally:
            self._remove_temporaries_in(final, tag)
        try:
            self._trim(job)
        except OSError as exc:
            log.warning("job %r: older persisted steps could not be trimmed: %s", job, exc)
        if self.metrics is not None:
            self.metrics.persist_seconds.observe(time.perf_counter() - started)
            self.metrics.persisted_bytes.inc(fresh)
        log.info("persisted job %r step %d (ranks %s) to %s", job, step,
                 [v.rank for v in written], final)
        return final

    def _tmp(self, path: str, tag: str) -> str:
        head, name = os.path.split(path)
        return os.path.join(head, f".{name}.{self.node}.{os.getpid()}.{tag}.tmp")

    def _publish(self, path: str, data: bytes, tag: str = "") -> None:
        """Write a small file under a temporary name, then rename it into place."""
        tmp = self._tmp(path, tag or secrets.token_hex(3))
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            _unlink(tmp)
            raise

    def _write_rank(self, directory: str, v: Version, tag: str) -> None:
        binary = os.path.join(directory, f"rank-{v.rank}.bin")
        tmp = self._tmp(binary, tag)
        view = self.store.dir.view(v.number, v.size)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                for start in range(0, v.nbytes, _PIECE):
                    began = time.perf_counter()
                    fh.write(view[start:min(start + _PIECE, v.nbytes)])
                    self._throttle(min(_PIECE, v.nbytes - start), time.perf_counter() - began)
                fh.flush()
                os.fsync(fh.fileno())
            # The old manifest goes first: a rank is never its old manifest over new bytes.
            _unlink(os.path.join(directory, f"rank-{v.rank}.json"))
            os.replace(tmp, binary)
        except BaseException:
            _unlink(tmp)
            raise
        finally:
            view.release()
        timeline = self._timeline_of(v.job, v.rank, v.committed_at)
        manifest = {"format": _FORMAT, "job": v.job, "rank": v.rank, "step": v.step,
                    "nbytes": v.nbytes, "committed_at": v.committed_at,
                    "world_size": v.world_size, "local_world_size": v.local_world_size,
                    "timeline": timeline, "owner": self.store.owner(v.job),
                    "run": v.run, "node": self.node, "meta": v.meta,
                    "tensors": [t.__dict__ | {"shape": list(t.shape)} for t in v.tensors]}
        self._publish(os.path.join(directory, f"rank-{v.rank}.json"),
                      json.dumps(manifest).encode(), tag)

    def _write_marker(self, directory: str, versions: list[Version], tag: str) -> None:
        marker = {"format": _FORMAT, "node": self.node, "written_at": time.time(),
                  "ranks": {str(v.rank): {"committed_at": v.committed_at,
                                          "world_size": v.world_size, "run": v.run}
                            for v in versions}}
        self._publish(os.path.join(directory, f"node-{self.node}.done"),
                      json.dumps(marker).encode(), tag)

    def _throttle(self, nbytes: int, spent: float) -> None:
        if self.rate > 0:
            self._sleep(max(0.0, nbytes / self.rate - spent))

    def _trim(self, job: str) -> None:
        """Keep the newest ``keep`` complete steps: in older steps remove this node's files
        (its marker and the ranks it names); other nodes trim their own."""
        complete = sorted(s for s, ranks in self.inventory(job).items() if ranks)
        if self.keep <= 0 or len(complete) <= self.keep:
            return
        cut = complete[-self.keep]
        for step in self._step_numbers(job):
            if step >= cut:
                continue
            directory = self.step_dir(job, step)
            mine = os.path.join(directory, f"node-{self.node}.done")
            marker = _read_json(mine)
            if marker is None:
                continue
            for rank in marker.get("ranks", {}):
                self._remove_rank(directory, int(rank))
            _unlink(mine)
            try:
                os.rmdir(directory)       # once every node trimmed its part
            except OSError:
                pass

    # ------------------------------------------------------------------ the job's owner

    def owner(self, job: str) -> str:
        """The token digest the job's persisted versions belong to ('' when none is kept)."""
        try:
            with open(os.path.join(self.root, job, "owner")) as fh:
                return fh.read().strip()
        except OSError:
            return ""

    def _claim(self, job: str, owner: str) -> None:
        """Refuse to write a job whose directory belongs to another token; record the owner
        of a job that has one and whose directory has none."""
        held = self.owner(job)
        if held and owner and held != owner:
            raise StoreError("forbidden", f"job {job!r} in {self.root} belongs to another "
                             "token; give this job another name")
        if owner and not held:
            os.makedirs(os.path.join(self.root, job), mode=0o700, exist_ok=True)
            self._publish(os.path.join(self.root, job, "owner"), (owner + "\n").encode())

    # ------------------------------------------------------------------ drops (timelines)

    def dropped(self, job: str, ranks: Iterable[int], step: int | None = None,
                newer_than: int | None = None, timeline: int = 0) -> int:
        """A drop of (job, ranks) reached memory: record it in each rank's drop log and remove
        the persisted versions it selects (``rank=None`` of an operator's drop: the ranks
        held here and those this node persisted). Never raises: the drop in memory stands.
        Returns how many persisted versions were removed."""
        chosen = set(ranks)
        # The store's stamp, not time.time(): after every commit on this node even with its
        # wall clock stepped back (a version committed before the drop is abandoned).
        record = {"at": self.store.stamp(durable=True), "step": step, "newer_than": newer_than,
                  "timeline": timeline, "node": self.node}
        removed = 0
        try:
            for rank in sorted(chosen):
                self._record_drop(job, rank, record)
                for s in self._step_numbers(job):
                    if _selects(record, s) and self._remove_rank(self.step_dir(job, s), rank):
                        removed += 1
        except OSError as exc:
            log.warning("job %r ranks %s: the drop (%s) could not reach the persistence tier: "
                        "%s; the versions it selects there are abandoned all the same (the "
                        "drop is kept in memory)", job, sorted(chosen), record, exc)
        if removed:
            log.info("job %r ranks %s: removed %d persisted versions (a drop: step %s, newer "
                     "than %s)", job, sorted(chosen), removed, step, newer_than)
        return removed

    def ranks_written(self, job: str) -> set[int]:
        """The ranks of ``job`` this node's markers name (an operator's drop of every rank)."""
        out: set[int] = set()
        for s in self._step_numbers(job):
            marker = _read_json(os.path.join(self.step_dir(job, s), f"node-{self.node}.done"))
            out |= {int(r) for r in (marker or {}).get("ranks", {})}
        return out

    def _drop_log(self, job: str, rank: int) -> str:
        return os.path.join(self.root, job, "drops", f"rank-{rank}.json")

    def _record_drop(self, job: str, rank: int, record: dict[str, Any]) -> None:
        with self._lock:
            self._drops.setdefault((job, rank), []).append(record)
            del self._drops[(job, rank)][:-_DROPS_KEPT]
            path = self._drop_log(job, rank)
            held = _read_json(path)
            records = held if isinstance(held, list) else []
            records = (records + [record])[-_DROPS_KEPT:]
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            self._publish(path, json.dumps(records).encode())

    def _drops_of(self, job: str, rank: int) -> list[dict[str, Any]]:
        held = _read_json(self._drop_log(job, rank))
        with self._lock:
            mine = list(self._drops.get((job, rank), []))
        return (held if isinstance(held, list) else []) + mine

    def _abandoned(self, job: str, rank: int, step: int, committed_at: float,
                   drops: list[dict[str, Any]] | None = None) -> bool:
        """Whether a drop made after the version was committed selects it."""
        for d in self._drops_of(job, rank) if drops is None else drops:
            try:
                if float(d["at"]) > committed_at and _selects(d, step):
                    return True
            except (KeyError, TypeError, ValueError):
                continue
        return False

    def _timeline_of(self, job: str, rank: int, committed_at: float) -> dict[str, Any]:
        """The timeline a version was committed in: the newest drop before its commit that
        named one (token 0, base -1: none known)."""
        before = [d for d in self._drops_of(job, rank)
                  if isinstance(d.get("at"), (int, float)) and d["at"] <= committed_at
                  and d.get("timeline")]
        if not before:
            return {"token": 0, "base": -1}
        last = max(before, key=lambda d: d["at"])
        base = last.get("newer_than")
        return {"token": last["timeline"], "base": -1 if base is None else base}

    # ------------------------------------------------------------------ reading

    def step_dir(self, job: str, step: int) -> str:
        return os.path.join(self.root, job, f"step-{step:012d}")

    def _step_numbers(self, job: str) -> list[int]:
        try:
            names = os.listdir(os.path.join(self.root, job))
        except OSError:
            return []
        return sorted(int(m.group(1)) for n in names if (m := _STEP_RE.fullmatch(n)))

    def _markers(self, directory: str) -> dict[int, dict[str, Any]]:
        """rank -> what the newest marker naming it says (committed_at, world_size)."""
        out: dict[int, dict[str, Any]] = {}
        try:
            names = os.listdir(directory)
        except OSError:
            return out
        for name in names:
            if not (name.startswith("node-") and name.endswith(".done")):
                continue
            marker = _read_json(os.path.join(directory, name))
            if not isinstance(marker, dict) or not isinstance(marker.get("ranks"), dict):
                continue
            for rank, said in marker["ranks"].items():
                try:
                    entry = {"committed_at": float(said["committed_at"]),
                             "world_size": int(said.get("world_size", 0)),
                             "run": str(said.get("run", ""))}
                    r = int(rank)
                except (KeyError, TypeError, ValueError):
                    continue
                if r not in out or entry["committed_at"] > out[r]["committed_at"]:
                    out[r] = entry
        return out

    def inventory(self, job: str) -> dict[int, dict[int, dict[str, Any]]]:
        """step -> {rank: {committed_at, world_size, run}} of the persisted versions that can be
        restored: the step complete (every rank of its world marked and its manifest there),
        not abandoned; an incomplete step maps to {}."""
        out: dict[int, dict[int, dict[str, Any]]] = {}
        drops: dict[int, list[dict[str, Any]]] = {}
        for step in self._step_numbers(job):
            directory = self.step_dir(job, step)
            marked = self._markers(directory)
            try:
                present = {int(m.group(1)) for n in os.listdir(directory)
                           if (m := _RANK_RE.fullmatch(n))}
            except OSError:
                present = set()
            ranks = {}
            for rank, entry in marked.items():
                if rank not in drops:
                    drops[rank] = self._drops_of(job, rank)
                if rank in present and not self._abandoned(job, rank, step,
                                                           entry["committed_at"], drops[rank]):
                    ranks[rank] = entry
            world = max((e["world_size"] for e in marked.values()), default=0)
            whole = bool(ranks) and (world <= 0 or set(ranks) >= set(range(world)))
            out[step] = ranks if whole else {}
        return out

    def steps(self, job: str, rank: int | None = None, run: str | None = None) -> list[int]:
        """Complete persisted steps of a job (that hold ``rank``, when given, of run identity
        ``run``, when given), oldest first."""
        return sorted(s for s, ranks in self.inventory(job).items()
                      if ranks and (rank is None or rank in ranks)
                      and (run is None or rank is None or ranks[rank].get("run", "") == run))

    def load(self, job: str, rank: int, step: int, pid: int, mapped: bool = False,
             run: str | None = None) -> Lease:
        """Load a persisted version into memory (checked against its checksums), leased to
        ``pid`` as it is published (retention may evict a step older than those held at once;
        the lease keeps it for this reader). Raises StoreError ``corrupt`` (the version is set
        aside: ``rank-R.json.corrupt``), ``forbidden``, ``not_found``."""
        directory = self.step_dir(job, step)
        path = os.path.join(directory, f"rank-{rank}.json")
        binary = os.path.join(directory, f"rank-{rank}.bin")
        marked = self._markers(directory).get(rank)
        try:
            with open(path, "rb") as fh:
                text = fh.read()
        except FileNotFoundError:
            raise StoreError("not_found", f"job {job!r} rank {rank} step {step} is not in the "
                             f"persistence tier ({directory})") from None
        except OSError as exc:
            raise _disk_error(exc, f"reading {path}") from None
        try:
            m = json.loads(text)
            tensors = tuple(TensorEntry(t["name"], t["dtype"], tuple(t["shape"]), t["offset"],
                                        t["nbytes"], t["checksum"]) for t in m["tensors"])
            nbytes, meta, committed_at = int(m["nbytes"]), str(m["meta"]), \
                float(m["committed_at"])
            local_world, world, owner = int(m.get("local_world_size", 1)), \
                int(m.get("world_size", 0)), str(m.get("owner", ""))
            written_by = str(m.get("run", ""))
        except (ValueError, KeyError, TypeError) as exc:
            self._set_aside(path, f"not a readable manifest ({type(exc).__name__}: {exc})")
            raise StoreError("corrupt", f"persisted manifest {path} is damaged "
                             f"({type(exc).__name__}: {exc}); it was set aside, restore "
                             "another step") from None
        if marked is None or marked["committed_at"] != committed_at or \
                self._abandoned(job, rank, step, committed_at):
            raise StoreError("not_found", f"job {job!r} rank {rank} step {step} in the "
                             "persistence tier is not complete or was abandoned (a restore "
                             "of an older step dropped it)")
        if run is not None and written_by != run:
            raise StoreError("not_found", f"job {job!r} rank {rank} step {step} in the "
                             f"persistence tier was written by run {written_by!r}, not "
                             f"{run!r} (another job of the same name)")
        bound = self.store.owner(job)
        if bound and owner and owner != bound:
            raise StoreError("forbidden", f"job {job!r} rank {rank} step {step} in the "
                             "persistence tier belongs to another token")
        try:
            size = os.path.getsize(binary)
        except OSError as exc:
            raise _disk_error(exc, f"reading {binary}") from None
        if size < nbytes:
            self._set_aside(path, f"{binary} holds {size} of {nbytes} bytes")
            raise StoreError("corrupt", f"{binary} is shorter ({size} bytes) than its "
                             f"manifest says ({nbytes}); it was set aside, restore another "
                             "step")

        def fill(view: memoryview) -> None:
            with open(binary, "rb") as fh:
                if fh.readinto(view) != view.nbytes:
                    raise StoreError("corrupt", f"{binary} is shorter than its manifest says")

        hold = Hold(pid, mapped)
        try:
            self.store.install(job, rank, step, nbytes, tensors, meta, local_world, fill,
                               committed_at=committed_at, protected=False, owner=bound or owner,
                               world_size=world, hold=hold, run=written_by)
        except StoreError as exc:
            if exc.code not in ("checksum_mismatch", "corrupt"):
                raise
            if self.metrics is not None and exc.code == "checksum_mismatch":
                self.metrics.checksum_failures.inc()
            self._set_aside(path, exc.message)
            raise StoreError("corrupt", f"persisted job {job!r} rank {rank} step {step} "
                             f"({binary}) is damaged: {exc.message}; it was set aside, "
                             "restore another step") from None
        except OSError as exc:
            raise _disk_error(exc, f"reading {binary}") from None
        assert hold.lease is not None
        return hold.lease

    def _set_aside(self, manifest: str, why: str) -> None:
        """Rename a damaged version's manifest (``.corrupt``): no node lists it again, the
        bytes stay for a look."""
        log.error("persisted version %s is corrupt (%s); set aside as %s.corrupt", manifest,
                  why, manifest)
        try:
            os.replace(manifest, manifest + ".corrupt")
        except OSError as exc:
            log.warning("could not set %s aside: %s", manifest, exc)

    # ------------------------------------------------------------------ temporaries

    def _remove_rank(self, directory: str, rank: int) -> bool:
        """Remove a rank's files from a step directory (the manifest first)."""
        found = _unlink(os.path.join(directory, f"rank-{rank}.json"))
        return _unlink(os.path.join(directory, f"rank-{rank}.bin")) or found

    def _remove_temporaries_in(self, directory: str, tag: str) -> None:
        """One write's temporaries in a directory (the write failed)."""
        mark = f".{self.node}.{os.getpid()}.{tag}."
        try:
            names = os.listdir(directory)
        except OSError:
            return
        for name in names:
            if name.startswith(".") and name.endswith(".tmp") and mark in name:
                _unlink(os.path.join(directory, name))

    def _remove_temporaries(self) -> list[str]:
        """At start: this node's temporaries (its daemon was killed mid-persist) and any
        node's older than a day; returns what was removed."""
        removed = []
        now = time.time()
        for top, dirs, files in os.walk(self.root):
            if os.path.relpath(top, self.root).count(os.sep) >= 2:
                dirs[:] = []               # DIR/<job>/<step or drops>: no deeper
            for name in files:
                if not (name.startswith(".") and name.endswith(".tmp")):
                    continue
                path = os.path.join(top, name)
                mine = f".{self.node}." in name
                try:
                    stale = now - os.path.getmtime(path) > _STALE_TMP_S
                except OSError:
                    continue
                if (mine or stale) and _unlink(path):
                    removed.append(os.path.relpath(path, self.root))
        return removed


def _selects(drop: dict[str, Any], step: int) -> bool:
    """Whether a drop record (``step``, ``newer_than``; both None: every step) selects a step."""
    return (drop.get("step") is None or drop["step"] == step) and \
        (drop.get("newer_than") is None or step > drop["newer_than"])


def _read_json(path: str) -> Any:
    """A small JSON file's content; None when it is missing or unreadable."""
    try:
        with open(path, "rb") as fh:
            return json.loads(fh.read())
    except (OSError, ValueError):
        return None


def _unlink(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False
