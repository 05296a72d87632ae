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
import mmap
import os
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
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
from .protection import Protector, contiguous, frames_checksum
from .rebuild import RebuildError, Recovery, _my_manifests, _Source

__all__ = ["PeerReads"]

#: Seconds a node has to answer a drop before it is told again later (the reader waits).
DROP_TIMEOUT = 5.0
#: Seconds a lost node's decoded chunk is kept for the reads of the other ranks that share it
#: (it goes as soon as each of them was served, and first when the budget needs room).
DECODED_SECONDS = 10.0
#: Seconds a decode of a lost node's rank waits for room in the memory budget (reads in
#: flight giving theirs back) before it fails with ``memory_full``.
ROOM_WAIT = 10.0

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
        #: One lock per lost node's version (job, lost slot, step): its reads decode one at a
        #: time, so a chunk that ranks share is decoded once (kept in ``_cache``).
        self._decoding: dict[tuple[str, int, int], threading.Lock] = {}
        #: Everything a decode holds is in the budget (issue 24, finding 6), summed as it
        #: changes and read without the lock by the store (design section 6): claim ->
        #: bytes of one stripe's working set (``decoding``: fragments, decoded chunk), and
        #: (job, lost slot, step, version id, chunk) -> a decoded chunk kept (``decoded``).
        self._work: locks.Tally = locks.Tally(lambda n: n)
        self._cache: locks.Tally = locks.Tally(lambda kept: kept.nbytes)
        #: Seconds a read waits for room in the budget (see ``_claim_copy``).
        self.room_wait = ROOM_WAIT
        self._lock = locks.rlock("reads")
        self._ids = itertools.count(self.FIRST_LEASE)
        #: lease -> (path, pid, id, bytes): remote copies held; their bytes (``total``) are read
        #: without the lock by the store's budget (design section 6).
        self._held: locks.Tally = locks.Tally(lambda h: h[3])
        #: Copies of whole versions being sent to a reader on another node (``serve``):
        #: counted from the copy until ZeroMQ lets go of it (a finalizer on the buffer).
        self._served: locks.Tally = locks.Tally(lambda n: n)
        self._serving = locks.lock("reads.serve")
        before = store.extra_kinds
        store.extra_kinds = lambda: before() | {"remote": self._held.total,
                                                "decoding": self._work.total,
                                                "decoded": self._cache.total,
                                                "serving": self._served.total}
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
            payload = self._copy_out(v)
        finally:
            self.store.release(lease.id)
        return pp.VersionData(v.step, v.nbytes, v.tensors, v.meta, frames_checksum([payload]),
                              v.world_size), [payload]

    def _copy_out(self, v: Any) -> bytearray:
        """A copy of version ``v``'s bytes to send, inside the budget: one copy at a time,
        made only when it fits (else ``memory_full``: the reader tries another holder, or
        decodes), and counted (``serving``) until ZeroMQ has sent it and let go (second
        review of issue 24, finding 3: six readers took a holder 47-76 MiB past its limit,
        counted nowhere)."""
        with self._serving:
            self.store.make_room(v.nbytes)
            used = self.store.stats()["bytes_used"]
            if used + v.nbytes > self.store.memory_limit:
                raise StoreError("memory_full", f"node {self.me} cannot copy job {v.job!r} "
                                 f"rank {v.rank} step {v.step} ({v.nbytes} bytes) to send it: "
                                 f"{used} of --memory-limit {self.store.memory_limit} in use")
            payload = _Served(v.nbytes)
            key = id(payload)
            self._served[key] = v.nbytes
            weakref.finalize(payload, self._served.pop, key, None)
        view = self.store.dir.view(v.number, v.size)
        try:
            payload[:] = view[:v.nbytes]
        finally:
            view.release()
        return payload

    def on_drop_newer(self, msg: pp.DropNewer) -> int:
        """Drop this node's versions of (job, rank) newer than ``newer_than`` (as a local
        ``Drop`` would: the group is told, so their parity goes too); only those of the
        requester's run identity (another job of the same name keeps its versions), and only
        for a requester of the job's token."""
        if msg.rank < 0 or msg.newer_than < -1:
            raise StoreError("bad_request", f"drop_newer of job {msg.job!r}: rank {msg.rank} "
                             f"and newer_than {msg.newer_than} must be >= 0 and >= -1")
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
            self._forget_decoded(older=time.monotonic() - DECODED_SECONDS)
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
                return self.decode(job, rank, step, slot, pid, run, owner, admin)
            except (StoreError, PeerError, RebuildError, OSError, RuntimeError) as exc:
                if isinstance(exc, StoreError) and exc.code == "memory_full":
                    raise
                if getattr(exc, "code", "") == "forbidden":
                    forbidden.append(slot)
                problems.append(f"node {slot} is down, and decoding its version from "
                                f"its group failed: {exc}")
                log.warning("job %r rank %d step %d: %s", job, rank, step, problems[-1])
                continue
        if forbidden:
            raise StoreError("forbidden", f"job {job!r} rank {rank} step {step}: node(s) "
                             f"{forbidden} hold it for another token; use the job's own "
                             "SNAPSHOTD_JOB_TOKEN")
        raise StoreError("not_found", f"job {job!r} rank {rank} step {step} is held by no "
                         f"reachable node of the cluster ({'; '.join(problems) or 'none '}"
                         f"{'' if problems else 'reported it'})")

    def decode(self, job: str, rank: int, step: int, lost: int, pid: int,
               run: str | None = None, owner: str = "", admin: bool = False) -> p.OpenReply:
        """Rank ``rank``'s version ``step`` of lost node ``lost``, decoded from its group's
        fragments (the newest version of that step its group's parity records know) into a
        copy leased to ``pid``, every tensor checked against its checksum.

        Inside the memory budget (issue 24, finding 6): the copy (``remote``) and the working
        set of one stripe (``decoding``: ``k`` fragments and the decoded chunk) are claimed
        before anything is fetched, waiting up to :attr:`room_wait` for room, else
        ``memory_full``. Only the stripes whose chunks hold the rank's bytes are decoded, one
        at a time, straight into the copy where a chunk lies inside it; each stripe's
        fragments are let go once decoded. A decoded chunk that other ranks of the lost node
        share is kept (``decoded``) for their reads, while the budget has room for it, until
        each of them was served or ``DECODED_SECONDS`` passed (evicted first when room is
        needed)."""
        key = (job, lost, step)
        with self._lock:
            lock = self._decoding.setdefault(key, locks.lock("reads.decode"))
        try:
            with lock:                 # one read of a lost node's version at a time
                return self._decode(job, rank, step, lost, pid, run, owner, admin)
        finally:
            with self._lock:
                for k in [k for k, other in self._decoding.items() if not other.locked()]:
                    del self._decoding[k]

    def _decode(self, job: str, rank: int, step: int, lost: int, pid: int,
                run: str | None, owner: str, admin: bool) -> p.OpenReply:
        started = time.perf_counter()
        rec, manifest, plan = self._plan(job, step, lost)
        record = json.loads(manifest)
        # The lost node's binding travels with its version (the node manifest's owner).
        self.check_owner(job, owner, admin, bound=str(record.get("owner", "")))
        ranks = record["ranks"]
        offset = 0
        for r in ranks:
            if r["rank"] == rank:
                break
            offset += r["nbytes"]
        else:
            raise StoreError("not_found", f"node {lost}'s step {step} has no rank {rank}")
        if run is not None and str(r.get("run", "")) != run:
            raise StoreError("not_found", f"node {lost}'s rank {rank} step {step} was written "
                             f"by run {r.get('run', '')!r}, not {run!r}")
        nbytes, vid, k = int(r["nbytes"]), pp.manifest_id(manifest), rec.group.k
        # The lost node's chunks (in order: their bytes one after the other) this rank's
        # bytes lie in, and per chunk the other ranks that share it.
        spans, pos = [], 0
        for index, (_stripe, frag, length, chunk, sources) in enumerate(plan):
            lo, hi = pos, pos + chunk
            pos = hi
            if lo < offset + nbytes and offset < hi:
                share, at = set(), 0
                for other in ranks:
                    if other["rank"] != rank and at < hi and lo < at + other["nbytes"]:
                        share.add(other["rank"])
                    at += other["nbytes"]
                spans.append((index, frag, length, lo, hi, sources, share))
        work = max(((k + 1) * span[2] for span in spans), default=0)
        rec._not_abandoned(job, step, manifest)
        what = (f"decoding job {job!r} rank {rank} step {step} of lost node {lost} "
                f"({nbytes} bytes, and {work} for one stripe's {k} fragments and its output)")
        lease, path, token = self._claim_copy(job, rank, step, nbytes, pid, what, work)
        decoded = 0
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.ftruncate(fd, nbytes)
                mapped = mmap.mmap(fd, nbytes) if nbytes else None
            finally:
                os.close(fd)
            dest = memoryview(mapped) if mapped is not None else memoryview(bytearray())
            try:
                for index, frag, length, lo, hi, sources, share in spans:
                    decoded += self._decode_chunk(rec, (job, lost, step, vid, index), frag,
                                                  length, lo, hi, sources, share, rank,
                                                  dest, offset)
                rec._not_abandoned(job, step, manifest)   # a drop may have come meanwhile
                tensors = tuple(TensorEntry(n, d, tuple(sh), o, b, c) for n, d, sh, o, b, c
                                in r["tensors"])
                bad = [t.name for t, c in zip(tensors, _checksums(dest, tensors))
                       if c != t.checksum]
            finally:
                _unmap(dest, mapped)
            if bad:
                self._forget_decoded((job, lost, step))
                raise StoreError("corrupt", f"node {lost}'s rank {rank} step {step} decoded "
                                 f"from its group fails the checksums of {bad[:4]}")
        except BaseException:
            self.release(lease)
            raise
        finally:
            with self._lock:
                self._work.pop(token, None)
        seconds = time.perf_counter() - started
        if self.metrics is not None and decoded:
            self.metrics.rebuilds.inc()
            self.metrics.rebuilt_bytes.inc(decoded)
            self.metrics.rebuild_seconds.observe(seconds)
        log.info("job %r rank %d step %d of lost node %d decoded from its group into a copy "
                 "for pid %d (%d bytes; %d bytes of its chunks decoded, the rest kept from an "
                 "earlier read) in %.2fs", job, rank, step, lost, pid, nbytes, decoded, seconds)
        return p.OpenReply(lease, job, rank, step, path, nbytes, tensors, r["meta"], "peer", 0)

    def _decode_chunk(self, rec: Recovery, key: tuple[str, int, int, str, int], frag: int,
                      length: int, lo: int, hi: int, sources: list[Any], share: set[int],
                      rank: int, dest: memoryview, offset: int) -> int:
        """Copy the part of the lost node's chunk ``key`` (its bytes ``lo``..``hi``) that
        lies in the rank's bytes (from ``offset`` in the node's) into ``dest``: from the
        chunk kept by an earlier read, else decoded from ``k`` fragments of its stripe (the
        bytes decoded returned). Runs inside the read's claim of one stripe's working set."""
        a, b = max(lo, offset), min(hi, offset + dest.nbytes)
        with self._lock:
            kept = self._cache.pop(key, None)       # in use: inside this read's claim now
        if kept is not None:
            dest[a - offset:b - offset] = kept.buf[a - lo:b - lo]
            kept.due.discard(rank)
            if kept.due:
                with self._lock:
                    self._cache[key] = kept
            return 0
        inside = a == lo and b == hi and hi - lo == length and not share
        present = rec._fetch_k(sources, length)
        out: Any = dest[a - offset:b - offset] if inside else bytearray(length)
        rec.codec.reconstruct(present, {frag: out})
        present.clear()                             # the fragments go now
        if not inside:
            dest[a - offset:b - offset] = memoryview(out)[a - lo:b - lo]
            if share:
                self._keep_decoded(key, _Decoded(time.monotonic(), memoryview(out)[:hi - lo],
                                                 length, share))
        return hi - lo

    def _keep_decoded(self, key: tuple[str, int, int, str, int], kept: _Decoded) -> None:
        """Keep a decoded chunk for the reads of the other ranks that share it, where the
        budget has room for it without evicting anything (else they decode it again)."""
        with self._lock:
            if self.store.stats()["bytes_used"] + kept.nbytes <= self.store.memory_limit:
                self._cache[key] = kept

    def _forget_decoded(self, version: tuple[str, int, int] | None = None,
                        older: float | None = None, room: int = 0) -> int:
        """Drop kept chunks: those of ``version`` (job, lost slot, step), those kept since
        before ``older`` (monotonic), and, oldest first, enough for ``room`` bytes; return
        the bytes dropped."""
        freed = 0
        with self._lock:
            for key, kept in sorted(self._cache.items(), key=lambda kv: kv[1].at):
                if (key[:3] == version or (older is not None and kept.at < older)
                        or freed < room):
                    freed += self._cache.pop(key).nbytes
        return freed

    def _plan(self, job: str, step: int, lost: int) -> tuple[Recovery, str, list[Any]]:
        """How to decode lost node ``lost``'s version of (job, step) from its group:
        (the recovery that plans and fetches, the version's manifest, the plan)."""
        try:
            group = group_of(lost, self.groups)
        except ValueError as exc:
            raise StoreError("not_found", str(exc)) from None
        with self._lock:
            if group.index not in self._codecs:
                self._codecs[group.index] = make_codec(self.codec_name, group.k, group.m)
            codec = self._codecs[group.index]
        up = self.live(group.slots)
        rec = _Decoder(lost, group, codec, self.store, self.protector, self.links,
                       up.__contains__, local=self.me)
        inv = rec._inventories()
        manifest = _my_manifests(inv, job, lost).get(step)
        if manifest is None:
            raise StoreError("not_found", f"no parity record of group {group.index} "
                             f"(up: {sorted(up)}) covers step {step} of node {lost}")
        plan = rec._plan(job, step, inv, manifest)
        if plan is None:
            raise StoreError("cannot_rebuild", f"group {group.index} cannot decode node "
                             f"{lost}'s step {step}: {rec._shortfall(job, step, inv)}")
        return rec, manifest, plan

    def _claim_copy(self, job: str, rank: int, step: int, nbytes: int, pid: int, what: str,
                    work: int = 0, wait: float | None = None) -> tuple[int, str, int]:
        """Claim a remote copy of ``nbytes`` for ``pid`` and ``work`` bytes of working memory
        (``decoding``) together, once the budget has room for both: kept decoded chunks are
        evicted first, then versions kept above the job-wide step (as for parity). Waits up
        to ``wait`` (default :attr:`room_wait`) seconds for reads in flight to give theirs
        back; ``memory_full`` after. Returns (lease, path of the copy, work claim)."""
        need = nbytes + work
        limit = self.store.memory_limit
        deadline = time.monotonic() + (self.room_wait if wait is None else wait)
        while True:
            with self._lock:    # the check and the claim together (reads run in parallel)
                used = self.store.stats()["bytes_used"]
                if used + need > limit:
                    self._forget_decoded(room=used + need - limit)
                    self.store.make_room(need)
                    used = self.store.stats()["bytes_used"]
                if used + need <= limit:
                    lease = next(self._ids)
                    path = os.path.join(self.store.dir.path, f"remote-{lease}.bin")
                    self._held[lease] = (path, pid, process_identity(pid), nbytes)
                    token = next(self._ids)
                    if work:
                        self._work[token] = work
                    return lease, path, token
            if time.monotonic() >= deadline or self._closed:
                break
            time.sleep(0.05)
        raise StoreError("memory_full", f"{what}: the memory budget has no room for "
                         f"{need} bytes ({used} of --memory-limit {limit} in use, none came "
                         f"free in {self.room_wait if wait is None else wait:.0f}s); raise "
                         f"--memory-limit to at least {used + need} bytes, or read fewer "
                         "ranks at once")

    def _keep(self, job: str, rank: int, reply: pp.VersionData, bufs: list[Any],
              pid: int) -> p.OpenReply:
        # The bytes arrived already: no wait (they would be held meanwhile).
        lease, path, _ = self._claim_copy(
            job, rank, reply.step, reply.nbytes, pid, f"reading job {job!r} rank {rank} step "
            f"{reply.step} ({reply.nbytes} bytes) from another node", wait=0.0)
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
        with self._lock:
            self._cache.clear()


