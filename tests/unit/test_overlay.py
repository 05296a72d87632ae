"""The overlay the job-wide retention reports travel on, and their relay (issue 16: peer
connections per daemon bounded by its group size, not the cluster's): the tree of groups is the
same from every node, reaches every node, and bounds each node's peers; reports relayed through
real Protectors (a real Store each, no sockets: batches are handed over in memory) reach every
node, fall over to the next member when a relay is down, and a report no newer than the one
held of its origin is refused."""

import dataclasses
import random

import pytest

from snapshotd.cluster import overlay as ov
from snapshotd.cluster import peerproto as pp
from snapshotd.cluster.codec import make_codec
from snapshotd.cluster.placement import PlacementError, group_of, make_groups
from snapshotd.cluster.protection import Protector
from snapshotd.cluster.relay import ReportRelay
from snapshotd.common.protocol import TensorEntry
from snapshotd.node.store import Store

pytestmark = pytest.mark.timeout(60)


def steady_links(overlays, up=lambda slot: True):
    """slot -> the peers it exchanges reports with (either direction) when every edge is
    carried by its first member that is up, sending to the first member up on the other side."""
    links = {me: {s for s in o.local if up(s)} for me, o in overlays.items() if up(me)}
    for me, o in overlays.items():
        for edge in o.edges:
            if up(me) and ov.gateway(edge.mine, up) == me:
                other = ov.gateway(edge.theirs, up)
                links[me].add(other)
                links[other].add(me)
    return links


