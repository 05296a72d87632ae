"""The peer server: answers group peers over ZeroMQ TCP (CURVE), on its own thread.

Handlers only check and route; the protection and rebuild logic live in
:mod:`snapshotd.cluster.protection` and :mod:`snapshotd.cluster.rebuild`.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import zmq

from ..common import protocol as p
from ..common._loop import RouterLoop
from . import peerproto as pp
from .peers import Security
from .protection import Protector

__all__ = ["PeerServer"]

log = logging.getLogger("snapshotd.peerserver")


class PeerServer(RouterLoop):
    """Serves :mod:`snapshotd.cluster.peerproto` for one node."""

    SLOW = frozenset({"put_data", "put_parity", "inventory", "get_data", "get_parity",
                      "get_version", "drop_newer"})
    MAX_PAYLOAD_FRAMES = 1 << 16

    def __init__(self, endpoint: str, context: zmq.Context, security: Security,
                 protector: Protector, me: int, metrics: Any, ready: Any,
                 reads: Any = None) -> None:
        self.reads = reads
        sock = context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        security.server(sock)
        sock.bind(endpoint)
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.protector = protector
        self.me = me
        self._ready = ready
        super().__init__(sock, context, workers=2, decode=pp.decode,
                         on_reject=lambda code: metrics.rejected.labels(reason="peer_" + code)
                         .inc(), housekeeping=protector.housekeeping, housekeeping_interval=1.0)
        self._thread = threading.Thread(target=self.serve, name="snapshotd-peers", daemon=True)

    def start(self) -> PeerServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopping = True
        self._thread.join(timeout=5)
        self.drain(5)

    def _on_ping(self, m: pp.Ping, _: Any) -> pp.Pong:
        return pp.Pong(self.me, bool(self._ready()))

    def _on_put_data(self, m: pp.PutData, frames: list[Any]) -> p.Ok:
        self.protector.on_put_data(m, [f.buffer for f in frames])
        return p.Ok(1)

    def _on_have_data(self, m: pp.HaveData, _: Any) -> p.Ok:
        return p.Ok(int(self.protector.on_have_data(m)))

    def _on_put_parity(self, m: pp.PutParity, frames: list[Any]) -> p.Ok:
        self.protector.on_put_parity(m, [f.buffer for f in frames])
        return p.Ok(1)

    def _on_protected(self, m: pp.Protected, _: Any) -> p.Ok:
        self.protector.on_protected(m)
        return p.Ok(1)

    def _on_dropped(self, m: pp.Dropped, _: Any) -> p.Ok:
        self.protector.on_dropped(m)
        return p.Ok(1)

    def _on_held(self, m: pp.Held, _: Any) -> p.Ok:
        return p.Ok(int(self.protector.on_held(m)))

    def _on_reports(self, m: pp.Reports, _: Any) -> pp.ReportsReply:
        if self.protector.relay is None:
            raise p.ProtocolError("bad_request", "this node relays no reports")
        return self.protector.relay.answer(m)

    def _on_inventory(self, m: pp.Inventory, _: Any) -> pp.InventoryReply:
        return self.protector.inventory()

    def _on_get_data(self, m: pp.GetData, _: Any) -> Any:
        return self.protector.get_data(m)

    def _on_get_parity(self, m: pp.GetParity, _: Any) -> Any:
        return self.protector.get_parity(m)

    def _on_get_version(self, m: pp.GetVersion, _: Any) -> Any:
        if self.reads is None:
            raise p.ProtocolError("bad_request", "this node serves no reads across nodes")
        return self.reads.serve(m)

    def _on_drop_newer(self, m: pp.DropNewer, _: Any) -> p.Ok:
        if self.reads is None:
            raise p.ProtocolError("bad_request", "this node serves no drops across nodes")
        return p.Ok(self.reads.on_drop_newer(m))
