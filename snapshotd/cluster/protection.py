"""Erasure-coded protection of node versions across a group (docs/design.md section 4).

A *node version* is every rank's committed version of one (job, step) on this node, laid end to
end in rank order (``S`` bytes) and cut into ``k`` chunks of ``ceil(S/k)`` bytes. Chunk ``c`` of
node ``x`` is the data fragment of ``x`` in the ``c``-th stripe where ``x`` is a data node.

This module holds the policy and the state: which chunks to send where, the stripes being
assembled, the parity this node holds, which versions are protected. Bytes move through
:class:`~snapshotd.cluster.peers.PeerLinks`; the peer server calls the ``on_*`` handlers.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, NamedTuple

import xxhash

from ..common import locks
from ..common import protocol as p
from ..node._shm import read_sealed, seal
from ..node.store import Store, StoreError, Version
from . import peerproto as pp
from .codec import Codec
from .parityfiles import ParityFiles
from .peers import PeerError
from .placement import Group, Stripe, data_stripes, stripes

__all__ = ["Protector", "ParityRecord", "NodeVersion", "frames_checksum", "contiguous"]

log = logging.getLogger("snapshotd.protection")


def frames_checksum(frames: Sequence[Any]) -> str:
    h = xxhash.xxh3_64()
    for frame in frames:
        h.update(frame)
    return h.hexdigest()


@dataclass
class ParityRecord:
    job: str
    step: int
    stripe: int
    index: int
    length: int
    frags: tuple[pp.FragInfo, ...]
    buf: Any                    # the bytes: a mapping of its file once kept
    checksum: str
    complete: bool = False      # every parity holder of the stripe has its fragment
    number: int = 0             # its par-N files (see parityfiles), once kept
    #: Data nodes that sent another version of this step since (see ParityHolding.stale).
    stale: set[int] = field(default_factory=set)

    def holding(self) -> pp.ParityHolding:
        return pp.ParityHolding(self.job, self.step, self.stripe, self.index, self.length,
                                self.frags, tuple(sorted(self.stale)))


@dataclass
class NodeVersion:
    """This node's data for one (job, step): the rank versions, in rank order."""

    job: str
    step: int
    versions: list[Version]

    @property
    def total(self) -> int:
        return sum(v.nbytes for v in self.versions)

    def manifest(self, slot: int, owner: str = "") -> str:
        ranks = [{"rank": v.rank, "nbytes": v.nbytes, "meta": v.meta,
                  "committed_at": v.committed_at, "local_world_size": v.local_world_size,
                  "world_size": v.world_size, "run": v.run,
                  "tensors": [[t.name, t.dtype, list(t.shape), t.offset, t.nbytes, t.checksum]
                              for t in v.tensors]} for v in self.versions]
        return json.dumps({"slot": slot, "job": self.job, "step": self.step,
                           "total": self.total, "owner": owner, "ranks": ranks},
                          separators=(",", ":"))

    def chunk_frames(self, store: Store, start: int, length: int) -> list[memoryview]:
        """Zero-copy views of blob bytes [start, start+length) across the rank segments."""
        frames, offset = [], 0
        for v in self.versions:
            lo, hi = max(start, offset), min(start + length, offset + v.nbytes)
            if lo < hi:
                frames.append(store.dir.view(v.number, v.size)[lo - offset:hi - offset])
            offset += v.nbytes
        return frames


