"""Rebuilding a node's data and parity from its group (docs/design.md section 5, node replacement).

At start, a daemon asks every reachable group peer for its inventory. For each job, if the
peers' parity records know a newer version of this node's data than it holds, it rebuilds the
newest one the group can: per stripe, ``k`` fragments (peers' data chunks and parity), decoded,
checked against the tensor checksums, installed as protected versions. Then it re-creates the
parity it held. Control requests that list or open versions wait until this is done
(:meth:`Recovery.wait_ready`), so a replacement node serves its ranks as if nothing happened.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from ..common import locks
from ..common.protocol import TensorEntry
from ..node.store import Store, StoreError
from . import peerproto as pp
from .codec import Codec
from .placement import Group, Stripe, data_stripes, parity_stripes
from .protection import ParityRecord, Protector, contiguous, frames_checksum

__all__ = ["Recovery", "RebuildError"]

log = logging.getLogger("snapshotd.rebuild")
_FETCH = timedelta(seconds=60)


class RebuildError(Exception):
    """The group cannot rebuild what was asked; the message names group, slots and version."""


@dataclass
class _Source:
    index: int          # codec fragment index: 0..k-1 data, k.. parity
    slot: int
    request: Any        # GetData or GetParity
    length: int         # bytes the source sends (data chunks may be shorter than L)


#: Per stripe: (stripe, my fragment index, fragment length, my chunk's length, k sources).
_Plan = list[tuple[Stripe, int, int, int, list[_Source]]]


class Recovery:
    """Rebuilds this node from its peers once at start, and on demand (checksum failures)."""

    def __init__(self, me: int, group: Group, codec: Codec, store: Store,
                 protector: Protector, links: Any, up: Any, metrics: Any = None,
                 settle: float = 5.0) -> None:
        self.me, self.group, self.codec, self.store = me, group, codec, store
        self.protector, self.links, self.up, self.metrics = protector, links, up, metrics
        self.settle = settle
        self.failures: dict[str, str] = {}
        self.rebuilt_bytes = 0
        self._ready = threading.Event()
        self._lock = locks.lock("rebuild")
        #: Set after every pass of the rebuild (a restore waiting for a late peer looks again).
        self._passed = threading.Condition(locks.lock("rebuild.pass"))
        self._passes = 0
        #: Whether a peer of the group was down when the last pass began (its failures may
        #: be only a late peer's: the next pass, once it is back, says more).
        self._late_at_pass = False
        self.stopping = False
        #: How long a restore waits for a peer that is down now while the rebuild of its job
        #: failed for want of it (a paused or slow peer: the rebuild is tried again when it
        #: comes back). Below the client's request timeout (30 s).
        self.late_wait = 20.0
        #: Seconds between tries of a failed rebuild while no peer came back (doubling).
        self.retry_every = (1.0, 30.0)

    def start(self) -> Recovery:
        threading.Thread(target=self._run, name="snapshotd-recovery", daemon=True).start()
        return self

    def _run(self) -> None:
        deadline = time.monotonic() + self.settle
        peers = [s for s in self.group.slots if s != self.me]
        while time.monotonic() < deadline and not all(self.up(s) for s in peers):
            time.sleep(0.1)
        # ... and for their floors (Held, every heartbeat): the job-wide step is rebuilt too.
        deadline = time.monotonic() + self.settle
        while time.monotonic() < deadline and not all(
                self.protector.reported(s) for s in peers if self.up(s)):
            time.sleep(0.05)
        inv: dict[int, pp.InventoryReply] = {}
        try:
            inv = self.recover()
        except Exception:  # noqa: BLE001 - recovery problems must not stop the daemon
            log.exception("recovery failed")
        finally:
            try:
                self.protector.adopt_timelines()    # of the versions it rebuilt
            except Exception:  # noqa: BLE001
                log.exception("taking the jobs' timelines failed")
            self._ready.set()           # ranks may restore now; parity follows
        self._note_pass()
        try:
            with self._lock:
                self._recreate_parity(inv, _jobs(inv))
        except Exception:  # noqa: BLE001
            log.exception("re-creating parity failed")
        finally:
            self.links.close_thread()
        self._retry_failed()

    def _passed_since(self, seen: int) -> bool:
        return self._passes > seen

    def _note_pass(self) -> None:
        with self._passed:
            self._passes += 1
            self._passed.notify_all()

    def _late(self) -> list[int]:
        """The group's other nodes that are down now (lost for good, or only late)."""
        return [s for s in self.group.slots if s != self.me and not self.up(s)]

    def _retry_failed(self) -> None:
        """Try the rebuild of the jobs that failed again, at once when a peer that was down
        comes back, else every few seconds (doubling up to 30 s), until none is left: a peer
        that was paused or slow through the first pass is not a loss (issue 25, finding 4:
        a replacement whose peer came back 3-10 s late served ``cannot_rebuild`` for good)."""
        wait, longest = self.retry_every
        while self.failures and not self.stopping:
            late = set(self._late())
            deadline = time.monotonic() + wait
            while (time.monotonic() < deadline and not self.stopping
                   and not late - set(self._late())):
                time.sleep(0.1)
            if self.stopping:
                return
            back = late - set(self._late())
            wait = self.retry_every[0] if back else min(longest, wait * 2)
            failed = dict(self.failures)
            if back:
                self._fresh_reports()      # their floors: the job-wide step is rebuilt too
            try:
                inv = self.recover(only=set(failed))
                done = {job for job in failed if job not in self.failures}
                if done:
                    log.info("rebuilt job(s) %s on a later try (node(s) %s back)",
                             sorted(done), sorted(back) or "none")
                    self.protector.adopt_timelines()
                    with self._lock:
                        self._recreate_parity(inv, sorted(done))
            except Exception:  # noqa: BLE001 - tried again later
                log.exception("rebuild retry failed")
            finally:
                self.links.close_thread()
                self._note_pass()

    def wait_ready(self, job: str, timeout: float = 600.0) -> None:
        """Block until start-up recovery is done; raise if ``job`` could not be rebuilt.
        While the rebuild failed and a peer of the group is down (it may be only late: a
        paused process, a slow restart), wait up to :attr:`late_wait` for a later try."""
        self._ready.wait(timeout)
        deadline = time.monotonic() + self.late_wait
        while True:
            reason = self.failures.get(job)
            if not reason or self.store.versions(job):
                return
            late = self._late()
            left = deadline - time.monotonic()
            if not (late or self._late_at_pass) or left <= 0:
                break
            with self._passed:
                self._passed.wait_for(functools.partial(self._passed_since, self._passes),
                                      min(left, 1.0))
        if late:
            raise StoreError("cannot_rebuild", f"waiting for slot(s) {late} of group "
                             f"{self.group.index}, down now (lost, or only late): job {job!r} "
                             f"is rebuilt when they answer; retry the restore. ({reason})")
        raise StoreError("cannot_rebuild", reason)

    def wait_started(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for the start-up rebuild to be over; whether it is."""
        return self._ready.wait(timeout)

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    # ------------------------------------------------------------------ the passes

    def recover(self, only: set[str] | None = None) -> dict[int, pp.InventoryReply]:
        """Rebuild this node's newest data of every job the group knows (of ``only``, when
        given: a retry of the jobs that failed); return the inventories."""
        with self._lock:
            self._late_at_pass = bool(self._late())
            inv = self._inventories()
            jobs = [j for j in _jobs(inv) if only is None or j in only]
            for job in jobs:
                try:
                    self._recover_job(job, inv)
                except Exception as exc:  # noqa: BLE001 - one job's failure spares the others
                    log.log(logging.DEBUG if job in self.failures else
                            logging.WARNING if self._late() else logging.ERROR, "%s", exc)
                    self.failures[job] = str(exc)
                else:
                    self.failures.pop(job, None)
            return inv

    def _inventories(self) -> dict[int, pp.InventoryReply]:
        out = {}
        for slot in self.group.slots:
            if slot != self.me and self.up(slot):
                try:
                    out[slot], _ = self.links.call(slot, pp.Inventory(self.me),
                                                   timeout=timedelta(seconds=10))
                except Exception as exc:  # noqa: BLE001
                    log.warning("no inventory from node %d: %s", slot, exc)
        return out

    def _recover_job(self, job: str, inv: dict[int, pp.InventoryReply]) -> None:
        mine = _my_manifests(inv, job, self.me)
        # Newer than the newest version this node holds whole; a version held in part (a
        # rebuild cut short between ranks) is a candidate too: its missing ranks are rebuilt.
        held = self.store.versions(job)
        whole = [s for s in {v.step for v in held}
                 if (s in mine and {r["rank"] for r in json.loads(mine[s])["ranks"]}
                     <= {v.rank for v in held if v.step == s})
                 or (s not in mine and self.protector.node_version(job, s) is not None)]
        candidates = sorted((s for s in mine if not whole or s > max(whole)), reverse=True)
        problems = []
        for step in candidates:
            plan = self._plan(job, step, inv, mine[step])
            if plan is None:
                problems.append(f"step {step}: {self._shortfall(job, step, inv)}")
                continue
            try:
                self.rebuild(job, step, mine[step], plan, keep_held=True)
            except Exception as exc:  # noqa: BLE001 - an older version may still be whole
                log.warning("rebuild of job %r step %d failed, trying an older one: %s", job,
                            step, exc)
                problems.append(f"step {step}: {exc}")
                continue
            self._rebuild_common(job, step, inv, mine)
            return
        if candidates:
            lost = [s for s in self.group.slots if s == self.me or not self.up(s)]
            late = [s for s in lost if s != self.me]
            why = (f"group {self.group.index} misses slots {lost} (more than m={self.group.m})"
                   if len(lost) > self.group.m else
                   f"group {self.group.index} (missing slots {lost}) holds fewer than k="
                   f"{self.group.k} fragments of some stripe for every version")
            then = (f"; slot(s) {late} are down now (lost, or only late: paused, restarting): "
                    "the rebuild is tried again when they answer" if late else
                    "; fall back to the newest persisted checkpoint")
            raise RebuildError(
                f"{why}: job {job!r} step {candidates[0]} (and older) cannot be rebuilt for "
                f"slot {self.me} now{then}"
                + (f" ({'; '.join(problems)})" if problems else ""))

    def _rebuild_common(self, job: str, rebuilt: int, inv: dict[int, pp.InventoryReply],
                        mine: dict[int, str]) -> None:
        """Rebuild the job-wide step too, when it is older than the step just rebuilt: the
        newest pin the other nodes report (they keep it, with every newer step), else the
        step their reports have in common. So after this loss every rank of the job still
        holds a common step.

        The others may raise their pins on this node's last report from before it was lost
        until they hear that it recovers (then they hold them): so once a step is rebuilt,
        this waits for a round of reports sent since, and rebuilds the pin again if it moved.
        """
        done: set[int] = set()
        for _ in range(4):
            common = self.protector.others_floor(job)
            if common is None or common >= rebuilt or common in done:
                break                   # none older, or the same after a fresh round
            done.add(common)
            if not self._rebuild_if_missing(job, common, inv, mine):
                break                   # held already: the others can only agree on it
            self._fresh_reports()
        # The newest step every other node still holds, when the group can rebuild it here
        # and it is newer than that pin: the job-wide step prefers a step protected on every
        # node, which can be older than one every rank holds (a node's encode of a step
        # skipped for a newer one); without it, the job would come back at the pin (review
        # of issue 16, finding 1: step 1 restored where step 3 was held by every rank).
        pin = max(done, default=-1)
        shared = [s for s in self.protector.held_in_common(job, skip=self.me) & set(mine)
                  if pin < s < rebuilt]
        if shared:
            self._rebuild_if_missing(job, max(shared), inv, mine)

    def _rebuild_if_missing(self, job: str, step: int, inv: dict[int, pp.InventoryReply],
                            mine: dict[int, str]) -> bool:
        """Rebuild this node's version of (job, step) unless it holds it (then False);
        failures are logged."""
        if step not in mine:
            inv = self._inventories()
            mine = _my_manifests(inv, job, self.me)
            if step not in mine:
                log.warning("job %r: the job-wide step %d is in no parity record of slot %d; "
                            "it is not rebuilt", job, step, self.me)
                return True
        held = {v.rank for v in self.store.versions(job) if v.step == step}
        if {r["rank"] for r in json.loads(mine[step])["ranks"]} <= held:
            return False
        plan = self._plan(job, step, inv, mine[step])
        if plan is None:
            log.warning("job %r: the job-wide step %d cannot be rebuilt for slot %d (%s)", job,
                        step, self.me, self._shortfall(job, step, inv))
            return True
        try:
            self.rebuild(job, step, mine[step], plan, keep_held=True)
        except Exception as exc:  # noqa: BLE001 - the newest step is rebuilt; logged
            log.warning("job %r: the job-wide step %d not rebuilt: %s", job, step, exc)
        return True

    def _fresh_reports(self) -> None:
        """Wait for a report from every group peer that is up and every other node heard from
        lately (all groups: the pin is job-wide) that is newer than the one held now and says
        it heard that this node recovers (``Held.holding``): the pins they report were set
        after that, and stay where they are while it does. Reports are relayed, so this allows
        for a round trip through the relay (``relay_latency`` twice) besides ``settle``."""
        before = self.protector.report_marks()
        nodes = {s for s in self.group.slots if s != self.me and self.up(s)}
        nodes |= self.protector.reporting()
        deadline = time.monotonic() + self.settle + 2 * self.protector.relay_latency
        while time.monotonic() < deadline:
            if nodes <= self.protector.heard_holding(before, self.me):
                return
            time.sleep(0.05)
        log.info("job-wide steps: no fresh report from nodes %s after %.1fs",
                 sorted(nodes - self.protector.heard_holding(before, self.me)),
                 self.settle + 2 * self.protector.relay_latency)

    def _plan(self, job: str, step: int, inv: dict[int, pp.InventoryReply],
              manifest: str) -> _Plan | None:
        """Per stripe, ``k`` sources of this node's version ``manifest`` of (job, step)."""
        plan = []
        for stripe, pos in data_stripes(self.me, self.group):
            holdings = [h for h in _holdings(inv, job, step, stripe)
                        if self.me not in h.stale and any(
                            f.src == self.me and f.manifest == manifest for f in h.frags)]
            if not holdings:
                return None
            length = holdings[0].length
            mine = [f for f in holdings[0].frags if f.src == self.me]
            sources = self._sources(job, step, stripe, inv, holdings, skip=self.me)
            if len(sources) < self.group.k or not mine:
                return None
            plan.append((stripe, pos, length, mine[0].length, sources))
        return plan

    def _shortfall(self, job: str, step: int, inv: dict[int, pp.InventoryReply]) -> str:
        """Which stripes of (job, step) lack fragments, for the error message."""
        out = []
        for stripe, _ in data_stripes(self.me, self.group):
            holdings = _holdings(inv, job, step, stripe)
            have = self._sources(job, step, stripe, inv, holdings, skip=self.me)
            if len(have) < self.group.k:
                out.append(f"stripe {stripe.index} has {len(have)} of k={self.group.k} "
                           f"fragments (from nodes {sorted(s.slot for s in have)})")
        return ", ".join(out) or "no parity record lists this node"

    def _sources(self, job: str, step: int, stripe: Stripe, inv: dict[int, pp.InventoryReply],
                 holdings: list[pp.ParityHolding], skip: int) -> list[_Source]:
        out = []
        # Parity of one encoding only (a re-encode may have reached some holders so far), and
        # data only from nodes whose version is the one that encoding used.
        holdings = [h for h in holdings if holdings and _same_encoding(h, holdings[0])]
        frags = {f.src: f for f in holdings[0].frags} if holdings else {}
        stale = set(holdings[0].stale) if holdings else set()
        for pos, slot in enumerate(stripe.data):
            reply = inv.get(slot)
            if slot == skip or reply is None or slot in stale:
                continue
            if any((d.job, d.step) == (job, step) for d in reply.data):
                chunk = [s.index for s, _ in data_stripes(slot, self.group)].index(stripe.index)
                length = frags[slot].length if slot in frags else -1
                vid = pp.manifest_id(frags[slot].manifest) if slot in frags else ""
                out.append(_Source(pos, slot, pp.GetData(job, step, chunk, vid), length))
        for h in holdings:
            slot = stripe.parity[h.index]
            if slot != skip and slot in inv:
                out.append(_Source(self.group.k + h.index, slot,
                                   pp.GetParity(job, step, stripe.index, h.index), h.length))
        return out

    def repair(self, job: str, step: int) -> bool:
        """Rebuild this node's (job, step) from the group after a local checksum failure."""
        nv = self.protector.node_version(job, step)
        if nv is None:
            return False
        manifest = nv.manifest(self.me, self.store.owner(job))
        with self._lock:
            try:
                plan = self._plan(job, step, self._inventories(), manifest)
                if plan is None:
                    return False
                self.rebuild(job, step, manifest, plan)
            except Exception as exc:  # noqa: BLE001 - reported by the caller as a mismatch
                log.error("repair of job %r step %d failed: %s", job, step, exc)
                return False
            finally:
                self.links.close_thread()
        return True

    # ------------------------------------------------------------------ data

    def rebuild(self, job: str, step: int, manifest: str, plan: list,
                keep_held: bool = False) -> None:
        """Fetch, decode and install this node's data for (job, step); with ``keep_held``,
        ranks already held at that step are kept (a repair replaces them)."""
        started = time.perf_counter()
        timing: dict[str, float] = {}
        chunks = self.decode(job, step, manifest, plan, timing)
        installed = time.perf_counter()
        self._install(json.loads(manifest), chunks, keep_held)
        done = time.perf_counter()
        seconds, timing["install"] = done - started, done - installed
        total = sum(c.nbytes for c in chunks)
        self.rebuilt_bytes += total
        if self.metrics is not None:
            self.metrics.rebuilds.inc()
            self.metrics.rebuilt_bytes.inc(total)
            self.metrics.rebuild_seconds.observe(seconds)
        log.info("rebuilt job %r step %d for slot %d: %d bytes in %.2fs (fetch %.2fs, decode "
                 "%.2fs, install %.2fs)", job, step, self.me, total, seconds,
                 timing.get("fetch", 0.0), timing.get("decode", 0.0), timing["install"])

    def decode(self, job: str, step: int, manifest: str, plan: list,
               timing: dict[str, float] | None = None) -> list[Any]:
        """Fetch ``k`` fragments of every stripe of ``plan`` and decode this node's chunks of
        its version ``manifest`` of (job, step), in chunk order (not installed: a read of a lost
        node's ranks by another node serves them from these, see reads.py). ``timing`` gets
        the seconds spent fetching and decoding."""
        chunks: list[Any] = []
        timing = {} if timing is None else timing
        self._not_abandoned(job, step, manifest)
        for _stripe, pos, length, my_length, sources in plan:
            started = time.perf_counter()
            present = self._fetch_k(sources, length)
            fetched = time.perf_counter()
            out = bytearray(length)
            self.codec.reconstruct(present, {pos: out})
            chunks.append(memoryview(out)[:my_length])
            timing["fetch"] = timing.get("fetch", 0.0) + fetched - started
            timing["decode"] = timing.get("decode", 0.0) + time.perf_counter() - fetched
        self._not_abandoned(job, step, manifest)          # a drop may have come meanwhile
        return chunks

    def _not_abandoned(self, job: str, step: int, manifest: str) -> None:
        if self.protector.abandoned(job, step, manifest):
            raise StoreError("not_found", f"job {job!r} step {step} was dropped on this node "
                             "after that version was committed (a new timeline); not rebuilt")

    def _fetch_k(self, sources: list[_Source], length: int) -> dict[int, Any]:
        """Fetch ``k`` of a stripe's fragments, in parallel (one connection per node).

        A fragment that cannot be had (its node is gone, or it fails a checksum there or on
        the way) is replaced by one of the stripe's other sources; RebuildError once fewer
        than ``k`` good ones are left.
        """
        def one(source: _Source) -> Any:
            try:
                return self._fetch(source, length)[0]
            finally:
                self.links.close_thread()

        k = self.group.k
        present: dict[int, Any] = {}
        problems: list[str] = []
        queue = list(sources)
        with ThreadPoolExecutor(k, thread_name_prefix="snapshotd-fetch") as pool:
            while len(present) < k and queue:
                batch, queue = queue[:k - len(present)], queue[k - len(present):]
                futures = [(s, pool.submit(one, s)) for s in batch]
                for source, future in futures:
                    try:
                        present[source.index] = future.result()
                    except Exception as exc:  # noqa: BLE001 - try another fragment
                        problems.append(f"node {source.slot}: {exc}")
                        log.warning("fragment %d from node %d unusable, trying another: %s",
                                    source.index, source.slot, exc)
        if len(present) < k:
            raise RebuildError(f"only {len(present)} of the k={k} fragments needed could be "
                               f"fetched: {'; '.join(problems)}")
        return present

    def _fetch(self, source: _Source, length: int) -> tuple[Any, pp.Chunk]:
        reply, frames = self.links.call(source.slot, source.request, timeout=_FETCH)
        if frames_checksum(frames) != reply.checksum or (
                sum(f.buffer.nbytes for f in frames) != reply.length):
            raise RebuildError(f"fragment from node {source.slot} failed its checksum")
        return contiguous([f.buffer for f in frames], reply.length if length < 0 else length), reply

    def _install(self, manifest: dict[str, Any], chunks: list[Any], keep_held: bool) -> None:
        blob = _Blob(chunks)
        offset = 0
        held = {v.rank for v in self.store.versions(manifest["job"])
                if v.step == manifest["step"]} if keep_held else set()
        for r in manifest["ranks"]:
            if r["rank"] in held:            # installed before a restart cut the rebuild short
                offset += r["nbytes"]
                continue
            tensors = tuple(TensorEntry(n, d, tuple(s), o, b, c) for n, d, s, o, b, c
                            in r["tensors"])
            start = offset
            self.store.install(manifest["job"], r["rank"], manifest["step"], r["nbytes"],
                               tensors, r["meta"], r["local_world_size"],
                               functools.partial(blob.read_into, start),
                               committed_at=r["committed_at"], owner=manifest.get("owner", ""),
                               world_size=int(r.get("world_size", 0)),
                               run=str(r.get("run", "")))
            offset += r["nbytes"]

    # ------------------------------------------------------------------ parity

    def _recreate_parity(self, inv: dict[int, pp.InventoryReply], jobs: list[str]) -> None:
        held = {(r.job, r.stripe, r.step) for r in self.protector.parity_records()}
        # Every step the data nodes still hold, newest first (parity retention trims the rest):
        # the newest may be one some data node never got protected, and its newest *protected*
        # step, possibly older than the newest steps of the others, is the one a loss of that
        # node falls back to.
        for stripe, index in parity_stripes(self.me, self.group):
            for job in jobs:
                steps = sorted({d.step for r in inv.values() for d in r.data if d.job == job},
                               reverse=True)
                for step in steps:
                    if (job, stripe.index, step) in held:
                        continue
                    try:
                        self._recreate(job, step, stripe, index, inv)
                    except Exception as exc:  # noqa: BLE001
                        log.warning("parity %d of stripe %d, job %r step %d not re-created: %s",
                                    index, stripe.index, job, step, exc)

    def _recreate(self, job: str, step: int, stripe: Stripe, index: int,
                  inv: dict[int, pp.InventoryReply]) -> bool:
        holdings = _holdings(inv, job, step, stripe)
        sources = self._sources(job, step, stripe, inv, holdings, skip=self.me)
        data = [s for s in sources if s.index < self.group.k]
        out: Any = None
        if len(data) == self.group.k:
            try:
                fetched = [self._fetch(s, -1) for s in data]
                infos = tuple(pp.FragInfo(s.slot, s.request.frag, reply.length, reply.manifest,
                                          reply.floor)
                              for s, (_, reply) in zip(data, fetched))
                length = max(i.length for i in infos)
                bufs = [contiguous([buf], length) for buf, _ in fetched]
                parity = [bytearray(length) for _ in range(self.group.m)]
                self.codec.encode(bufs, parity)
                out = parity[index]
            except Exception as exc:  # noqa: BLE001 - decode it from the other parity instead
                if not holdings:
                    raise
                log.warning("parity %d of stripe %d, job %r step %d: data fragments unusable "
                            "(%s); decoding it from the surviving fragments", index,
                            stripe.index, job, step, exc)
        if out is None:
            if not holdings or len(sources) < self.group.k:
                return False
            length, infos = holdings[0].length, holdings[0].frags
            present = self._fetch_k(sources, length)
            out = bytearray(length)
            self.codec.reconstruct(present, {self.group.k + index: out})
        self.protector.store_parity(ParityRecord(job, step, stripe.index, index, length, infos,
                                                 out, frames_checksum([out]), complete=True))
        log.info("re-created parity %d of stripe %d for job %r step %d", index, stripe.index,
                 job, step)
        return True


