"""The local control server: one ZeroMQ ROUTER socket, one loop, a few worker threads.

The loop is ``while not stopping: run_once()``. A pass receives the requests that are waiting,
answers the cheap ones inline, hands the slow ones (reserving memory, checksumming) to a worker
pool, forwards finished replies, and reaps dead writers. Each request is handled inside its own
``try``: a malformed or failing request gets an :class:`~snapshotd.protocol.Error` reply and a
counter, and the loop goes on.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional

import zmq

from . import protocol as p
from .metrics import Metrics
from .store import Store, StoreError

__all__ = ["ControlServer"]

log = logging.getLogger("snapshotd.server")
_SLOW = (p.Alloc, p.Commit, p.Open)


class ControlServer:
    """Serves :mod:`snapshotd.protocol` for one :class:`Store`."""

    def __init__(self, store: Store, endpoint: str, *, context: zmq.Context,
                 metrics: Metrics, node_slot: int = 0, workers: int = 2,
                 reap_interval: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.metrics = metrics
        self.node_slot = node_slot
        self.stopping = False
        self._clock = clock
        self._reap_interval = reap_interval
        self._next_reap = 0.0
        self._ctx = context
        self._sock = context.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, p.MAX_MESSAGE_BYTES)
        self._results_ep = f"inproc://snapshotd-results-{id(self)}"
        self._results = context.socket(zmq.PULL)
        self._results.bind(self._results_ep)
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="snapshotd-worker")
        self._inflight = 0
        self.endpoint = self._bind(endpoint)
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._poller.register(self._results, zmq.POLLIN)

    def _bind(self, endpoint: str) -> str:
        if endpoint.startswith("ipc://"):
            os.makedirs(os.path.dirname(endpoint[6:]) or ".", mode=0o700, exist_ok=True)
        old = os.umask(0o077)
        try:
            self._sock.bind(endpoint)
        finally:
            os.umask(old)
        return self._sock.getsockopt_string(zmq.LAST_ENDPOINT)

    # ------------------------------------------------------------------ the loop

    def serve(self) -> None:
        while not self.stopping:
            self.run_once(100)

    def run_once(self, timeout_ms: int = 100) -> None:
        """One pass: answer waiting requests, forward finished replies, reap if due."""
        events = dict(self._poller.poll(timeout_ms))
        if self._sock in events:
            for _ in range(64):
                try:
                    frames = self._sock.recv_multipart(zmq.NOBLOCK, copy=True)
                except zmq.Again:
                    break
                self._handle(frames)
        self._forward_results()
        now = self._clock()
        if now >= self._next_reap:
            self._next_reap = now + self._reap_interval
            try:
                reaped = self.store.reap()
                if reaped:
                    log.info("reclaimed %d slots/leases of processes that are gone", reaped)
                    self.metrics.reclaimed.inc(reaped)
            except Exception:  # noqa: BLE001 - the loop must survive housekeeping errors
                log.exception("reaping failed")

    def _forward_results(self) -> None:
        while True:
            try:
                ident, frame = self._results.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._inflight -= 1
            self._sock.send_multipart([ident, frame])

    def _handle(self, frames: list[bytes]) -> None:
        ident = frames[0]
        req_id = 0
        try:
            if len(frames) != 2:
                raise p.ProtocolError("malformed", f"expected 1 frame, got {len(frames) - 1}")
            req_id, msg = p.decode(frames[1])
            if isinstance(msg, _SLOW):
                self._inflight += 1
                self._pool.submit(self._work, ident, req_id, msg)
                return
            reply = self._dispatch(msg)
        except Exception as exc:  # noqa: BLE001 - one bad request never stops the loop
            reply = self._error(exc, frames)
        self._sock.send_multipart([ident, p.encode(reply, req_id)])

    def _work(self, ident: bytes, req_id: int, msg: Any) -> None:
        try:
            reply = self._dispatch(msg)
        except Exception as exc:  # noqa: BLE001
            reply = self._error(exc, None)
        sock = getattr(self._local, "push", None)
        if sock is None:
            sock = self._local.push = self._ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 1000)
            sock.connect(self._results_ep)
        sock.send_multipart([ident, p.encode(reply, req_id)])

    def _error(self, exc: Exception, frames: Optional[list[bytes]]) -> p.Error:
        if isinstance(exc, p.ProtocolError):
            log.warning("rejected request: %s", exc)
            self.metrics.rejected.labels(reason=exc.code).inc()
            return p.Error(exc.code, exc.message)
        log.exception("request failed")
        self.metrics.rejected.labels(reason="internal").inc()
        return p.Error("internal", f"{type(exc).__name__}: {exc}")

    # ------------------------------------------------------------------ requests

    def _dispatch(self, msg: Any) -> Any:
        handler = getattr(self, "_on_" + msg.OP, None)
        if handler is None:
            raise p.ProtocolError("unknown_op", f"{msg.OP!r} is a reply, not a request")
        return handler(msg)

    def _on_alloc(self, m: p.Alloc) -> p.AllocReply:
        if self.stopping:
            raise StoreError("shutting_down", "the daemon is shutting down; retry on restart")
        slot = self.store.alloc(m.job, m.rank, m.step, m.nbytes, m.pid)
        return p.AllocReply(slot.number, self.store.dir.seg_path(slot.number), slot.nbytes)

    def _on_commit(self, m: p.Commit) -> p.CommitReply:
        started = time.perf_counter()
        version = self.store.commit(m.slot, m.tensors, m.meta)
        self.metrics.commit_seconds.observe(time.perf_counter() - started)
        self.metrics.committed_bytes.inc(version.nbytes)
        return p.CommitReply(version.job, version.rank, version.step, version.nbytes)

    def _on_abort(self, m: p.Abort) -> p.Ok:
        self.store.abort(m.slot)
        return p.Ok(1)

    def _on_list(self, m: p.ListVersions) -> p.ListReply:
        return p.ListReply(tuple(_info(v) for v in self.store.versions(m.job, m.rank)))

    def _on_open(self, m: p.Open) -> p.OpenReply:
        started = time.perf_counter()
        lease = self.store.lease(m.job, m.rank, m.pid, m.step, m.max_step)
        v = lease.version
        bad = self.store.verify(v) if m.verify else []
        if bad:
            self.store.release(lease.id)
            self.metrics.checksum_failures.inc(len(bad))
            raise StoreError("checksum_mismatch", f"job {v.job!r} rank {v.rank} step {v.step}: "
                             f"bytes of tensors {bad} do not match their checksums")
        self.metrics.open_seconds.observe(time.perf_counter() - started)
        return p.OpenReply(lease.id, v.job, v.rank, v.step, self.store.dir.seg_path(v.number),
                           v.nbytes, v.tensors, v.meta, "memory")

    def _on_release(self, m: p.Release) -> p.Ok:
        self.store.release(m.lease)
        return p.Ok(1)

    def _on_drop(self, m: p.Drop) -> p.Ok:
        return p.Ok(self.store.drop(m.job, m.rank, m.step, m.newer_than))

    def _on_status(self, m: p.Status) -> p.StatusReply:
        stats = self.store.stats()
        return p.StatusReply(self.node_slot, os.getpid(), not self.stopping,
                             self.store.memory_limit, stats["bytes_used"], stats["open_slots"],
                             stats["open_leases"], tuple(_info(v) for v in self.store.versions()))

    # ------------------------------------------------------------------ shutdown

    def close(self, drain_timeout: float = 30.0) -> None:
        """Finish in-flight requests (commits), answer them, then close the sockets."""
        self.stopping = True
        deadline = time.monotonic() + drain_timeout
        while self._inflight > 0 and time.monotonic() < deadline:
            self.run_once(50)
        self._pool.shutdown(wait=True)
        self._forward_results()
        self._sock.close(0)
        self._results.close(0)
        if self.endpoint.startswith("ipc://"):
            try:
                os.unlink(self.endpoint[6:])
            except OSError:
                pass


def _info(v: Any) -> p.VersionInfo:
    return p.VersionInfo(v.job, v.rank, v.step, v.nbytes, v.state, v.committed_at)