def _unmap(view: memoryview, mapped: mmap.mmap | None) -> None:
    """Unmap a copy written through ``view`` (at once, or, where a view of it is still
    referenced, say by an exception's traceback, when the last one goes)."""
    try:
        view.release()
        if mapped is not None:
            mapped.close()
    except BufferError:
        pass


@dataclass
class _Decoded:
    """A decoded chunk of a lost node's version kept for the reads of other ranks."""

    at: float           # when it was decoded (monotonic)
    buf: Any            # its bytes
    nbytes: int         # the memory it holds (the stripe's fragment length)
    due: set[int]       # the ranks sharing it that were not read from it yet


class _Decoder(Recovery):
    """The recovery of a lost node, planned and fetched by another node (``local``) that
    reads its ranks: fragments ``local`` holds are taken in process, not sent to itself
    (one copy of each less: the daemon's own parity is not copied at all)."""

    def __init__(self, *args: Any, local: int, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.local = local

    def _fetch(self, source: _Source, length: int) -> tuple[Any, pp.Chunk]:
        if source.slot != self.local:
            return super()._fetch(source, length)
        if isinstance(source.request, pp.GetData):
            reply, frames = self.protector.get_data(source.request)
        else:
            reply, frames = self.protector.get_parity(source.request)
        return contiguous(frames, reply.length if length < 0 else length), reply


class _Served(bytearray):
    """A copy being sent (a bytearray that takes a finalizer: its bytes are counted until
    ZeroMQ and the server let go of it)."""
