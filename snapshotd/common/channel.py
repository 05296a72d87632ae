"""Request/reply with the node daemon over one ZeroMQ DEALER socket, with timeouts.

Used by the trainer client, by ``snapshotctl`` and by the test harness; like the protocol it
needs no torch, and the client distribution ships the same file as ``_channel.py``.

A request that gets no answer in time raises :class:`DaemonUnavailable` and the socket is
rebuilt, so a late reply to an abandoned request is never mistaken for the next one's.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from datetime import timedelta
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

try:
    from . import protocol as p  # type: ignore[attr-defined,unused-ignore]
except ImportError:  # inside snapshotd_client, where the same module is named _protocol
    from . import _protocol as p  # type: ignore[no-redef,attr-defined]

__all__ = ["Channel", "SnapshotError", "DaemonUnavailable", "DaemonError"]


#: How long a request waits for the connection to the daemon to come up.
_CONNECT_MS = 3000


class SnapshotError(Exception):
    """Base class of every error raised by ``snapshotd_client``."""


class DaemonUnavailable(SnapshotError):
    """No snapshotd answers at the endpoint."""


class DaemonError(SnapshotError):
    """The daemon refused a request; ``code`` is the daemon's reason (e.g. ``memory_full``)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"snapshotd refused the request ({code}): {message}")
        self.code = code
        self.message = message


class Channel:
    """Thread-safe request/reply to one daemon endpoint."""

    def __init__(self, endpoint: str, timeout: timedelta = timedelta(seconds=30),
                 context: zmq.Context | None = None) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self._ctx = context or zmq.Context.instance()
        self._lock = threading.Lock()
        self._sock: zmq.Socket | None = None
        self._monitor: Any = None
        self._next_id = 1

    def call(self, msg: Any, timeout: timedelta | None = None) -> Any:
        """Send one request and return the reply message; raise on error or timeout."""
        wait_ms = int((timeout or self.timeout).total_seconds() * 1000)
        with self._lock:
            if self._sock is not None and self._disconnected():
                self._reset()           # the daemon went away since the last request
            self._check_endpoint()
            sock = self._socket()
            req_id = self._next_id
            self._next_id += 1
            try:
                sock.send(p.encode(msg, req_id))
            except zmq.Again:
                self._reset()
                raise DaemonUnavailable(
                    f"cannot connect to snapshotd at {self.endpoint}: is it running "
                    "(snapshotctl status)?") from None
            reply = self._await(sock, req_id, wait_ms, msg.OP)
        if isinstance(reply, p.Error):
            raise DaemonError(reply.code, reply.message)
        return reply

    def _await(self, sock: zmq.Socket, req_id: int, wait_ms: int, op: str) -> Any:
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        deadline = time.monotonic() + wait_ms / 1000
        while (left := deadline - time.monotonic()) > 0:
            events = dict(poller.poll(int(left * 1000) + 1))
            if self._monitor in events and self._disconnected():
                self._reset()
                raise DaemonUnavailable(f"snapshotd at {self.endpoint} went away during a "
                                        f"{op!r} request; is it running (snapshotctl status)?")
            if sock in events:
                try:
                    got_id, reply = p.decode(sock.recv())
                except p.ProtocolError as exc:
                    self._reset()
                    raise DaemonError(exc.code, f"the reply to a {op!r} request could not be "
                                      f"read: {exc.message}") from None
                # One request is outstanding per socket (calls hold the lock, and a timed-out
                # one resets the socket), so an error that the daemon could not tie to a
                # request id (it could not read the request) answers this one.
                if got_id == req_id or (got_id == 0 and isinstance(reply, p.Error)):
                    return reply
        self._reset()
        raise DaemonUnavailable(f"snapshotd at {self.endpoint} did not answer a {op!r} request "
                                f"within {wait_ms / 1000:.1f}s; is it running (snapshotctl "
                                "status)?")

    def _disconnected(self) -> bool:
        while True:
            try:
                event = recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.Again:
                return False
            if event["event"] == zmq.EVENT_DISCONNECTED:
                return True

    def _check_endpoint(self) -> None:
        """Fail at once, without waiting for a timeout, when nobody listens on the ipc path."""
        if not self.endpoint.startswith("ipc://"):
            return
        path = self.endpoint[6:]
        if not os.path.exists(path):
            self._reset()
            raise DaemonUnavailable(
                f"no snapshotd socket at {path}; start the daemon (snapshotd --control ...) "
                "or point SNAPSHOTD_ENDPOINT at the running one")
        if self._sock is None:
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except ConnectionRefusedError:
                raise DaemonUnavailable(
                    f"snapshotd at {self.endpoint} is not running (the socket file is left "
                    "from a daemon that died); restart it") from None
            except OSError:
                pass
            finally:
                probe.close()

    def _socket(self) -> zmq.Socket:
        if self._sock is None:
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            # Queue nothing for a daemon that is not connected: fail fast instead.
            sock.setsockopt(zmq.IMMEDIATE, 1)
            sock.setsockopt(zmq.SNDTIMEO, _CONNECT_MS)
            self._monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
            sock.connect(self.endpoint)
            self._sock = sock
        return self._sock

    def _reset(self) -> None:
        if self._sock is not None:
            self._sock.disable_monitor()
            self._monitor.close(0)
            self._sock.close(0)
            self._sock = None

    def close(self) -> None:
        with self._lock:
            self._reset()