def chunk_size(total: int, k: int) -> int:
    return -(-total // k)


@dataclass
class _Assembly:
    """Data fragments of one stripe arriving at its first parity holder."""

    started: float
    frags: dict[int, tuple[pp.FragInfo, list[Any]]] = field(default_factory=dict)
    pulling: bool = False       # the missing fragments are being fetched (a re-encode)
    pulled: float = 0.0         # when the last fetch gave up (asked again a moment later)

    @property
    def nbytes(self) -> int:
        return sum(info.length for info, _ in self.frags.values())


class _Replaced(Exception):
    """The version being sent is no longer the node's version of its step."""


class Protector:
    """Runs the encode pipeline and keeps this node's parity."""

    def __init__(self, me: int, group: Group, codec: Codec, store: Store, links: Any, *,
                 keep: int = 2, encode_timeout: float = 60.0, peer_timeout: float = 10.0,
                 up: Callable[[int], bool],
                 metrics: Any = None, clock: Callable[[], float] = time.monotonic,
                 on_node_protected: Callable[[str, int], None] = lambda job, step: None) -> None:
        self.on_node_protected = on_node_protected
        self.me, self.group, self.codec, self.store, self.links = me, group, codec, store, links
        self.keep = keep
        self.encode_timeout = encode_timeout
        # A peer call that carries a fragment is bounded by the encode timeout (a stripe whose
        # fragments do not all arrive in that time is given up anyway); a small one by the
        # heartbeat's peer timeout. A call stuck on a dead peer then holds an encode thread no
        # longer than the configured timeouts.
        self._transfer = timedelta(seconds=encode_timeout)
        self._small = timedelta(seconds=peer_timeout)
        self.up = up
        self.metrics = metrics
        self._clock = clock
        self._lock = locks.lock("protector")
        self._closed = False
        self._stopping = False
        #: (job, step) -> when this node dropped it (wall clock, like commit times): a rebuild
        #: never installs a version committed before that (see abandoned()).
        self._dropped_here: dict[tuple[str, int], float] = {}
        #: (src, job, step) -> the newest drop time a peer sent for its versions of that step
        #: (see on_dropped): a fragment or parity of a version it committed before that is
        #: refused, so what is left of a send that a re-commit replaced (or a parity forward
        #: behind it) never completes the replaced bytes' parity after the notice.
        #: With each, the incarnation of the node that the report then held for it had (0:
        #: none heard): its stamps are ordered within a memory (Store.stamp), so a record
        #: made under an earlier incarnation is not held against a replacement's commits,
        #: whose clock may be behind the lost daemon's (issue 25, finding 3).
        self._dropped_by: dict[tuple[int, str, int], tuple[float, int]] = {}
        #: (job, stripe, step) -> parity kept; its bytes (``total``) are read without the lock
        #: by the store's budget (design section 6: no lock is taken under another's).
        self._parity: locks.Tally = locks.Tally(lambda r: r.length)
        self._assembling: dict[tuple[str, int, int], _Assembly] = {}  # (job, step, stripe)
        self._protected: dict[tuple[str, int, str], set[int]] = {}  # (job, step, vid)
        #: (job, step) -> (when its chunks went out, the version id sent): when the send was
        #: queued, then when it ended (a retry waits from there, see retry()).
        self._sent: dict[tuple[str, int], tuple[float, str]] = {}
        #: (job, step) being sent now, and how long its last send took.
        self._sending: set[tuple[str, int]] = set()
        self._send_again: set[tuple[str, int]] = set()
        self._send_took: dict[tuple[str, int], float] = {}
        #: (job, step) -> the version (manifest id) whose every fragment last went out: a
        #: retry of that version asks each holder first (HaveData) instead of re-sending.
        self._sent_vid: dict[tuple[str, int], str] = {}
        #: (job, step) whose send failed already (its next failures are logged at DEBUG).
        self._unprotected: set[tuple[str, int]] = set()
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="snapshotd-encode")
        #: Drop notices go on their own threads: behind a large send on the encode pool a
        #: re-commit's notice reached the holders seconds late (review of issue 15, F1).
        self._notices = ThreadPoolExecutor(2, thread_name_prefix="snapshotd-notice")
        #: Drop notices a peer could not be given yet: slot -> messages (see resend_drops).
        self._undelivered: dict[int, list[pp.Dropped]] = {}
        #: Bytes of data fragments and parity buffers held by stripes being assembled or
        #: encoded: inside the budget, like the parity kept.
        self._inflight = 0
        #: Job-wide retention: node -> {job: its floor}, and node -> {job: the steps it holds},
        #: from Held reports (this node's too), kept in floors.json (see _load_floors); the
        #: nodes heard from since this start.
        self._floors: dict[int, dict[str, int]] = {}
        self._held: dict[int, dict[str, NodeView]] = {}
        #: job -> this node's job-wide step: it only moves up (see job_wide).
        self._pin: dict[str, int] = {}
        #: job -> (token, base) of the timeline this node's ranks last restored (a restore
        #: names it, every rank the same; absent: the job never restored here).
        self._timelines: dict[str, tuple[int, int]] = {}
        #: Jobs whose timeline this node took from the others' reports (adopt_timelines),
        #: not from a restore of its own ranks: taken again when the reports move on.
        self._adopted: set[str] = set()
        #: Bumped whenever what is known of the other nodes changes (_held, _floors), and per
        #: job the value at which a commit last tried adopt_timelines: a commit of a job
        #: without a timeline tries again only when the reports changed (not O(nodes) a save).
        self._held_gen = 0
        self._adopt_tried: dict[str, int] = {}
        #: Reports are relayed (see overlay, relay), so each carries its origin's incarnation
        #: and sequence number (Held.mark); per node: the newest mark taken (a report no newer
        #: is refused), the mark of the report its floors come from (kept in floors.json),
        #: the newest report itself (what the relay forwards), the nodes a report was taken
        #: from since this start (a recovery waits for them) and when the last was, and the
        #: nodes that last said they are recovering, with when (see _set_pins).
        self._marks: dict[int, tuple[int, int]] = {}
        self._floor_marks: dict[int, tuple[int, int]] = {}
        self._latest: dict[int, pp.Held] = {}
        self._accepted: set[int] = set()
        self._report_at: dict[int, float] = {}
        self._recovering: dict[int, float] = {}
        #: This daemon's incarnation (when it started, in microseconds; above any of this
        #: slot's earlier ones it heard of) and its reports' count (see report()).
        self.inc = time.time_ns() // 1000
        self._seq = 0
        self._report_lock = locks.lock("protector.report")
        #: How long a node's last "recovering" report holds the job-wide steps where they are
        #: (it reports every interval while it recovers; the cluster sets this, allowing for
        #: the relay's latency).
        self.recovering_hold = 5.0
        #: The other nodes of the cluster (None until the cluster sets it: no job-wide step is
        #: computed before), and how long a report pushed at once after a drop may take to be
        #: taken by this node's overlay neighbours.
        self._report_to: list[int] | None = None
        self.report_timeout = 1.0
        #: The relay that carries the reports (see relay.ReportRelay; set by the cluster), and
        #: the most seconds a report takes to reach every node through it.
        self.relay: Any = None
        self.relay_latency = 0.0
        self.ready: Callable[[], bool] = lambda: True
        self.stripes = {s.index: s for s in stripes(group)}
        # Called under the store's lock: reads two sums, takes no lock (design section 6).
        store.extra_kinds = lambda: {"parity": self._parity.total, "encoding": self._inflight}
        self.files = ParityFiles(store.dir.path)
        #: Adopted parity records not scrubbed yet (see start_scrub), the scrub's thread, the
        #: event that stops it, and how many bytes a second it reads at most.
        self._scrub_due: list[ParityRecord] = []
        self._scrub_thread: threading.Thread | None = None
        self._scrub_stop = threading.Event()
        self.scrub_rate = _SCRUB_RATE
        self._adopt()
        self._load_floors()

    def _adopt(self) -> None:
        """Adopt the parity a previous daemon on this memory left (see parityfiles): each
        description whose stripe this node holds that parity of; the rest are removed with a
        warning. What is adopted is scrubbed once in the background (:meth:`start_scrub`)."""
        adopted = 0
        for number, d, buf in self.files.scan():
            record = ParityRecord(d.job, d.step, d.stripe, d.index, d.length, d.frags, buf,
                                  d.checksum, d.complete, number, set(d.stale))
            stripe = self.stripes.get(d.stripe)
            if stripe is None or not 0 <= d.index < len(stripe.parity) or \
                    stripe.parity[d.index] != self.me:
                why = (f"stripe {d.stripe} is not in group {self.group.index}"
                       if stripe is None else
                       f"node {self.me} does not hold parity {d.index} of stripe {d.stripe}")
            elif sorted(f.src for f in d.frags) != sorted(stripe.data):
                why = (f"its fragments come from nodes {[f.src for f in d.frags]}, the stripe's "
                       f"data nodes are {list(stripe.data)}")
            elif d.length != max((f.length for f in d.frags), default=0):
                why = f"its length {d.length} is not its longest fragment's"
            else:
                why = ""
            if why:
                log.warning("discarded parity file %s (job %r step %d stripe %d): %s",
                            self.files.path_of(number), d.job, d.step, d.stripe, why)
                self.files.remove(ParityRecord("", 0, 0, 0, 0, (), buf, "", number=number))
                continue
            key = (record.job, record.stripe, record.step)
            if key in self._parity:
                self._forget(key)
            self._parity[key] = record
            self._scrub_due.append(record)
            adopted += 1
        if adopted:
            log.info("adopted %d parity fragments (%d bytes) from %s", adopted,
                     self.parity_bytes(), self.files.path)

    # ------------------------------------------------------------------ scrubbing adopted parity

    def start_scrub(self) -> None:
        """Scrub the adopted parity in the background (once the peer links are up): each
        record's bytes checked against its checksum, at most :attr:`scrub_rate` bytes a
        second; one that fails is counted (``snapshotd_parity_scrub_failures_total``) and
        re-created from its stripe's data fragments, fetched from the data nodes while they
        are up (tried again, less and less often, while the record is kept)."""
        if self._scrub_due and self._scrub_thread is None:
            self._scrub_thread = threading.Thread(target=self._scrub_loop, daemon=True,
                                                  name="snapshotd-scrub")
            self._scrub_thread.start()

    def _scrub_loop(self) -> None:
        try:
            bad = self.scrub()
            wait = 1.0
            while bad and not self._scrub_stop.is_set():
                bad = [r for r in bad if not self._recreate_adopted(r)]
                if bad:
                    self._scrub_stop.wait(wait)
                    wait = min(30.0, 2 * wait)
        except Exception:  # noqa: BLE001 - the daemon goes on; the parity is checked when served
            log.exception("scrubbing the adopted parity failed")
        finally:
            if self.links is not None:
                self.links.close_thread()

    def scrub(self) -> list[ParityRecord]:
        """Check every adopted parity record not checked yet against its checksum (at most
        :attr:`scrub_rate` bytes a second); return those that fail, each counted and logged."""
        with self._lock:
            due, self._scrub_due = self._scrub_due, []
        bad: list[ParityRecord] = []
        started, done = time.monotonic(), 0
        for record in due:
            if self._scrub_stop.is_set():
                break
            with self._lock:
                if self._parity.get((record.job, record.stripe, record.step)) is not record:
                    continue                       # dropped or replaced since
            h = xxhash.xxh3_64()
            try:
                view = memoryview(record.buf).cast("B")
            except ValueError:                     # unmapped: forgotten meanwhile
                continue
            try:
                for lo in range(0, view.nbytes, _SCRUB_PIECE):
                    h.update(view[lo:lo + _SCRUB_PIECE])
                    done += min(_SCRUB_PIECE, view.nbytes - lo)
                    ahead = done / self.scrub_rate - (time.monotonic() - started)
                    if ahead > 0 and self._scrub_stop.wait(ahead):
                        return bad
            finally:
                view.release()
            if h.hexdigest() != record.checksum:
                bad.append(record)
                if self.metrics is not None:
                    self.metrics.parity_scrub_failures.inc()
                    self.metrics.checksum_failures.inc()
                log.warning("adopted parity %d of stripe %d for job %r step %d (%s) fails its "
                            "checksum (changed while this daemon was down); re-creating it "
                            "from the stripe's data nodes %s", record.index, record.stripe,
                            record.job, record.step, self.files.path_of(record.number),
                            sorted(f.src for f in record.frags))
        return bad

    def _recreate_adopted(self, record: ParityRecord) -> bool:
        """Re-create a damaged adopted parity record in place from its stripe's data fragments
        (the very versions it was encoded from: ``GetData`` with their ``vid``); whether it is
        settled (re-created, or no longer kept). False: a data node is down or did not answer
        (tried again later)."""
        key = (record.job, record.stripe, record.step)
        with self._lock:
            if self._parity.get(key) is not record:
                return True
        stripe = self.stripes[record.stripe]
        infos = sorted(record.frags, key=lambda f: stripe.data.index(f.src))
        down = [f.src for f in infos if not self.up(f.src)]
        if down:
            log.debug("damaged parity of stripe %d job %r step %d: data nodes %s down",
                      record.stripe, record.job, record.step, down)
            return False
        try:
            self._room((len(infos) + self.group.m) * record.length,
                       "re-creating a damaged parity fragment")
            data = []
            for info in infos:
                reply, frames = self._call(info.src, pp.GetData(
                    record.job, record.step, info.frag, pp.manifest_id(info.manifest)))
                bufs = [f.buffer for f in frames]
                if reply.length != info.length or frames_checksum(bufs) != reply.checksum:
                    raise StoreError("corrupt", f"data fragment of node {info.src} is not the "
                                     f"{info.length} bytes it was, or failed its checksum")
                data.append(contiguous(bufs, record.length))
            parity = [bytearray(record.length) for _ in range(self.group.m)]
            self.codec.encode(data, parity)
        except Exception as exc:  # noqa: BLE001 - tried again later
            log.info("damaged parity of stripe %d job %r step %d not re-created yet: %s",
                     record.stripe, record.job, record.step, exc)
            return False
        out = parity[record.index]
        if frames_checksum([out]) != record.checksum:
            log.warning("parity %d of stripe %d for job %r step %d: re-encoding its data nodes' "
                        "fragments does not give its checksum; it stays refused when served",
                        record.index, record.stripe, record.job, record.step)
            return True
        with self._lock:
            if self._parity.get(key) is not record:
                return True
            try:
                memoryview(record.buf).cast("B")[:] = out
            except ValueError:
                return True
        log.warning("re-created damaged parity %d of stripe %d for job %r step %d from its data "
                    "nodes", record.index, record.stripe, record.job, record.step)
        return True

    def _forget(self, key: tuple[str, int, int]) -> None:
        """Drop a parity record and its files (lock held)."""
        record = self._parity.pop(key, None)
        if record is not None and record.number:
            self.files.remove(record)

    # ------------------------------------------------------------------ data-node side

    def node_version(self, job: str, step: int, versions: list[Version] | None = None
                     ) -> NodeVersion | None:
        """This node's complete data for (job, step), or None while a rank has not committed.

        Complete means every rank of the job this node holds (or is writing) in the step's
        layout (its world size) has committed the step: the count a client declares
        (``local_world_size``, 1 when unset) is only a lower bound, never trusted to leave a
        rank out of the node version. ``versions``: the
        step's versions when the caller has listed them already (``Store.at_step``)."""
        if versions is None:
            versions = self.store.at_step(job, step)
        if not versions:
            return None
        have = {v.rank for v in versions}
        world = max(v.world_size for v in versions)       # the layout of this step
        if not self.store.ranks(job, world) <= have or len(have) < max(
                v.local_world_size for v in versions):
            return None
        return NodeVersion(job, step, sorted(versions, key=lambda v: v.rank))

    def vid(self, nv: NodeVersion) -> str:
        """The identity of a node version (see :func:`peerproto.manifest_id`)."""
        return pp.manifest_id(nv.manifest(self.me, self.store.owner(nv.job)))

    def on_commit(self, version: Version, versions: list[Version] | None = None) -> None:
        """Called after every local commit: start encoding once the node version is complete.

        A re-commit of a step makes the parity of the version it replaced wrong for this node:
        the group is told at once, like a drop of the older version (kept and told again to a
        holder that is down), so that a loss of this node before the new version is encoded
        never rebuilds the replaced bytes."""
        if version.job not in self._timelines and \
                self._adopt_tried.get(version.job) != self._held_gen:
            # A daemon that holds no timeline of the job (a fresh one under live trainers:
            # its node's daemon was replaced and the job did not restore) takes the others'.
            self._adopt_tried[version.job] = self._held_gen
            self.adopt_timelines(version.job)
        if self.group.m == 0:
            return
        if version.replaces:
            self._tell_dropped(version.job, {version.step}, version.committed_at - 1e-6)
        key = (version.job, version.step)
        nv = self.node_version(*key, versions)    # outside our lock: the store calls back in
        if nv is None:
            return
        vid = self.vid(nv)
        with self._lock:
            sent = self._sent.get(key)
            if sent is not None and sent[1] == vid:
                return                            # this very version is on its way
            self._sent[key] = (self._clock(), vid)
        self._pool.submit(self._send_data, version.job, version.step)

    def retry(self) -> int:
        """Send again the newest node version of each job that is still not protected, and
        the job-wide step (the pin) if this node's version of it is not protected.

        A version whose chunks could not go out (a parity holder was down or not connected
        yet), or whose protection did not come back within ``encode_timeout``, is retried;
        other older versions are left alone: recovery needs the newest protected one, and
        the job the step every rank holds (a new timeline's step, or the step a lagging node
        holds, can be one whose first encode was given up when a newer step came).
        """
        started = 0
        present = {(v.job, v.step) for v in self.store.versions()}
        with self._lock:
            for key in [k for k in self._sent if k not in present]:
                del self._sent[key]
            for key in [k for k in self._send_took if k not in present]:
                del self._send_took[key]
            for key in [k for k in self._sent_vid if k not in present]:
                del self._sent_vid[key]
            self._unprotected &= present         # steps no longer held: forgotten
        for job in sorted({job for job, _ in present}):
            held = self.store.versions(job)
            steps = {max(v.step for v in held)}
            pin = self.store.pins.get(job)
            if pin is not None and any(v.step == pin for v in held):
                steps.add(pin)
            # The newest step every node holds: the job-wide step prefers one protected on
            # every node, so a step every rank holds whose encode this node skipped (a newer
            # step came first) would stay unprotected here, and the job-wide step below it
            # (review of issue 16, finding 2).
            common = self._common_step(job)
            soon = {pin}                  # asked again after a few seconds, not encode_timeout
            if common is not None and any(v.step == common for v in held):
                steps.add(common)
                if pin is None or common > pin:
                    soon.add(common)
            for step in sorted(steps, reverse=True):
                nv = self.node_version(job, step)
                if nv is None or all(v.protected for v in nv.versions):
                    continue
                key = (job, step)
                # The pin is what the job falls back to: asked again after a few seconds (a
                # holder whose stripe is complete confirms a re-sent fragment at once, and one
                # whose confirmation went to a peer it thought down is asked again).
                with self._lock:
                    # Never while its chunks are still going out, and the pin no sooner than
                    # twice as long as its last send took after that send ended: the holders
                    # encode and forward as many bytes before they confirm (a large version on
                    # a loaded node was otherwise sent again every 3 s while its first send
                    # still ran: 3-4 times its bytes, measured by bench.cluster).
                    if key in self._sending:
                        continue
                    wait = (self.encode_timeout if step not in soon else min(
                        self.encode_timeout, max(3.0, 2 * self._send_took.get(key, 0.0))))
                    sent = self._sent.get(key)
                    if sent is not None and self._clock() - sent[0] < wait:
                        continue
                vid = self.vid(nv)                # asks the store: not under our lock
                with self._lock:
                    if key in self._sending:
                        continue
                    self._sent[key] = (self._clock(), vid)
                self._pool.submit(self._send_data, job, step)
                started += 1
        return started

    def held_in_common(self, job: str, skip: int | None = None) -> set[int]:
        """The steps every node of the job's current layout reports holding (``skip``'s
        report left out; without it, none unless this node is in that layout)."""
        with self._lock:
            # The others' reports as they are when this node is left out (a replacement
            # asks what they hold in common; it takes their timeline, adopt_timelines).
            views = current_views(self._views(job, skip=skip, timeline=skip is None))
        held = [set(v.held) for v in views.values() if v.held]
        if not held or (skip is None and self.me not in views):
            return set()
        return set.intersection(*held)

    def _common_step(self, job: str) -> int | None:
        """The newest step every node of the job's current layout reports holding (this
        node's own report included), or None."""
        return max(self.held_in_common(job), default=None)

    def _send_data(self, job: str, step: int) -> None:
        key = (job, step)
        with self._lock:
            if key in self._sending:     # sent again once that send ends (a re-commit of the
                self._send_again.add(key)    # step may have changed its bytes meanwhile)
                return
            self._sending.add(key)
        try:
            self._send_data_once(job, step)
        finally:
            with self._lock:
                self._sending.discard(key)
                again = key in self._send_again and not self._stopping
                self._send_again.discard(key)
            if again:
                try:
                    self._pool.submit(self._send_data, job, step)
                except RuntimeError:     # the pool is shutting down
                    pass

    def _send_data_once(self, job: str, step: int) -> None:
        started = time.perf_counter()
        held = [v.step for v in self.store.versions(job)]
        if held and step < max(held) and step not in (self.store.pins.get(job),
                                                      self._common_step(job)):
            # A newer step was committed while this one waited: that one is sent (or retried)
            # instead, and queued sends cannot pile up behind a slow peer.
            log.debug("job %r step %d not sent: step %d is newer", job, step, max(held))
            with self._lock:          # not on its way: a retry (it may become the pin) may go
                self._sent.pop((job, step), None)
            return
        try:
            try:
                self._send_data_chunks(job, step)
            except PeerError as exc:
                if exc.code != "dropped":        # (the holder heard of the drop first)
                    raise
                raise _Replaced(str(exc)) from None
            with self._lock:                      # a retry waits from the end of the send
                took = time.perf_counter() - started
                self._send_took[(job, step)] = took
                sent = self._sent.get((job, step))
                if sent is not None:
                    self._sent[(job, step)] = (max(sent[0], self._clock()), sent[1])
        except _Replaced as exc:
            # The bytes being sent were replaced (a re-commit of the step: its own send
            # follows) or dropped: what is left of them is not sent (review of issue 15, F1).
            log.info("job %r step %d: send of a replaced version stopped (%s)", job, step, exc)
        except Exception as exc:  # noqa: BLE001 - a failed encode leaves the version local
            with self._lock:  # try again in a couple of seconds
                self._sent[(job, step)] = (self._clock() - self.encode_timeout + 2.0, "")
                again = (job, step) in self._unprotected
                self._unprotected.add((job, step))
            # Once per step at WARNING (retries say it again at DEBUG).
            log.log(logging.DEBUG if again else logging.WARNING,
                    "job %r step %d stays unprotected: %s", job, step, exc)
        finally:
            self.links.close_thread()
        if self.metrics is not None:
            self.metrics.encode_seconds.observe(time.perf_counter() - started)

    def _send_data_chunks(self, job: str, step: int) -> None:
        leases, nv = self._lease_node_version(job, step)
        try:
            manifest = nv.manifest(self.me, self.store.owner(nv.job))
            vid = pp.manifest_id(manifest)
            with self._lock:                # sent before: a retry (see on_have_data)
                again = self._sent_vid.get((job, step)) == vid
            skipped = 0
            floor = self.floor(job)
            cs = chunk_size(nv.total, self.group.k)
            for chunk, (stripe, _) in enumerate(data_stripes(self.me, self.group)):
                if self._stopping:
                    raise StoreError("stopping", "this daemon is stopping")
                with self._lock:
                    sent = self._sent.get((job, step))
                if sent is not None and sent[1] and sent[1] != vid:
                    raise _Replaced(f"job {job!r} step {step} was committed again")
                if not self.up(stripe.parity[0]):
                    raise StoreError("peer_down", f"node {stripe.parity[0]}, first parity "
                                     f"holder of stripe {stripe.index}, is down")
                start = chunk * cs
                length = max(0, min(cs, nv.total - start))
                info = pp.FragInfo(self.me, chunk, length, manifest, floor)
                if again:
                    # A retry: the holder may hold the fragment already, in a stripe still
                    # waiting for another data node's (one that saves later): asked, not sent.
                    try:
                        reply, _ = self._call(stripe.parity[0],
                                              pp.HaveData(job, step, stripe.index, info),
                                              timeout=self._small)
                        held = bool(reply.count)
                    except PeerError as exc:
                        if exc.code in ("dropped", ""):     # (""): no answer: peer away
                            raise
                        held = False                # a daemon that predates HaveData
                    if held:
                        skipped += length
                        continue
                frames = nv.chunk_frames(self.store, start, length)
                msg = pp.PutData(job, step, stripe.index, info, frames_checksum(frames))
                self._call(stripe.parity[0], msg, frames)
            with self._lock:
                self._sent_vid[(job, step)] = vid
            if skipped:
                log.debug("job %r step %d: %d bytes already at their parity holders, not "
                          "sent again", job, step, skipped)
        finally:
            for lease in leases:
                self.store.release(lease)

    def _lease_node_version(self, job: str, step: int) -> tuple[list[int], NodeVersion]:
        nv = self.node_version(job, step)
        if nv is None:
            raise StoreError("not_found", f"job {job!r} step {step} is not complete here")
        leases = []
        for v in nv.versions:
            leases.append(self.store.lease(job, v.rank, os.getpid(), step=step).id)
        return leases, nv

    def _was_dropped(self, job: str, step: int, frags: Any) -> Any:
        """The first of ``frags`` (FragInfos) whose version its node said it dropped (a
        re-commit or a new timeline, :meth:`on_dropped`), or None (lock held)."""
        for f in frags:
            record = self._dropped_by.get((f.src, job, step))
            if record is None:
                continue
            at, inc = record
            if inc and self._marks.get(f.src, (0, 0))[0] > inc:
                continue                     # told by an earlier incarnation of that node
            if _committed_at(f.manifest) <= at:
                return f
        return None

    def _still_up(self, slot: int) -> bool:
        """Whether a send to ``slot`` may keep waiting for its connection: the heartbeats say
        it is up and this daemon is not stopping (its heartbeats stop first)."""
        return not self._stopping and self.up(slot)

    def _call(self, slot: int, msg: Any, frames: Sequence[Any] = (),
              timeout: timedelta | None = None) -> tuple[Any, list[Any]]:
        """``links.call`` (``timeout``: the transfer timeout by default) that waits for the
        connection and the answer only while :meth:`_still_up`."""
        return self.links.call(slot, msg, frames, timeout=timeout or self._transfer,
                               while_up=lambda: self._still_up(slot))

    def floor(self, job: str) -> int:
        """The newest step of ``job`` every local rank holds as protected (-1: none)."""
        newest: dict[int, int] = {}
        for v in self.store.versions(job):
            newest.setdefault(v.rank, -1)
            if v.protected:
                newest[v.rank] = max(newest[v.rank], v.step)
        return min(newest.values(), default=-1)

    def _current(self, job: str) -> list[Any]:
        """The versions of ``job`` that belong to its current layout: all of them, except,
        once the job restarted at another world size (its newest version says how many ranks
        it has), the versions saved at another size (or of ranks beyond it). Those are the
        old layout's (a rank id held here may now run on another node), kept by per-rank
        retention until dropped; they must not hold back the job-wide step meanwhile."""
        versions = self.store.versions(job)
        world = max(((v.step, v.world_size) for v in versions), default=(0, 0))[1]
        return [v for v in versions if not world or (v.rank < world
                                                     and v.world_size in (world, 0))]

    def job_floor(self, job: str) -> int:
        """The step of ``job`` this node asks every node to keep (its Held report): the
        lowest, over its local ranks, of a rank's newest protected step, or of its newest
        step where it holds none protected yet (after a restore of an unprotected step, or
        with no coding: that is the step the rank restores). -1: nothing held."""
        newest: dict[int, tuple[int, int]] = {}
        for v in self._current(job):
            got = newest.get(v.rank, (-1, -1))
            newest[v.rank] = (max(got[0], v.step if v.protected else -1), max(got[1], v.step))
        return min((p if p >= 0 else h for p, h in newest.values()), default=-1)

    def node_view(self, job: str) -> NodeView:
        """This node's report of ``job``: its floor, the steps every local rank holds, its
        ranks, and the job's number of ranks (as its writers said)."""
        per: dict[int, set[int]] = {}
        safe: dict[int, set[int]] = {}
        versions = self._current(job)
        world = max(((v.step, v.world_size) for v in versions), default=(0, 0))[1]
        for v in versions:
            per.setdefault(v.rank, set()).add(v.step)
            safe.setdefault(v.rank, set())
            if v.protected:
                safe[v.rank].add(v.step)
        held = tuple(sorted(set.intersection(*per.values()))) if per else ()
        protected = tuple(sorted(set.intersection(*safe.values()))) if safe else ()
        with self._lock:
            pin = self._pin.get(job, -1)
            token, base = self._timelines.get(job, (0, -1))
        run = max(((v.step, v.committed_at, v.run) for v in versions), default=(0, 0.0, ""))[2]
        return NodeView(self.job_floor(job), held, tuple(sorted(per)), world, pin, protected,
                        token, base, run, self.store.owner(job))

    def on_protected(self, msg: pp.Protected) -> None:
        stripe = self._stripe(msg.stripe)
        if self.me in stripe.parity:
            self._mark_complete(msg.job, msg.stripe, msg.step)
        if self.me not in stripe.data:
            return
        nv = self.node_version(msg.job, msg.step)
        if nv is None:
            return
        vid = self.vid(nv)
        if msg.vid and msg.vid != vid:
            return                      # another version of this step was encoded
        with self._lock:
            done = self._protected.setdefault((msg.job, msg.step, vid), set())
            done.add(msg.stripe)
            complete = len(done) >= self.group.k
        if complete:
            # Exactly the rank versions that were encoded: a rank committed since is not.
            for v in nv.versions:
                self.store.mark_protected(msg.job, v.rank, msg.step, v.committed_at)
            with self._lock:
                for key in [k for k in self._protected if k[0] == msg.job and k[1] <= msg.step]:
                    del self._protected[key]
            self.on_node_protected(msg.job, msg.step)

    # ------------------------------------------------------------------ parity-holder side

    def on_put_data(self, msg: pp.PutData, frames: list[Any]) -> None:
        stripe = self._first_holder_of(msg)
        got = sum(memoryview(f).nbytes for f in frames)
        if got != msg.info.length or frames_checksum(frames) != msg.checksum:
            raise StoreError("corrupt", f"data fragment of node {msg.info.src} for job "
                             f"{msg.job!r} step {msg.step}: {got} bytes or checksum mismatch")
        self._room(got, f"the data fragment of node {msg.info.src} for job {msg.job!r} step "
                   f"{msg.step}")
        with self._lock:
            record, whole = self._known_fragment(msg)
            if whole:
                # A re-send of a fragment already encoded (its node restarted and lost the
                # protected flag): the stripe is whole, said so again instead of re-encoding.
                return
            if record is not None:
                # Another version of a step already encoded (a re-commit): the old parity no
                # longer matches this node's data; it is replaced once the new one is encoded,
                # and the other data nodes, which will not send again, are asked for theirs.
                # (A re-send of the fragment the record holds, while the stripe is not whole
                # yet, is a retry: that parity still matches, it is not stale.)
                if any(f.src == msg.info.src and not msg.info.same_fragment(f)
                       for f in record.frags) and msg.info.src not in record.stale:
                    record.stale.add(msg.info.src)
                    self._update(record)
            pull = self._add_fragment(stripe, msg.job, msg.step, msg.info, frames,
                                      reencode=record is not None)
        if pull:
            self._pool.submit(self._pull, msg.job, msg.step, stripe)

    def on_have_data(self, msg: pp.HaveData) -> bool:
        """Whether this node, first parity holder of ``msg.stripe``, holds the data fragment
        ``msg.info`` names (the same bytes of the same version): waiting in the stripe's
        assembly for the other data nodes' (its floor is taken as news), or encoded, when the
        node is told again that the stripe is protected. A data node asks before it sends a
        fragment again (see ``_send_data_chunks``): not its bytes a second time."""
        stripe = self._first_holder_of(msg)
        with self._lock:
            if self._known_fragment(msg)[1]:
                return True
            assembly = self._assembling.get((msg.job, msg.step, msg.stripe))
            pos = stripe.data.index(msg.info.src)
            got = None if assembly is None else assembly.frags.get(pos)
            if assembly is None or got is None or not msg.info.same_fragment(got[0]):
                return False
            assembly.frags[pos] = (msg.info, got[1])
            return True

    def _first_holder_of(self, msg: pp.PutData | pp.HaveData) -> Stripe:
        """The stripe ``msg`` names, once this node is its first parity holder and the
        fragment's node one of its data nodes (``bad_request`` otherwise)."""
        stripe = self._stripe(msg.stripe)
        if stripe.parity[0] != self.me or msg.info.src not in stripe.data:
            raise StoreError("bad_request", f"stripe {msg.stripe}: node {self.me} is not its "
                             f"first parity holder, or node {msg.info.src} is not a data node")
        return stripe

    def _known_fragment(self, msg: pp.PutData | pp.HaveData
                        ) -> tuple[ParityRecord | None, bool]:
        """What this holder has of ``msg``'s fragment (lock held): ``dropped`` when its node
        dropped that version; else the stripe's parity record of the step (or None) and
        whether that record encoded this very fragment whole, in which case the node is told
        again that the stripe is protected."""
        if self._was_dropped(msg.job, msg.step, (msg.info,)) is not None:
            raise StoreError("dropped", f"node {msg.info.src} dropped this version of job "
                             f"{msg.job!r} step {msg.step} (a re-commit or a new timeline)")
        record = self._parity.get((msg.job, msg.stripe, msg.step))
        if record is not None and record.complete and any(
                msg.info.same_fragment(f) for f in record.frags):
            self._pool.submit(self._confirm, msg.job, msg.step, msg.stripe, msg.info)
            return record, True
        return record, False

    def _add_fragment(self, stripe: Stripe, job: str, step: int, info: pp.FragInfo,
                      frames: list[Any], reencode: bool = False) -> bool:
        """Add a data fragment to its stripe's assembly; encode once all ``k`` are there
        (lock held). True if the missing fragments should be fetched (a re-encode)."""
        key = (job, step, stripe.index)
        assembly = self._assembling.setdefault(key, _Assembly(self._clock()))
        pos = stripe.data.index(info.src)
        if pos in assembly.frags:
            self._inflight -= assembly.frags[pos][0].length
        assembly.frags[pos] = (info, frames)
        self._inflight += info.length
        if len(assembly.frags) < self.group.k:
            if reencode and not assembly.pulling:
                assembly.pulling = True
                return True
            return False
        del self._assembling[key]
        self._pool.submit(self._encode, job, step, stripe, assembly)
        return False

    def _pull(self, job: str, step: int, stripe: Stripe) -> None:
        """Fetch the data fragments a re-encode of (job, step, stripe) lacks from their
        nodes (``GetData``: checked against the tensor checksums there)."""
        try:
            with self._lock:
                assembly = self._assembling.get((job, step, stripe.index))
                have = set(assembly.frags) if assembly is not None else set(
                    range(self.group.k))
            started = assembly
            for pos, slot in enumerate(stripe.data):
                if pos in have or not self.up(slot):
                    continue
                chunk = [s.index for s, _ in data_stripes(slot, self.group)].index(
                    stripe.index)
                reply, frames = self._call(slot, pp.GetData(job, step, chunk))
                bufs = [f.buffer for f in frames]
                self._room(reply.length, f"a data fragment of node {slot}")
                if frames_checksum(bufs) != reply.checksum:
                    raise StoreError("corrupt", f"data fragment of node {slot} failed its "
                                     "checksum on the way")
                info = pp.FragInfo(slot, chunk, reply.length, reply.manifest, reply.floor)
                with self._lock:
                    # Only into the assembly this pull was for, and only where nothing came
                    # meanwhile: a node that re-committed the step (its drop notice ended that
                    # assembly) sends its new fragment itself, and a late reply carrying the
                    # old bytes must not take its place.
                    now = self._assembling.get((job, step, stripe.index))
                    if now is None or now is not started or pos in now.frags:
                        return
                    self._add_fragment(stripe, job, step, info, bufs)
        except Exception as exc:  # noqa: BLE001 - the stripe expires like any other
            # (a data node that has not committed the step yet answers not_found; it may
            # never send it either, a newer step being there first: asked again in a moment)
            with self._lock:
                assembly = self._assembling.get((job, step, stripe.index))
                first = assembly is None or not assembly.pulled
                if assembly is not None:
                    assembly.pulling, assembly.pulled = False, self._clock()
            log.log(logging.INFO if first else logging.DEBUG,
                    "stripe %d of job %r step %d still lacks fragments: %s", stripe.index, job,
                    step, exc)
        finally:
            self.links.close_thread()

    def _encode(self, job: str, step: int, stripe: Stripe, assembly: _Assembly) -> None:
        held = assembly.nbytes
        try:
            infos = tuple(assembly.frags[i][0] for i in range(self.group.k))
            length = max(info.length for info in infos)
            down = [s for s in stripe.parity[1:] if not self.up(s)]
            if down:        # never wait on a peer known to be down (its data node retries)
                raise StoreError("peer_down", f"parity holders {down} are down")
            self._room(self.group.m * length, f"{self.group.m} parity buffers")
            with self._lock:
                self._inflight += self.group.m * length
                held += self.group.m * length
            data = [contiguous(assembly.frags[i][1], length) for i in range(self.group.k)]
            parity = [bytearray(length) for _ in range(self.group.m)]
            self.codec.encode(data, parity)
            record = ParityRecord(job, step, stripe.index, 0, length, infos, parity[0],
                                  frames_checksum([parity[0]]))
            with self._lock:    # parity 0 is counted as kept parity from here on
                self._inflight -= length
                held -= length
            self._keep(record)
            for index in range(1, self.group.m):
                msg = pp.PutParity(job, step, stripe.index, index, length, infos,
                                   frames_checksum([parity[index]]))
                self._call(stripe.parity[index], msg, [parity[index]])
            self._mark_complete(job, stripe.index, step)
            for slot in stripe.parity[1:]:
                self._tell(slot, pp.Protected(job, step, stripe.index))
            for info in infos:
                self._tell(info.src, pp.Protected(job, step, stripe.index,
                                                  pp.manifest_id(info.manifest)))
        except Exception as exc:  # noqa: BLE001
            log.warning("stripe %d of job %r step %d not protected: %s", stripe.index, job, step,
                        exc)
        finally:
            with self._lock:
                self._inflight -= held
            self.links.close_thread()

    def _tell(self, slot: int, msg: Any) -> None:
        """A small notice to a peer that is up (one that is down asks again: re-sent data
        fragments are confirmed at once)."""
        if not self.up(slot):
            return
        try:
            self._call(slot, msg, timeout=self._small)
        except Exception as exc:  # noqa: BLE001 - the other peers are still told
            log.info("node %d did not hear %s: %s", slot, msg, exc)

    def _room(self, nbytes: int, what: str) -> None:
        """Refuse (``memory_full``) bytes that would take the daemon over its budget."""
        self.store.make_room(nbytes)
        used = self.store.stats()["bytes_used"]
        if used + nbytes > self.store.memory_limit:
            raise StoreError("memory_full", f"no room for {what} ({nbytes} bytes): {used} of "
                             f"{self.store.memory_limit} in use")

    def inflight_bytes(self) -> int:
        with self._lock:
            return self._inflight

    def _confirm(self, job: str, step: int, stripe: int, info: pp.FragInfo) -> None:
        slot = info.src
        try:
            self._call(slot, pp.Protected(job, step, stripe, pp.manifest_id(info.manifest)),
                       timeout=self._small)
        except Exception as exc:  # noqa: BLE001 - the node retries its PutData later
            log.info("could not confirm stripe %d of job %r step %d to node %d: %s", stripe, job,
                     step, slot, exc)
        finally:
            self.links.close_thread()

    # ------------------------------------------------------------------ dropped versions

    def node_dropped(self, job: str, steps: set[int],
                     timeline: tuple[int, int] | None = None) -> None:
        """This node no longer holds ``steps`` of ``job`` (dropped): tell the group's parity
        holders, which free the parity of the stripes this node's data is part of.
        ``timeline``: the (token, base) of the restore that dropped them (see
        :meth:`new_timeline`).

        A drop that lowers this node's floor (a restore that started a new timeline) is
        pushed at once (an urgent report, forwarded at once by every relay), and taken by
        this node's overlay neighbours before the drop returns: until the others hear it, a
        node that commits a newer step could let the step this node now relies on go. The
        nodes further away (tree mode) may take it later than the first commit of the new
        timeline: the timeline's token in every report is what keeps them from raising a pin
        on this node's stale report meanwhile (:func:`on_timeline`)."""
        renewed = timeline is not None and self.new_timeline(job, *timeline)
        now = self.store.stamp(durable=True)     # ordered after every commit here, whatever
        with self._lock:                         # the wall clock did (issue 25, finding 3)
            for step in steps:
                self._dropped_here[(job, step)] = now
            while len(self._dropped_here) > _MAX_DROPPED_KEPT:     # oldest first
                del self._dropped_here[next(iter(self._dropped_here))]
            last = self._floors.get(self.me, {}).get(job)
            if self._pin.get(job, -1) in steps:  # a new timeline: the pin was dropped
                del self._pin[job]
                self.store.pins = {j: p for j, p in self._pin.items() if p >= 0}
        if renewed or (steps and (last is None or self.job_floor(job) < last)):
            self.push()
        if self.group.m == 0 or not steps:
            return
        with self._lock:
            for key in [k for k in self._sent if k[0] == job and k[1] in steps]:
                del self._sent[key]
        self._tell_dropped(job, steps, now)

    def adopt_timelines(self, job: str | None = None) -> None:
        """A replacement, its memory rebuilt from its group, takes for every job it holds no
        timeline of (or for ``job``) the one the other nodes report most (then the higher
        base): its versions were rebuilt from the parity of that timeline, or its trainers go
        on with it. Without it the others would count its reports only up to their base
        until the job restores again (review of the timelines, F2). A timeline taken so is
        taken again whenever the others' reports move to another (it may have been taken
        from stale reports, behind a partition), until this node's own ranks restore."""
        jobs = {v.job for v in self.store.versions()} if job is None else {job}
        with self._lock:
            if self._take_timelines(jobs - set(self._timelines)):
                self._save_floors()

    def _take_timelines(self, jobs: set[str]) -> bool:
        """Take the others' timeline of ``jobs`` (lock held); whether one changed."""
        changed = False
        for job in sorted(jobs):
            best = self._others_timeline(self._views(job, skip=self.me, timeline=False))
            if best is None:
                continue
            if self._timelines.get(job) != best:
                self._timelines[job] = best
                self._adopted.add(job)
                changed = True
                log.info("job %r: timeline %x from step %d, as the others report", job,
                         *best)
        return changed

    def new_timeline(self, job: str, token: int, base: int) -> bool:
        """A restore of this node's ranks started a new timeline of ``job`` from step ``base``
        (-1: from nothing), which the job's ranks named ``token`` (every rank of one restore
        sends the same): from now on this node's reports carry it, and a report of another
        node that carries another timeline counts for the job-wide step only up to the base
        (:func:`on_timeline`). Step numbers above the base are reused by the new timeline, so
        a stale report of the old one, relayed late, would otherwise let a pin rise to a step
        that node does not hold. Returns whether the timeline changed."""
        if not token:
            return False
        with self._lock:
            self._adopted.discard(job)                  # this node's own restore now
            if self._timelines.get(job) == (token, base):
                return False
            self._timelines[job] = (token, base)
            self._save_floors()
        log.info("job %r: new timeline %x from step %d", job, token, base)
        return True

    def abandoned(self, job: str, step: int, manifest: str) -> bool:
        """This node dropped (job, step) after the version ``manifest`` describes was
        committed: rebuilding it would bring an abandoned timeline back (a rebuild that
        raced the drop, from parity the group has not freed yet)."""
        with self._lock:
            dropped = self._dropped_here.get((job, step))
        return dropped is not None and _committed_at(manifest) <= dropped

    def _tell_dropped(self, job: str, steps: set[int], at: float) -> None:
        """Tell the group's other nodes that this node's versions of ``steps`` committed up
        to ``at`` are gone (now, or once a node that is down is up again)."""
        msg = pp.Dropped(job, self.me, tuple(sorted(steps)), at)
        for slot in self.group.slots:
            if slot == self.me:
                continue
            if self.up(slot):
                self._notices.submit(self._notify, slot, msg)
            else:                       # told once it is up (resend_drops)
                with self._lock:
                    self._undelivered.setdefault(slot, []).append(msg)
                    del self._undelivered[slot][:-_MAX_UNDELIVERED]

    def _notify(self, slot: int, msg: Any) -> None:
        """Tell ``slot`` about a drop; a peer that cannot be told now is told again once it
        is up (:meth:`resend_drops`), so drops converge."""
        try:
            self._call(slot, msg, timeout=self._small)
        except Exception as exc:  # noqa: BLE001 - kept and sent again later
            log.warning("node %d did not hear that job %r steps %s were dropped here (told "
                        "again once it answers): %s", slot, msg.job, list(msg.steps), exc)
            with self._lock:
                pending = self._undelivered.setdefault(slot, [])
                if msg not in pending:
                    pending.append(msg)
                del pending[:-_MAX_UNDELIVERED]
        finally:
            self.links.close_thread()

    def resend_drops(self) -> int:
        """Send again the drop notices a peer missed, to the peers that are up now."""
        with self._lock:
            due = {slot: msgs for slot, msgs in self._undelivered.items()
                   if msgs and self.up(slot)}
            for slot in due:
                del self._undelivered[slot]
        for slot, msgs in due.items():
            for msg in msgs:
                self._notices.submit(self._notify, slot, msg)
        return sum(len(m) for m in due.values())

    def on_dropped(self, msg: pp.Dropped) -> None:
        if msg.src not in self.group.slots or msg.src == self.me:
            raise StoreError("bad_request", f"node {msg.src} is not a peer of node {self.me} "
                             f"in group {self.group.index}")
        self._drop_parity(msg.src, msg.job, set(msg.steps), msg.at)

    def _drop_parity(self, src: int, job: str, steps: set[int], at: float = 0.0) -> None:
        """Free the parity of (job, step) in every stripe ``src`` is a data node of: that
        version is an abandoned timeline, and a rebuild must not bring it back. With ``at``,
        only parity of versions ``src`` committed before ``at`` (not of a newer timeline)."""

        def before(frags: Any) -> bool:
            mine = [f for f in frags if f.src == src]
            return not at or not mine or _committed_at(mine[0].manifest) <= at

        with self._lock:
            if at:
                for step in steps:
                    key3 = (src, job, step)
                    inc = max(0, self._marks.get(src, (0, 0))[0])
                    old = self._dropped_by.pop(key3, (at, inc))
                    self._dropped_by[key3] = (max(old[0], at) if old[1] == inc else at, inc)
                while len(self._dropped_by) > _MAX_DROPPED_KEPT:     # oldest first
                    del self._dropped_by[next(iter(self._dropped_by))]
            gone = [key for key, r in self._parity.items() if key[0] == job
                    and key[2] in steps and src in self.stripes[key[1]].data
                    and before(r.frags)]
            for key in gone:
                self._forget(key)
            for key in [k for k, a in self._assembling.items() if k[0] == job
                        and k[1] in steps and before(info for info, _ in a.frags.values())]:
                self._inflight -= self._assembling.pop(key).nbytes
        if gone:
            log.info("freed %d parity fragments of job %r steps %s dropped by node %d",
                     len(gone), job, sorted(steps), src)

    def on_put_parity(self, msg: pp.PutParity, frames: list[Any]) -> None:
        stripe = self._stripe(msg.stripe)
        if not 0 < msg.index < self.group.m or stripe.parity[msg.index] != self.me:
            raise StoreError("bad_request", f"node {self.me} does not hold parity {msg.index} "
                             f"of stripe {msg.stripe}")
        if sum(memoryview(f).nbytes for f in frames) != msg.length:
            raise StoreError("corrupt", f"parity {msg.index} of stripe {msg.stripe}: payload is "
                             f"not the {msg.length} bytes the header declares")
        buf = contiguous(frames, msg.length)
        if frames_checksum([buf]) != msg.checksum:
            raise StoreError("corrupt", f"parity {msg.index} of stripe {msg.stripe} for job "
                             f"{msg.job!r} step {msg.step}: length or checksum mismatch")
        self._keep(ParityRecord(msg.job, msg.step, msg.stripe, msg.index, msg.length,
                                msg.frags, bytearray(buf), msg.checksum))

    def _keep(self, record: ParityRecord) -> None:
        self.store.make_room(record.length)
        used = self.store.stats()["bytes_used"]
        with self._lock:                # a record it replaces is freed
            old = self._parity.get((record.job, record.stripe, record.step))
        if used - (old.length if old else 0) + record.length > self.store.memory_limit:
            raise StoreError("memory_full", f"no room for {record.length} parity bytes: "
                             f"{used} of {self.store.memory_limit} in use")
        with self._lock:
            if self._closed:
                raise StoreError("shutting_down", "the daemon is shutting down; retry on restart")
            gone = self._was_dropped(record.job, record.step, record.frags)
            if gone is not None:     # a drop came while it was encoded or forwarded
                raise StoreError("dropped", f"node {gone.src} dropped this version of job "
                                 f"{record.job!r} step {record.step}: its parity is not kept")
            key = (record.job, record.stripe, record.step)
            try:
                self.files.write(record)
            except OSError as exc:
                raise StoreError("memory_full", f"cannot keep {record.length} parity bytes in "
                                 f"{self.files.path}: {exc.strerror}") from None
            self._forget(key)
            self._parity[key] = record
            self._retain_parity(record.job, record.stripe)

    def _mark_complete(self, job: str, stripe: int, step: int) -> None:
        with self._lock:
            record = self._parity.get((job, stripe, step))
            if record is not None and not record.complete:
                record.complete = True
                self._update(record)
                self._retain_parity(job, stripe)

    def _retain_parity(self, job: str, stripe: int) -> None:
        """Keep the newest ``keep`` steps of a stripe, its two newest complete ones, and every
        step that a data node of the stripe may hold as its newest protected one (lock held).

        A data node's newest protected step is the newest one whose ``k`` stripes are all
        complete, so a stripe that is ahead of a slower stripe of the same data node must keep
        the older step: each fragment says which step its sender held as protected
        (``FragInfo.floor``); the newest such report per data node is kept. A node that is
        lost sends nothing more, so its last protected step stays restorable."""
        records = sorted((r for (j, st, _), r in self._parity.items()
                          if j == job and st == stripe), key=lambda r: -r.step)
        keep = {r.step for r in records[:self.keep]}
        keep |= {r.step for r in [r for r in records if r.complete][:2]}
        floors: dict[int, int] = {}
        for r in records:
            for f in r.frags:
                floors[f.src] = max(floors.get(f.src, -1), f.floor)
        keep |= set(floors.values())
        pinned = self.store.pins.get(job)
        if pinned is not None:
            keep.add(pinned)
        if pinned is not None or self.store.hold_unpinned:
            low = -1 if pinned is None else pinned
            keep |= {r.step for r in records if r.step > low}
        for r in records:
            if r.step not in keep:
                self._forget((job, stripe, r.step))

    # ------------------------------------------------------------------ job-wide retention

    def report(self) -> pp.Held:
        """This node's next report, taken as its own newest: its floors (only ``recovering``
        while it is still rebuilding: it holds too little yet to speak for its ranks), with
        the next sequence number of this incarnation."""
        with self._report_lock:
            if not self.ready():
                msg = pp.Held(self.me, (), recovering=True)
            else:
                jobs = sorted({v.job for v in self.store.versions()})
                msg = pp.Held(self.me, tuple(pp.JobFloor(job, *self.node_view(job))
                                             for job in jobs))
            return self._learn(msg, own=True)

    def push(self) -> None:
        """Report now (after a drop that lowered a floor): through the relay, urgently, once
        this node's overlay neighbours took it (at most ``report_timeout``)."""
        if self.relay is None:
            self.report()
        else:
            self.relay.push(self.report_timeout)

    @property
    def report_to(self) -> list[int] | None:
        """The other nodes of the cluster (None until the cluster sets it: no job-wide step
        is computed before). Setting it forgets what was heard of any other slot (a report
        from outside the cluster kept in floors.json, issue 25 finding 7)."""
        return self._report_to

    @report_to.setter
    def report_to(self, others: list[int] | None) -> None:
        with self._lock:
            self._report_to = None if others is None else list(others)
            if others is None:
                return
            known = {self.me, *others}
            foreign = {slot for slot in {*self._floors, *self._held, *self._marks,
                                         *self._latest} if slot not in known}
            for slot in foreign:
                for table in (self._floors, self._held, self._marks, self._floor_marks,
                              self._latest, self._report_at, self._recovering):
                    table.pop(slot, None)
                self._accepted.discard(slot)
            if foreign:
                log.warning("forgot the reports of slots %s: not nodes of this cluster",
                            sorted(foreign))
                self._held_gen += 1

    def in_cluster(self, slot: int) -> bool:
        """Whether ``slot`` is a node of this cluster (any slot >= 0 before the cluster set
        :attr:`report_to`)."""
        others = self._report_to
        return slot == self.me or (slot >= 0 if others is None else slot in others)

    def on_held(self, msg: pp.Held) -> bool:
        """Take another node's report if it is newer than the one held for it. A report of a
        slot that is not a node of this cluster is refused (it would hold the job-wide step
        back for good: issue 25, finding 7)."""
        if msg.src == self.me:
            raise StoreError("bad_request", f"node {msg.src} is this node")
        if not self.in_cluster(msg.src):
            raise StoreError("bad_request", f"node {msg.src} is not a node of this cluster")
        return self._learn(msg) is not None

    def _learn(self, msg: pp.Held, own: bool = False) -> Any:
        """Take ``msg`` (``own``: this node's, given its mark here); None when it is not newer
        than the report held for its origin (relayed late, or twice). Returns the report."""
        return self.learn_all([msg], own)[0]

    def learn_all(self, msgs: Sequence[pp.Held], own: bool = False) -> list[Any]:
        """Take the reports of one batch (see :meth:`_learn`), then set the pins once."""
        taken: list[Any] = []
        with self._lock:
            moved = False
            for msg in msgs:
                if not own and not self.in_cluster(msg.src):
                    taken.append(None)            # never a slot outside the cluster
                    continue
                got, changed = self._take(msg, own)
                taken.append(got)
                moved |= changed
            if not moved:
                return taken
            if self._adopted:
                self._take_timelines(set(self._adopted))
            before = dict(self.store.pins)
            self._set_pins()
            self._save_floors()
            changed_jobs = {job for job in {*before, *self.store.pins}
                            if before.get(job) != self.store.pins.get(job)}
        for job in changed_jobs:                 # what the new job-wide steps let go
            self.store.retain_job(job)
            with self._lock:
                for stripe in self.stripes:
                    self._retain_parity(job, stripe)
        return taken

    def _take(self, msg: pp.Held, own: bool) -> tuple[Any, bool]:
        """Take one report (lock held): (the report or None when not newer, whether what is
        known of its node changed)."""
        if own:
            self._seq += 1
            now = self._clock()
            holding = tuple(sorted(slot for slot, t in self._recovering.items()
                                   if now - t < self.recovering_hold))
            msg = dataclasses.replace(msg, inc=self.inc, seq=self._seq, holding=holding)
        elif msg.mark <= self._marks.get(msg.src, (-1, -1)):
            return None, False
        self._marks[msg.src] = msg.mark
        self._latest[msg.src] = msg
        self._accepted.add(msg.src)
        self._report_at[msg.src] = self._clock()
        if msg.recovering:
            if not own:
                self._recovering[msg.src] = self._clock()
            return msg, False
        floors = {j.job: j.floor for j in msg.jobs}
        held = {j.job: NodeView(j.floor, tuple(j.held), tuple(j.ranks), j.world, j.pin,
                                tuple(j.protected), j.timeline, j.base, j.run, j.owner)
                for j in msg.jobs}
        self._floor_marks[msg.src] = msg.mark
        back = self._recovering.pop(msg.src, None) is not None
        if not back and (self._floors.get(msg.src) == floors
                         and self._held.get(msg.src) == held):
            return msg, False
        self._floors[msg.src] = floors
        self._held[msg.src] = held
        self._held_gen += 1
        return msg, True

    def heard_of_self(self, msg: pp.Held) -> None:
        """A relayed report of this very slot: from an earlier incarnation whose clock was
        ahead of this one's, this daemon takes a higher incarnation (else its reports would
        be refused as older until the clock caught up)."""
        with self._report_lock, self._lock:
            if msg.mark > (self.inc, self._seq):
                log.warning("a report of this slot from incarnation %d (this one is %d): "
                            "taking incarnation %d", msg.inc, self.inc, msg.inc + 1)
                self.inc, self._seq = msg.inc + 1, 0

    def latest(self) -> dict[int, pp.Held]:
        """The newest report taken of every node (this node's too): what the relay forwards."""
        with self._lock:
            return dict(self._latest)

    def views(self, job: str, timeline: bool = False) -> dict[int, NodeView]:
        """slot -> what it last reported of ``job`` (see :meth:`_views`), for the readers
        (remote reads, ``Where``, drops elsewhere)."""
        with self._lock:
            return self._views(job, timeline=timeline)

    def _views(self, job: str, skip: int | None = None,
               timeline: bool = True) -> dict[int, NodeView]:
        """slot -> what it reported of ``job``, for every node that did (lock held); with
        ``timeline``, a report of another timeline than this node's only up to the steps
        the two share (:func:`on_timeline`)."""
        views = {slot: self._held.get(slot, {}).get(job, NodeView(f[job]))
                 for slot, f in self._floors.items() if job in f and slot != skip}
        if not timeline:
            return views
        token, base = self._timelines.get(job, (0, -1))
        return {slot: on_timeline(v, token, base) for slot, v in views.items()}

    def _set_pins(self) -> None:
        """The job-wide step of every job (lock held): the newest :func:`job_wide` gave, and
        only one this node's own report says it holds; lower only once a node reports that it
        no longer holds it (a lower pin keeps more)."""
        jobs = {job for floors in self._floors.values() for job in floors}
        for job in set(self._pin) - jobs:        # a job no node holds any more
            del self._pin[job]
        # Only once every node of the cluster has reported (now or before a restart): a node
        # not heard yet may hold the job's older steps only.
        everyone = self.report_to is not None and set(self._floors) >= {self.me,
                                                                         *self.report_to}
        # While a node recovers, no pin goes up: its last report (from before it was lost or
        # restarted) may list steps it is not rebuilding, and it rebuilds the pins it hears
        # of (Recovery.catch_up); a higher pin now could let go the step it is rebuilding.
        now = self._clock()
        hold = any(now - t < self.recovering_hold for t in self._recovering.values())
        for job in jobs:
            views = self._views(job)
            step = job_wide(views) if everyone and self.me in views else -1
            views = current_views(views)
            # Whether a node no longer holds the pin: by what it reported, not capped to this
            # node's timeline (a stale report of an older timeline holds it back from rising,
            # it must not make it fall: a pin below what every node holds keeps nothing).
            raw = current_views(self._views(job, timeline=False))
            pin = new = self._pin.get(job, -1)
            if pin >= 0 and any(v.held and pin not in v.held for v in raw.values()):
                # A node no longer holds the pin (it restored an older step: a new timeline;
                # or it was replaced): the pin goes to what is common now, which keeps more
                # (not higher while a node recovers).
                new = min(step, pin) if hold else step
            elif step > pin and not hold:
                new = step
            if new != pin:
                self._pin[job] = new
                log.log(logging.DEBUG if new > pin else logging.INFO,
                        "job %r: job-wide step %d -> %d (reports: %s)", job, pin, new,
                        {slot: (v.floor, v.held, v.pin) for slot, v in sorted(views.items())})
        self.store.pins = {job: pin for job, pin in self._pin.items() if pin >= 0}

    # The floors are kept in a file next to the segments, so that a daemon restarted on its
    # memory goes on from what it knew: with only its own floor it would let the job-wide step
    # go (a peer that is down, or has not reported yet, may be the one holding it).

    def _floors_path(self) -> str:
        return os.path.join(self.store.dir.path, "floors.json")

    def _load_floors(self) -> None:
        """Take the job-wide retention state a previous daemon on this memory kept (see
        :class:`SavedFloors`); a file that cannot be trusted (not sealed, or sealed by another
        text, a field missing or of the wrong type) is ignored with a warning naming it and
        what was wrong: the job-wide steps are then learnt again from the peers."""
        saved, problem = read_sealed(self._floors_path())
        if saved is None and not problem:
            return                                          # no file: a first start
        try:
            if saved is None or problem:
                raise p.ProtocolError("malformed", problem or "not a JSON object")
            loaded = _decode_floors(saved)
        except p.ProtocolError as exc:
            log.warning("ignored %s: %s; the job-wide steps are learnt again from the peers",
                        self._floors_path(), exc.message)
            return
        self._floors, self._held, marks, self._pin, self._timelines, self._adopted = loaded
        # Stale but standing: each node's floors count until a newer report of it comes, and
        # the relay forwards them as the report they came from (its mark; (0, 0) when the
        # file predates marks, which any report replaces).
        for slot, floors in self._floors.items():
            mark = marks.get(slot, (0, 0))
            self._floor_marks[slot] = self._marks[slot] = mark
            self._latest[slot] = pp.Held(
                slot, tuple(pp.JobFloor(job, *self._held.get(slot, {}).get(job, NodeView(f)))
                            for job, f in sorted(floors.items())), inc=mark[0], seq=mark[1])
        self.inc = max(self.inc, self._marks.get(self.me, (0, 0))[0] + 1)
        self._set_pins()

    def _save_floors(self) -> None:
        if self._closed:
            return
        path = self._floors_path()
        try:
            with open(path + ".tmp", "w") as fh:
                fh.write(seal(json.dumps(
                    {"floors": {str(s): f for s, f in self._floors.items()},
                     "held": {str(s): h for s, h in self._held.items()},
                     "marks": {str(s): list(m) for s, m in self._floor_marks.items()},
                     "pins": self._pin,
                     "timelines": {j: list(t) for j, t in self._timelines.items()},
                     "adopted": sorted(self._adopted)}, separators=(",", ":"))))
            os.replace(path + ".tmp", path)
        except OSError as exc:
            log.warning("could not keep the job-wide steps in %s: %s", path, exc)

    def reported(self, slot: int) -> bool:
        """Whether a report of ``slot`` newer than any held before was taken since this
        daemon started (floors.json's, or one relayed late, do not count)."""
        with self._lock:
            return slot in self._accepted

    def _others_timeline(self, views: dict[int, NodeView]) -> tuple[int, int] | None:
        """The timeline the other nodes' ``views`` of a job report most (lock held), counting
        only the nodes heard from lately when any was: a node that stopped reporting (down,
        cut off) speaks of the timeline it was on then, and must not outvote, or tie with,
        the ones that took part in a restore since (review of session 11, F2)."""
        heard = self._heard_lately()
        best = most_reported({slot: v for slot, v in views.items() if slot in heard})
        return best if best is not None else most_reported(views)

    def others_floor(self, job: str) -> int | None:
        """The job-wide step of ``job`` by the other nodes' reports (None: none): the newest
        pin one of them reports (a step every node held when it was adopted, which its node
        keeps), else the step their reports have in common."""
        with self._lock:
            views = self._views(job, skip=self.me, timeline=False)
            best = self._others_timeline(views)
        # Of the timeline the others report (the one this node takes, adopt_timelines): a
        # stale report of another one counts only up to the steps both share, its pin too (a
        # pin of an abandoned timeline, above the new base, names a step no node keeps).
        if best is not None:
            views = {slot: on_timeline(v, *best) for slot, v in views.items()}
        pins = [v.pin for v in views.values() if v.pin >= 0]
        if pins:
            return max(pins)
        pin = job_wide(views, every_rank=False)     # this node's own ranks are being rebuilt
        return pin if pin >= 0 else None

    def report_marks(self) -> dict[int, tuple[int, int]]:
        """The newest report's mark taken of every node (see Recovery: it waits for newer
        reports that say they heard it recovers)."""
        with self._lock:
            return dict(self._marks)

    def heard_holding(self, before: dict[int, tuple[int, int]], slot: int) -> set[int]:
        """The nodes whose newest report is newer than ``before`` says and lists ``slot`` in
        ``holding``: the job-wide steps they report were set after they heard that ``slot``
        recovers, and stay where they are while it does."""
        with self._lock:
            return {src for src, msg in self._latest.items()
                    if msg.mark > before.get(src, (-1, -1)) and slot in msg.holding}

    def reporting(self) -> set[int]:
        """The other nodes (all groups) heard from lately: a newer report of theirs was taken
        within ``recovering_hold`` (a stale one relayed late does not count)."""
        with self._lock:
            return self._heard_lately()

    def _heard_lately(self) -> set[int]:
        """:meth:`reporting`, the lock held."""
        now = self._clock()
        return {slot for slot, at in self._report_at.items()
                if slot != self.me and now - at < self.recovering_hold}

    def pin(self, job: str) -> int | None:
        """The job-wide step: the lowest newest-protected step of all nodes holding ``job``."""
        return self.store.pins.get(job)

    def housekeeping(self) -> None:
        self.expire()
        self.retry()
        self.resend_drops()

    def expire(self) -> int:
        """Drop stripes whose data fragments did not all arrive within ``encode_timeout``;
        ask the data nodes for the fragments of stripes still waiting after a moment (a node
        that committed the step again, or on a new timeline, sends alone)."""
        now = self._clock()
        with self._lock:
            old = [key for key, a in self._assembling.items()
                   if now - a.started > self.encode_timeout]
            for key in old:
                self._inflight -= self._assembling.pop(key).nbytes
            waiting = [key for key, a in self._assembling.items() if not a.pulling
                       and now - max(a.started, a.pulled) > min(1.0, self.encode_timeout / 2)]
            for key in waiting:
                self._assembling[key].pulling = True
        for job, step, stripe in waiting:
            self._pool.submit(self._pull, job, step, self.stripes[stripe])
        for job, step, stripe in old:
            log.warning("stripe %d of job %r step %d: data fragments missing after %.0fs; "
                        "that version stays unprotected", stripe, job, step, self.encode_timeout)
        return len(old)

    def _stripe(self, index: int) -> Stripe:
        stripe = self.stripes.get(index)
        if stripe is None:
            raise StoreError("bad_request", f"stripe {index} is not in group {self.group.index}")
        return stripe

    # ------------------------------------------------------------------ serving rebuilds

    def inventory(self) -> pp.InventoryReply:
        held = {(v.job, v.step) for v in self.store.versions()}
        data = []
        for job, step in sorted(held):
            nv = self.node_version(job, step)
            if nv is not None:
                data.append(pp.DataHolding(job, step, nv.total))
        with self._lock:
            parity = tuple(r.holding() for r in self._parity.values())
        return pp.InventoryReply(self.me, tuple(data), parity)

    def get_data(self, msg: pp.GetData) -> tuple[pp.Chunk, list[Any]]:
        """Serve one chunk of a node version, after checking its tensors against their
        checksums: damaged bytes must not be decoded into a rebuild or encoded into parity."""
        leases, nv = self._lease_node_version(msg.job, msg.step)
        try:
            if msg.vid and self.vid(nv) != msg.vid:
                raise StoreError("not_found", f"job {msg.job!r} step {msg.step} on node "
                                 f"{self.me} is another version than the one asked for")
            cs = chunk_size(nv.total, self.group.k)
            start, offset = msg.frag * cs, 0
            for v in nv.versions:
                bad = self.store.verify(v, start - offset, start + cs - offset)
                offset += v.nbytes
                if bad:
                    if self.metrics is not None:
                        self.metrics.checksum_failures.inc()
                    raise StoreError("corrupt", f"job {msg.job!r} rank {v.rank} step {msg.step} "
                                     f"on node {self.me}: tensors {bad[:4]} fail their checksums")
            length = max(0, min(cs, nv.total - start))
            payload = bytes(contiguous(nv.chunk_frames(self.store, start, length), length))
        finally:
            for lease in leases:
                self.store.release(lease)
        manifest = nv.manifest(self.me, self.store.owner(nv.job))
        return pp.Chunk(length, frames_checksum([payload]), manifest,
                        self.floor(msg.job)), [payload]

    def get_parity(self, msg: pp.GetParity) -> tuple[pp.Chunk, list[Any]]:
        with self._lock:
            record = self._parity.get((msg.job, msg.stripe, msg.step))
        if record is None or record.index != msg.index:
            raise StoreError("not_found", f"no parity {msg.index} of stripe {msg.stripe} for "
                             f"job {msg.job!r} step {msg.step} on node {self.me}")
        if frames_checksum([record.buf]) != record.checksum:
            if self.metrics is not None:
                self.metrics.checksum_failures.inc()
            raise StoreError("corrupt", f"parity {msg.index} of stripe {msg.stripe} on node "
                             f"{self.me} fails its checksum")
        return pp.Chunk(record.length, record.checksum), [record.buf]

    def store_parity(self, record: ParityRecord) -> None:
        """Keep a parity record re-created by a rebuild."""
        self._keep(record)

    def parity_bytes(self) -> int:
        """Bytes of parity kept (read without the lock: see ``locks.Tally``)."""
        return int(self._parity.total)

    def parity_records(self) -> list[ParityRecord]:
        with self._lock:
            return list(self._parity.values())

    def _update(self, record: ParityRecord) -> None:
        """Write a kept record's changed description (lock held)."""
        if record.number:
            try:
                self.files.update(record)
            except OSError as exc:
                log.warning("parity file %d not updated: %s", record.number, exc)

    def close(self) -> None:
        """Stop (a graceful stop also removes the parity files, like the segments)."""
        self._stopping = True                    # sends stop waiting for a connection
        # Sends still queued are dropped (this node's versions go with it): only those
        # running are waited for, and they give up within a quarter second.
        self._scrub_stop.set()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._notices.shutdown(wait=True, cancel_futures=True)
        if self._scrub_thread is not None:
            self._scrub_thread.join(timeout=5)
        with self._lock:
            self._closed = True                  # nothing is written after this
            for key in list(self._parity):
                self._forget(key)
            try:
                os.unlink(self._floors_path())
            except FileNotFoundError:
                pass


