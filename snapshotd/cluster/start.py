"""Wiring of the multi-node part of a daemon: security, links, heartbeats, protection, rebuild."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import zmq

from ..common.config import Config, ConfigError, peer_endpoints, slot_domains
from ..node.store import Store
from .codec import make_codec
from .peers import Heartbeats, PeerLinks, Security, load_security
from .peerserver import PeerServer
from .placement import Group, PlacementError, domain_counts, domain_spread, group_of, make_groups
from .protection import Protector
from .reads import PeerReads
from .rebuild import Recovery

__all__ = ["ClusterNode", "start_cluster"]

log = logging.getLogger("snapshotd.cluster")


@dataclass
class ClusterNode:
    security: Security
    links: PeerLinks
    heartbeats: Heartbeats
    protector: Protector
    recovery: Recovery
    server: PeerServer
    auth: Any
    reporter: FloorReporter | None = None
    all_links: PeerLinks | None = field(default=None, repr=False)
    reads: PeerReads | None = field(default=None, repr=False)

    def stop(self) -> None:
        if self.reporter is not None:
            self.reporter.stop()
        self.heartbeats.stop()
        self.server.stop()
        self.protector.close()
        if self.reads is not None:
            self.reads.close()
        if self.auth is not None:
            self.auth.stop()


def start_cluster(config: Config, store: Store, context: zmq.Context, metrics: Any,
                  on_node_protected: Any = None) -> ClusterNode | None:
    """Start the peer side when ``--peers`` is set; None for a stand-alone node."""
    endpoints = peer_endpoints(config)
    if not endpoints:
        return None
    me = config.node_slot
    if sorted(endpoints) != list(range(len(endpoints))):
        raise ConfigError(f"--peers must list slots 0..N-1, got {sorted(endpoints)}")
    try:
        security = load_security(config.keys, config.insecure)
        group = place(config, len(endpoints))
    except (ValueError, PlacementError) as exc:
        raise ConfigError(str(exc)) from None
    if security.insecure:
        log.warning("peer traffic is NOT encrypted or authenticated (--insecure)")
    codec = make_codec(config.codec, group.k, group.m)
    auth = security.authenticator(context)
    links = PeerLinks({s: endpoints[s] for s in group.slots}, context, security,
                      on_bytes=lambda d, n: metrics.peer_bytes.labels(direction=d).inc(n))
    heartbeats = Heartbeats(links, me, "snapshotd", config.heartbeat_interval,
                            config.peer_timeout)
    protector = Protector(me, group, codec, store, links, keep=config.keep,
                          encode_timeout=config.encode_timeout,
                          peer_timeout=config.peer_timeout, up=heartbeats.up,
                          metrics=metrics,
                          on_node_protected=on_node_protected or (lambda job, step: None))
    recovery = Recovery(me, group, codec, store, protector, links, heartbeats.up, metrics,
                        settle=config.peer_timeout)
    # Job-wide retention: every node tells every node (all groups) its protected floors.
    all_links = PeerLinks(endpoints, context, security,
                          on_bytes=lambda d, n: metrics.peer_bytes.labels(direction=d).inc(n))
    protector.all_links = all_links
    # A job without a job-wide step yet (its first saves, or a rank not reported yet) keeps
    # every version until the reports say which steps every node holds (see job_wide).
    store.hold_unpinned = True
    protector.ready = lambda: recovery.ready
    protector.report_to = [s for s in endpoints if s != me]
    protector.report_timeout = min(config.peer_timeout, 1.0)
    protector.recovering_hold = max(3 * config.heartbeat_interval, config.peer_timeout)
    reporter = FloorReporter(protector, protector.report_to, config.heartbeat_interval,
                             protector.report_timeout)
    listen = config.listen or "tcp://*:" + endpoints[me].rsplit(":", 1)[1]
    reads = PeerReads(me, store, protector, all_links, timeout=max(60.0, config.encode_timeout),
                      groups=make_groups(len(endpoints), config.k, config.m,
                                         slot_domains(config, len(endpoints))),
                      codec=config.codec, ping_timeout=protector.report_timeout,
                      metrics=metrics)
    server = PeerServer(listen, context, security, protector, me, metrics,
                        ready=lambda: recovery.ready, reads=reads).start()
    heartbeats.start()
    recovery.start()
    reporter.start()
    log.info("node %d in group %d %s (k=%d, m=%d, codec %s), peers listen on %s", me,
             group.index, list(group.slots), group.k, group.m, config.codec, server.endpoint)
    return ClusterNode(security, links, heartbeats, protector, recovery, server, auth, reporter,
                       all_links, reads)


def place(config: Config, nodes: int) -> Group:
    """This node's group, from the membership (``nodes`` slots) and ``--domains``; logs a
    warning when the domains cannot keep every group to ``m`` nodes per domain, or when this
    node's own ``--domain`` is not the one the map gives its slot."""
    me = config.node_slot
    domains = slot_domains(config, nodes)
    groups = make_groups(nodes, config.k, config.m, domains)
    group = group_of(me, groups)
    if domains is None:
        if config.domain:
            log.warning("this node says it is in failure domain %r, but there is no --domains "
                        "map: groups are consecutive slots and ignore domains (give every node "
                        "the same --domains)", config.domain)
        return group
    spread = domain_spread(groups, domains)
    if spread > config.m and config.m > 0:
        worst = sorted({d for g in groups for d, c in domain_counts(g, domains).items()
                        if c > config.m})
        log.warning("the failure domains cannot keep every group to m=%d nodes per domain: "
                    "some group has %d nodes in one domain, so losing one of %s loses data "
                    "(add domains, or use a larger m or a smaller k)", config.m, spread,
                    ", ".join(worst[:8]) + (" ..." if len(worst) > 8 else ""))
    if config.domain and config.domain != domains[me]:
        log.warning("this node says it is in failure domain %r but --domains puts slot %d in "
                    "%r: the groups follow the map; fix the map (or the node) so that a "
                    "domain failure is what the placement expects", config.domain, me,
                    domains[me])
    log.info("node %d in failure domain %s; its group %d has %s", me, domains[me],
             group.index, dict(sorted(domain_counts(group, domains).items())))
    return group


class FloorReporter:
    """Sends this node's protected floors to every other node each ``interval``."""

    def __init__(self, protector: Protector, slots: list[int], interval: float,
                 timeout: float) -> None:
        self.protector, self.slots = protector, slots
        self.interval, self.timeout = interval, timeout
        self.stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="snapshotd-floors", daemon=True)

    def start(self) -> FloorReporter:
        self._thread.start()
        return self

    def _run(self) -> None:
        links = self.protector.all_links
        while not self.stopping.wait(self.interval):
            try:
                self.protector.broadcast(self.slots, self.timeout)
            except Exception:  # noqa: BLE001 - the next round tries again
                log.exception("sending this node's floors failed")
        if links is not None:
            links.close_thread()

    def stop(self) -> None:
        self.stopping.set()
        self._thread.join(timeout=5)
