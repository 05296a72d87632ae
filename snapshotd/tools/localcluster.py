"""Run several snapshotd "nodes" on one machine: the demo and the integration tests use this.

Each node gets its own control socket, shared-memory directory and TCP port on loopback, and
its daemon runs as a real process that can be killed with a real signal and replaced.

Example::

    with LocalCluster(nodes=3, workdir="/tmp/demo", k=2, m=1) as cluster:
        cluster.start()
        cluster.kill(1)             # SIGKILL node 1's daemon
        cluster.replace(1)          # a fresh, empty daemon takes slot 1
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta

from ..common import protocol as p
from ..common.channel import Channel, SnapshotError

__all__ = ["NodeSpec", "DaemonProcess", "LocalCluster", "free_ports"]


def free_ports(count: int) -> list[int]:
    """Ports on 127.0.0.1 that were free a moment ago."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass(frozen=True)
class NodeSpec:
    """Where one node's daemon lives."""

    slot: int
    workdir: str
    port: int
    metrics_port: int
    shm_root: str = "/dev/shm"

    @property
    def control(self) -> str:
        return f"ipc://{self.workdir}/node{self.slot}/control.sock"

    @property
    def shm_dir(self) -> str:
        # The work directory's name and a hash of its path: two clusters (two test sessions)
        # whose directories share a name must not share memory.
        tag = hashlib.sha1(os.path.abspath(self.workdir).encode()).hexdigest()[:6]
        return os.path.join(self.shm_root, f"snapshotd-{os.path.basename(self.workdir)}-"
                            f"{tag}-{self.slot}")

    @property
    def listen(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> str:
        return os.path.join(self.workdir, f"node{self.slot}", "daemon.log")


@dataclass
class DaemonProcess:
    """One daemon as a child process."""

    spec: NodeSpec
    args: Sequence[str] = ()
    proc: subprocess.Popen | None = None
    env: dict[str, str] = field(default_factory=dict)

    def start(self) -> DaemonProcess:
        os.makedirs(os.path.dirname(self.spec.log_path), exist_ok=True)
        cmd = [sys.executable, "-m", "snapshotd", "--node-slot", str(self.spec.slot),
               "--control", self.spec.control, "--shm-dir", self.spec.shm_dir,
               "--metrics-port", str(self.spec.metrics_port), *self.args]
        log = open(self.spec.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **self.env}, start_new_session=True)
        log.close()
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Return once the daemon answers a status request."""
        deadline = time.monotonic() + timeout
        channel = Channel(self.spec.control, timedelta(seconds=1))
        try:
            while time.monotonic() < deadline:
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(f"daemon {self.spec.slot} exited with "
                                       f"{self.proc.returncode}; see {self.spec.log_path}")
                try:
                    channel.call(p.Status())
                    return
                except SnapshotError:
                    time.sleep(0.05)
        finally:
            channel.close()
        raise TimeoutError(f"daemon {self.spec.slot} not ready in {timeout}s; "
                           f"see {self.spec.log_path}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 30.0) -> int:
        """Send ``sig`` and wait for the process to exit; return its exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)


class LocalCluster:
    """``nodes`` daemons on loopback, each in its own slot, all peers of each other."""

    def __init__(self, nodes: int, workdir: str, *, k: int = 4, m: int = 2,
                 args: Sequence[str] = (), shm_root: str = "/dev/shm",
                 keys: str | None = None) -> None:
        self.workdir = os.path.abspath(workdir)
        os.makedirs(self.workdir, exist_ok=True)
        ports = free_ports(2 * nodes)
        self.specs = [NodeSpec(i, self.workdir, ports[2 * i], ports[2 * i + 1], shm_root)
                      for i in range(nodes)]
        self.k, self.m = k, m
        self.args = list(args)
        self.daemons: dict[int, DaemonProcess] = {}
        self.keys = keys
        #: Extra daemon arguments for one slot (e.g. another key, for attack tests), and
        #: extra environment (e.g. a wall clock shifted by the fault tests).
        self.slot_args: dict[int, list[str]] = {}
        self.slot_env: dict[int, dict[str, str]] = {}

    def peer_args(self) -> list[str]:
        peers = ",".join(f"{s.slot}={s.listen[len('tcp://'):]}" for s in self.specs)
        return ["--peers", peers, "--k", str(self.k), "--m", str(self.m)]

    def daemon_args(self, slot: int) -> list[str]:
        extra = self.slot_args.get(slot, [])
        if len(self.specs) == 1:
            return [*self.args, *extra]
        keys = ["--keys", self.keys] if self.keys else []
        return ["--listen", self.specs[slot].listen, *self.peer_args(), *keys, *self.args,
                *extra]

    def start(self, slots: Sequence[int] | None = None, timeout: float = 30.0) -> None:
        chosen = list(range(len(self.specs)) if slots is None else slots)
        for slot in chosen:
            self.daemons[slot] = DaemonProcess(self.specs[slot], self.daemon_args(slot),
                                               env=dict(self.slot_env.get(slot, {}))).start()
        for slot in chosen:
            self.daemons[slot].wait_ready(timeout)

    def kill(self, slot: int, sig: int = signal.SIGKILL) -> int:
        return self.daemons[slot].kill(sig)

    def replace(self, slot: int, wipe: bool = True, timeout: float = 30.0) -> DaemonProcess:
        """Start a fresh daemon in ``slot`` (with empty memory when ``wipe``)."""
        if slot in self.daemons and self.daemons[slot].alive():
            self.kill(slot)
        if wipe:
            shutil.rmtree(self.specs[slot].shm_dir, ignore_errors=True)
        self.start([slot], timeout)
        return self.daemons[slot]

    def stop(self) -> None:
        """SIGTERM every daemon at once, then wait for each (SIGKILL after 30 s): each drains
        what it has in flight, in parallel rather than one after the other."""
        alive = [d for d in self.daemons.values() if d.alive()]
        for daemon in alive:
            assert daemon.proc is not None
            daemon.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        for daemon in alive:
            try:
                daemon.kill(signal.SIGTERM, timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                daemon.kill(signal.SIGKILL)
        for spec in self.specs:
            shutil.rmtree(spec.shm_dir, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
