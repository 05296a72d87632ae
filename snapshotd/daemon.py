"""The ``snapshotd`` process: wires config, store, control server and metrics, and runs them.

Run it as ``snapshotd --node-slot 0 --memory-limit 8GiB`` (or ``python -m snapshotd``). On
SIGTERM or SIGINT it refuses new writes, finishes the commits in flight, answers them, releases
its segments and exits 0. A daemon that was killed leaves its directory behind; the next one
adopts the committed versions in it and removes the rest.
"""

from __future__ import annotations

import argparse
import ctypes
import faulthandler
import fcntl
import logging
import os
import secrets
import signal
import sys
from collections.abc import Sequence

import zmq
from prometheus_client import CollectorRegistry

from .cluster.start import ClusterNode, start_cluster
from .common.config import Config, ConfigError, add_arguments, build_config
from .common.metrics import Metrics, StoreCollector
from .node.server import ControlServer
from .node.store import Store, Version
from .ops.http import MetricsServer
from .ops.persist import Persister, node_name

__all__ = ["Daemon", "main"]

log = logging.getLogger("snapshotd")

#: Heap buffers of at least this many bytes are mapped on their own, and unmapped when freed.
MMAP_THRESHOLD = 1 << 20


def give_large_buffers_back() -> bool:
    """Have the C allocator map every buffer of :data:`MMAP_THRESHOLD` bytes or more on its
    own and unmap it when it is freed (glibc's ``mallopt(M_MMAP_THRESHOLD)``, which also stops
    it raising that threshold after each such free); False where that is not glibc.

    The daemon's large transient buffers (fragments fetched, decoded chunks, payloads, ZeroMQ
    messages) are counted in the memory budget while they are held; by default glibc keeps
    the memory of the freed ones in its arenas for the next ones: 30-60 MiB stayed in the
    daemon's RSS after a lost rank's decode, counted nowhere (issue 24, finding 6)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        return bool(libc.mallopt(-3, MMAP_THRESHOLD))       # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


#: What the daemon needs beside the budget inside its memory cgroup (its own heap: the
#: interpreter, ZeroMQ, bookkeeping outside the budget), at least.
CGROUP_HEADROOM = 96 << 20


def cgroup_memory_limit(proc: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup"
                        ) -> tuple[int, str] | None:
    """The memory limit of this process's cgroup (v2 ``memory.max``, else v1
    ``memory.limit_in_bytes``) and the file it was read from; None where there is none (or
    it cannot be read). The daemon's segments are charged to it: a budget above it gets the
    daemon killed by the kernel, not saves refused (review of issue 25, C)."""
    try:
        with open(proc) as fh:
            lines = [line.rstrip("\n").split(":", 2) for line in fh]
    except OSError:
        return None
    candidates = []
    for parts in lines:
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            candidates.append(os.path.join(root, path.lstrip("/"), "memory.max"))
        elif "memory" in controllers.split(","):
            candidates.append(os.path.join(root, "memory", path.lstrip("/"),
                                           "memory.limit_in_bytes"))
    for name in candidates:
        try:
            with open(name) as fh:
                text = fh.read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < (1 << 60):    # v1 "unlimited" is ~2^63
            return int(text), name
    return None


def fit_cgroup(memory_limit: int, found: tuple[int, str] | None) -> int:
    """``--memory-limit`` lowered to what the cgroup leaves beside the daemon's own heap
    (:data:`CGROUP_HEADROOM`, or a tenth of the cgroup's limit), with a warning; unchanged
    where it fits."""
    if found is None:
        return memory_limit
    limit, where = found
    room = limit - max(CGROUP_HEADROOM, limit // 10)
    if memory_limit <= room:
        return memory_limit
    fitted = max(room, 0)
    log.warning("--memory-limit %d bytes does not fit this daemon's memory cgroup (%d bytes, "
                "%s) with room for the daemon itself: the budget is lowered to %d bytes, so "
                "saves beyond it are refused (memory_full) instead of the kernel killing the "
                "daemon; raise the cgroup's limit (systemd MemoryMax=, the pod's memory "
                "limit) or lower --memory-limit", memory_limit, limit, where, fitted)
    return fitted


class Daemon:
    """One node's daemon. ``start()`` then ``serve()``; ``stop()`` from a signal handler."""

    def __init__(self, config: Config, *, context: zmq.Context | None = None,
                 registry: CollectorRegistry | None = None) -> None:
        self.config = config
        self.context = context or zmq.Context()
        self.registry = registry or CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.store = Store(config.shm_dir, fit_cgroup(config.memory_limit,
                                                      cgroup_memory_limit()), config.keep)
        self.server: ControlServer | None = None
        self.cluster: ClusterNode | None = None
        self.http: MetricsServer | None = None
        self.persister: Persister | None = None
        self._lock_fd: int | None = None

    def start(self) -> None:
        self._take_lock()
        # Retention of what is adopted waits for the job-wide steps the cluster kept (the
        # floors file): evicting first would drop the step a lagging node relies on.
        report = self.store.open(adopt=self.config.adopt, retain=False)
        log.log(logging.WARNING if report["discarded"] else logging.INFO,
                "segments in %s: adopted %d committed versions, removed %d leftovers (%d bytes)%s",
                self.config.shm_dir, report["adopted"], report["removed"],
                report["bytes_removed"], f", {report['discarded']} of them committed versions "
                "whose manifest could not be trusted (see the warnings above)"
                if report["discarded"] else "")
        if self.config.persist_dir:
            self.persister = Persister(self.store, self.config.persist_dir,
                                       every=self.config.persist_every,
                                       keep=self.config.persist_keep,
                                       rate=self.config.persist_rate, metrics=self.metrics,
                                       node=node_name(self.config.node_slot)).start()
        self.cluster = start_cluster(self.config, self.store, self.context, self.metrics)
        if self.persister is not None and self.cluster is not None and \
                self.cluster.reads is not None:
            persister = self.persister
            # A peer's DropNewer may come late (sent again until answered): it removes only
            # the persisted versions this node committed before it.
            self.cluster.reads.on_dropped = lambda job, rank, newer_than: persister.dropped(
                job, [rank], newer_than=newer_than, everyone=False)
        self.store.retain_all()
        self.registry.register(StoreCollector(
            self.store, peers=self.cluster.heartbeats.status if self.cluster else None,
            insecure=bool(self.cluster and self.cluster.security.insecure)))
        self.server = ControlServer(
            self.store, self.config.control, context=self.context, metrics=self.metrics,
            node_slot=self.config.node_slot, workers=self.config.workers,
            reap_interval=self.config.reap_interval,
            on_commit=self._on_commit,
            on_drop=(self.cluster.protector.node_dropped if self.cluster
                     else lambda job, steps, timeline=None: None),
            recovery=self.cluster.recovery if self.cluster else None,
            peers=self.cluster.heartbeats.status if self.cluster else None,
            persister=self.persister, job_isolation=self.config.job_isolation,
            admin_token=self._admin_token() if self.config.job_isolation else "",
            coding=(self.cluster.protector.group.k, self.cluster.protector.group.m)
            if self.cluster else (0, 0),
            reads=self.cluster.reads if self.cluster else None)
        if self.config.metrics_port is not None:
            self.http = MetricsServer(self.registry, self.config.metrics_port,
                                      ready=self.readiness).start()
            log.info("metrics on http://0.0.0.0:%d/metrics", self.http.port)
        log.info("snapshotd node slot %d serving %s (memory limit %d bytes, keep %d)",
                 self.config.node_slot, self.server.endpoint, self.config.memory_limit,
                 self.config.keep)

    def _admin_token(self) -> str:
        """A fresh admin token in ``<shm-dir>/admin.token`` (0600, in the daemon's 0700
        directory): who can read it can read the segments anyway. snapshotctl
        --admin-token-file uses it to reach every job under --job-isolation."""
        token = secrets.token_hex(32)
        path = os.path.join(self.config.shm_dir, "admin.token")
        fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(token + "\n")
        os.replace(path + ".tmp", path)
        return token

    def _on_commit(self, version: Version) -> None:
        """After a commit: erasure-code the node version, persist every Nth one."""
        ranks = self.store.at_step(version.job, version.step)   # one listing per commit
        if self.cluster is not None:
            self.cluster.protector.on_commit(version, ranks)
        if self.persister is not None and len(ranks) >= version.local_world_size:
            self.persister.maybe(version.job, version.step)

    def readiness(self) -> tuple[bool, str]:
        """Ready once the store is open and the daemon accepts writes."""
        if self.server is None or self.server.stopping:
            return False, "not serving"
        if self.cluster is not None:
            if not self.cluster.recovery.ready:
                return False, "rebuilding from peers"
            down = sorted(s for s, up in self.cluster.heartbeats.status().items() if not up)
            if down:
                return False, f"group peers {down} do not answer"
        return True, "ready"

    def _take_lock(self) -> None:
        self.store.dir.prepare()
        fd = os.open(os.path.join(self.config.shm_dir, ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(f"another snapshotd is running on {self.config.shm_dir}; give "
                              "each daemon its own --shm-dir") from None
        self._lock_fd = fd

    def serve(self) -> None:
        assert self.server is not None, "call start() first"
        self.server.serve()

    def stop(self) -> None:
        """Ask the loop to stop (safe from a signal handler)."""
        if self.server is not None:
            self.server.stopping = True
        self.store.accepting = False

    def close(self) -> None:
        """Drain in-flight requests, release every segment, close sockets."""
        if self.server is not None:
            self.server.close()
        if self.cluster is not None:
            self.cluster.stop()
        if self.persister is not None:
            self.persister.stop()
        if self.http is not None:
            self.http.close()
        self.store.close()
        self.context.destroy(linger=0)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
        log.info("snapshotd stopped; segments released")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="snapshotd", description="Per-node in-memory snapshot daemon for training jobs.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        config = build_config(args)
    except ConfigError as exc:
        print(f"snapshotd: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s snapshotd[%(process)d] %(levelname)s %(message)s")
    if not give_large_buffers_back():
        log.info("not glibc: freed large buffers may stay in the allocator's arenas")
    daemon = Daemon(config)
    try:
        daemon.start()
    except (ConfigError, ValueError, OSError, zmq.ZMQError) as exc:
        log.error("cannot start: %s", exc)
        return 1
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: daemon.stop())
    # `kill -USR1 <pid>` writes every thread's stack to the log (stderr): what a daemon that
    # does not stop, or does not answer, is waiting for.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        daemon.serve()
    except Exception:  # noqa: BLE001
        # Not a stop that was asked for: leave the node's memory (segments, parity, floors)
        # as a SIGKILL would, for the restart to adopt; a graceful close would release it
        # (review of issue 25, A: a failed reply took the daemon down and its close deleted
        # every committed step).
        log.critical("the control loop failed; exiting without releasing this node's "
                     "memory (a restart adopts it)", exc_info=True)
        logging.shutdown()
        os._exit(70)
    daemon.close()
    return 0
