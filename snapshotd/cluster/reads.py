"""Reads across nodes: a rank's version served by the node that holds it, to a rank of the
job on another node (issue 14: a job restored at another world size, or whose ranks moved).

The reading rank asks its own daemon (``Open(remote=True)``); that daemon finds a node that
reported the rank (``Where``: the job-wide retention reports, docs/protocol.md) and asks it
over the peer transport (``GetVersion``). The holder verifies every tensor's checksum before
it sends the bytes, with the payload's XXH3; the reader's daemon checks that, writes the bytes
to a file in its shm directory (counted in its memory budget as ``remote`` bytes) and answers
like any ``Open``: the client maps the file and releases it when done (or the daemon removes
it when the reader's process is gone)::

    rank ──Open(remote)──► its daemon ──GetVersion──► holder (verify, send)
                           write remote-<lease>.bin ◄──VersionData + bytes──
    rank ◄──OpenReply(tier "peer", path)── ; ... ──Release──► unlink

A node that is lost and not replaced (its group's heartbeats, or for a node of another group
the lack of its job-wide retention reports, say it is down) cannot send its ranks; its group
still holds them, coded. Then the reader's daemon decodes the lost node's version itself, as a
replacement would rebuild it (rebuild.py: the group's inventories, ``k`` fragments of every
stripe, decoded), checks the rank's tensors against their checksums and serves that rank's
bytes the same way; nothing is installed as the lost node's. ``Where`` says which nodes are up:
of one that is not, only the steps it reported *protected* (the ones its group can decode).
"""

from __future__ import annotations

import hmac
import itertools
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from ..common import locks
from ..common import protocol as p
from ..common.protocol import TensorEntry
from ..node.store import Store, StoreError, _checksums, process_identity
from . import peerproto as pp
from .codec import Codec, make_codec
from .peers import PeerError
from .placement import Group, group_of
from .protection import Protector, frames_checksum
from .rebuild import RebuildError, Recovery, _Blob, _my_manifests

__all__ = ["PeerReads"]

#: Seconds a node has to answer a drop before it is told again later (the reader waits).
DROP_TIMEOUT = 5.0
#: Seconds a lost node's decoded version is kept for the other reads of its ranks.
DECODED_SECONDS = 30.0

log = logging.getLogger("snapshotd.reads")