def _holdings(inv: dict[int, pp.InventoryReply], job: str, step: int,
              stripe: Stripe) -> list[pp.ParityHolding]:
    """The parity records of (job, step, stripe) the inventories list."""
    return [h for r in inv.values() for h in r.parity
            if (h.job, h.step, h.stripe) == (job, step, stripe.index)]


def _same_encoding(a: pp.ParityHolding, b: pp.ParityHolding) -> bool:
    return len(a.frags) == len(b.frags) and all(
        x.same_fragment(y) for x, y in zip(a.frags, b.frags))


def _committed(manifest: str) -> float:
    return max((r["committed_at"] for r in json.loads(manifest)["ranks"]), default=0.0)


def _my_manifests(inv: dict[int, pp.InventoryReply], job: str, me: int) -> dict[int, str]:
    """Per step, the newest version of this node's data the group's parity knows: never one
    that a holder marks superseded (this node sent another version of the step since)."""
    stale = {(h.step, f.manifest) for r in inv.values() for h in r.parity
             if h.job == job and me in h.stale for f in h.frags if f.src == me}
    mine: dict[int, str] = {}
    for r in inv.values():
        for h in r.parity:
            for f in h.frags:
                if h.job != job or f.src != me or (h.step, f.manifest) in stale:
                    continue
                if h.step not in mine or _committed(f.manifest) > _committed(mine[h.step]):
                    mine[h.step] = f.manifest
    return mine


def _jobs(inv: dict[int, pp.InventoryReply]) -> list[str]:
    """Every job the inventories mention."""
    jobs = {d.job for r in inv.values() for d in r.data}
    return sorted(jobs | {h.job for r in inv.values() for h in r.parity})


class _Blob:
    """Reads a node's bytes back out of its decoded chunks (in chunk order)."""

    def __init__(self, chunks: list[Any]) -> None:
        self.chunks = chunks

    def read_into(self, start: int, out: memoryview) -> None:
        pos, done = 0, 0
        for chunk in self.chunks:
            lo, hi = max(start, pos), min(start + out.nbytes, pos + chunk.nbytes)
            if lo < hi:
                out[done:done + hi - lo] = chunk[lo - pos:hi - pos]
                done += hi - lo
            pos += chunk.nbytes
        if done != out.nbytes:
            raise RebuildError(f"decoded data is {pos} bytes, short of what the manifest lists")