#: Bytes of adopted parity the background scrub reads at most per second, and per piece.
_SCRUB_RATE = 256 << 20
_SCRUB_PIECE = 4 << 20
#: Local drops remembered (for abandoned()): the oldest go first beyond that.
_MAX_DROPPED_KEPT = 4096
#: Drop notices kept per unreachable peer (the oldest go first beyond that).
_MAX_UNDELIVERED = 1024


class NodeView(NamedTuple):
    """What one node reported of one job (a :class:`~snapshotd.cluster.peerproto.JobFloor`)."""

    floor: int
    held: tuple[int, ...] = ()
    ranks: tuple[int, ...] = ()
    world: int = 0
    pin: int = -1
    protected: tuple[int, ...] = ()
    #: The timeline the node's ranks last restored: its token (0: none) and base step.
    timeline: int = 0
    base: int = -1
    #: The run identity of the node's newest version, and the token digest the job is bound
    #: to there ("": none; see :class:`~snapshotd.cluster.peerproto.JobFloor`).
    run: str = ""
    owner: str = ""


def on_timeline(view: NodeView, token: int, base: int) -> NodeView:
    """``view`` (another node's report of a job) as far as it speaks of this node's timeline
    (``token`` from step ``base``; token 0: the job never restored here): all of it when its
    timeline is the same; else only the steps up to the lower base of the two (a timeline
    without a token has none), the only step numbers both timelines certainly share. Either
    the report is stale (its node restored since, in the restore this node's ranks took part
    in, and its steps above the base are abandoned or reused), or this node has not restored
    yet (its own steps above the base are about to go).

    >>> V = NodeView
    >>> old = V(10, (8, 9, 10), (1,), 2, 8, (8, 9, 10))   # a stale report, before the restore
    >>> on_timeline(old, 0x51, 8)[:6]
    (8, (8,), (1,), 2, 8, (8,))
    >>> on_timeline(V(10, (8, 9, 10), timeline=0x51, base=8), 0x51, 8).held  # same timeline
    (8, 9, 10)
    >>> on_timeline(V(9, (5, 9), timeline=0x52, base=5), 0x51, 8).held  # an older restore
    (5,)
    >>> on_timeline(V(7, (7,), timeline=0x51, base=-1), 0, -1).held     # it started over
    ()
    """
    if view.timeline == token:
        return view
    cap = min(b for t, b in ((token, base), (view.timeline, view.base)) if t)
    return view._replace(floor=min(view.floor, cap),
                         held=tuple(s for s in view.held if s <= cap),
                         protected=tuple(s for s in view.protected if s <= cap),
                         pin=min(view.pin, cap))