def reachable(links, start):
    seen, todo = {start}, [start]
    while todo:
        for nxt in links[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def _valid(nodes, k, m):
    try:
        make_groups(nodes, k, m)
    except PlacementError:
        return False
    return True


CASES = [(n, k, m, f) for n in (3, 8, 14, 15, 40, 100, 336)
         for k, m in ((2, 1), (4, 2), (6, 2)) for f in (1, 2, 4) if _valid(n, k, m)]


@pytest.mark.parametrize("nodes,k,m,fanout", CASES)
def test_the_tree_is_the_same_from_every_node_reaches_every_node_and_bounds_peers(
        nodes, k, m, fanout):
    groups = make_groups(nodes, k, m)
    overlays = {s: ov.overlay(s, groups, fanout) for s in range(nodes)}
    again = {s: ov.overlay(s, groups, fanout) for s in range(nodes)}
    assert overlays == again                                        # deterministic
    largest = max(g.n for g in groups)
    for me, o in overlays.items():
        mine = group_of(me, groups)
        if o.flat:
            assert nodes <= ov.flat_limit(groups, fanout) and len(o.local) == nodes - 1
            continue
        assert set(o.local) == set(mine.slots) - {me}
        assert len(o.edges) <= fanout + 1
        for edge in o.edges:                   # the other side sees the same edge, mirrored
            other = overlays[edge.theirs[0]]
            mirror = [e for e in other.edges if e.other == mine.index]
            assert mirror == [ov.Edge(mine.index, edge.theirs, edge.mine)]
    links = steady_links(overlays)
    assert reachable(links, 0) == set(range(nodes))
    for me, peers in links.items():
        assert len(peers) <= (nodes - 1 if overlays[me].flat
                              else ov.steady_degree(largest, fanout)), (me, peers)
    if nodes > ov.flat_limit(groups, fanout):                      # it saves connections
        assert max(len(p) for p in links.values()) < nodes - 1


def test_with_members_down_the_edges_fall_over_and_every_node_up_is_still_reached():
    rng = random.Random(16)
    groups = make_groups(204, 4, 2)
    overlays = {s: ov.overlay(s, groups) for s in range(204)}
    for _ in range(50):
        down = set()
        for g in groups:                       # any members of a group but one
            down |= set(rng.sample(g.slots, rng.randrange(g.n)))
        up = lambda s, down=down: s not in down          # noqa: E731
        links = steady_links(overlays, up)
        alive = set(range(204)) - down
        assert reachable(links, min(alive)) == alive
        assert max(len(p) for p in links.values()) <= ov.worst_degree(6)


def test_depth_and_hops():
    assert [ov.depth(c, 4) for c in (1, 2, 5, 6, 21, 22, 2048)] == [0, 1, 1, 2, 2, 3, 6]
    assert ov.hops(1) == 1 and ov.hops(4, 4) == 5
    assert list(ov.children(0, 3, 4)) == [1, 2] and ov.parent(5, 4) == 1


# ---------------------------------------------------------------------------- the relay


class Net:
    """Batches handed over in memory; a node that is down takes nothing, and the reports of
    an origin in ``hidden`` never reach the slots listed for it (a relay cut off)."""

    def __init__(self):
        self.relays, self.down = {}, set()
        self.hidden: dict[int, set[int]] = {}
        self.cut: set[tuple[int, int]] = set()    # (a, b): a cannot reach b (b may reach a)
        self.batches = 0

    def links(self, me):
        net = self

        class Links:
            def call_each(self, msgs, timeout, replies=None, stale=None):
                answered = set()
                for slot, msg in msgs.items():
                    net.batches += 1
                    if slot not in net.down and me not in net.down and (me, slot) not in net.cut:
                        reports = tuple(r for r in msg.reports
                                        if slot not in net.hidden.get(r.src, ()))
                        reply = net.relays[slot].answer(dataclasses.replace(msg, reports=reports))
                        answered.add(slot)
                        if replies is not None:
                            replies[slot] = dataclasses.replace(reply, reports=tuple(
                                r for r in reply.reports if me not in net.hidden.get(r.src, ())))
                return answered

            def open_slots(self):
                return []

            def close(self, slot):
                pass

        return Links()


def node(tmp_path, net, groups, slot, clock, nodes):
    store = Store(str(tmp_path / f"n{slot}"), memory_limit=1 << 20, keep=2,
                  identity=lambda pid: 1.0)
    store.open()
    prot = Protector(slot, group_of(slot, groups), make_codec("isal", 2, 2), store, links=None,
                     up=lambda s: True, clock=lambda: clock[0])
    prot.report_to = [s for s in range(nodes) if s != slot]
    relay = ReportRelay(prot, ov.overlay(slot, groups), net.links(slot), nodes,
                        up=lambda s: s not in net.down, interval=1.0, timeout=1.0, retry=5.0,
                        clock=lambda: clock[0])
    prot.relay = relay
    net.relays[slot] = relay
    return prot


def commit(store, step):
    slot = store.alloc("j", 0, step, 64, 100)
    store.commit(slot.number, (TensorEntry("t", "uint8", (64,), 0, 64),), "{}")


def run(net, clock, rounds):
    for _ in range(rounds):
        clock[0] += 1.0
        for slot, relay in sorted(net.relays.items()):
            if slot not in net.down:
                relay.round()


def marks_everywhere(net, origin):
    return {s: r.protector.report_marks().get(origin) for s, r in net.relays.items()
            if s not in net.down and s != origin}


NODES = 40          # RS(2, 2): 10 groups of 4, a tree of fan-out 4 and depth 2


@pytest.fixture
def cluster(tmp_path):
    groups = make_groups(NODES, 2, 2)
    net, clock = Net(), [1000.0]
    prots = {s: node(tmp_path, net, groups, s, clock, NODES) for s in range(NODES)}
    return groups, net, clock, prots


def test_every_report_reaches_every_node_within_the_hops_and_batches_stay_few(cluster):
    groups, net, clock, prots = cluster
    mesh = ov.overlay(0, groups)
    assert not mesh.flat and mesh.depth == 2 and mesh.hops == 9
    for step in (1, 2):
        commit(prots[33].store, step)
    run(net, clock, mesh.hops)
    for slot, prot in prots.items():            # everybody holds everybody's report
        assert prot._accepted >= set(range(NODES)) - {slot}, slot
        assert prot._held[33]["j"].held == (1, 2)
    # Steady state: one batch per overlay neighbour per interval, about 4 per node here
    # (3 group peers and at most one edge), not 39.
    net.batches = 0
    run(net, clock, 1)
    assert net.batches <= NODES * ov.steady_degree(4)
    # A new report of node 33 is everywhere within the hops (one interval each at most).
    commit(prots[33].store, 3)
    run(net, clock, mesh.hops)
    assert all(p._held[33]["j"].held == (2, 3) for s, p in prots.items() if s != 33)


def test_a_relay_down_delays_but_the_edge_falls_over_to_the_next_member(cluster):
    groups, net, clock, prots = cluster
    mesh = ov.overlay(0, groups)
    run(net, clock, mesh.hops)
    # Group 9 (slots 36-39) hangs below group 2; the member of group 9 that carries that edge,
    # and the member of group 2 that carries it on the other side, are both SIGKILLed.
    edge = next(e for e in ov.overlay(36, groups).edges if e.other == 2)
    net.down |= {edge.mine[0], edge.theirs[0]}
    origin = edge.mine[1]
    commit(prots[origin].store, 7)               # a node behind the dead relay changes
    run(net, clock, 1)
    sent = prots[origin].report_marks()[origin]  # its report that says so
    # The member carrying the edge on the other side is given up after 5 s (retry) without
    # an answer, then the reports go through the next one.
    run(net, clock, 5 + mesh.hops + 1)
    live = {s for s in range(NODES) if s not in net.down}
    assert all(prots[s]._held[origin]["j"].held == (7,) for s in live if s != origin)
    assert min(marks_everywhere(net, origin).values()) >= sent


def test_a_stale_or_repeated_report_is_refused_and_a_restart_is_a_newer_incarnation(cluster):
    groups, net, clock, prots = cluster
    run(net, clock, 10)
    prot = prots[0]
    newest = prot.latest()[5]
    older = dataclasses.replace(newest, seq=newest.seq - 1, jobs=(pp.JobFloor("j", 9, (9,)),))
    assert not prot.on_held(older) and not prot.on_held(newest)       # late, and twice
    assert "j" not in prot._floors[5]
    # Node 5 restarts: a new incarnation, its count starts again at 1, and it is taken.
    restarted = dataclasses.replace(newest, inc=newest.inc + 1, seq=1,
                                    jobs=(pp.JobFloor("j", 4, (4,)),))
    assert prot.on_held(restarted) and prot._floors[5] == {"j": 4}
    assert not prot.on_held(dataclasses.replace(newest, seq=newest.seq + 5))   # the old one


def test_a_report_of_this_slot_from_a_later_incarnation_raises_this_ones(cluster):
    groups, net, clock, prots = cluster
    prot = prots[3]
    ahead = pp.Held(3, (), inc=prot.inc + 10, seq=4)
    net.relays[3].on_reports(pp.Reports(2, (ahead,)))
    assert prot.inc == ahead.inc + 1
    assert prot.report().mark == (ahead.inc + 1, 1)


def test_the_marks_survive_a_restart_and_old_reports_stay_standing(tmp_path, cluster):
    groups, net, clock, prots = cluster
    commit(prots[7].store, 2)
    run(net, clock, 10)
    prot = prots[0]
    mark = prot.report_marks()[7]
    again = Protector(0, group_of(0, groups), make_codec("isal", 2, 2),
                      Store(str(tmp_path / "n0"), memory_limit=1 << 20, keep=2,
                            identity=lambda pid: 1.0), links=None, up=lambda s: True)
    assert again._floors[7] == {"j": 2} and again.report_marks()[7] <= mark
    assert not again.reported(7)                 # floors.json's reports are not fresh ones
    assert not again.on_held(again.latest()[7])  # nor is one relayed again
    assert again.inc > prot.inc                  # a higher incarnation than the one before
    assert again.latest()[7].jobs == prot.latest()[7].jobs


def test_a_recovering_node_waits_for_reports_that_say_they_heard_it(cluster):
    groups, net, clock, prots = cluster
    run(net, clock, 10)
    prots[12].ready = lambda: False              # node 12 is replaced, rebuilding
    before = prots[12].report_marks()
    assert prots[12].heard_holding(before, 12) == set()
    run(net, clock, 2 * ov.overlay(0, groups).hops)
    assert prots[12].heard_holding(before, 12) == set(range(NODES)) - {12}
    assert all(12 in p._recovering for s, p in prots.items() if s != 12)


def test_small_clusters_stay_flat():
    for nodes, k, m in ((3, 2, 1), (8, 2, 2), (12, 2, 2), (16, 6, 2)):
        groups = make_groups(nodes, k, m)
        assert all(ov.overlay(s, groups).flat for s in range(nodes)), (nodes, k, m)
    assert not ov.overlay(0, make_groups(32, 6, 2)).flat



def test_a_restart_whose_clock_is_behind_takes_a_higher_incarnation_and_is_heard(
        tmp_path, cluster):
    """A replacement on a machine whose clock is behind the old one's starts with a lower
    incarnation: its reports are refused as older until it hears the old incarnation's report
    of its slot (sent back to it by its group peers), then it takes a higher one."""
    groups, net, clock, prots = cluster
    run(net, clock, 10)
    old = prots[5].inc
    net.relays.pop(5)
    again = node(tmp_path / "again", net, groups, 5, clock, NODES)
    again.inc = old - 10_000_000                 # 10 s behind
    commit(again.store, 4)
    run(net, clock, 2)
    assert again.inc == old + 1
    run(net, clock, ov.overlay(0, groups).hops)
    assert all(p._held[5]["j"].held == (4,) for s, p in prots.items() if s != 5)


def test_a_stale_report_of_the_old_timeline_raises_no_pin_over_a_reused_step(cluster):
    """Finding 4 of the issue-16 review: after a restore (a new timeline from step 8) the
    steps 9 and 10 are trained again; a far node still holding a report of the old timeline
    (which listed the old 9 and 10: its post-drop report is slow to come round the tree)
    must not take it for the new steps, raise its pin to 10 and let go of step 8, which the
    slow node still needs."""
    groups, net, clock, prots = cluster
    mesh = ov.overlay(0, groups)
    slow, lagging, far = 33, 20, 1                # three groups (8, 5, 0) far apart
    for prot in prots.values():
        prot.push = prot.report                  # no relay thread here: report at once
    for prot in prots.values():
        for step in (7, 8):
            commit(prot.store, step)
    run(net, clock, mesh.hops + 1)
    assert {p.pin("j") for p in prots.values()} == {8}
    for slot, prot in prots.items():
        if slot != lagging:                      # node 20's ranks never saved 9 and 10
            for step in (9, 10):
                commit(prot.store, step)
    run(net, clock, mesh.hops + 1)
    assert {p.pin("j") for p in prots.values()} == {8}
    assert prots[far]._held[slow]["j"].held == (8, 9, 10)       # the old timeline's 9, 10
    # The job restores step 8 everywhere (what every rank holds): a new timeline, the same
    # token on every node. The slow node's report after its drop does not reach the far
    # node's group (its relay is cut off).
    net.hidden[slow] = set(range(0, 4))
    for prot in prots.values():
        gone = {v.step for v in prot.store.versions("j") if v.step > 8}
        prot.store.drop("j", newer_than=8)
        prot.node_dropped("j", gone, (0x5EED, 8))
    # Everyone but the slow node trains 9 and 10 again and saves them (its saves are late).
    for slot, prot in prots.items():
        if slot != slow:
            for step in (9, 10):
                commit(prot.store, step)
    run(net, clock, mesh.hops + 1)
    far_view = prots[far]._held
    assert far_view[slow]["j"].held == (8, 9, 10) and far_view[slow]["j"].timeline == 0
    assert all(far_view[s]["j"].timeline == 0x5EED for s in prots if s not in (slow, far))
    # On the stale report alone the far node would take 10 as held everywhere and let 8 go.
    assert prots[far].pin("j") == 8
    assert 8 in {v.step for v in prots[far].store.versions("j")}
    # The report comes round: still 8 (the slow node holds nothing newer yet); once it has
    # saved 9 and 10 of the new timeline, every node raises its pin to 10.
    net.hidden.clear()
    run(net, clock, mesh.hops + 1)
    assert {p.pin("j") for p in prots.values()} == {8}
    for step in (9, 10):
        commit(prots[slow].store, step)
    run(net, clock, mesh.hops + 1)
    assert {p.pin("j") for p in prots.values()} == {10}


@pytest.mark.parametrize("both_ways", [False, True], ids=["one-way", "both-ways"])
def test_an_edge_carrier_cut_off_from_the_other_group_but_up_in_its_own_is_routed_around(
        cluster, both_ways):
    """Finding 4 of the issue-16 review, second part, and finding A of the tree-mode review:
    the member carrying an edge is up for its group (heartbeats) but reaches no member of the
    other group. One way (the other group still reaches it): it answers their batches with its
    group's reports. Both ways: the other side falls over to the next member of this group
    after ``retry``, which answers the same way. Either way both directions flow again."""
    groups, net, clock, prots = cluster
    mesh = ov.overlay(0, groups)
    run(net, clock, mesh.hops)
    edge = next(e for e in ov.overlay(36, groups).edges if e.other == 2)   # group 9 -> 2
    carrier = edge.mine[0]
    net.cut |= {(carrier, s) for s in edge.theirs}
    if both_ways:
        net.cut |= {(s, carrier) for s in edge.theirs}
    below, above = edge.mine[1], edge.theirs[1]       # a node on each side that changes
    commit(prots[below].store, 5)
    commit(prots[above].store, 6)
    run(net, clock, 1)
    sent = {s: prots[s].report_marks()[s] for s in (below, above)}
    run(net, clock, 5 + 2 * mesh.hops)
    for slot, prot in prots.items():
        if slot != below:
            assert prot._held[below]["j"].held == (5,), slot
            assert prot.report_marks()[below] >= sent[below]
        if slot != above:
            assert prot._held[above]["j"].held == (6,), slot
    # The carrier is still everybody's gateway in its group (it is up) and still cut off.
    assert ov.gateway(edge.mine, lambda s: True) == carrier
    assert all(carrier not in net.relays[s].partners() for s in edge.theirs) == both_ways


def test_a_stale_report_of_an_older_timeline_never_lowers_a_pin_and_a_replacement_adopts(
        cluster):
    """A report of an older timeline counts only up to the lower base for raising a pin; it
    must not make a pin fall (the pin is what every node keeps). Restore X from step 8, then
    restore Y from step 14 with the pin at 14: a far node still holding a node's report of
    timeline X (base 8) keeps its pin at 14. A replacement (no timeline of its own) takes the
    one the others report."""
    groups, net, clock, prots = cluster
    mesh = ov.overlay(0, groups)
    slow, far = 33, 1
    for prot in prots.values():
        prot.push = prot.report
        for step in (7, 8):
            commit(prot.store, step)
    run(net, clock, mesh.hops + 1)
    for prot in prots.values():
        prot.node_dropped("j", set(), (0xA, 8))          # restore X: back to step 8
        for step in (13, 14):
            commit(prot.store, step)
    run(net, clock, mesh.hops + 1)
    assert {p.pin("j") for p in prots.values()} == {14}
    net.hidden[slow] = set(range(0, 4))
    for prot in prots.values():
        prot.node_dropped("j", set(), (0xB, 14))         # restore Y: back to step 14
    run(net, clock, mesh.hops + 1)
    assert prots[far]._held[slow]["j"].timeline == 0xA   # stale, of timeline X
    assert prots[far].pin("j") == 14
    # A late report of timeline X from the slow node that also lists step 8 (kept there):
    # capped to X's base it holds {8}, not the pin; yet it says it holds 14.
    last = prots[far].latest()[slow]
    late = dataclasses.replace(last, seq=last.seq + 1, jobs=tuple(
        dataclasses.replace(j, held=(8, 13, 14)) for j in last.jobs))
    assert prots[far].on_held(late)
    assert prots[far].pin("j") == 14
    assert 14 in {v.step for v in prots[far].store.versions("j")}
    net.hidden.clear()
    for prot in prots.values():
        for step in (15, 16):
            commit(prot.store, step)
    run(net, clock, mesh.hops + 1)
    assert {p.pin("j") for p in prots.values()} == {16}
    # Node 12 is replaced: its memory rebuilt, it has no timeline until its ranks restore.
    prots[12]._timelines.clear()
    prots[12].adopt_timelines()
    assert prots[12]._timelines["j"] == (0xB, 14)
    # Node 13's daemon is replaced under live trainers (nothing rebuilt, no restore): its
    # first commit takes the others' timeline (review of the timelines, F2: pins froze).
    prots[13]._timelines.clear()
    commit(prots[13].store, 17)
    prots[13].on_commit(next(v for v in prots[13].store.versions("j") if v.step == 17))
    assert prots[13]._timelines["j"] == (0xB, 14)
    # A timeline taken from the others is taken again when theirs moves on (it may have come
    # from stale reports, behind a partition: round 4, S-a); one of its own ranks' restores
    # is not.
    for slot, prot in prots.items():
        if slot != 13:
            prot.node_dropped("j", set(), (0xC, 16))
    run(net, clock, mesh.hops + 1)
    assert prots[13]._timelines["j"] == (0xC, 16)
    prots[13].node_dropped("j", set(), (0xD, 17))
    run(net, clock, mesh.hops + 1)
    assert prots[13]._timelines["j"] == (0xD, 17)


def test_a_commit_without_a_timeline_looks_for_one_only_when_the_reports_changed(cluster):
    """A job that never restored has no timeline anywhere: a commit looks at the others'
    reports for one (adopt_timelines, O(nodes)) only when they changed since it last looked,
    not at every save; and once one is reported, the next commit takes it."""
    groups, net, clock, prots = cluster
    mesh = ov.overlay(0, groups)
    for p in prots.values():
        p.push = p.report
        commit(p.store, 1)
    run(net, clock, mesh.hops + 1)
    prot = prots[5]
    looked: list[set] = []
    take = prot._take_timelines
    prot._take_timelines = lambda jobs: looked.append(set(jobs)) or take(jobs)

    def save(step):
        commit(prot.store, step)
        prot.on_commit(next(v for v in prot.store.versions("j") if v.step == step))

    for step in (2, 3, 4):
        save(step)
    assert looked == [{"j"}]
    for slot, p in prots.items():          # the others restore: a timeline in their reports
        if slot != 5:
            p.node_dropped("j", set(), (0x7, 1))
    run(net, clock, mesh.hops + 1)
    save(5)
    assert prot._timelines["j"] == (0x7, 1)
    for step in (6, 7, 8):                 # it has one now: no more looking
        save(step)
    assert looked == [{"j"}, {"j"}]
