"""Dozens of daemons (issue 16): 32 real daemons on loopback in 5 failure domains of uneven
sizes (8, 7, 7, 5, 5 slots), RS(6, 2): 4 groups of 8 drawn across the domains by --domains, at
most 2 nodes of a group per domain. A whole domain is lost (every daemon in it SIGKILLed and
its shm directory removed), replacements start empty and rebuild, and every one of the 32 ranks
restores its newest step bit for bit. With consecutive groups (no --domains) the same loss would
take all 8 nodes of group 0 (checked with the planner).

Bounded by the group, not the cluster (the numbers asserted below): every daemon sees 7 peers
(its group of 8, heartbeats), sends data and parity only inside its group, and holds at most
(versions) x S x (1 + m/k) of snapshot memory plus its pool, whatever the cluster size. The
job-wide retention reports (``Held``, docs/protocol.md) are relayed along the overlay (its group
peers, and a tree of the 4 groups of fan-out 4 whose edges one member of each side carries:
snapshotd/cluster/overlay.py), so a daemon talks to at most 7 + ceil(5 / 8) = 8 other daemons
while all are up (31 = N - 1 before the relay), at most 7 + 2 x 5 = 17 while relays fall over,
and still hears every other daemon's report (``Where`` lists all 31 on every daemon).

test_32_daemons_relay_every_report_with_connections_bounded_by_the_group (make test) checks
that, the number of batches per interval and the time a report takes to reach every daemon,
then SIGKILLs the daemon that carries its group's edge to the root group: the reports of the
nodes behind it still reach everyone, through the next member. The domain loss runs in make
faults (SNAPSHOTD_FAULT_RUNS=long): it loses every domain in turn, each after the previous one
was rebuilt."""

from __future__ import annotations

import os
import time

import psutil
import pytest
from harness import (
    FAST,
    LONG,
    all_protected,
    call,
    cluster_state,
    drop_job,
    lose,
    metric,
    restore_all,
    save_on,
    status,
    unique,
    wait_for,
)

from snapshotd.cluster import overlay as ov
from snapshotd.cluster.placement import domain_spread, make_groups
from snapshotd.cluster.planner import domain_survival
from snapshotd.common import protocol as p

pytest_plugins = ["faultfixtures"]

pytestmark = pytest.mark.timeout(1200 if LONG else 240)

NODES, K, M = 32, 6, 2
SIZES = {"rack-a": 8, "rack-b": 7, "rack-c": 7, "rack-d": 5, "rack-e": 5}
DOMAINS = [label for label, size in SIZES.items() for _ in range(size)]
SPEC = ",".join(f"{DOMAINS.index(label)}-{DOMAINS.index(label) + size - 1}={label}"
                for label, size in SIZES.items())
MIB = 0.25
# Slower heartbeats than FAST: 32 daemons on 2 cores.
ARGS = [*FAST, "--heartbeat-interval", "0.5", "--peer-timeout", "3", "--encode-timeout", "5",
        "--memory-limit", "64MiB", "--keep", "2", "--domains", SPEC]


#: Peers a daemon may talk to (either direction) while all are up: its 7 group peers and, for
#: the tree edges it carries (4 groups: the root has 3, the others 1, dealt out over 8 members),
#: one member of another group: 7 + ceil(5 / 8) = 8, whatever the cluster size.
STEADY = ov.steady_degree(K + M)
#: While relays fall over: 7 + 2 x (4 + 1) = 17.
WORST = ov.worst_degree(K + M)


def peer_connections(cluster, slot: int) -> set[int]:
    """The slots whose peer port this daemon has an established TCP connection to."""
    ports = {spec.port: spec.slot for spec in cluster.specs}
    conns = psutil.Process(cluster.daemons[slot].pid).net_connections(kind="tcp")
    return {ports[c.raddr.port] for c in conns
            if c.status == psutil.CONN_ESTABLISHED and c.raddr and c.raddr.port in ports}


def peers_either_way(cluster, slots) -> dict[int, set[int]]:
    """slot -> the daemons it has a connection with, opened by it or by them."""
    out = {s: peer_connections(cluster, s) for s in slots}
    return {s: out[s] | {t for t in slots if s in out[t]} for s in slots}


def unheard(cluster, job: str, slots, step: int, also: dict[int, int] | None = None
            ) -> list[str]:
    """What some daemon of ``slots`` has not heard yet: every other node of ``slots`` holding
    ``step`` of its rank (its slot) in the reports ``Where`` lists, and for ``also``
    (slot -> step) those nodes' last reports."""
    want = {s: step for s in slots} | (also or {})
    problems = []
    for slot in slots:
        nodes = {n.slot: n for n in call(cluster.specs[slot], p.Where(job)).nodes}
        for other, st in want.items():
            n = nodes.get(other)
            if other != slot and (n is None or n.ranks != (other,) or st not in n.steps):
                problems.append(f"{slot} lacks {other}@{st}")
    return problems