def most_reported(views: dict[int, NodeView]) -> tuple[int, int] | None:
    """The timeline (token, base) most of ``views`` report (then the higher base, then the
    higher token); None when none reports one.

    >>> V = NodeView
    >>> most_reported({1: V(9, timeline=0x51, base=8), 2: V(9, timeline=0x51, base=8),
    ...                3: V(12, timeline=0x52, base=3), 4: V(5)})
    (81, 8)
    >>> most_reported({1: V(5)}) is None
    True
    """
    seen = collections.Counter((v.timeline, v.base) for v in views.values() if v.timeline)
    if not seen:
        return None
    return max(seen.items(), key=lambda kv: (kv[1], kv[0][1], kv[0][0]))[0]


def current_views(views: dict[int, NodeView]) -> dict[int, NodeView]:
    """The reports of the nodes that hold the job's *current layout*: the world size its
    newest step was saved with (the world of the reports whose newest held step is the
    highest, when they agree on one). A node whose newest version is of another layout (the
    ranks a job restarted at another world size left behind) does not count for the job-wide
    step: its old steps would hold the step back forever, and nothing would be evicted.

    >>> V = NodeView
    >>> sorted(current_views({0: V(5, (4, 5), (0, 1), 2), 1: V(3, (1, 2, 3), (2, 3), 4)}))
    [0]
    >>> sorted(current_views({0: V(3, (3,), (0,), 2), 1: V(3, (3,), (1,), 4)}))   # ambiguous
    [0, 1]
    """
    newest = {slot: max(v.held, default=-1) for slot, v in views.items()}
    top = max(newest.values(), default=-1)
    worlds = {views[slot].world for slot, n in newest.items() if n == top}
    if top < 0 or len(worlds) != 1 or not (world := worlds.pop()):
        return views
    return {slot: v for slot, v in views.items() if v.world in (world, 0)}


