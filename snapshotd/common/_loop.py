"""A ROUTER-socket request loop shared by the control server and the peer server.

``while not stopping: run_once()``. A pass takes the waiting requests, answers cheap ones inline,
hands slow ones to a worker pool, and forwards the replies the workers finished. Workers send
their replies through an inproc PUSH socket of their own thread, because ZeroMQ sockets are not
thread-safe. Every request is handled inside its own ``try``: a failing request gets an
:class:`~snapshotd.common.protocol.Error` reply, is counted, and the loop goes on.

A handler is a method ``_on_<op>(msg, payload) -> reply`` where ``payload`` is the list of frames
after the header, and ``reply`` is a message or a ``(message, frames)`` pair.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import zmq

from . import protocol as p

__all__ = ["RouterLoop"]

log = logging.getLogger("snapshotd.loop")


class RouterLoop:
    """Base class: subclasses define ``_on_<op>`` handlers and the ``SLOW`` op names."""

    SLOW: frozenset[str] = frozenset()
    MAX_PAYLOAD_FRAMES = 0

    def __init__(self, sock: zmq.Socket, context: zmq.Context, *, workers: int,
                 decode: Callable[[bytes], tuple[int, Any]],
                 on_reject: Callable[[str], None] = lambda code: None,
                 housekeeping: Callable[[], None] | None = None,
                 housekeeping_interval: float = 1.0) -> None:
        self.stopping = False
        self._sock = sock
        self._ctx = context
        self._decode = decode
        self._on_reject = on_reject
        self._housekeeping = housekeeping
        self._interval = housekeeping_interval
        self._next_housekeeping = 0.0
        self._results_ep = f"inproc://snapshotd-results-{id(self)}"
        self._results = context.socket(zmq.PULL)
        self._results.bind(self._results_ep)
        self._local = threading.local()
        self._pushes: list[zmq.Socket] = []
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix=type(self).__name__)
        self._inflight = 0
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._poller.register(self._results, zmq.POLLIN)

    def serve(self) -> None:
        while not self.stopping:
            self.run_once(100)

    def run_once(self, timeout_ms: int = 100) -> None:
        """One pass: answer waiting requests, forward finished replies, housekeeping if due."""
        events = dict(self._poller.poll(timeout_ms))
        if self._sock in events:
            for _ in range(64):
                try:
                    frames = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                self._handle(frames)
        self._forward_results()
        if self._housekeeping is not None and time.monotonic() >= self._next_housekeeping:
            self._next_housekeeping = time.monotonic() + self._interval
            try:
                self._housekeeping()
            except Exception:  # noqa: BLE001 - the loop must survive housekeeping errors
                log.exception("housekeeping failed")

    def _forward_results(self) -> None:
        while True:
            try:
                frames = self._results.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._inflight -= 1
            self._deliver(frames)

    def _deliver(self, frames: list[Any]) -> None:
        """Send a reply; one whose requester is gone (with ``ROUTER_MANDATORY``: it closed its
        socket, e.g. after giving up on the request) goes to :meth:`_undeliverable`."""
        try:
            self._sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as exc:
            if exc.errno not in (errno.EHOSTUNREACH, errno.EAGAIN):
                raise
            try:
                self._undeliverable(frames)
            except Exception:  # noqa: BLE001 - the loop must survive it
                log.exception("undo of an undeliverable reply failed")

    def _undeliverable(self, frames: list[Any]) -> None:
        """A reply could not be delivered; subclasses undo what it handed out."""

    def _handle(self, frames: list[zmq.Frame]) -> None:
        ident = frames[0].bytes
        req_id = 0
        try:
            if len(frames) < 2 or len(frames) - 2 > self.MAX_PAYLOAD_FRAMES:
                raise p.ProtocolError("malformed", f"unexpected number of frames "
                                      f"({len(frames) - 1})")
            req_id, msg = self._decode(frames[1].bytes)
            if msg.OP in self.SLOW:
                self._inflight += 1
                self._pool.submit(self._work, ident, req_id, msg, frames[2:])
                return
            reply = self._dispatch(msg, frames[2:])
        except Exception as exc:  # noqa: BLE001 - one bad request never stops the loop
            if isinstance(exc, p.ProtocolError) and exc.req_id is not None:
                req_id = exc.req_id          # refused while decoding: still matchable
            reply = self._error(exc)
        self._deliver(self._frames(ident, req_id, reply))

    def _work(self, ident: bytes, req_id: int, msg: Any, payload: list[zmq.Frame]) -> None:
        try:
            reply = self._dispatch(msg, payload)
        except Exception as exc:  # noqa: BLE001
            reply = self._error(exc)
        sock = getattr(self._local, "push", None)
        if sock is None:
            sock = self._local.push = self._ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 1000)
            sock.connect(self._results_ep)
            self._pushes.append(sock)
        self._send(sock, ident, req_id, reply)

    def _send(self, sock: zmq.Socket, ident: bytes, req_id: int, reply: Any) -> None:
        sock.send_multipart(self._frames(ident, req_id, reply), copy=False)

    def _frames(self, ident: bytes, req_id: int, reply: Any) -> list[Any]:
        """The frames of ``reply``; a reply that cannot be encoded (a value JSON cannot
        carry, such as a non-finite float from a damaged record) is answered ``internal``
        instead: one bad reply never stops the loop (review of issue 25, A: it took the
        daemon down, and its graceful stop released the node's memory)."""
        msg, extra = reply if isinstance(reply, tuple) else (reply, [])
        try:
            return [ident, p.encode(msg, req_id), *extra]
        except Exception as exc:  # noqa: BLE001
            log.exception("a %s reply could not be encoded", getattr(msg, "OP", "?"))
            return [ident, p.encode(self._error(exc), req_id)]

    def _dispatch(self, msg: Any, payload: list[zmq.Frame]) -> Any:
        handler = getattr(self, "_on_" + msg.OP, None)
        if handler is None:
            raise p.ProtocolError("unknown_op", f"{msg.OP!r} is not a request here")
        job = getattr(msg, "job", None)
        if isinstance(job, str):             # every request naming a job, on both servers
            p.check_job(job)
        run = getattr(msg, "run", None)
        if isinstance(run, str):
            p.check_run(run)
        return handler(msg, payload)

    def _error(self, exc: Exception) -> p.Error:
        if isinstance(exc, p.ProtocolError):
            # not_found is an answer, not a fault (a restore with nothing to restore yet, a
            # parity holder asking a data node again for a step it never got): kept quiet.
            log.log(logging.DEBUG if exc.code == "not_found" else logging.WARNING,
                    "rejected request: %s", exc)
            self._on_reject(exc.code)
            return p.Error(exc.code, exc.message)
        log.exception("request failed")
        self._on_reject("internal")
        return p.Error("internal", f"{type(exc).__name__}: {exc}")

    def drain(self, timeout: float = 30.0) -> None:
        """Finish in-flight requests and answer them, then close the sockets."""
        self.stopping = True
        deadline = time.monotonic() + timeout
        while self._inflight > 0 and time.monotonic() < deadline:
            self.run_once(50)
        self._pool.shutdown(wait=True)
        self._forward_results()
        for sock in self._pushes:
            sock.close(0)
        self._sock.close(0)
        self._results.close(0)
