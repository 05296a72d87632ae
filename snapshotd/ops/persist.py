"""The persistence tier: node versions written to a directory, in the background, throttled.

The daemon has no torch, so it writes its own format, the segment layout on disk. The directory
may be shared by every node of the cluster (NFS): nothing one node writes is renamed over or
removed by another, except where a drop of a rank removes that rank's files (docs/protocol.md,
"Persistence tier")::

    DIR/<job>/owner                           hex SHA-256 of the job's token (--job-isolation)
    DIR/<job>/drops/rank-3.<node>.json        the drops of rank 3 made on <node> (newest 64)
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
restored and exported. Manifests, markers and drop logs are sealed (``_shm.seal``: an XXH3-64
``check`` over the record's text). A rank's version is *abandoned* when the drop log of the
node that committed it holds a drop made there after the commit (the node's stamps: one
clock, never compared with another node's) that selects its step (a restore of an older step
starts a new timeline): it is removed by the drop, and never served should a persist in flight
have written it after. ``snapshotctl export`` turns any version (in memory or here) into a
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

from ..common import locks
from ..common.protocol import ProtocolError, TensorEntry, check_table
from ..node._shm import read_sealed, seal, unseal
from ..node.store import Hold, Lease, Store, StoreError, Version

__all__ = ["Persister", "node_name"]

log = logging.getLogger("snapshotd.persist")
_STEP_RE = re.compile(r"step-(\d{12})")
_RANK_RE = re.compile(r"rank-(\d+)\.json")
#: A drop log: ``rank-<rank>.<node>.json`` (one file per rank and node: no node rewrites
#: another's records).
_DROPS_RE = re.compile(r"rank-(\d+)\.([A-Za-z0-9_-]+)\.json")
_PIECE = 8 << 20
#: Drops kept per rank in its drop log (older ones cannot select a version still on disk).
_DROPS_KEPT = 64
#: Temporaries of other nodes older than this are removed at start too (a node gone for good).
_STALE_TMP_S = 24 * 3600.0
_FORMAT = 3
#: Codes of a failed install that say nothing about the persisted files (everything else a
#: load finds wrong is damage: ``corrupt``).
_NOT_DAMAGE = frozenset({"memory_full", "shutting_down", "forbidden"})


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
        self._lock = locks.lock("persist")
        #: (job, rank) -> drops made here since the start (also in the drop logs on disk,
        #: where writing them may fail: a full disk)
        self._drops: dict[tuple[str, int], list[dict[str, Any]]] = {}
        self._failing = ""        # the code of the failure streak under way ('' when none)
        #: (job, rank) of drop logs whose write failed (a full disk): written again with the
        #: next drop or persist of the job.
        self._unsaved: set[tuple[str, int]] = set()
        #: (job, step) being written here: a manifest newer than its marker is not damage.
        self._writing: set[tuple[str, int]] = set()
        #: Damaged records already named in the log (one line each, not one per listing).
        self._warned: set[str] = set()
        os.makedirs(root, mode=0o700, exist_ok=True)
        removed = self._remove_temporaries()
        if removed:
            log.warning("removed %d temporaries of persists that did not finish in %s: %s",
                        len(removed), root, ", ".join(removed[:8]))
        self._raise_stamps()

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
        try:
            self._save_drops(job)              # drops a full disk kept from the logs
        except OSError as exc:
            log.warning("job %r: drops made here are still not in the persistence tier's drop "
                        "logs (%s); they are kept in memory", job, exc)
        final = self.step_dir(job, step)
        os.makedirs(final, mode=0o700, exist_ok=True)
        started = time.perf_counter()
        tag = secrets.token_hex(3)              # this write's temporaries
        written: list[Version] = []
        fresh = 0
        with self._lock:
            self._writing.add((job, step))
        try:
            marked = self._markers(final)
            for v in versions:
                if self._abandoned(job, v.rank, step, v.committed_at, self.node):
                    continue               # dropped since (a new timeline)
                mine = [e for e in marked.get(v.rank, []) if e["node"] == self.node]
                if any(e["committed_at"] == v.committed_at for e in mine) and \
                        self._manifest_is(final, v.rank, self.node, v.committed_at):
                    written.append(v)      # persisted already
                    continue
                self._write_rank(final, v, tag)
                written.append(v)
                fresh += v.nbytes
            # A drop that came while the bytes were written: those ranks are abandoned.
            gone = [v for v in written
                    if self._abandoned(job, v.rank, step, v.committed_at, self.node)]
            for v in gone:
                self._remove_rank(final, v.rank)
            written = [v for v in written if v not in gone]
            if written:
                self._write_marker(final, written, tag)
        finally:
            with self._lock:
                self._writing.discard((job, step))
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
        self._publish(os.path.join(directory, f"rank-{v.rank}.json"), _sealed(manifest), tag)

    def _write_marker(self, directory: str, versions: list[Version], tag: str) -> None:
        marker = {"format": _FORMAT, "node": self.node, "written_at": time.time(),
                  "ranks": {str(v.rank): {"committed_at": v.committed_at,
                                          "world_size": v.world_size, "run": v.run}
                            for v in versions}}
        self._publish(os.path.join(directory, f"node-{self.node}.done"), _sealed(marker), tag)

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
            marker, _ = read_sealed(mine)
            if marker is None:
                continue
            for rank in marker.get("ranks", {}):
                # Not a rank another node wrote since (a rank that moved nodes).
                if self._manifest_node(directory, int(rank)) in (self.node, None):
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
                newer_than: int | None = None, timeline: int = 0,
                everyone: bool = True) -> int:
        """A drop of (job, ranks) reached memory: record it in each rank's drop log (this
        node's) and remove the persisted versions it selects (``rank=None`` of an operator's
        drop: the ranks held here and those this node persisted). ``everyone``: the drop is
        made now, here (a restore's or an operator's ``Drop``), so every node's selected
        versions of the ranks belong to the abandoned timeline and are removed; else (a peer's
        ``DropNewer``, which may arrive late, after the new timeline was persisted by another
        node) only those this node committed before the drop. The versions are removed even
        where the log cannot be written (a full disk: unlinking needs no space; the drop is
        kept in memory and written with the next drop or persist). Never raises: the drop in
        memory stands. Returns how many persisted versions were removed."""
        chosen = set(ranks)
        # The store's stamp, not time.time(): after every commit on this node even with its
        # wall clock stepped back (a version committed before the drop is abandoned).
        at = self.store.stamp(durable=True)
        record = {"at": at, "step": step, "newer_than": newer_than, "timeline": timeline,
                  "node": self.node}
        removed = 0
        for rank in sorted(chosen):
            with self._lock:
                self._drops.setdefault((job, rank), []).append(record)
                del self._drops[(job, rank)][:-_DROPS_KEPT]
                self._unsaved.add((job, rank))
            try:
                self._save_drops(job, rank)
            except OSError as exc:
                log.warning("job %r rank %d: the drop (%s) could not be recorded in the "
                            "persistence tier (%s); the versions it selects there are removed "
                            "all the same, and the record is written with the next drop or "
                            "persist of the job", job, rank, record, exc)
            for s in self._step_numbers(job):
                if not _selects(record, s):
                    continue
                directory = self.step_dir(job, s)
                try:
                    if not everyone and not self._manifest_is(directory, rank, self.node,
                                                              below=at):
                        continue
                    if self._remove_rank(directory, rank):
                        removed += 1
                except OSError as exc:
                    log.error("job %r rank %d step %d: the persisted version a drop abandons "
                              "could not be removed (%s); it is not served while this daemon "
                              "runs, remove %s by hand", job, rank, s, exc, directory)
        if removed:
            log.info("job %r ranks %s: removed %d persisted versions (a drop: step %s, newer "
                     "than %s)", job, sorted(chosen), removed, step, newer_than)
        return removed

    def ranks_written(self, job: str) -> set[int]:
        """The ranks of ``job`` this node's markers name (an operator's drop of every rank)."""
        out: set[int] = set()
        for s in self._step_numbers(job):
            marker, _ = read_sealed(os.path.join(self.step_dir(job, s),
                                                 f"node-{self.node}.done"))
            out |= {int(r) for r in (marker or {}).get("ranks", {})}
        return out

    def _drops_dir(self, job: str) -> str:
        return os.path.join(self.root, job, "drops")

    def _drop_log(self, job: str, rank: int, node: str = "") -> str:
        return os.path.join(self._drops_dir(job), f"rank-{rank}.{node or self.node}.json")

    def _save_drops(self, job: str, rank: int | None = None) -> None:
        """Write this node's drop logs of ``job`` (of ``rank``) that memory holds records of
        not yet on disk: the records on disk and those in memory, the newest 64. Raises
        OSError (the record stays in memory, marked unsaved)."""
        with self._lock:
            todo = sorted(r for j, r in self._unsaved if j == job and rank in (None, r))
        for r in todo:
            path = self._drop_log(job, r)
            held, why = read_sealed(path)
            on_disk = held.get("drops") if held is not None and not why else None
            if (held is not None or why) and not isinstance(on_disk, list):
                # A damaged log of ours is kept as it is (the versions it covers answer
                # corrupt until an operator removes it); the record stays in memory.
                raise OSError(errno.EIO, f"the drop log is damaged ({why or 'no drops'}); "
                              "remove it once no restore of an older step is to be kept", path)
            with self._lock:
                mine = list(self._drops.get((job, r), []))
            records = [d for d in (on_disk if isinstance(on_disk, list) else [])
                       if isinstance(d, dict) and d not in mine] + mine
            records.sort(key=lambda d: float(d["at"]) if isinstance(d.get("at"), (int, float))
                         else 0.0)
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            self._publish(path, _sealed({"format": _FORMAT, "node": self.node, "rank": r,
                                         "drops": records[-_DROPS_KEPT:]}))
            with self._lock:
                if self._drops.get((job, r), []) == mine:     # none added meanwhile
                    self._unsaved.discard((job, r))

    def _drops_of(self, job: str, rank: int) -> tuple[list[dict[str, Any]], set[str]]:
        """The drops of (job, rank) every node recorded, and the nodes whose drop log of the
        rank is damaged (not sealed, truncated, changed): what they abandoned is unknown."""
        records: list[dict[str, Any]] = []
        damaged: set[str] = set()
        try:
            names = os.listdir(self._drops_dir(job))
        except OSError:
            names = []
        for name in names:
            m = _DROPS_RE.fullmatch(name)
            if m is None or int(m.group(1)) != rank:
                continue
            path = os.path.join(self._drops_dir(job), name)
            held, why = read_sealed(path)
            if held is None and not why:
                continue                   # removed meanwhile
            drops = held.get("drops") if held is not None else None
            if why or held is None or not isinstance(drops, list) or \
                    held.get("node") != m.group(2):
                damaged.add(m.group(2))
                self._warn(path, f"drop log {path} is damaged ({why or 'not a drop log'}): "
                           f"the persisted versions of rank {rank} that node {m.group(2)} "
                           "wrote answer corrupt (a restore of an older step may have "
                           "abandoned them); remove the file if no such restore was made")
                continue
            records += [d for d in drops if isinstance(d, dict)]
        with self._lock:
            records += self._drops.get((job, rank), [])
        return records, damaged

    def _abandoned(self, job: str, rank: int, step: int, committed_at: float, node: str,
                   drops: tuple[list[dict[str, Any]], set[str]] | None = None) -> bool:
        """Whether a drop made on ``node`` (the node that committed the version: its stamps
        are ordered, another node's are another clock) after the commit selects the version.
        (A damaged drop log is :meth:`load`'s to refuse.)"""
        records = (self._drops_of(job, rank) if drops is None else drops)[0]
        for d in records:
            try:
                if d.get("node") == node and float(d["at"]) > committed_at and \
                        _selects(d, step):
                    return True
            except (KeyError, TypeError, ValueError):
                continue
        return False

    def _timeline_of(self, job: str, rank: int, committed_at: float) -> dict[str, Any]:
        """The timeline a version committed here was committed in: the newest drop made here
        before its commit that named one (token 0, base -1: none known)."""
        before = [d for d in self._drops_of(job, rank)[0]
                  if d.get("node") == self.node and isinstance(d.get("at"), (int, float))
                  and d["at"] <= committed_at and d.get("timeline")]
        if not before:
            return {"token": 0, "base": -1}
        last = max(before, key=lambda d: d["at"])
        base = last.get("newer_than")
        return {"token": last["timeline"], "base": -1 if base is None else base}

    def _raise_stamps(self) -> None:
        """At start, before the daemon serves: the store's stamps from now on come after every
        stamp this node left in the persistence tier (its drops and the commit times in its
        markers). A memory lost with the wall clock stepped back took ``stamp.json`` with it;
        a new commit stamped below an older drop of this node would look abandoned."""
        newest = 0.0
        try:
            jobs = os.listdir(self.root)
        except OSError:
            return
        for job in jobs:
            for rank in self._own_drop_ranks(job):
                held, why = read_sealed(self._drop_log(job, rank))
                for d in (held or {}).get("drops", []) if not why else []:
                    if isinstance(d, dict) and isinstance(d.get("at"), (int, float)):
                        newest = max(newest, float(d["at"]))
            for s in self._step_numbers(job):
                marker, why = read_sealed(os.path.join(self.step_dir(job, s),
                                                       f"node-{self.node}.done"))
                ranks = (marker or {}).get("ranks", {}) if not why else {}
                for said in ranks.values() if isinstance(ranks, dict) else []:
                    at = said.get("committed_at") if isinstance(said, dict) else None
                    if isinstance(at, (int, float)):
                        newest = max(newest, float(at))
        if newest:
            self.store.raise_stamp(newest)

    def _own_drop_ranks(self, job: str) -> list[int]:
        try:
            names = os.listdir(self._drops_dir(job))
        except OSError:
            return []
        return [int(m.group(1)) for n in names
                if (m := _DROPS_RE.fullmatch(n)) and m.group(2) == self.node]

    # ------------------------------------------------------------------ reading

    def step_dir(self, job: str, step: int) -> str:
        return os.path.join(self.root, job, f"step-{step:012d}")

    def _step_numbers(self, job: str) -> list[int]:
        try:
            names = os.listdir(os.path.join(self.root, job))
        except OSError:
            return []
        return sorted(int(m.group(1)) for n in names if (m := _STEP_RE.fullmatch(n)))

    def _warn(self, key: str, message: str) -> None:
        """Log a damaged record once (listings read it again and again)."""
        with self._lock:
            first = key not in self._warned
            self._warned.add(key)
        if first:
            log.error("%s", message)

    def _markers(self, directory: str) -> dict[int, list[dict[str, Any]]]:
        """rank -> what each marker naming it says: {node, committed_at, world_size}. A
        damaged marker (its seal does not match) names nothing."""
        out: dict[int, list[dict[str, Any]]] = {}
        try:
            names = os.listdir(directory)
        except OSError:
            return out
        for name in names:
            if not (name.startswith("node-") and name.endswith(".done")):
                continue
            path = os.path.join(directory, name)
            marker, why = read_sealed(path)
            if marker is None and not why:
                continue                   # removed meanwhile
            if why or not isinstance(marker, dict) or not isinstance(marker.get("ranks"), dict):
                self._warn(path, f"persisted marker {path} is damaged ({why or 'no ranks'}); "
                           "the ranks it names are not complete there")
                continue
            for rank, said in marker["ranks"].items():
                try:
                    entry = {"node": str(marker["node"]),
                             "committed_at": float(said["committed_at"]),
                             "world_size": int(said.get("world_size", 0)),
                             "run": str(said.get("run", ""))}
                    r = int(rank)
                except (KeyError, TypeError, ValueError):
                    continue
                out.setdefault(r, []).append(entry)
        return out

    def _manifest(self, directory: str, rank: int) -> tuple[dict[str, Any] | None, str]:
        return read_sealed(os.path.join(directory, f"rank-{rank}.json"))

    def _manifest_node(self, directory: str, rank: int) -> str | None:
        """The node that wrote a rank's manifest (None: no manifest, or a damaged one)."""
        m, why = self._manifest(directory, rank)
        return None if m is None or why else str(m.get("node", ""))

    def _manifest_is(self, directory: str, rank: int, node: str,
                     committed_at: float | None = None, below: float | None = None) -> bool:
        """Whether the rank's manifest is intact, written by ``node``, of a version committed
        at ``committed_at`` (or before ``below``)."""
        m, why = self._manifest(directory, rank)
        if m is None or why or m.get("node") != node:
            return False
        at = m.get("committed_at")
        if not isinstance(at, (int, float)):
            return False
        return (committed_at is None or at == committed_at) and (below is None or at < below)

    def _marked(self, directory: str, rank: int,
                entries: list[dict[str, Any]]) -> dict[str, Any] | None:
        """The marker entry that describes the rank's manifest. Where markers of several
        nodes name the rank (it moved nodes, and one rewrote it), the manifest says which
        (never the newest commit time: those of two nodes are two clocks)."""
        distinct = {(e["node"], e["committed_at"]): e for e in entries}
        if len(distinct) == 1:
            return entries[0]
        m, why = self._manifest(directory, rank)
        if m is None or why:
            return None
        return distinct.get((m.get("node"), m.get("committed_at")))

    def inventory(self, job: str) -> dict[int, dict[int, dict[str, Any]]]:
        """step -> {rank: {node, committed_at, world_size, run}} of the persisted versions
        that can be restored: the step complete (every rank of its world marked and its
        manifest there), not abandoned; an incomplete step maps to {}."""
        out: dict[int, dict[int, dict[str, Any]]] = {}
        drops: dict[int, tuple[list[dict[str, Any]], set[str]]] = {}
        for step in self._step_numbers(job):
            directory = self.step_dir(job, step)
            marked = self._markers(directory)
            try:
                present = {int(m.group(1)) for n in os.listdir(directory)
                           if (m := _RANK_RE.fullmatch(n))}
            except OSError:
                present = set()
            ranks = {}
            world = 0
            for rank, entries in marked.items():
                entry = self._marked(directory, rank, entries) if rank in present else None
                if entry is None:
                    continue
                world = max(world, entry["world_size"])
                if rank not in drops:
                    drops[rank] = self._drops_of(job, rank)
                if not self._abandoned(job, rank, step, entry["committed_at"], entry["node"],
                                       drops[rank]):
                    ranks[rank] = entry
            whole = bool(ranks) and (world <= 0 or set(ranks) >= set(range(world)))
            out[step] = ranks if whole else {}
        return out

    def steps(self, job: str, rank: int | None = None, run: str | None = None) -> list[int]:
        """Complete persisted steps of a job (that hold ``rank``, when given, of run identity
        ``run``, when given), oldest first."""
        return sorted(s for s, ranks in self.inventory(job).items()
                      if ranks and (rank is None or rank in ranks)
                      and (run is None or rank is None or ranks[rank].get("run", "") == run))

    def _damaged(self, path: str, job: str, rank: int, step: int, why: str,
                 set_aside: bool = True) -> StoreError:
        """The error of a damaged persisted version (set aside unless told not to)."""
        if set_aside:
            self._set_aside(path, why)
        return StoreError("corrupt", f"persisted job {job!r} rank {rank} step {step} ({path}) "
                          f"is damaged: {why}; {'it was set aside, ' if set_aside else ''}"
                          "restore another step")

    def load(self, job: str, rank: int, step: int, pid: int, mapped: bool = False,
             run: str | None = None) -> Lease:
        """Load a persisted version into memory (checked against its seal and checksums),
        leased to ``pid`` as it is published (retention may evict a step older than those
        held at once; the lease keeps it for this reader). Raises StoreError ``corrupt``
        (anything found wrong with the files: the version is set aside as
        ``rank-R.json.corrupt``), ``forbidden``, ``not_found`` (not there, or abandoned),
        ``disk_error``, ``memory_full``."""
        directory = self.step_dir(job, step)
        path = os.path.join(directory, f"rank-{rank}.json")
        binary = os.path.join(directory, f"rank-{rank}.bin")
        try:
            with open(path, "rb") as fh:
                text = fh.read()
        except FileNotFoundError:
            raise StoreError("not_found", f"job {job!r} rank {rank} step {step} is not in the "
                             f"persistence tier ({directory})") from None
        except OSError as exc:
            raise _disk_error(exc, f"reading {path}") from None
        m, why = unseal(text)
        if m is None or why:
            raise self._damaged(path, job, rank, step, f"not a readable manifest ({why})")
        try:
            tensors = tuple(TensorEntry(str(t["name"]), str(t["dtype"]),
                                        tuple(int(d) for d in t["shape"]), int(t["offset"]),
                                        int(t["nbytes"]), str(t["checksum"]))
                            for t in m["tensors"])
            nbytes, meta, committed_at = int(m["nbytes"]), m["meta"], float(m["committed_at"])
            local_world, world, owner = int(m.get("local_world_size", 1)), \
                int(m.get("world_size", 0)), str(m.get("owner", ""))
            written_by = str(m.get("run", ""))
            node = str(m["node"])
            if (m.get("job"), m.get("rank"), m.get("step")) != (job, rank, step):
                raise ValueError(f"it describes job {m.get('job')!r} rank {m.get('rank')} "
                                 f"step {m.get('step')}")
            if not isinstance(meta, str) or nbytes < 0 or local_world < 1:
                raise ValueError("meta, nbytes or local_world_size out of range")
            json.loads(meta)
            check_table(tensors, nbytes)
        except (ValueError, KeyError, TypeError, ProtocolError) as exc:
            raise self._damaged(path, job, rank, step, f"not a valid manifest "
                                f"({type(exc).__name__}: {exc})") from None
        entry = self._marked(directory, rank, self._markers(directory).get(rank, []))
        if entry is None or (entry["node"], entry["committed_at"]) != (node, committed_at):
            with self._lock:
                writing = (job, step) in self._writing
            # A rank being rewritten here is between its manifest and its marker: not damage.
            raise self._damaged(path, job, rank, step, "its manifest and the markers disagree "
                                "(a persist cut short, or a file changed)",
                                set_aside=not writing)
        drops = self._drops_of(job, rank)
        if node in drops[1]:
            raise StoreError("corrupt", f"job {job!r} rank {rank} step {step}: the drop log "
                             f"{self._drop_log(job, rank, node)} of the node that wrote it is "
                             "damaged, so whether a restore of an older step abandoned it is "
                             "unknown; remove that file if no such restore was made")
        if self._abandoned(job, rank, step, committed_at, node, drops):
            raise StoreError("not_found", f"job {job!r} rank {rank} step {step} in the "
                             "persistence tier was abandoned (a restore of an older step "
                             "dropped it)")
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
        except FileNotFoundError:
            raise self._damaged(path, job, rank, step, f"{binary} is missing") from None
        except OSError as exc:
            raise _disk_error(exc, f"reading {binary}") from None
        if size != nbytes:
            raise self._damaged(path, job, rank, step, f"{binary} holds {size} bytes, its "
                                f"manifest says {nbytes}")

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
            if exc.code in _NOT_DAMAGE or (exc.code == "bad_request" and "pid" in exc.message):
                raise
            if self.metrics is not None and exc.code == "checksum_mismatch":
                self.metrics.checksum_failures.inc()
            raise self._damaged(path, job, rank, step, exc.message) from None
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


def _sealed(record: dict[str, Any]) -> bytes:
    """A record as written to the persistence tier: compact JSON, sealed (``_shm.seal``)."""
    return seal(json.dumps(record, separators=(",", ":"))).encode()


def _unlink(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False