def job_wide(views: dict[int, NodeView], every_rank: bool = True) -> int:
    """The step every node of one job can agree to keep, from every node's last report: the
    newest step in every node's ``held`` that is no newer than every node's ``floor`` (its
    newest protected step), preferring the newest such step every node holds *protected*
    (a single node loss cannot take that one; a step held but not protected somewhere, whose
    first encode was given up, is the answer only when no step is protected everywhere), or
    -1 when there is none, or while some rank of the job (by ``world``) is in no report
    (unless not ``every_rank``: a replacement asks what the others agree on). From a daemon
    whose reports have no ``held``: the lowest floor.

    A node's *pin* (the job-wide step) is the highest this ever gave it; it never evicts its
    pin nor any step newer than it (newer ones give way only when memory is needed). That
    makes the newest pin of any node a step every node still holds: the node that adopted it
    saw every node report it, and a node evicts a step only below its own pin, which is no
    higher. Without the second rule, nodes saving faster than a heartbeat round evicted the
    step a slower node reported next, and the job was left without a common step.

    >>> V = NodeView
    >>> job_wide({0: V(5, (2, 3, 4, 5)), 1: V(5, (2, 4, 5)), 2: V(3, (2, 3))})
    2
    >>> job_wide({0: V(2, (2, 3, 4, 5)), 1: V(5, (3, 4, 5))})     # 3-5: not protected on 0
    -1
    >>> job_wide({0: V(5, (3, 4, 5), (0,), 3), 1: V(3, (2, 3), (1,), 3)})   # rank 2 unheard
    -1
    >>> job_wide({0: V(4, (3, 4), protected=(4,)), 1: V(4, (3, 4), protected=(3, 4)),
    ...           2: V(3, (3,), protected=(3,))})   # 3 is not protected on node 0: no such step
    3
    >>> job_wide({0: V(5, (3, 4, 5), protected=(3, 5)), 1: V(4, (3, 4), protected=(3, 4))})
    3
    >>> job_wide({0: V(5, (3, 4, 5)), 1: V(4, (3, 4))})       # reports without protected
    4
    >>> job_wide({0: V(5, (3, 4, 5)), 1: V(4, ())})     # node 1's ranks share no step
    -1
    """
    views = current_views(views)
    if not views:
        return -1
    low = min(v.floor for v in views.values())
    helds = [set(v.held) for v in views.values()]
    world = max(v.world for v in views.values())
    heard = {r for v in views.values() for r in v.ranks}
    if every_rank and world and len(heard) < world:
        return -1
    if not any(helds):                  # daemons that predate ``held``
        return low
    if not all(helds):                  # a node whose ranks hold no step in common
        return -1
    candidates = {s for s in set.intersection(*helds) if s <= low}
    safe = candidates.intersection(*(set(v.protected) for v in views.values()))
    return max(safe or candidates, default=-1)


