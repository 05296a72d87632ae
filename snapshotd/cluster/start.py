"""Wiring of the multi-node part of a daemon: security, links, heartbeats, protection, rebuild."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import zmq

from ..common.config import Config, ConfigError, peer_endpoints, slot_domains
from ..node.store import Store
from .codec import make_codec
from .overlay import Overlay, overlay
from .peers import Heartbeats, PeerLinks, Security, load_security
from .peerserver import PeerServer
from .placement import Group, PlacementError, domain_counts, domain_spread, group_of, make_groups
from .protection import Protector
from .reads import PeerReads
from .rebuild import Recovery
from .relay import ReportRelay

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
    reporter: ReportRelay | None = None
    all_links: PeerLinks | None = field(default=None, repr=False)
    reads: PeerReads | None = field(default=None, repr=False)

    def stop(self) -> None:
        self.recovery.stopping = True           # no more rebuild retries
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
        group, groups = place(config, len(endpoints))
        mesh = overlay(me, groups)
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
    # Job-wide retention: every node's report reaches every node (all groups), relayed along
    # the overlay (group peers, a tree of groups): connections stay bounded by the group.
    all_links = PeerLinks(endpoints, context, security,
                          on_bytes=lambda d, n: metrics.peer_bytes.labels(direction=d).inc(n))
    # A job without a job-wide step yet (its first saves, or a rank not reported yet) keeps
    # every version until the reports say which steps every node holds (see job_wide).
    store.hold_unpinned = True
    protector.ready = lambda: recovery.ready
    protector.report_to = [s for s in endpoints if s != me]
    protector.report_timeout = min(config.peer_timeout, 1.0)
    timing(protector, mesh, config.heartbeat_interval, config.peer_timeout)
    reporter = ReportRelay(protector, mesh, all_links, len(endpoints), heartbeats.up,
                           config.heartbeat_interval, protector.report_timeout,
                           retry=config.peer_timeout, metrics=metrics)
    protector.relay = reporter
    listen = config.listen or "tcp://*:" + endpoints[me].rsplit(":", 1)[1]
    reads = PeerReads(me, store, protector, all_links, timeout=max(60.0, config.encode_timeout),
                      groups=make_groups(len(endpoints), config.k, config.m,
                                         slot_domains(config, len(endpoints))),
                      codec=config.codec,
                      metrics=metrics)
    server = PeerServer(listen, context, security, protector, me, metrics,
                        ready=lambda: recovery.ready, reads=reads).start()
    heartbeats.start()
    protector.start_scrub()
    recovery.start()
    reporter.start()
    log.info("node %d in group %d %s (k=%d, m=%d, codec %s), peers listen on %s; reports %s",
             me, group.index, list(group.slots), group.k, group.m, config.codec,
             server.endpoint, "to every node" if mesh.flat else
             f"relayed over a tree of {len(groups)} groups (depth {mesh.depth}, edges "
             f"{[e.other for e in mesh.edges]})")
    return ClusterNode(security, links, heartbeats, protector, recovery, server, auth, reporter,
                       all_links, reads)


def timing(protector: Protector, mesh: Overlay, interval: float, peer_timeout: float) -> None:
    """The waits that allow for the relay (docs/protocol.md, "Job-wide retention"): a report
    takes at most ``mesh.hops`` rounds to reach every node (one per hop), a round being an
    interval plus, when a neighbour is dead, the ``report_timeout`` its batch waits for it
    (review of issue 16, finding 5: with intervals under 1 s that wait is the longer part),
    plus, while a relay is down, the time heartbeats take to say so (``peer_timeout``; the
    other side of an edge tries the next member after one batch it did not take). A
    recovering node's reports hold the job-wide steps that long beyond the old hold
    (``max(3 intervals, peer_timeout)``, unchanged where the overlay is flat: reports go
    straight to every node)."""
    protector.relay_latency = 0.0 if mesh.flat else (
        mesh.hops * (interval + protector.report_timeout) + peer_timeout)
    protector.recovering_hold = max(3 * interval, peer_timeout) + protector.relay_latency


def place(config: Config, nodes: int) -> tuple[Group, list[Group]]:
    """This node's group and all groups, from the membership (``nodes`` slots) and
    ``--domains``; logs a
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
        return group, groups
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
    return group, groups
