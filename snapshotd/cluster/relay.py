"""The relay of the job-wide retention reports (docs/protocol.md, "Job-wide retention";
docs/scale.md section 5).

Every report interval a daemon makes its own next report (``Protector.report``: a new sequence
number of its incarnation) and sends each of its overlay neighbours
(:mod:`snapshotd.cluster.overlay`) one ``Reports`` batch: the newest report it holds of every
node that this neighbour may lack, by what it knows the neighbour has (what it sent it and what
it received from it, by each report's mark). Which reports go where:

- to a group peer (every other node, when the overlay is flat): this node's own report; the
  reports that came into the group through this node (across a tree edge); and any report
  that has not changed for a while (``stable``: an origin that is down sends nothing newer),
  which makes the last report of a node that died converge on every member even when the
  member that brought it into the group died while passing it on;
- across a tree edge this node carries (it is the first member of its group's order for the
  edge that its heartbeats say is up): every report the member on the other side may lack.
  That member is the first of its group's order for the edge that has not failed to take a
  batch within ``retry`` seconds.

A receiver answers a batch with the reports its sender is not known to have (by the same
rules): an edge carries reports both ways whenever either side can reach the other, so a
carrier that its group's heartbeats keep as the gateway but that cannot reach the other group
(a cut link, a one-way partition) does not cut the tree: the other side reaches it, or falls
over to the next member of its group, and takes this group's reports from the answers.

A receiver takes a report only if it is newer than the one it holds of its origin, so one that
is relayed late, twice, or round a fall-over is refused, and a relay that is down only delays
what passes through it (nothing is made up, nothing is taken as newer than it is). A batch
that brings something new after a drop (``urgent``) is forwarded at once, not at the next
interval. The sockets to edge partners that are no longer used are closed after each round, so
a daemon's connections stay bounded by its group size and the fan-out
(:func:`overlay.worst_degree`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from ..common import locks
from ..node.store import StoreError
from . import peerproto as pp
from .overlay import Edge, Overlay, gateway

__all__ = ["ReportRelay"]

log = logging.getLogger("snapshotd.relay")

_NONE = (-1, -1)


class ReportRelay:
    """Sends and receives the report batches of one daemon."""

    def __init__(self, protector: Any, overlay: Overlay, links: Any, nodes: int,
                 up: Callable[[int], bool], interval: float, timeout: float, retry: float,
                 stable: float | None = None, metrics: Any = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.protector, self.overlay, self.links = protector, overlay, links
        self.me, self.nodes, self.up = overlay.me, nodes, up
        self.interval, self.timeout, self.retry = interval, timeout, retry
        self.stable = 3 * interval if stable is None else stable
        self.metrics = metrics
        self._clock = clock
        self._local = frozenset(overlay.local)
        self._lock = locks.lock("relay")
        #: neighbour -> origin -> the newest mark it is known to hold (sent to it, or received
        #: from it); forgotten when the neighbour restarts (a new incarnation).
        self._known: dict[int, dict[int, tuple[int, int]]] = {}
        self._incs: dict[int, int] = {}
        #: origin -> (when its newest report was taken, whether from outside the group).
        self._came: dict[int, tuple[float, bool]] = {}
        #: edge partner -> when it was given up (it took no batch for ``retry`` seconds; one
        #: that was given up before is given up again at its first miss), and since when one
        #: that was not has been missing batches.
        self._failed: dict[int, float] = {}
        self._missing: dict[int, float] = {}
        #: member of another group -> when it last sent this node a batch across a tree edge
        #: (it chose this node as its partner: what it is known to have is kept, for answers).
        self._across: dict[int, float] = {}
        self._urgent = False
        self._fresh = False
        self._wake = threading.Event()
        self._done = locks.condition("relay.done")
        self._pushed = 0
        self.stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="snapshotd-reports", daemon=True)
        #: Batches sent and received (also in metrics), for the scale tests.
        self.sent = 0
        self.received = 0

    # ------------------------------------------------------------------ the thread

    def start(self) -> ReportRelay:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self._wake.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        due = self._clock() + self.interval
        while not self.stopping.is_set():
            self._wake.wait(max(0.0, due - self._clock()))
            self._wake.clear()
            if self.stopping.is_set():
                break
            with self._lock:
                urgent, fresh = self._urgent, self._fresh
                self._urgent = self._fresh = False
            tick = self._clock() >= due
            if tick:
                due = max(due + self.interval, self._clock())
            try:
                self.round(own=tick or fresh, urgent=urgent or fresh)
            except Exception:  # noqa: BLE001 - the next round tries again
                log.exception("relaying the job-wide retention reports failed")
            if fresh:
                with self._done:
                    self._pushed += 1
                    self._done.notify_all()
        self.links.close_thread()

    def push(self, timeout: float) -> bool:
        """Report now, urgently (a drop lowered this node's floor); return once this node's
        neighbours were sent it (False if that took longer than ``timeout`` and a little)."""
        with self._done:
            before = self._pushed
        with self._lock:
            self._fresh = True
        self._wake.set()
        with self._done:
            return self._done.wait_for(lambda: self._pushed > before, timeout + 1.0)

    # ------------------------------------------------------------------ sending

    def partners(self, now: float | None = None) -> dict[int, Edge]:
        """The edges this node carries now, by the member it sends them to."""
        now = self._clock() if now is None else now
        out = {}
        for edge in self.overlay.edges:
            if gateway(edge.mine, self.up) != self.me:
                continue
            fresh = [s for s in edge.theirs if now - self._failed.get(s, -1e18) >= self.retry]
            out[fresh[0] if fresh else min(edge.theirs, key=lambda s: self._failed[s])] = edge
        return out

    def round(self, own: bool = True, urgent: bool = False) -> int:
        """One round: this node's next report (``own``), then one batch to each neighbour that
        may lack something; returns the batches sent."""
        if own:
            self.protector.report()
        latest = self.protector.latest()
        now = self._clock()
        batches: dict[int, pp.Reports] = {}
        with self._lock:
            partners = self.partners(now)
            for slot in [*self.overlay.local, *partners]:
                out = self._lacking(slot, latest, now)
                if out:
                    batches[slot] = pp.Reports(self.me, out, urgent)
        if not batches:
            return 0
        replies: dict[int, Any] = {}
        answered = self.links.call_each(batches, self.timeout, replies, stale=self.retry)
        for slot, reply in replies.items():         # what the neighbour answered with
            if isinstance(reply, pp.ReportsReply) and reply.reports:
                self.on_reports(pp.Reports(slot, reply.reports))
        with self._lock:
            for slot, batch in batches.items():
                if slot in answered:
                    known = self._known.setdefault(slot, {})
                    for msg in batch.reports:
                        if known.get(msg.src, _NONE) < msg.mark:
                            known[msg.src] = msg.mark
                    self._failed.pop(slot, None)
                    self._missing.pop(slot, None)
                elif slot in partners and (
                        slot in self._failed
                        or now - self._missing.setdefault(slot, now) >= self.retry):
                    # A slow answer is not a dead relay: given up only after ``retry``
                    # seconds without one (as heartbeats do), or at once when probed again.
                    if slot not in self._failed:
                        log.info("node %d took no reports for %.0fs: the edge to group %d "
                                 "goes to the next member", slot, self.retry,
                                 partners[slot].other)
                    self._failed[slot] = now
                    self._missing.pop(slot, None)
            # Partners no longer used (nor sending here across an edge): forget them, and
            # close the sockets to them.
            used = self._local | set(self.partners(now))
            callers = {s for s, t in self._across.items() if now - t < self.retry}
            for slot in [s for s in self._known if s not in used | callers]:
                del self._known[slot]
            for slot in [s for s in self._across if s not in callers]:
                del self._across[slot]
        for slot in self.links.open_slots():
            if slot not in used:
                self.links.close(slot)
        self.sent += len(batches)
        if self.metrics is not None:
            self.metrics.report_batches.labels(direction="sent").inc(len(batches))
        return len(batches)

    def _lacking(self, slot: int, latest: dict[int, pp.Held], now: float) -> tuple[pp.Held, ...]:
        """The reports neighbour ``slot`` is not known to have and gets from here (lock held)."""
        known = self._known.get(slot, {})
        inside = slot in self._local
        return tuple(msg for src, msg in sorted(latest.items())
                     if known.get(src, _NONE) < msg.mark
                     and (not inside or src == slot or self._due_inside(src, now)))

    def _due_inside(self, src: int, now: float) -> bool:
        """Whether the newest report of ``src`` goes to group peers from here (lock held)."""
        if src == self.me:
            return True
        when, outside = self._came.get(src, (-1e18, False))
        return outside or now - when >= self.stable

    # ------------------------------------------------------------------ receiving

    def answer(self, msg: pp.Reports) -> pp.ReportsReply:
        """Take a batch (:meth:`on_reports`) and answer it with the reports its sender is not
        known to have, where the sender is a neighbour of this node (a group peer, or a
        member of a group across one of its tree edges): an edge carries reports both ways
        whenever either side can reach the other (a carrier that cannot reach the other
        group, but is reached by it, keeps the edge: its heartbeats say it is up)."""
        taken = self.on_reports(msg)
        slot = msg.sender
        if slot not in self._local and not any(slot in e.theirs for e in self.overlay.edges):
            return pp.ReportsReply(taken)
        latest = self.protector.latest()
        now = self._clock()
        with self._lock:
            back = self._lacking(slot, latest, now)
            known = self._known.setdefault(slot, {})
            for report in back:
                # Taken as delivered, except a report that no longer changes (its origin is
                # down): an answer that arrives after the sender gave up waiting is lost, and
                # nothing newer of that origin would ever be sent in its place.
                if report.src == self.me or now - self._came.get(report.src, (-1e18,))[0] \
                        < self.stable:
                    known[report.src] = report.mark
        return pp.ReportsReply(taken, back)

    def on_reports(self, msg: pp.Reports) -> int:
        """Take the reports of a batch that are newer than those held; return how many."""
        if msg.sender == self.me or not 0 <= msg.sender < self.nodes:
            raise StoreError("bad_request", f"node {msg.sender} is not another node of this "
                             f"cluster of {self.nodes}")
        outside = msg.sender not in self._local
        if outside:
            with self._lock:
                self._across[msg.sender] = self._clock()
        reports = []
        for report in msg.reports:
            if report.src == self.me:
                self.protector.heard_of_self(report)
            elif 0 <= report.src < self.nodes:
                reports.append(report)
        taken = 0
        results = self.protector.learn_all(reports)        # the pins are set once
        with self._lock:
            for report, new in zip(reports, results):
                if new is not None:
                    taken += 1
                    self._came[report.src] = (self._clock(), outside)
                    if self._incs.get(report.src) != report.inc:
                        self._incs[report.src] = report.inc
                        self._known.pop(report.src, None)   # restarted: knows nothing
                known = self._known.setdefault(msg.sender, {})
                if report.src == msg.sender:
                    # What the sender has of itself is its own newest report: when an older
                    # incarnation of it is held here (its clock is behind the one before),
                    # that one is sent back to it, and it takes a higher incarnation.
                    known[report.src] = report.mark
                elif known.get(report.src, _NONE) < report.mark:
                    known[report.src] = report.mark
        self.received += 1
        if self.metrics is not None:
            self.metrics.report_batches.labels(direction="received").inc()
        if msg.urgent and taken:
            with self._lock:
                self._urgent = True
            self._wake.set()
        return taken