def batches_sent(cluster, slots) -> float:
    return sum(metric(cluster.specs[s], "snapshotd_report_batches_total", direction="sent")
               for s in slots)


@pytest.mark.skipif(not LONG, reason="make faults (SNAPSHOTD_FAULT_RUNS=long): 32 daemons, "
                    "about 35 s; tests/unit/test_overlay.py relays reports between real "
                    "Protectors in every run")
def test_32_daemons_relay_every_report_with_connections_bounded_by_the_group(
        clusters, zygote) -> None:
    groups = make_groups(NODES, K, M, DOMAINS)
    mesh = ov.overlay(0, groups)
    assert not mesh.flat and mesh.depth == 1 and mesh.hops == 5
    cluster = clusters(NODES, k=K, m=M, args=ARGS)
    cluster.start(timeout=120)
    job = unique("relay")
    everyone = range(NODES)
    save_on(zygote, cluster, job, 1, 2, MIB, world=NODES)
    t0 = time.monotonic()
    wait_for(lambda: not unheard(cluster, job, everyone, 2), 60, "every report everywhere",
             interval=0.2, explain=lambda: str(unheard(cluster, job, everyone, 2)[:20]))
    latency = time.monotonic() - t0
    # Connections: settled (a partner tried before it was up is given up after 3 s).
    wait_for(lambda: max(len(x) for x in peers_either_way(cluster, everyone).values())
             <= STEADY, 20, f"at most {STEADY} peers per daemon", interval=0.5,
             explain=lambda: str(sorted(peers_either_way(cluster, everyone).items())))
    links = peers_either_way(cluster, everyone)
    out = [len(peer_connections(cluster, s)) for s in everyone]
    group_of = {s: g for g in groups for s in g.slots}
    for slot, peers in links.items():
        assert set(group_of[slot].slots) - {slot} <= peers, (slot, peers)
    # Batches: one per overlay neighbour per interval (0.5 s), about 8 per daemon, not 31.
    before, t1 = batches_sent(cluster, everyone), time.monotonic()
    time.sleep(3.0)
    per_interval = (batches_sent(cluster, everyone) - before) / NODES / (
        (time.monotonic() - t1) / 0.5)
    assert per_interval <= STEADY + 1, per_interval
    # Reads across nodes (what a restore at another world size does): daemon 0 reads a rank
    # of every other group through its peers; the connections they opened close with them.
    far = [g.slots[0] for g in groups if 0 not in g.slots]
    for rank in far:
        lease = call(cluster.specs[0], p.Open(job, rank, os.getpid(), step=2, remote=True))
        call(cluster.specs[0], p.Release(lease.lease))
    wait_for(lambda: len(peers_either_way(cluster, everyone)[0]) <= STEADY, 10,
             "daemon 0's peers bounded again after its remote reads", interval=0.5,
             explain=lambda: str(sorted(peers_either_way(cluster, everyone)[0])))
    # The daemon carrying group 1's edge to the root group is SIGKILLed; group 1 saves step 3.
    group1 = groups[1]
    edge = next(e for e in ov.overlay(group1.slots[0], groups).edges if e.other == 0)
    relay = edge.mine[0]
    cluster.kill(relay)
    alive = [s for s in everyone if s != relay]
    t0 = time.monotonic()
    save_on(zygote, cluster, job, 3, 3, MIB, world=NODES, slots=alive)
    wait_for(lambda: not unheard(cluster, job, alive, 3, {relay: 2}), 90,
             "the reports behind the dead relay everywhere", interval=0.2,
             explain=lambda: str(unheard(cluster, job, alive, 3, {relay: 2})[:20]))
    fallover = time.monotonic() - t0
    worst = max(len(x) for x in peers_either_way(cluster, alive).values())
    assert worst <= WORST, worst
    drop_job(cluster, job)
    print(f"32 daemons, reports relayed (tree depth {mesh.depth}, at most {mesh.hops} hops): "
          f"peers per daemon max {max(len(x) for x in links.values())} (bound {STEADY}; "
          f"opened by it max {max(out)}; before the relay {NODES - 1}), batches sent per "
          f"daemon per interval {per_interval:.1f}, every report on every daemon "
          f"{latency:.1f}s after the saves, after the relay of group 1 was SIGKILLed "
          f"{fallover:.1f}s after the saves of step 3 began (peers max {worst}, bound {WORST})")