class PeerReads:
    """Both sides of a read across nodes for one daemon."""

    #: Lease ids of remote reads (apart from the store's, which count up from 1).
    FIRST_LEASE = 1 << 40

    def __init__(self, me: int, store: Store, protector: Protector, links: Any,
                 timeout: float = 60.0, groups: list[Group] | None = None,
                 codec: str = "isal", metrics: Any = None) -> None:
        self.me, self.store, self.protector, self.links = me, store, protector, links
        self.timeout = timeout
        #: Every group of the cluster and the codec's name: to decode a lost node's ranks.
        self.groups, self.codec_name = groups or [], codec
        self._codecs: dict[int, Codec] = {}
        self.metrics = metrics
        #: (job, lost slot, step) -> (when, manifest, decoded chunks), and one lock per key:
        #: the reads of a lost node's ranks decode its version once.
        self._decoded: dict[tuple[str, int, int], tuple[float, str, list[Any]]] = {}
        self._decoding: dict[tuple[str, int, int], threading.Lock] = {}
        self._lock = locks.rlock("reads")
        self._ids = itertools.count(self.FIRST_LEASE)
        #: lease -> (path, pid, id, bytes): remote copies held; their bytes (``total``) are read
        #: without the lock by the store's budget (design section 6).
        self._held: locks.Tally = locks.Tally(lambda h: h[3])
        before = store.extra_kinds
        store.extra_kinds = lambda: before() | {"remote": self._held.total}
        #: Drops a node did not answer, by slot: sent again until it does.
        self._pending: dict[int, list[pp.DropNewer]] = {}
        #: Called with (job, rank, newer_than) after a drop asked by another node (the
        #: daemon hooks the persistence tier in: the drop reaches persisted steps too).
        self.on_dropped: Callable[[str, int, int], Any] = lambda job, rank, newer_than: None
        self._closed = False
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._resend, name="snapshotd-drops",
                                        daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ the holder's side

    def check_owner(self, job: str, owner: str, admin: bool, bound: str | None = None) -> None:
        """Refuse (``forbidden``) a peer request made for a client whose token digest
        ``owner`` is not the one ``job`` is bound to on this node (``bound``: the binding a
        version's record says instead; unbound: anyone, as on the requester's node). The
        requester's daemon checked the client's token against its own binding; this is the
        holder's check against its own (docs/design.md section 6)."""
        held = self.store.owner(job) if bound is None else bound
        if admin or not held or hmac.compare_digest(held, owner):
            return
        raise StoreError("forbidden", f"job {job!r} on node {self.me} belongs to another "
                         "token; use the job's own SNAPSHOTD_JOB_TOKEN")

    def owners(self, job: str) -> dict[str, list[int]]:
        """The token digests the other nodes' reports say ``job`` is bound to, each with the
        nodes that said so (empty: no node reported a binding)."""
        out: dict[str, list[int]] = {}
        for slot, v in sorted(self.protector.views(job).items()):
            if slot != self.me and v.owner:
                out.setdefault(v.owner, []).append(slot)
        return out

    def serve(self, msg: pp.GetVersion) -> tuple[pp.VersionData, list[Any]]:
        """Send (job, rank, step) whole, once every tensor matches its checksum (only to a
        requester of the job's token, and only a version of its run identity)."""
        self.check_owner(msg.job, msg.owner, msg.admin)
        lease = self.store.lease(msg.job, msg.rank, os.getpid(), step=msg.step, run=msg.run)
        try:
            v = lease.version
            bad = self.store.verify(v)
            if bad:
                raise StoreError("corrupt", f"job {msg.job!r} rank {msg.rank} step {msg.step} "
                                 f"on node {self.me}: tensors {bad[:4]} fail their checksums")
            payload = bytes(self.store.dir.view(v.number, v.size)[:v.nbytes])
        finally:
            self.store.release(lease.id)
        return pp.VersionData(v.step, v.nbytes, v.tensors, v.meta, frames_checksum([payload]),
                              v.world_size), [payload]

    def on_drop_newer(self, msg: pp.DropNewer) -> int:
        """Drop this node's versions of (job, rank) newer than ``newer_than`` (as a local
        ``Drop`` would: the group is told, so their parity goes too); only those of the
        requester's run identity (another job of the same name keeps its versions), and only
        for a requester of the job's token."""
        self.check_owner(msg.job, msg.owner, msg.admin)
        before = {v.step for v in self.store.versions(msg.job)}
        count = self.store.drop(msg.job, msg.rank, None, msg.newer_than, run=msg.run)
        gone = before - {v.step for v in self.store.versions(msg.job)}
        if gone:
            self.protector.node_dropped(msg.job, gone)
        self.on_dropped(msg.job, msg.rank, msg.newer_than)
        if count:
            log.info("job %r rank %d: dropped %d versions newer than step %d (a new timeline "
                     "started elsewhere)", msg.job, msg.rank, count, msg.newer_than)
        return count

    def drop_elsewhere(self, job: str, rank: int, newer_than: int, run: str | None = None,
                       owner: str = "", admin: bool = False) -> int:
        """Have every other node that reported holding (job, rank) drop its versions newer
        than ``newer_than``; return how many they dropped now. A node that does not answer
        (down, partitioned, frozen) is told again until it does (kept in memory, like drop
        notices): the versions it holds belong to the abandoned timeline, and a later
        restore must never combine them with the new one's. ``run``, ``owner``, ``admin``:
        the requesting client's run identity and token (see :class:`~.peerproto.DropNewer`)."""
        views = self.protector.views(job)
        count = 0
        holders = sorted(s for s, v in views.items() if s != self.me and rank in v.ranks)
        drop = pp.DropNewer(job, rank, newer_than, run, owner, admin)
        up = self.live(holders) if self.groups else set(holders)
        for slot in holders:
            try:
                if slot not in up:
                    raise PeerError(f"node {slot} is down")
                count += self._send_drop(slot, drop)
            except (PeerError, OSError) as exc:
                if getattr(exc, "code", "") == "forbidden":     # never: not told again
                    log.warning("job %r rank %d: node %d refused to drop its versions newer "
                                "than step %d (%s)", job, rank, slot, newer_than, exc)
                    continue
                log.warning("job %r rank %d: node %d did not drop its versions newer than "
                            "step %d yet (%s); told again once it answers", job, rank, slot,
                            newer_than, exc)
                with self._lock:
                    self._pending.setdefault(slot, []).append(drop)
                self._wake.set()
        self.links.close_thread()           # a worker thread of the control server
        return count

    def _send_drop(self, slot: int, msg: pp.DropNewer) -> int:
        reply, _ = self.links.call(slot, msg, timeout=timedelta(seconds=DROP_TIMEOUT))
        return int(reply.count)

    def _resend(self) -> None:
        """Deliver the drops a node missed, every few seconds, until it answers."""
        while not self._closed:
            self._wake.wait(2.0)
            self._wake.clear()
            with self._lock:
                pending = {slot: list(msgs) for slot, msgs in self._pending.items() if msgs}
            for slot, msgs in pending.items():
                for msg in msgs:
                    try:
                        self._send_drop(slot, msg)
                    except (PeerError, OSError) as exc:
                        if getattr(exc, "code", "") != "forbidden":
                            break                           # still away: later
                        log.warning("job %r rank %d: node %d refused the drop (%s)", msg.job,
                                    msg.rank, slot, exc)    # not again
                    with self._lock:
                        self._pending[slot].remove(msg)
                    log.info("job %r rank %d: node %d dropped its versions newer than step %d "
                             "(told again)", msg.job, msg.rank, slot, msg.newer_than)
            self.links.close_thread()

    # ------------------------------------------------------------------ the reader's side

    def live(self, slots: Any) -> set[int]:
        """The nodes of ``slots`` that are up, by the failure detectors the daemon has: a
        node of this group as the heartbeats say (down after ``--peer-timeout`` without an
        answer), any other node while its job-wide retention reports keep coming (a newer
        one taken within the hold the relay's latency allows for: ``Protector.reporting``).
        Nothing is sent: asking would open a connection to every node of the cluster."""
        slots = set(slots)
        mine = set(self.protector.group.slots)
        up = {s for s in slots & mine if s == self.me or self.protector.up(s)}
        return up | (slots - mine) & self.protector.reporting()

    def where(self, job: str, run: str | None = None, owner: str = "") -> p.WhereReply:
        """What every other node last reported holding of ``job``; of a node that is down
        now, only the steps it reported protected (its group can decode those). ``run``: only
        the nodes whose newest version of the job is of that run identity; ``owner``: only
        those that report the job bound to that token digest, or unbound (the requester's
        binding; "": any)."""
        views = {slot: v for slot, v in self.protector.views(job).items() if slot != self.me
                 and (run is None or v.run == run)
                 and (not owner or not v.owner or hmac.compare_digest(v.owner, owner))}
        up = self.live(views) if self.groups else set(views)
        return p.WhereReply(tuple(
            p.NodeHolding(slot, tuple(v.ranks),
                          tuple(v.held) if slot in up else
                          tuple(s for s in v.held if s in set(v.protected)),
                          v.world, slot in up)
            for slot, v in sorted(views.items())))

    def fetch(self, job: str, rank: int, step: int | None, pid: int, *,
              run: str | None = None, owner: str = "", admin: bool = False) -> p.OpenReply:
        """Fetch (job, rank, step) from a node that reported holding it; a lease on the copy.
        The connections it opened (on the control server's worker thread) are closed when it
        returns: a daemon's peers stay bounded by its group, not by the nodes it read from.
        ``run``, ``owner``, ``admin``: the reading client's run identity and token digest (see
        :class:`~.peerproto.GetVersion`): only versions of its run, held for its token."""
        if step is None:
            raise StoreError("bad_request", "a remote read names its step")
        try:
            return self._fetch(job, rank, step, pid, run, owner, admin)
        finally:
            self.links.close_thread()

    def _fetch(self, job: str, rank: int, step: int, pid: int, run: str | None, owner: str,
               admin: bool) -> p.OpenReply:
        views = self.protector.views(job)
        holders = [slot for slot, v in views.items() if slot != self.me and rank in v.ranks]
        forbidden = []
        up = self.live(holders) if self.groups else set(holders)
        candidates = sorted((slot for slot in holders if slot in up),
                            key=lambda slot: (step not in views[slot].held, slot))
        problems = []
        for slot in candidates:
            try:
                reply, frames = self.links.call(slot, pp.GetVersion(job, rank, step, run,
                                                                    owner, admin),
                                                timeout=timedelta(seconds=self.timeout))
            except (PeerError, StoreError, OSError) as exc:
                if getattr(exc, "code", "") == "forbidden":
                    forbidden.append(slot)
                problems.append(f"node {slot}: {exc}")
                if isinstance(exc, PeerError) and slot not in self.live([slot]):
                    up.discard(slot)                    # gone meanwhile: decoded below
                continue
            bufs = [f.buffer for f in frames]
            if frames_checksum(bufs) != reply.checksum or sum(len(b) for b in bufs) != \
                    reply.nbytes:
                problems.append(f"node {slot}: the bytes failed their checksum on the way")
                continue
            return self._keep(job, rank, reply, bufs, pid)
        for slot in sorted(set(holders) - up):          # lost: decoded from its group
            if step not in views[slot].protected:
                problems.append(f"node {slot} is down and did not report step {step} "
                                "protected")
                continue
            try:
                reply, payload = self.decode(job, rank, step, slot, run, owner, admin)
            except (StoreError, PeerError, RebuildError, OSError, RuntimeError) as exc:
                if getattr(exc, "code", "") == "forbidden":
                    forbidden.append(slot)
                problems.append(f"node {slot} is down, and decoding its version from "
                                f"its group failed: {exc}")
                log.warning("job %r rank %d step %d: %s", job, rank, step, problems[-1])
                continue
            return self._keep(job, rank, reply, [payload], pid)
        if forbidden:
            raise StoreError("forbidden", f"job {job!r} rank {rank} step {step}: node(s) "
                             f"{forbidden} hold it for another token; use the job's own "
                             "SNAPSHOTD_JOB_TOKEN")
        raise StoreError("not_found", f"job {job!r} rank {rank} step {step} is held by no "
                         f"reachable node of the cluster ({'; '.join(problems) or 'none '}"
                         f"{'' if problems else 'reported it'})")

    def decode(self, job: str, rank: int, step: int, lost: int, run: str | None = None,
               owner: str = "", admin: bool = False) -> tuple[pp.VersionData, Any]:
        """Rank ``rank``'s version ``step`` of lost node ``lost``, decoded from its group's
        fragments (the newest version of that step its group's parity records know), every
        tensor checked against its checksum. The node version is decoded once for all the
        reads of its ranks that come within ``DECODED_SECONDS``."""
        key = (job, lost, step)
        with self._lock:
            lock = self._decoding.setdefault(key, locks.lock("reads.decode"))
        with lock:                         # one decode at a time per version; others wait
            now = time.monotonic()
            with self._lock:
                for k in [k for k, (at, _, _) in self._decoded.items()
                          if now - at > DECODED_SECONDS]:
                    del self._decoded[k]
                for k in [k for k, other in self._decoding.items()      # idle ones go
                          if k != key and k not in self._decoded and not other.locked()]:
                    del self._decoding[k]
                cached = self._decoded.get(key)
            started = time.perf_counter()
            if cached is not None:
                manifest, chunks = cached[1], cached[2]
            else:
                manifest, chunks = self._decode_node(job, step, lost)
                with self._lock:
                    self._decoded = {key: (now, manifest, chunks)}  # the newest one only
        record = json.loads(manifest)
        # The lost node's binding travels with its version (the node manifest's owner).
        self.check_owner(job, owner, admin, bound=str(record.get("owner", "")))
        ranks = record["ranks"]
        if rank not in [r["rank"] for r in ranks]:
            raise StoreError("not_found", f"node {lost}'s step {step} has no rank {rank}")
        blob = _Blob(chunks)
        offset = 0
        for r in ranks:
            if r["rank"] == rank:
                break
            offset += r["nbytes"]
        if run is not None and str(r.get("run", "")) != run:
            raise StoreError("not_found", f"node {lost}'s rank {rank} step {step} was written "
                             f"by run {r.get('run', '')!r}, not {run!r}")
        payload = bytearray(r["nbytes"])
        blob.read_into(offset, memoryview(payload))
        tensors = tuple(TensorEntry(n, d, tuple(sh), o, b, c) for n, d, sh, o, b, c
                        in r["tensors"])
        bad = [t.name for t, c in zip(tensors, _checksums(memoryview(payload), tensors))
               if c != t.checksum]
        if bad:
            with self._lock:
                self._decoded.pop(key, None)
            raise StoreError("corrupt", f"node {lost}'s rank {rank} step {step} decoded from "
                             f"its group fails the checksums of {bad[:4]}")
        decoded, seconds = sum(x["nbytes"] for x in ranks), time.perf_counter() - started
        if self.metrics is not None and cached is None:
            self.metrics.rebuilds.inc()
            self.metrics.rebuilt_bytes.inc(decoded)
            self.metrics.rebuild_seconds.observe(seconds)
        log.info("job %r rank %d step %d of lost node %d %s (%d bytes of its %d in %.2fs)",
                 job, rank, step, lost, "decoded from its group" if cached is None else
                 "served from its version decoded moments ago", len(payload), decoded, seconds)
        return pp.VersionData(step, len(payload), tensors, r["meta"],
                              frames_checksum([payload]), int(r.get("world_size", 0))), payload

    def _decode_node(self, job: str, step: int, lost: int) -> tuple[str, list[Any]]:
        """Lost node ``lost``'s version of (job, step) from its group: (manifest, chunks)."""
        try:
            group = group_of(lost, self.groups)
        except ValueError as exc:
            raise StoreError("not_found", str(exc)) from None
        with self._lock:
            if group.index not in self._codecs:
                self._codecs[group.index] = make_codec(self.codec_name, group.k, group.m)
            codec = self._codecs[group.index]
        up = self.live(group.slots)
        rec = Recovery(lost, group, codec, self.store, self.protector, self.links,
                       up.__contains__)
        try:
            inv = rec._inventories()
            manifest = _my_manifests(inv, job, lost).get(step)
            if manifest is None:
                raise StoreError("not_found", f"no parity record of group {group.index} "
                                 f"(up: {sorted(up)}) covers step {step} of node {lost}")
            plan = rec._plan(job, step, inv, manifest)
            if plan is None:
                raise StoreError("cannot_rebuild", f"group {group.index} cannot decode node "
                                 f"{lost}'s step {step}: {rec._shortfall(job, step, inv)}")
            return manifest, rec.decode(job, step, manifest, plan)
        finally:
            self.links.close_thread()

    def _keep(self, job: str, rank: int, reply: pp.VersionData, bufs: list[Any],
              pid: int) -> p.OpenReply:
        with self._lock:            # the check and the claim together (reads run in parallel)
            if self.store.stats()["bytes_used"] + reply.nbytes > self.store.memory_limit:
                raise StoreError("memory_full", f"reading job {job!r} rank {rank} step "
                                 f"{reply.step} from another node needs {reply.nbytes} "
                                 "bytes; the memory budget has no room (raise --memory-limit)")
            lease = next(self._ids)
            path = os.path.join(self.store.dir.path, f"remote-{lease}.bin")
            self._held[lease] = (path, pid, process_identity(pid), reply.nbytes)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            for buf in bufs:
                os.write(fd, buf)
        except OSError:
            self.release(lease)
            raise
        finally:
            os.close(fd)
        log.info("job %r rank %d step %d read from another node for pid %d (%d bytes)", job,
                 rank, reply.step, pid, reply.nbytes)
        return p.OpenReply(lease, job, rank, reply.step, path, reply.nbytes, reply.tensors,
                           reply.meta, "peer", 0)

    def release(self, lease: int) -> bool:
        """Remove a remote read's copy; False if ``lease`` is not one."""
        with self._lock:
            held = self._held.pop(lease, None)
        if held is None:
            return False
        try:
            os.unlink(held[0])
        except FileNotFoundError:
            pass
        return True

    def reap(self) -> int:
        """Remove the copies of readers whose process is gone."""
        with self._lock:
            gone = [lease for lease, (_, pid, ident, _) in self._held.items()
                    if process_identity(pid) != ident]
        for lease in gone:
            self.release(lease)
        return len(gone)

    def nbytes(self) -> int:
        """Bytes of remote copies held (read without the lock: see ``locks.Tally``)."""
        return int(self._held.total)

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        self._thread.join(timeout=5)
        for lease in list(self._held):
            self.release(lease)
