"""Peer transport: CURVE security, request/reply links to peers, liveness by heartbeats.

Every daemon of a cluster shares one CURVE key pair (``snapshotctl keygen``). A server accepts
only clients presenting the cluster's public key (checked by ZAP), and a client only talks to a
server holding the cluster's secret key, so a peer with another key can neither read nor write.

Example::

    links = PeerLinks({1: "tcp://10.0.0.2:7600"}, context, security)
    reply, frames = links.call(1, Ping(slot=0, cluster="c"), timeout=timedelta(seconds=1))
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from ..common import locks
from ..common import protocol as p
from .peerproto import Ping, Pong, decode

__all__ = ["Security", "PeerLinks", "PeerError", "Heartbeats", "load_security"]

log = logging.getLogger("snapshotd.peers")
#: How long a send waits for a connection to the peer (ZeroMQ SNDTIMEO, ms).
_SEND_TIMEOUT_MS = 5000


class PeerError(Exception):
    """A peer did not answer in time, or answered with an error (``code``: the error's code,
    empty when it did not answer)."""

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Security:
    """CURVE keys of the cluster, or ``insecure`` (plain TCP, for tests and trusted networks)."""

    public: bytes = b""
    secret: bytes = b""
    keys_dir: str = ""

    @property
    def insecure(self) -> bool:
        return not self.secret

    def server(self, sock: zmq.Socket) -> None:
        if not self.insecure:
            sock.curve_secretkey = self.secret
            sock.curve_publickey = self.public
            sock.curve_server = True

    def client(self, sock: zmq.Socket) -> None:
        if not self.insecure:
            sock.curve_secretkey = self.secret
            sock.curve_publickey = self.public
            sock.curve_serverkey = self.public

    def authenticator(self, context: zmq.Context) -> ThreadAuthenticator | None:
        """Start ZAP: only clients with a public key in ``keys_dir`` get in."""
        if self.insecure:
            return None
        auth = ThreadAuthenticator(context, log=logging.getLogger("snapshotd.zap"))
        auth.start()
        auth.configure_curve(domain="*", location=self.keys_dir)
        return auth


def load_security(keys_dir: str, insecure: bool) -> Security:
    """Read ``cluster.key_secret`` from ``keys_dir``; refuse to run without keys unless told."""
    if not keys_dir:
        if insecure:
            return Security()
        raise ValueError("peer traffic needs the cluster CURVE keys: run `snapshotctl keygen "
                         "DIR` once, copy DIR to every node and pass --keys DIR (or pass "
                         "--insecure on a trusted network)")
    path = os.path.join(keys_dir, "cluster.key_secret")
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the cluster key {path}: {exc}") from None
    if secret is None:
        raise ValueError(f"{path} holds no secret key; use the file `snapshotctl keygen` wrote")
    return Security(public, secret, keys_dir)


class PeerLinks:
    """Request/reply to peers over DEALER sockets; one socket per (thread, peer)."""

    def __init__(self, endpoints: dict[int, str], context: zmq.Context, security: Security,
                 on_bytes: Callable[[str, int], None] = lambda direction, n: None) -> None:
        self.endpoints = endpoints
        self._ctx = context
        self._security = security
        self._local = threading.local()
        self._on_bytes = on_bytes
        self._ids = iter(range(1, 1 << 62))
        self._lock = locks.lock("peers")

    def call(self, slot: int, msg: Any, frames: Sequence[Any] = (),
             timeout: timedelta = timedelta(seconds=30),
             while_up: Callable[[], bool] | None = None) -> tuple[Any, list[zmq.Frame]]:
        """Send ``msg`` (and payload ``frames``) to ``slot``; return the reply and its frames.

        A connection not established within the send timeout (5 s: on a loaded node the
        peer's CURVE handshake can take longer) fails the call as not reachable; with
        ``while_up`` the send keeps waiting for it, within ``timeout``, while ``while_up()``
        (the heartbeats) says the peer is up (a large transfer that failed so was sent again
        from its first chunk), and the wait for the answer ends once it says the peer is
        down."""
        sock = self._socket(slot)
        with self._lock:
            req_id = next(self._ids)
        sent = sum(memoryview(f).nbytes for f in frames)
        deadline = time.monotonic() + timeout.total_seconds()
        if while_up is not None:                 # tries of a quarter second, see below
            sock.setsockopt(zmq.SNDTIMEO, 250)
        try:
            while True:
                try:
                    sock.send_multipart([p.encode(msg, req_id), *frames], copy=False)
                    break
                except zmq.Again:
                    if while_up is None or time.monotonic() >= deadline or not while_up():
                        raise PeerError(f"node {slot} ({self.endpoints[slot]}) is not "
                                        "reachable") from None
        finally:
            if while_up is not None:
                sock.setsockopt(zmq.SNDTIMEO, _SEND_TIMEOUT_MS)
        self._on_bytes("sent", sent)
        while (left := deadline - time.monotonic()) > 0:
            # With while_up, the wait for the answer ends as soon as the peer is down (or
            # this daemon stops): a peer that died mid-transfer costs its peer timeout, not
            # the whole transfer timeout.
            if not sock.poll(int((left if while_up is None else min(left, 0.25)) * 1000) + 1):
                if while_up is None or not while_up():
                    break
                continue
            parts = sock.recv_multipart(copy=False)
            got_id, reply = decode(parts[0].bytes)
            if got_id != req_id:
                continue
            self._on_bytes("received", sum(f.buffer.nbytes for f in parts[1:]))
            if isinstance(reply, p.Error):
                raise PeerError(f"node {slot} refused {msg.OP}: {reply.code}: {reply.message}",
                                reply.code)
            return reply, parts[1:]
        self._reset(slot)
        raise PeerError(f"node {slot} ({self.endpoints[slot]}) did not answer {msg.OP} within "
                        f"{timeout.total_seconds():.1f}s")

    def call_all(self, slots: Sequence[int], msg: Any, timeout: float) -> set[int]:
        """Send ``msg`` to every slot at once; return the slots that answered it (not with an
        error) within ``timeout`` in all: a slot that is down costs no more than the others."""
        # (a late answer is skipped by its id next time)
        return self._fan_out(slots, msg, timeout, lambda req_id, got_id, reply: (
            None if got_id != req_id else not isinstance(reply, p.Error)))

    def call_each(self, msgs: dict[int, Any], timeout: float,
                  replies: dict[int, Any] | None = None, stale: float | None = None
                  ) -> set[int]:
        """Send each slot its own message at once; return the slots that answered it (not
        with an error) within ``timeout`` in all (their answers into ``replies``). ``stale``:
        see :meth:`ping_all`."""
        return self._fan_out(list(msgs), msgs, timeout, lambda req_id, got_id, reply: (
            None if got_id != req_id else not isinstance(reply, p.Error)), replies, stale)

    def ping_all(self, slots: Sequence[int], msg: Any, timeout: float,
                 stale: float | None = None) -> set[int]:
        """Send ``msg`` to every slot at once; return the slots that answered in ``timeout``.

        ``stale``: a slot that has answered nothing on this thread for that many seconds gets
        a fresh connection (then again every ``stale`` seconds while it stays silent). A
        connection through a partition keeps what it sends in TCP's retransmission backoff,
        and a connect attempt waits for SYN retries, each growing to tens of seconds: without
        a fresh one a peer stayed unheard for about 35 s after a partition healed (review of
        issue 16, round 4)."""
        # this ping's answer or a late one: alive
        return self._fan_out(slots, msg, timeout,
                             lambda _req, _got, reply: True if isinstance(reply, Pong) else None,
                             stale=stale)

    def _fan_out(self, slots: Sequence[int], msg: Any, timeout: float,
                 judge: Callable[[int, int, Any], bool | None],
                 replies: dict[int, Any] | None = None,
                 stale: float | None = None) -> set[int]:
        """Send ``msg`` (or ``msg[slot]``, a dict) to every slot at once and read replies until
        ``timeout``:
        ``judge(request id, reply id, reply)`` says whether a reply answers (True), ends the
        wait for that slot without answering (False), or is to be skipped (None)."""
        pending: dict[zmq.Socket, tuple[int, int]] = {}
        for slot in slots:
            sock = self._socket(slot)
            with self._lock:
                req_id = next(self._ids)
            try:
                sock.send(p.encode(msg[slot] if isinstance(msg, dict) else msg, req_id),
                          zmq.NOBLOCK)
                pending[sock] = (slot, req_id)
            except zmq.Again:  # not connected (yet): keep the socket so the handshake can finish
                pass
        answered: set[int] = set()
        poller = zmq.Poller()
        for sock in pending:
            poller.register(sock, zmq.POLLIN)
        deadline = time.monotonic() + timeout
        while pending and (left := deadline - time.monotonic()) > 0:
            for sock, _ in poller.poll(int(left * 1000) + 1):
                slot, req_id = pending[sock]
                got_id, reply = decode(sock.recv_multipart()[0])
                verdict = judge(req_id, got_id, reply)
                if verdict is None:
                    continue
                if verdict:
                    answered.add(slot)
                    if replies is not None:
                        replies[slot] = reply
                poller.unregister(sock)
                del pending[sock]
        if stale is not None:
            now = time.monotonic()
            heard = self._local.__dict__.setdefault("heard", {})
            for slot in slots:
                if slot in answered:
                    heard[slot] = now
                elif now - heard.setdefault(slot, now) > stale:
                    self._reset(slot)                # the next call connects afresh
                    heard[slot] = now
        return answered

    def late_pongs(self) -> set[int]:
        """Slots whose answer to an earlier ping arrived after it was given up on."""
        alive: set[int] = set()
        for slot, sock in self._local.__dict__.get("socks", {}).items():
            while sock.poll(0):
                _, reply = decode(sock.recv_multipart()[0])
                if isinstance(reply, Pong):
                    alive.add(slot)
        return alive

    def _socket(self, slot: int) -> zmq.Socket:
        socks = self._local.__dict__.setdefault("socks", {})
        sock = socks.get(slot)
        if sock is None:
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.IMMEDIATE, 1)
            sock.setsockopt(zmq.SNDTIMEO, _SEND_TIMEOUT_MS)
            self._security.client(sock)
            sock.connect(self.endpoints[slot])
            socks[slot] = sock
        return sock

    def open_slots(self) -> list[int]:
        """The slots this thread has a socket to."""
        return list(self._local.__dict__.get("socks", {}))

    def close(self, slot: int) -> None:
        """Close this thread's socket to ``slot`` (its connection goes)."""
        self._reset(slot)

    def _reset(self, slot: int) -> None:
        sock = self._local.__dict__.get("socks", {}).pop(slot, None)
        if sock is not None:
            sock.close(0)

    def close_thread(self) -> None:
        """Close this thread's sockets (call at the end of a thread that used the links)."""
        for sock in self._local.__dict__.pop("socks", {}).values():
            sock.close(0)


class Heartbeats:
    """Pings every peer each ``interval``; a peer silent for ``timeout`` is down."""

    def __init__(self, links: PeerLinks, me: int, cluster: str, interval: float,
                 timeout: float, clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[int, bool], None] = lambda slot, up: None) -> None:
        self.links = links
        self.me = me
        self.cluster = cluster
        self.interval = interval
        self.timeout = timeout
        self._clock = clock
        self._on_change = on_change
        self._last_ok: dict[int, float] = {}
        self._up: dict[int, bool] = {s: False for s in links.endpoints if s != me}
        self.stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="snapshotd-heartbeat",
                                        daemon=True)

    def start(self) -> Heartbeats:
        self._thread.start()
        return self

    def up(self, slot: int) -> bool:
        return slot == self.me or self._up.get(slot, False)

    def status(self) -> dict[int, bool]:
        return dict(self._up)

    def beat_once(self) -> None:
        """Ping every peer once and update who is up."""
        answered = self.links.ping_all(list(self._up), Ping(self.me, self.cluster),
                                       max(0.2, self.interval * 0.8), stale=self.timeout)
        answered |= self.links.late_pongs()
        for slot in self._up:
            if slot in answered:
                self._last_ok[slot] = self._clock()
            up = self._clock() - self._last_ok.get(slot, -1e18) < self.timeout
            if up != self._up[slot]:
                self._up[slot] = up
                log.log(logging.INFO if up else logging.WARNING, "peer node %d is %s", slot,
                        "up" if up else "DOWN")
                self._on_change(slot, up)

    def _run(self) -> None:
        while not self.stopping.is_set():
            started = self._clock()
            self.beat_once()
            self.stopping.wait(max(0.0, self.interval - (self._clock() - started)))
        self.links.close_thread()

    def stop(self) -> None:
        self.stopping.set()
        self._thread.join(timeout=5)