@pytest.mark.skipif(not LONG, reason="make faults (SNAPSHOTD_FAULT_RUNS=long): 32 daemons, "
                    "16 s or more; make test stays under 12 minutes")
def test_32_daemons_lose_whole_domains(clusters, zygote) -> None:
    groups = make_groups(NODES, K, M, DOMAINS)
    assert [g.n for g in groups] == [8, 8, 8, 8] and domain_spread(groups, DOMAINS) == 2
    assert domain_survival(groups, DOMAINS) == 1.0
    assert domain_survival(make_groups(NODES, K, M), DOMAINS) == 0.0   # rack-a = group 0
    cluster = clusters(NODES, k=K, m=M, args=ARGS)
    started = time.monotonic()
    cluster.start(timeout=120)
    timings = {"start": time.monotonic() - started}
    job = unique("scale")
    step = 0
    rounds = list(SIZES) if LONG else ["rack-a"]
    for lost_domain in rounds:
        first, step = step + 1, step + 2
        t0 = time.monotonic()
        save_on(zygote, cluster, job, first, step, MIB, world=NODES)
        wait_for(lambda s=step: all_protected(cluster, job, s), 90, f"step {step} protected",
                 interval=0.5, explain=lambda: cluster_state(cluster, job, 3))
        timings[f"save+protect {lost_domain}"] = time.monotonic() - t0
        if lost_domain == rounds[0]:
            check_bounded_by_group(cluster, groups)
        slots = [s for s in range(NODES) if DOMAINS[s] == lost_domain]
        for slot in slots:
            lose(cluster, slot)
        t0 = time.monotonic()
        cluster.start(slots, timeout=120)
        lost, slowest, problems, _ = restore_all(
            zygote, cluster, job, MIB, {(s, s): step for s in range(NODES)}, timeout=180)
        timings[f"replace+restore {lost_domain}"] = time.monotonic() - t0
        assert lost == 0, "\n".join(problems) + "\n" + cluster_state(cluster, job, 5)
    drop_job(cluster, job)
    print(f"32 daemons: {', '.join(f'{k} {v:.1f}s' for k, v in timings.items())}")


def check_bounded_by_group(cluster, groups) -> None:
    """Peers, traffic partners and memory per daemon, as numbers."""
    group_of = {s: g for g in groups for s in g.slots}
    state_bytes = int(MIB * (1 << 20))
    rss, held, links = [], [], []
    for slot in range(NODES):
        st = status(cluster.specs[slot])
        mates = set(group_of[slot].slots) - {slot}
        # Heartbeats: exactly its 7 group peers, all up.
        assert set(st.peers_up) == mates and not st.peers_down, (slot, st.peers_up)
        assert (st.group_k, st.group_m) == (K, M)
        held.append(st.bytes_used)
        rss.append(psutil.Process(cluster.daemons[slot].pid).memory_info().rss)
        links.append(peer_connections(cluster, slot))
    # Snapshot memory: 2 versions of its own rank plus its parity (m/k of a version each):
    # 2 x S x (1 + 2/6) = 0.67 MiB (0.68 measured), bounded here by 3 versions' worth, 1 MiB,
    # whatever the cluster size (the cluster holds 32 x 2 x S = 16 MiB of snapshots).
    assert max(held) <= 3 * state_bytes * (1 + M / K), held
    assert min(held) >= 2 * state_bytes * 0.9, held     # (parity may be in flight or freed)
    # The process: about 41 MiB of Python (measured, 32 daemons); 100 MiB bounds it.
    assert max(rss) <= 100 << 20, [r >> 20 for r in rss]
    # Connections: each daemon has TCP connections to its group peers (data, parity,
    # heartbeats, reports) and, for the tree edges it carries, to at most a few other
    # daemons: 8 = 7 + ceil(5 / 8) while all are up (31 = N - 1 before the relay).
    for slot, peers in enumerate(links):
        assert set(group_of[slot].slots) - {slot} <= peers | {slot}
    either = peers_either_way(cluster, range(NODES))
    assert max(len(x) for x in either.values()) <= STEADY, either
    print(f"per daemon: heartbeat peers {len(groups[0].slots) - 1}, snapshot memory "
          f"max {max(held) / (1 << 20):.2f} MiB, RSS max {max(rss) / (1 << 20):.0f} MiB, "
          f"peers connected to max {max(len(x) for x in either.values())} (group peers "
          f"{len(groups[0].slots) - 1}, bound {STEADY}, cluster {NODES - 1})")
