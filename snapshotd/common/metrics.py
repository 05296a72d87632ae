"""Prometheus metrics of one daemon, registered on a registry passed in (tests use a fresh one).

Counters and histograms are updated where things happen; figures that are cheap to read but
change all the time (bytes held, versions, snapshot age, host memory) are computed at scrape time
by :class:`StoreCollector`, so they are never stale.

Example::

    >>> from prometheus_client import CollectorRegistry, generate_latest
    >>> m = Metrics(CollectorRegistry())
    >>> m.rejected.labels(reason="malformed").inc()
    >>> b"snapshotd_rejected_requests_total" in generate_latest(m.registry)
    True
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import psutil
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["Metrics", "StoreCollector"]

_SECONDS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    """Every counter and histogram the daemon updates."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        c = lambda name, doc, *labels: Counter(name, doc, labels, registry=registry)  # noqa: E731
        h = lambda name, doc: Histogram(name, doc, buckets=_SECONDS, registry=registry)  # noqa: E731
        self.rejected = c("snapshotd_rejected_requests_total",
                          "Requests answered with an error, by reason", "reason")
        self.committed_bytes = c("snapshotd_committed_bytes_total", "Bytes of committed versions")
        self.checksum_failures = c("snapshotd_checksum_failures_total",
                                   "Tensors or chunks whose bytes failed their checksum")
        self.parity_scrub_failures = c(
            "snapshotd_parity_scrub_failures_total",
            "Parity fragments adopted at start whose bytes failed their checksum in the "
            "background scrub (each is re-created from its stripe's data nodes)")
        self.reclaimed = c("snapshotd_reclaimed_total",
                           "Slots and leases reclaimed because their process was gone")
        self.commit_seconds = h("snapshotd_commit_duration_seconds",
                                "Time to check, checksum and publish one version")
        self.open_seconds = h("snapshotd_open_duration_seconds",
                              "Time to lease and verify one version for a restore")
        self.encode_seconds = h("snapshotd_encode_duration_seconds",
                                "Time to send one node version's data chunks for encoding")
        self.rebuild_seconds = h("snapshotd_rebuild_duration_seconds",
                                 "Time to rebuild one node version from the group")
        self.rebuilds = c("snapshotd_rebuilds_total",
                          "Node versions rebuilt from peers (or decoded for a reader)")
        self.rebuilt_bytes = c("snapshotd_rebuilt_bytes_total",
                               "Bytes rebuilt from peers (a replacement's memory, or a lost "
                               "node's version decoded for a reader on this node)")
        self.save_seconds = h("snapshotd_save_duration_seconds",
                              "Time from a save (the client's save(), or the write slot's "
                              "allocation for a client that does not say) to its commit")
        self.restore_seconds = h("snapshotd_restore_duration_seconds",
                                 "Time a restore holds its read lease (open to release)")
        self.persist_seconds = h("snapshotd_persist_duration_seconds",
                                 "Time to write one node version to the persistence tier")
        self.persisted_bytes = c("snapshotd_persisted_bytes_total",
                                 "Bytes written to the persistence tier")
        self.persist_failures = c("snapshotd_persist_failures_total",
                                  "Persists that failed, by reason (disk_full, disk_error, "
                                  "forbidden, not_found)", "reason")
        self.peer_bytes = c("snapshotd_peer_bytes_total", "Payload bytes exchanged with peers",
                            "direction")
        self.report_batches = c("snapshotd_report_batches_total",
                                "Batches of job-wide retention reports sent to and received "
                                "from overlay neighbours", "direction")


class StoreCollector(Collector):
    """Scrape-time gauges read from the store (and the host, through psutil)."""

    def __init__(self, store: Any, clock: Callable[[], float] = time.time,
                 memory: Callable[[], Any] = psutil.virtual_memory,
                 peers: Callable[[], dict[int, bool]] | None = None,
                 insecure: bool = False) -> None:
        self._store = store
        self._peers = peers
        self.insecure = insecure
        self._clock = clock
        self._memory = memory

    def collect(self) -> Iterator[GaugeMetricFamily]:
        stats = self._store.stats()
        versions = self._store.versions()
        yield GaugeMetricFamily("snapshotd_memory_limit_bytes", "Configured memory limit",
                                value=self._store.memory_limit)
        yield GaugeMetricFamily("snapshotd_memory_headroom_bytes",
                                "Memory limit minus bytes in use",
                                value=self._store.memory_limit - stats["bytes_used"])
        held = GaugeMetricFamily("snapshotd_memory_used_bytes", "Bytes in use, by kind",
                                 labels=["kind"])
        for kind, value in self._store.bytes_by_kind().items():
            held.add_metric([kind], value)
        yield held
        count = GaugeMetricFamily("snapshotd_versions", "Versions held, by state",
                                  labels=["state"])
        for state in ("local", "protected"):
            count.add_metric([state], sum(1 for v in versions if v.state == state))
        yield count
        yield from self._ages(versions)
        if self._peers is not None:
            up = GaugeMetricFamily("snapshotd_peer_up", "1 if the peer answers heartbeats",
                                   labels=["peer"])
            for slot, alive in sorted(self._peers().items()):
                up.add_metric([str(slot)], 1.0 if alive else 0.0)
            yield up
        yield GaugeMetricFamily("snapshotd_peer_insecure",
                                "1 if peer traffic runs without CURVE (--insecure)",
                                value=1.0 if self.insecure else 0.0)
        yield GaugeMetricFamily("snapshotd_host_memory_available_bytes",
                                "Host memory available (psutil)", value=self._memory().available)

    def _ages(self, versions: list[Any]) -> Iterator[GaugeMetricFamily]:
        now = self._clock()
        newest: dict[tuple[str, int], float] = {}
        newest_protected: dict[tuple[str, int], float] = {}
        for v in versions:
            key = (v.job, v.rank)
            newest[key] = max(newest.get(key, 0.0), v.committed_at)
            if v.protected:
                newest_protected[key] = max(newest_protected.get(key, 0.0), v.committed_at)
        for name, doc, table in (
                ("snapshotd_snapshot_age_seconds",
                 "Seconds since the newest committed version of a rank", newest),
                ("snapshotd_protected_snapshot_age_seconds",
                 "Seconds since the newest protected version of a rank: work a node loss "
                 "would lose now", newest_protected)):
            family = GaugeMetricFamily(name, doc, labels=["job", "rank"])
            for (job, rank), at in sorted(table.items()):
                family.add_metric([job, str(rank)], max(0.0, now - at))
            yield family