@dataclass(frozen=True)
class SavedFloors:
    """``floors.json`` (see ``Protector._load_floors``) as a restarted daemon reads it back,
    with the protocol's typed decoding; slots are object keys (decimal strings), each view of
    ``held`` a list of :class:`NodeView`'s fields in order (4 to 10 of them: older daemons
    wrote fewer), each mark and timeline a pair."""

    floors: dict[str, dict[str, int]]
    held: dict[str, dict[str, list]]            # type: ignore[type-arg]
    marks: dict[str, tuple[int, ...]]
    pins: dict[str, int]
    timelines: dict[str, tuple[int, ...]]
    adopted: tuple[str, ...]
    check: str = ""


def _slot_key(key: str, where: str) -> int:
    if not key.isdigit() or len(key) > 9:
        raise p.ProtocolError("malformed", f"{where}: {key!r} is not a node slot")
    return int(key)


def _pair(value: tuple[int, ...], where: str) -> tuple[int, int]:
    if len(value) != 2:
        raise p.ProtocolError("malformed", f"{where} must be a pair of integers")
    return value[0], value[1]


def _decode_floors(saved: dict[str, Any]) -> tuple[
        dict[int, dict[str, int]], dict[int, dict[str, NodeView]], dict[int, tuple[int, int]],
        dict[str, int], dict[str, tuple[int, int]], set[str]]:
    """The floors, views, marks, pins, timelines and adopted jobs of a sealed floors.json;
    raise :class:`~snapshotd.common.protocol.ProtocolError` naming what is wrong."""
    f = p.decode_as(SavedFloors, saved, "floors.json")
    floors = {_slot_key(s, "floors.json.floors"): jobs for s, jobs in f.floors.items()}
    held: dict[int, dict[str, NodeView]] = {}
    for slot, jobs in f.held.items():
        views = held.setdefault(_slot_key(slot, "floors.json.held"), {})
        for job, row in jobs.items():
            where = f"floors.json.held[{slot!r}][{job!r}]"
            if not 4 <= len(row) <= len(NodeView._fields):
                raise p.ProtocolError("malformed", f"{where} must list 4 to "
                                      f"{len(NodeView._fields)} fields of a report")
            jf = p.decode_as(pp.JobFloor, {"job": job, **dict(zip(NodeView._fields, row))},
                             where)
            views[job] = NodeView(*(getattr(jf, name) for name in NodeView._fields))
    marks = {_slot_key(s, "floors.json.marks"): _pair(m, f"floors.json.marks[{s!r}]")
             for s, m in f.marks.items()}
    timelines = {job: _pair(t, f"floors.json.timelines[{job!r}]")
                 for job, t in f.timelines.items()}
    return floors, held, marks, f.pins, timelines, set(f.adopted)


def _committed_at(manifest: str) -> float:
    """The newest commit time of the ranks in a node manifest (0 if unreadable)."""
    try:
        return max((float(r["committed_at"]) for r in json.loads(manifest)["ranks"]),
                   default=0.0)
    except (ValueError, KeyError, TypeError):
        return 0.0


def contiguous(frames: Sequence[Any], length: int) -> Any:
    """One buffer of ``length`` bytes: the single frame itself, or a zero-padded copy."""
    views = [memoryview(f).cast("B") for f in frames]
    if len(views) == 1 and views[0].nbytes == length:
        return views[0]
    out = bytearray(length)
    offset = 0
    for view in views:
        out[offset:offset + view.nbytes] = view
        offset += view.nbytes
    return out
