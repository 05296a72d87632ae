"""The local control server: answers trainer clients over ZeroMQ ``ipc://``.

The loop itself is :class:`snapshotd.common._loop.RouterLoop`; this module holds the handlers. Slow
requests (reserving memory, checksumming) run on worker threads; dead writers and readers are
reaped between passes.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import zmq

from ..common import protocol as p
from ..common._loop import RouterLoop
from ..common.metrics import Metrics
from .store import Store, StoreError

__all__ = ["ControlServer"]

log = logging.getLogger("snapshotd.server")
#: What a load of a listed persisted step may fail with where a restore of the newest step
#: goes on to the next older one, worst first (the error answered when every one failed).
_FALL_BACK = ("corrupt", "disk_error", "not_found")



#: How long a request naming a job waits for a replacement's rebuild under --job-isolation
#: (below the client's request timeout, 30 s) before it is refused ``rebuilding``.
REBUILD_WAIT = 25.0

class ControlServer(RouterLoop):
    """Serves :mod:`snapshotd.common.protocol` for one :class:`Store`.

    ``on_commit(version)`` is called after each commit (the protection pipeline hooks in there);
    ``recovery`` (optional) is asked before versions are listed or opened, so a replacement
    node answers only once it has rebuilt what it can.
    """

    SLOW = frozenset({"alloc", "commit", "open", "list", "verify", "persist", "where",
                      "drop"})

    def __init__(self, store: Store, endpoint: str, *, context: zmq.Context,
                 metrics: Metrics, node_slot: int = 0, workers: int = 4,
                 reap_interval: float = 1.0,
                 on_commit: Callable[[Any], None] = lambda version: None,
                 on_drop: Callable[..., None] = lambda job, steps, timeline=None: None,
                 recovery: Any = None,
                 peers: Callable[[], dict[int, bool]] | None = None,
                 persister: Any = None, job_isolation: bool = False,
                 admin_token: str = "", coding: tuple[int, int] = (0, 0),
                 reads: Any = None) -> None:
        self.coding = coding
        #: Reads across nodes (snapshotd.cluster.reads.PeerReads; None on a node without peers).
        self.reads = reads
        self.job_isolation = job_isolation
        self._admin = token_digest(admin_token) if admin_token else ""
        self.peers = peers
        self.persister = persister
        self.store = store
        self.metrics = metrics
        self.node_slot = node_slot
        self.on_commit = on_commit
        self.on_drop = on_drop
        self.recovery = recovery
        sock = context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, p.MAX_MESSAGE_BYTES)
        # A reply to a client that closed its socket (it gave up waiting) fails instead of
        # vanishing, so what it would have handed out is taken back (_undeliverable).
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.endpoint = _bind(sock, endpoint)
        super().__init__(sock, context, workers=max(workers, 4), decode=p.decode,
                         on_reject=lambda code: metrics.rejected.labels(reason=code).inc(),
                         housekeeping=self._reap, housekeeping_interval=reap_interval)

    def _undeliverable(self, frames: list[Any]) -> None:
        """The client of this reply is gone (it timed out and rebuilt its socket, e.g. while
        a rebuild made its Open wait): release the lease or abort the slot it was given."""
        try:
            _, reply = p.decode(bytes(frames[1]))
        except p.ProtocolError:
            return
        if isinstance(reply, p.OpenReply):
            self.store.release(reply.lease)
            log.warning("released lease %d of job %r rank %d step %d: its client gave up "
                        "waiting for it", reply.lease, reply.job, reply.rank, reply.step)
        elif isinstance(reply, p.AllocReply):
            self.store.abort(self.store.slot_number(reply.slot))
            log.warning("aborted slot %d: its client gave up waiting for it", reply.slot)
        elif isinstance(reply, p.CommitReply) and reply.next_slot:
            self.store.abort(self.store.slot_number(reply.next_slot))

    def _reap(self) -> None:
        reaped = self.store.reap() + (self.reads.reap() if self.reads is not None else 0)
        if reaped:
            log.info("reclaimed %d slots/leases of processes that are gone", reaped)
            self.metrics.reclaimed.inc(reaped)

    # ------------------------------------------------------------------ requests

    def _authorize(self, m: Any, bind: bool = False) -> tuple[str, bool]:
        """With ``--job-isolation``: a request naming a job must carry that job's token (the
        one its first writer presented) or the admin token. Return the token's digest and
        whether it is the admin token (("", False) without isolation): a request that reaches
        other nodes carries them, and each holder checks them against its own binding.

        The binding holds cluster-wide (docs/design.md section 6): where this node does not
        hold the job, the owners the other nodes' retention reports carry stand in for it, so
        a token that is not the job's is refused here too, and cannot bind the job here to
        itself (``bind``: an ``Alloc``)."""
        if not self.job_isolation:
            return "", False
        if self.recovery is not None and not self.recovery.ready:
            # A replacement knows no binding before its rebuild and its peers' reports: a
            # token let through now could read a rank rebuilt after it, or bind the job to
            # itself and own what is rebuilt (second review of issue 24, findings 1-2).
            # Every request naming a job is served on a worker thread: it waits.
            self.recovery.wait_started(REBUILD_WAIT)
            if not self.recovery.ready:
                raise StoreError("rebuilding", f"job {m.job!r}: this node is still rebuilding "
                                 "from its group and cannot tell yet which token the job "
                                 "belongs to; retry in a few seconds")
        if self.persister is not None and not self.store.owner(m.job):
            # After a restart with memory lost the binding comes back from the disk tier,
            # before anyone can read a persisted step or bind the job to another token.
            owner = self.persister.owner(m.job)
            if owner:
                self.store.authorize(m.job, owner, bind=True)
        if not m.token:
            raise StoreError("forbidden", f"job {m.job!r}: this daemon runs with "
                             "--job-isolation; set SNAPSHOTD_JOB_TOKEN (SnapshotClient(token=...)"
                             ") to the job's token")
        digest = token_digest(m.token)
        if self._admin and hmac.compare_digest(digest, self._admin):
            return digest, True
        bound_here = bool(self.store.owner(m.job))
        self.store.authorize(m.job, digest, bind=False)
        if not bound_here and self.reads is not None:
            others = self.reads.owners(m.job)
            if (bind and any(not hmac.compare_digest(o, digest) for o in others)) or \
                    (others and not any(hmac.compare_digest(o, digest) for o in others)):
                raise StoreError("forbidden", f"job {m.job!r} belongs to another token on "
                                 f"node(s) {sorted(s for v in others.values() for s in v)} "
                                 "of the cluster; use the "
                                 "job's own SNAPSHOTD_JOB_TOKEN, or name this job apart "
                                 "(SNAPSHOTD_JOB)")
        if bind:
            self.store.authorize(m.job, digest, bind=True)
        return digest, False

    def _on_alloc(self, m: p.Alloc, _: Any = None) -> p.AllocReply:
        self._authorize(m, bind=True)
        if self.stopping:
            raise StoreError("shutting_down", "the daemon is shutting down; retry on restart")
        slot = self.store.alloc(m.job, m.rank, m.step, m.nbytes, m.pid, m.local_world_size,
                                world_size=m.world_size, run=m.run)
        return p.AllocReply(slot.handle, self.store.dir.seg_path(slot.number), slot.nbytes,
                            _pinned_cpus())

    def _on_commit(self, m: p.Commit, _: Any = None) -> p.CommitReply:
        started = time.perf_counter()
        number = self.store.slot_number(m.slot)
        writer = self.store.open_slot(number)
        # The client says how long since its save() (a spare slot, reserved at the previous
        # commit, has an age that is not this save's time); else the slot's age stands in.
        age = m.took if m.took >= 0 else (
            self.store.slot_age(number) if writer is not None and writer.step >= 0 else None)
        version = self.store.commit(number, m.tensors, m.meta, layout=m.layout, step=m.step)
        if age is not None:
            self.metrics.save_seconds.observe(age + time.perf_counter() - started)
        self.metrics.commit_seconds.observe(time.perf_counter() - started)
        self.metrics.committed_bytes.inc(version.nbytes)
        try:
            self.on_commit(version)
        except Exception:  # noqa: BLE001 - protection problems never fail a local commit
            log.exception("protection of job %r step %d could not start", version.job,
                          version.step)
        spare = None
        if m.next_nbytes > 0 and writer is not None and not self.stopping:
            spare = self.store.alloc_spare(writer, m.next_nbytes)
        if spare is None:
            return p.CommitReply(version.job, version.rank, version.step, version.nbytes)
        return p.CommitReply(version.job, version.rank, version.step, version.nbytes,
                             spare.handle, self.store.dir.seg_path(spare.number), spare.nbytes)

    def _on_abort(self, m: p.Abort, _: Any = None) -> p.Ok:
        self.store.abort(self.store.slot_number(m.slot))
        return p.Ok(1)

    def _on_list(self, m: p.ListVersions, _: Any = None) -> p.ListReply:
        self._authorize(m)
        self._wait_recovery(m.job)
        held = [_info(v) for v in self.store.versions(m.job, m.rank)
                if m.run is None or v.run == m.run]
        if self.persister is not None:
            # Complete persisted steps only (every rank of the step's world written), none
            # that a drop abandoned.
            in_memory = {(v.rank, v.step) for v in held}
            held += [p.VersionInfo(m.job, rank, step, 0, "persisted", e["committed_at"],
                                   e["world_size"], e.get("run", ""))
                     for step, ranks in self.persister.inventory(m.job).items()
                     for rank, e in ranks.items()
                     if (m.rank is None or rank == m.rank) and (rank, step) not in in_memory
                     and (m.run is None or e.get("run", "") == m.run)]
        return p.ListReply(tuple(sorted(held, key=lambda v: (v.rank, v.step))))

    def _wait_recovery(self, job: str) -> None:
        if self.recovery is None:
            return
        try:
            self.recovery.wait_ready(job)
        except StoreError:
            if self.persister is None or not self.persister.steps(job):
                raise
            log.warning("memory cannot serve job %r; the persistence tier will", job)

    def _on_open(self, m: p.Open, _: Any = None) -> p.OpenReply:
        digest, admin = self._authorize(m)
        started = time.perf_counter()
        self._wait_recovery(m.job)
        try:
            lease, tier = self._lease_any_tier(m)
        except StoreError as exc:
            if exc.code != "not_found" or not m.remote or self.reads is None:
                raise
            # Another rank's version, held on another node: the holder verified it, and the
            # copy is checked against the checksum it sent.
            reply = self.reads.fetch(m.job, m.rank, m.step, m.pid, run=m.run, owner=digest,
                                     admin=admin)
            self.metrics.open_seconds.observe(time.perf_counter() - started)
            return reply
        v = lease.version
        # A version loaded from disk was checked as it was installed.
        bad = self.store.verify(v) if m.verify and tier != "disk" else []
        if bad:
            self.store.release(lease.id)
            self.metrics.checksum_failures.inc(len(bad))
            log.error("job %r rank %d step %d: tensors %s fail their checksums", v.job, v.rank,
                      v.step, bad)
            held = False
            if self.recovery is not None and self.recovery.repair(v.job, v.step):
                lease = self.store.lease(m.job, m.rank, m.pid, v.step, mapped=m.map)
                v, held = lease.version, True
                bad = self.store.verify(v)
            if bad:
                if held:
                    self.store.release(lease.id)
                raise StoreError("checksum_mismatch", f"job {v.job!r} rank {v.rank} step "
                                 f"{v.step}: bytes of tensors {bad} do not match their "
                                 "checksums, and the group could not rebuild them")
        self.metrics.open_seconds.observe(time.perf_counter() - started)
        return p.OpenReply(lease.id, v.job, v.rank, v.step, self.store.dir.seg_path(v.number),
                           v.nbytes, v.tensors, v.meta, tier, lease.newer)

    def _lease_any_tier(self, m: p.Open) -> tuple[Any, str]:
        """Lease from memory; if memory has nothing fitting, load from the persistence tier:
        the step asked for, or the newest complete persisted step, falling back to older ones
        while the newer cannot be loaded (``corrupt``: each is set aside as it is found;
        ``not_found``: trimmed or dropped since it was listed; ``disk_error``). A named step
        gets its error; an unnamed one whose every listed step failed gets the worst of them
        (``corrupt`` before ``disk_error`` before ``not_found``), never a bare "none"."""
        try:
            return self.store.lease(m.job, m.rank, m.pid, m.step, m.max_step,
                                    mapped=m.map, run=m.run), "memory"
        except StoreError as exc:
            if exc.code != "not_found" or self.persister is None:
                raise
            on_disk = [s for s in self.persister.steps(m.job, m.rank, run=m.run)
                       if (m.step is None or s == m.step)
                       and (m.max_step is None or s <= m.max_step)]
            in_memory = [v.step for v in self.store.versions(m.job, m.rank)
                         if (m.max_step is None or v.step <= m.max_step)
                         and (m.run is None or v.run == m.run)]
            if m.step is None and in_memory:
                on_disk = [s for s in on_disk if s > max(in_memory)]
            if not on_disk:
                raise
            failed: list[StoreError] = []
            for step in reversed(on_disk):
                try:
                    lease = self.persister.load(m.job, m.rank, step, m.pid, mapped=m.map,
                                                run=m.run)
                except StoreError as err:
                    if m.step is not None or err.code not in _FALL_BACK:
                        raise
                    failed.append(err)
                    log.error("job %r rank %d: persisted step %d cannot be loaded (%s); trying "
                              "an older one (%s)", m.job, m.rank, step, err.code, err.message)
                    continue
                log.warning("job %r rank %d step %d served from the persistence tier", m.job,
                            m.rank, step)
                return lease, "disk"
            raise min(failed, key=lambda e: _FALL_BACK.index(e.code)) from None

    def _on_persist(self, m: p.Persist, _: Any = None) -> p.Ok:
        self._authorize(m)
        if self.persister is None:
            raise StoreError("bad_request", "no persistence tier: start the daemon with "
                             "--persist-dir DIR")
        steps = sorted({v.step for v in self.store.versions(m.job)})
        step = m.step if m.step is not None else (steps[-1] if steps else None)
        if step is None or step not in steps:
            raise StoreError("not_found", f"job {m.job!r} step {step} is not in memory here")
        self.persister.write(m.job, step)
        return p.Ok(1)

    def _on_release(self, m: p.Release, _: Any = None) -> p.Ok:
        if self.reads is not None and self.reads.release(m.lease):
            return p.Ok(1)
        lease = self.store.release(m.lease)
        self.metrics.restore_seconds.observe(time.monotonic() - lease.opened)
        return p.Ok(1)

    def _on_verify(self, m: p.Verify, _: Any = None) -> p.VerifyReply:
        self._authorize(m)
        results = []
        for v in self.store.versions(m.job, m.rank):
            if m.step is None or v.step == m.step:
                bad = tuple(self.store.verify(v))
                if bad:
                    self.metrics.checksum_failures.inc(len(bad))
                results.append(p.Verified(v.job, v.rank, v.step, bad))
        return p.VerifyReply(tuple(results))

    def _on_where(self, m: p.Where, _: Any = None) -> p.WhereReply:
        digest, admin = self._authorize(m)
        if self.reads is None:
            return p.WhereReply(())
        return self.reads.where(m.job, run=m.run, owner="" if admin else digest)

    def _on_drop(self, m: p.Drop, _: Any = None) -> p.Ok:
        digest, admin = self._authorize(m)
        if m.everywhere and (m.rank is None or m.newer_than is None or m.step is not None):
            raise StoreError("bad_request", "a drop everywhere names one rank and newer_than")
        held = self.store.versions(m.job)
        before = {v.step for v in held}
        count = self.store.drop(m.job, m.rank, m.step, m.newer_than)
        gone = before - {v.step for v in self.store.versions(m.job)}
        if self.persister is not None:
            # The drop reaches the disk tier too: a restore's new timeline must never come
            # back to the abandoned steps from there (issue 24, finding 3).
            ranks = {m.rank} if m.rank is not None else \
                {v.rank for v in held} | self.persister.ranks_written(m.job)
            self.persister.dropped(m.job, ranks, m.step, m.newer_than, m.timeline)
        timeline = None
        if m.timeline and m.step is None:
            timeline = (m.timeline, -1 if m.newer_than is None else m.newer_than)
        if gone or timeline:
            try:
                self.on_drop(m.job, gone, timeline)
            except Exception:  # noqa: BLE001 - the local drop stands either way
                log.exception("telling peers that job %r steps %s were dropped failed", m.job,
                              sorted(gone))
        if m.everywhere and self.reads is not None:
            assert m.rank is not None and m.newer_than is not None
            count += self.reads.drop_elsewhere(m.job, m.rank, m.newer_than, run=m.run,
                                               owner=digest, admin=admin)
        return p.Ok(count)

    def _on_status(self, m: p.Status, _: Any = None) -> p.StatusReply:
        stats = self.store.stats()
        peers = self.peers() if self.peers is not None else {}
        versions = self.store.versions()
        if self.job_isolation:
            # Without the admin token a client sees only the jobs bound to its own token
            # (none without one): other tenants' names, ranks, steps and sizes are theirs.
            digest = token_digest(m.token) if m.token else ""
            if not (digest and self._admin and hmac.compare_digest(digest, self._admin)):
                owners = {job: self.store.owner(job) for job in {v.job for v in versions}}
                versions = [v for v in versions if digest and owners[v.job]
                            and hmac.compare_digest(owners[v.job], digest)]
        return p.StatusReply(self.node_slot, os.getpid(), not self.stopping,
                             self.store.memory_limit, stats["bytes_used"], stats["open_slots"],
                             stats["open_leases"], tuple(_info(v) for v in versions),
                             tuple(sorted(s for s, up in peers.items() if up)),
                             tuple(sorted(s for s, up in peers.items() if not up)),
                             self.recovery is not None and not self.recovery.ready,
                             *self.coding)

    # ------------------------------------------------------------------ shutdown

    def close(self, drain_timeout: float = 30.0) -> None:
        """Finish in-flight requests (commits), answer them, then close the sockets."""
        self.drain(drain_timeout)
        if self.endpoint.startswith("ipc://"):
            try:
                os.unlink(self.endpoint[6:])
            except OSError:
                pass


def token_digest(token: str) -> str:
    """What the daemon keeps of a job token (in memory and in manifests): its SHA-256."""
    return hashlib.sha256(token.encode()).hexdigest()


def _bind(sock: zmq.Socket, endpoint: str) -> str:
    if endpoint.startswith("ipc://"):
        os.makedirs(os.path.dirname(endpoint[6:]) or ".", mode=0o700, exist_ok=True)
    old = os.umask(0o077)
    try:
        sock.bind(endpoint)
    finally:
        os.umask(old)
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)


def _info(v: Any) -> p.VersionInfo:
    return p.VersionInfo(v.job, v.rank, v.step, v.nbytes, v.state, v.committed_at,
                         v.world_size, v.run)


def _pinned_cpus() -> tuple[int, ...]:
    """The CPUs this thread may run on, where that is fewer than the machine has (the daemon
    was pinned); empty otherwise (see :class:`~snapshotd.common.protocol.AllocReply`)."""
    try:
        mine = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        return ()
    return tuple(sorted(mine)) if len(mine) < (os.cpu_count() or 0) else ()
