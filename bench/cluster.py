"""Benchmarks of a group on loopback: node rebuild and network bytes per version.

Six real daemons (k=4, m=2, CURVE on, as in production) each hold one rank's ``S`` bytes. One
daemon is killed and replaced by an empty one; the rebuild time comes from the replacement's own
``snapshotd_rebuild_duration_seconds``. The baseline streams the same bytes between two processes
over raw ZeroMQ DEALER/ROUTER TCP sockets on loopback, with and without CURVE, in the same run.
"""

from __future__ import annotations

import multiprocessing as mp
import tempfile
import time
import urllib.request
from typing import Any

import torch
import zmq
from prometheus_client.parser import text_string_to_metric_families

from snapshotd.ops.ctl import main as ctl
from snapshotd.tools.localcluster import LocalCluster, free_ports
from snapshotd_client import SnapshotClient

from .node import make_state, stats

__all__ = ["rebuild_case", "zmq_stream", "metric"]

MIB = 1 << 20


def metric(port: int, name: str, **labels: str) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    return sum(s.value for f in text_string_to_metric_families(body.decode())
               for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def _sink(endpoint: str, secret: bytes, public: bytes, frames: int) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    if secret:
        sock.curve_secretkey, sock.curve_publickey, sock.curve_server = secret, public, True
    sock.bind(endpoint)
    for _ in range(frames):
        ident, _data = sock.recv_multipart(copy=False)
    sock.send_multipart([ident.bytes, b"done"])
    sock.close(0)
    ctx.term()


def zmq_stream(nbytes: int, curve: bool, frame: int = 16 * MIB) -> float:
    """Seconds to push ``nbytes`` through one raw ZeroMQ TCP connection on loopback."""
    public, secret = zmq.curve_keypair() if curve else (b"", b"")
    endpoint = f"tcp://127.0.0.1:{free_ports(1)[0]}"
    count = max(1, nbytes // frame)
    proc = mp.get_context("spawn").Process(target=_sink, args=(endpoint, secret, public, count))
    proc.start()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    if curve:
        sock.curve_secretkey, sock.curve_publickey, sock.curve_serverkey = secret, public, public
    sock.connect(endpoint)
    payload = bytearray(frame)
    time.sleep(0.5)
    start = time.perf_counter()
    for _ in range(count):
        sock.send(payload, copy=False)
    sock.recv()
    seconds = time.perf_counter() - start
    sock.close(0)
    ctx.term()
    proc.join()
    return seconds


def rebuild_case(nbytes: int, repeats: int = 2) -> dict[str, Any]:
    """Rebuild one node's ``nbytes`` from five peers; bytes sent per node per version."""
    workdir = tempfile.mkdtemp(prefix="snapbench-")
    ctl(["keygen", f"{workdir}/keys"])
    cluster = LocalCluster(6, workdir, k=4, m=2, keys=f"{workdir}/keys",
                           args=["--memory-limit", str(4 * nbytes + 256 * MIB),
                                 "--log-level", "WARNING", "--peer-timeout", "3"])
    cluster.start()
    try:
        state = make_state(nbytes)
        for spec in cluster.specs:
            with SnapshotClient(spec.control, job="bench", rank=spec.slot) as client:
                client.save(1, state).result()
        _wait_protected(cluster)
        sent = [metric(s.metrics_port, "snapshotd_peer_bytes_total", direction="sent")
                for s in cluster.specs]
        seconds, wall = [], []
        for _ in range(repeats):
            cluster.kill(1)
            start = time.perf_counter()
            cluster.replace(1)
            with SnapshotClient(cluster.specs[1].control, job="bench", rank=1) as client:
                step, restored = client.restore()
            wall.append(time.perf_counter() - start)
            assert step == 1 and torch.equal(restored["model"]["layer0.weight"],
                                             state["model"]["layer0.weight"])
            seconds.append(metric(cluster.specs[1].metrics_port,
                                  "snapshotd_rebuild_duration_seconds_sum"))
        moved = 4 * nbytes  # k fragments per stripe are fetched to decode one
        return {"bytes": nbytes, "rebuild": stats(seconds), "replace_to_restored": stats(wall),
                "fetched_bytes": moved,
                "zmq_stream_curve": stats([zmq_stream(moved, True) for _ in range(repeats)]),
                "zmq_stream_plain": stats([zmq_stream(moved, False) for _ in range(repeats)]),
                "sent_per_node": statistics_median(sent),
                "expected_sent_per_node": (1 + (2 - 1) / 4) * nbytes}
    finally:
        cluster.stop()


def statistics_median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def _wait_protected(cluster: LocalCluster, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(metric(s.metrics_port, "snapshotd_versions", state="protected") >= 1
               for s in cluster.specs):
            return
        time.sleep(0.2)
    raise TimeoutError("versions were not protected in time")
