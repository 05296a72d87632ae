"""PeerLinks: a peer that answers nothing for ``stale`` seconds gets a fresh connection (a
connection through a partition keeps what it sends in TCP's retransmission backoff, and a
connect attempt in SYN retries: after a partition healed, peers stayed unheard for about 35 s,
review of issue 16, round 4); a peer that answers keeps its connection."""

import threading
import time

import pytest
import zmq

from snapshotd.cluster import peerproto as pp
from snapshotd.cluster.peers import PeerLinks, Security
from snapshotd.common import protocol as p
from snapshotd.tools.localcluster import free_ports

pytestmark = pytest.mark.timeout(30)


def answering(ctx, port, stop):
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(f"tcp://127.0.0.1:{port}")
    while not stop.is_set():
        if sock.poll(50):
            ident, frame = sock.recv_multipart()
            req_id, _ = pp.decode(frame)
            sock.send_multipart([ident, p.encode(pp.Pong(1, True), req_id)])
    sock.close(0)


def test_a_silent_peer_gets_a_fresh_connection_and_an_answering_one_keeps_its_own():
    ctx = zmq.Context()
    alive, dead = free_ports(2)
    stop = threading.Event()
    server = threading.Thread(target=answering, args=(ctx, alive, stop), daemon=True)
    server.start()
    links = PeerLinks({1: f"tcp://127.0.0.1:{alive}", 2: f"tcp://127.0.0.1:{dead}"}, ctx,
                      Security())
    try:
        ping = pp.Ping(0, "c")
        deadline = time.monotonic() + 5
        while 1 not in links.ping_all([1, 2], ping, 0.1, stale=0.3):
            assert time.monotonic() < deadline, "the answering peer never answered"
        socks = dict(links._local.socks)
        for _ in range(5):                       # 0.5 s: longer than stale
            assert links.ping_all([1, 2], ping, 0.1, stale=0.3) == {1}
            time.sleep(0.1)
        assert links._local.socks[1] is socks[1]             # answered: kept
        assert links._local.socks.get(2) is not socks[2]     # silent: connected afresh
        # Without ``stale`` nothing is reset (the behaviour callers that read late answers
        # rely on).
        kept = dict(links._local.socks)
        for _ in range(4):
            links.ping_all([1, 2], ping, 0.1)
            time.sleep(0.1)
        assert links._local.socks[2] is kept[2]
    finally:
        links.close_thread()
        stop.set()
        server.join(2)
        ctx.term()
