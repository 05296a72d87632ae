"""Request/reply with the node daemon over one ZeroMQ DEALER socket, with timeouts.

A request that gets no answer in time raises :class:`DaemonUnavailable` and the socket is
rebuilt, so a late reply to an abandoned request is never mistaken for the next one's.
"""

from __future__ import annotations

import os
import threading
from datetime import timedelta
from typing import Any, Optional

import zmq

from . import _protocol as p

__all__ = ["Channel", "SnapshotError", "DaemonUnavailable", "DaemonError"]


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
                 context: Optional[zmq.Context] = None) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self._ctx = context or zmq.Context.instance()
        self._lock = threading.Lock()
        self._sock: Optional[zmq.Socket] = None
        self._next_id = 1

    def call(self, msg: Any, timeout: Optional[timedelta] = None) -> Any:
        """Send one request and return the reply message; raise on error or timeout."""
        wait_ms = int((timeout or self.timeout).total_seconds() * 1000)
        with self._lock:
            self._check_endpoint()
            sock = self._socket()
            req_id = self._next_id
            self._next_id += 1
            sock.send(p.encode(msg, req_id))
            while True:
                if not sock.poll(wait_ms):
                    self._reset()
                    raise DaemonUnavailable(
                        f"snapshotd at {self.endpoint} did not answer a {msg.OP!r} request "
                        f"within {wait_ms / 1000:.1f}s; is it running (snapshotd status)?")
                got_id, reply = p.decode(sock.recv())
                if got_id == req_id:
                    break
        if isinstance(reply, p.Error):
            raise DaemonError(reply.code, reply.message)
        return reply

    def _check_endpoint(self) -> None:
        if self.endpoint.startswith("ipc://") and not os.path.exists(self.endpoint[6:]):
            self._reset()
            raise DaemonUnavailable(
                f"no snapshotd socket at {self.endpoint[6:]}; start the daemon (snapshotd "
                "--control ...) or point SNAPSHOTD_ENDPOINT at the running one")

    def _socket(self) -> zmq.Socket:
        if self._sock is None:
            self._sock = self._ctx.socket(zmq.DEALER)
            self._sock.setsockopt(zmq.LINGER, 0)
            self._sock.connect(self.endpoint)
        return self._sock

    def _reset(self) -> None:
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None

    def close(self) -> None:
        with self._lock:
            self._reset()
