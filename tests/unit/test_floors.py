"""Job-wide retention (the floors nodes report to each other): what a node asks the others
to keep, that a daemon restarted on its memory remembers what it heard, and that a node still
recovering does not wipe what was heard from it. A real Store on a tmp directory; no peers."""

import dataclasses
import itertools

import pytest

from snapshotd.cluster import peerproto as pp
from snapshotd.cluster.codec import make_codec
from snapshotd.cluster.placement import make_groups
from snapshotd.cluster.protection import NodeView, Protector, job_wide
from snapshotd.common.protocol import TensorEntry
from snapshotd.node.store import Store, StoreError

pytestmark = pytest.mark.timeout(30)


def open_store(path):
    store = Store(str(path), memory_limit=1 << 20, keep=2, identity=lambda pid: 1.0)
    store.open()
    return store


def commit(store, step, rank=0, protected=False):
    slot = store.alloc("j", rank, step, 64, 100)
    view = store.dir.view(slot.number, slot.size)
    view[:64] = b"x" * 64
    view.release()
    return store.commit(slot.number, (TensorEntry("t", "uint8", (64,), 0, 64),), "{}",
                        protected=protected)


def protector(store, ready=True):
    group = make_groups(4, 2, 2)[0]
    prot = Protector(0, group, make_codec("isal", 2, 2), store, links=None,
                     up=lambda slot: True)
    prot.ready = lambda: ready
    return prot


_SEQ = itertools.count(1)


def hear(prot, msg):
    """``prot`` takes another node's report ``msg``, as the relay would hand it a newer one
    (reports carry their origin's incarnation and sequence number)."""
    return prot.on_held(dataclasses.replace(msg, inc=1, seq=next(_SEQ)))


def held(src, floor, job="j"):
    return pp.Held(src, (pp.JobFloor(job, floor),))


def test_job_floor_is_the_newest_protected_step_or_the_newest_held(tmp_path):
    store = open_store(tmp_path / "shm")
    prot = protector(store)
    assert prot.job_floor("j") == -1                 # nothing held
    commit(store, 3)
    assert prot.job_floor("j") == 3                  # no protected step: the one it restores
    commit(store, 4, protected=True)
    commit(store, 5)
    assert prot.job_floor("j") == 4                  # the newest protected step
    commit(store, 6, rank=1)
    assert prot.job_floor("j") == 4                  # the lowest over the local ranks
    commit(store, 2, rank=2, protected=True)
    assert prot.job_floor("j") == 2


def report(src, floor, steps, job="j"):
    return pp.Held(src, (pp.JobFloor(job, floor, tuple(steps)),))


def test_pins_survive_a_restart_on_the_same_memory(tmp_path):
    store = open_store(tmp_path / "shm")
    prot = protector(store)
    prot.report_to = [1, 2]                          # the cluster's other nodes
    for step in (3, 5, 7):
        commit(store, step, protected=True)
    prot.report()                                    # this node holds 3, 5, 7
    hear(prot, report(1, 7, (5, 7)))
    hear(prot, report(2, 5, (3, 5)))
    assert store.pins == {"j": 5}
    assert prot.reported(1) and prot.reported(2) and not prot.reported(3)
    # The daemon is SIGKILLed and restarted on its memory: it starts from what it knew (node
    # 2, which may be down now, relies on step 5), but waits for fresh reports to recover.
    again = protector(open_store(tmp_path / "shm"))
    assert again.store.pins == {"j": 5}
    assert not again.reported(2)
    again.close()                                    # a graceful stop forgets it
    assert protector(open_store(tmp_path / "shm")).store.pins == {}


def test_a_recovering_node_is_heard_but_keeps_its_last_floors(tmp_path):
    store = open_store(tmp_path / "shm")
    prot = protector(store)
    prot.report_to = [1, 2]
    commit(store, 4, protected=True)
    commit(store, 6, protected=True)
    prot.report()
    hear(prot, report(1, 4, (4,)))
    hear(prot, report(2, 6, (4, 6)))
    hear(prot, pp.Held(1, (), recovering=True))    # node 1 lost, its replacement rebuilding
    assert store.pins == {"j": 4}
    assert prot.reported(1)
    recovering = protector(open_store(tmp_path / "other"), ready=False).report()
    assert recovering.recovering and recovering.jobs == ()


def test_a_corrupt_floors_file_is_ignored_with_a_warning(tmp_path, caplog):
    store = open_store(tmp_path / "shm")
    (tmp_path / "shm" / "floors.json").write_text("{not json")
    prot = protector(store)
    prot.report_to = [1]
    assert store.pins == {} and "floors.json" in caplog.text
    commit(store, 2, protected=True)
    prot.report()
    hear(prot, report(1, 2, (2,)))
    assert store.pins == {"j": 2}


# The job-wide step from the steps every node holds (third review, F3: nodes saving faster than
# a report round evicted the step a slower node reported next; fourth review: the pin moved
# forward and back, and a rank not reported yet lost its steps).

V = NodeView


def test_the_job_wide_step_is_the_newest_protected_step_every_node_holds():
    views = {0: V(5, (2, 3, 4, 5)), 1: V(5, (2, 4, 5)), 2: V(3, (2, 3))}
    assert job_wide(views) == 2              # 3 is not on node 1: the lowest floor would be 3
    assert job_wide({0: V(2, (2, 3)), 1: V(5, (2, 3, 5))}) == 2   # 3 not protected on node 0
    assert job_wide({0: V(2, (3, 4, 5)), 1: V(5, (3, 4, 5))}) == -1   # none: no candidate


def test_no_candidate_until_every_rank_is_reported_and_old_reports_fall_back():
    views = {0: V(5, (3, 4, 5), (0, 1), 4), 1: V(3, (2, 3), (2,), 4)}     # rank 3 not heard
    assert job_wide(views) == -1
    views[2] = V(3, (1, 2, 3), (3,), 4)
    assert job_wide(views) == 3
    assert job_wide({0: V(5), 1: V(3)}) == 3            # daemons without held: lowest floor
    # A node whose ranks hold no step in common (or one without held beside one with it):
    # no step is common, whatever the floors say.
    assert job_wide({0: V(5, (4, 5)), 1: V(3)}) == -1
    assert job_wide({}) == -1


def commit_step(store, step, world=2):
    slot = store.alloc("j", 0, step, 64, 100, world_size=world)
    store.commit(slot.number, (TensorEntry("t", "uint8", (64,), 0, 64),), "{}")


def test_the_pin_only_moves_up_and_steps_above_it_are_kept(tmp_path):
    store = open_store(tmp_path)
    store.hold_unpinned = True               # a daemon with peers
    prot = protector(store)
    prot.report_to = [1]
    hear(prot, pp.Held(1, (pp.JobFloor("j", 2, (1, 2), (1,), 2),)))
    for step in range(1, 7):
        commit_step(store, step)
        prot.report()                        # this node's own report (every heartbeat)
    assert prot.pin("j") == 2
    assert sorted(v.step for v in store.versions("j")) == [2, 3, 4, 5, 6]   # all >= the pin
    report = prot.report().jobs[0]
    assert (report.ranks, report.world) == ((0,), 2)
    # The slower node reports step 4: the pin moves up to it, 2 and 3 may go.
    hear(prot, pp.Held(1, (pp.JobFloor("j", 4, (3, 4), (1,), 2),)))
    assert prot.pin("j") == 4
    assert sorted(v.step for v in store.versions("j")) == [4, 5, 6]
    # A report that gives an older candidate while still holding the pin does not move it.
    hear(prot, pp.Held(1, (pp.JobFloor("j", 3, (3, 4), (1,), 2),)))
    assert prot.pin("j") == 4
    # The other node restored step 3 (a new timeline: it dropped 4): the pin goes down to what
    # is common now, and this node keeps everything from there.
    hear(prot, pp.Held(1, (pp.JobFloor("j", 3, (2, 3), (1,), 2),)))
    assert prot.pin("j") == 3                 # by the reports (this node evicted 3 since)
    commit_step(store, 7)
    assert sorted(v.step for v in store.versions("j")) == [4, 5, 6, 7]
    store.close()


def test_no_pin_goes_up_while_a_node_recovers_and_reports_carry_the_pin(tmp_path):
    """A replacement rebuilds the newest pin the others report (Recovery._rebuild_common):
    while it recovers they must not raise their pins on its last report from before the loss,
    which lists steps the replacement may not be rebuilding (issue 12, fourth review B)."""
    clock = [100.0]
    store = open_store(tmp_path)
    store.hold_unpinned = True
    group = make_groups(4, 2, 2)[0]
    prot = Protector(0, group, make_codec("isal", 2, 2), store, links=None,
                     up=lambda slot: True, clock=lambda: clock[0])
    prot.report_to = [1]
    prot.recovering_hold = 3.0
    hear(prot, pp.Held(1, (pp.JobFloor("j", 2, (1, 2), (1,), 2),)))
    for step in range(1, 5):
        commit_step(store, step)
        prot.report()
    assert prot.pin("j") == 2
    assert prot.report().jobs[0].pin == 2           # the pin travels in the report
    hear(prot, pp.Held(1, (pp.JobFloor("j", 6, (2, 3, 4, 5, 6), (1,), 2),)))
    assert prot.pin("j") == 4                       # this node holds up to 4
    hear(prot, pp.Held(1, (), recovering=True))   # node 1 lost and replaced: rebuilding
    assert 1 in prot.reporting()
    for step in (5, 6):                             # by node 1's last report, 6 is common
        commit_step(store, step)
        prot.report()
    assert prot.pin("j") == 4                       # held while node 1 recovers
    # A node that said "recovering" and then went silent holds the pins only for a while.
    clock[0] += 5.0
    commit_step(store, 7)
    prot.report()
    assert prot.pin("j") == 6
    # Its first report once recovered counts at once (even if nothing else changed).
    hear(prot, pp.Held(1, (), recovering=True))
    hear(prot, pp.Held(1, (pp.JobFloor("j", 6, (2, 3, 4, 5, 6), (1,), 2),)))
    assert prot.pin("j") == 6
    store.close()


def test_others_floor_is_the_newest_pin_reported_else_the_common_step(tmp_path):
    prot = protector(open_store(tmp_path))
    hear(prot, pp.Held(1, (pp.JobFloor("j", 6, (4, 6), (1,), 4),)))
    hear(prot, pp.Held(2, (pp.JobFloor("j", 6, (4, 5, 6), (2,), 4),)))
    assert prot.others_floor("j") == 6              # no pins yet: the common step
    hear(prot, pp.Held(3, (pp.JobFloor("j", 4, (4,), (3,), 4, 4),)))
    assert prot.others_floor("j") == 4
    hear(prot, pp.Held(2, (pp.JobFloor("j", 6, (4, 5, 6), (2,), 4, 6),)))
    assert prot.others_floor("j") == 6              # the newest pin any node reports


def test_others_floor_takes_no_pin_of_a_timeline_the_others_left(tmp_path):
    """Review of the timelines in tree mode, S-b: a replacement rebuilt the newest pin any
    report named, a stale report of the abandoned timeline (from behind a partition) included:
    a step above the new timeline's base, which no node keeps. Now only the pins of the
    timeline most reports name count, and a stale one up to the steps both timelines share."""
    prot = protector(open_store(tmp_path))
    for src in (1, 2):          # restored step 8 (timeline 0x51), saved 9, pins 9
        hear(prot, pp.Held(src, (pp.JobFloor("j", 9, (8, 9), (src,), 4, 9, (8, 9), 0x51, 8),)))
    # Node 3's report from before the restore: its old timeline went on to step 12.
    hear(prot, pp.Held(3, (pp.JobFloor("j", 12, (10, 11, 12), (3,), 4, 12, (10, 11, 12)),)))
    assert prot.others_floor("j") == 9
    # Once node 3 reports the new timeline too, its pin counts whole.
    hear(prot, pp.Held(3, (pp.JobFloor("j", 10, (8, 9, 10), (3,), 4, 10, (8, 9, 10), 0x51,
                                       8),)))
    assert prot.others_floor("j") == 10


def test_a_node_that_stopped_reporting_does_not_tie_with_the_timeline_of_the_others(tmp_path):
    """Review of session 11, F2: one node's fresh report of the new timeline (0x52 from step
    5, pin 6) and one stale report of the abandoned one (0x51 from step 8, pin 11) tied, the
    higher base won, and a replacement would have rebuilt step 11 of the new timeline, not its
    pin. A node not heard from lately does not vote while another one was."""
    now = [100.0]
    prot = protector(open_store(tmp_path))
    prot._clock = lambda: now[0]
    hear(prot, pp.Held(2, (pp.JobFloor("j", 11, (9, 10, 11), (2,), 4, 11, (9, 10, 11), 0x51,
                                       8),)))
    now[0] += 2 * prot.recovering_hold              # node 2 has said nothing since
    hear(prot, pp.Held(1, (pp.JobFloor("j", 6, (5, 6), (1,), 4, 6, (5, 6), 0x52, 5),)))
    assert prot.others_floor("j") == 6
    prot.adopt_timelines("j")
    assert prot._timelines["j"] == (0x52, 5)


def test_before_any_report_a_daemon_with_peers_keeps_every_version(tmp_path):
    store = open_store(tmp_path)
    store.hold_unpinned = True
    for step in range(1, 6):
        commit_step(store, step)
    assert sorted(v.step for v in store.versions("j")) == [1, 2, 3, 4, 5]
    store.close()


def test_versions_above_the_pin_give_way_when_memory_is_needed(tmp_path, caplog):
    store = open_store(tmp_path)
    store.hold_unpinned = True
    store.pins = {"j": 1}
    for step in range(1, 6):
        commit_step(store, step)
    assert sorted(v.step for v in store.versions("j")) == [1, 2, 3, 4, 5]
    store.memory_limit = store._used() + 10   # full: no room for a sixth version
    # The next save needs room: the newest version above the pin outside the newest `keep`
    # goes first (3), the save succeeds; the pin and the newest two stay.
    commit_step(store, 6)
    assert "newer than the job-wide step are evicted" in caplog.text, caplog.text
    held = sorted(v.step for v in store.versions("j"))
    assert 1 in held and held[-2:] == [5, 6] and 3 not in held, held
    store.close()


def test_a_node_left_with_an_older_layout_does_not_hold_the_job_wide_step_back():
    """Review of issue 14: after a job came back at 2 ranks from 4, node 1 holds only the old
    layout's ranks 2-3 (world 4, steps 1-3); node 0 saves on (world 2). Counting node 1, no
    step is common and nothing was ever evicted again; its report is of another layout."""
    new = NodeView(33, tuple(range(31, 34)), (0, 1), 2, -1, tuple(range(31, 34)))
    old = NodeView(3, (1, 2, 3), (2, 3), 4, 3, (1, 2, 3))
    assert job_wide({0: new, 1: old}) == 33
    # Before the new layout saved anything newer, the old one is the current layout.
    assert job_wide({0: NodeView(3, (3,), (0, 1), 4, 3, (3,)), 1: old}) == 3
    # A node that does not say its world counts always.
    assert job_wide({0: new, 1: NodeView(3, (1, 2, 3), (2, 3), 0)}) == -1


def commit_at(store, step, rank, world):
    slot = store.alloc("j", rank, step, 64, 100, world_size=world)
    view = store.dir.view(slot.number, slot.size)
    view[:64] = b"x" * 64
    view.release()
    return store.commit(slot.number, (TensorEntry("t", "uint8", (64,), 0, 64),), "{}")


def test_an_old_layouts_rank_left_here_does_not_keep_the_new_layouts_versions_unprotected(
        tmp_path):
    """Second review of issue 14: after 4 ranks (2 per node) came back as 2 (1 per node), the
    node holding the old ranks 2-3 never saw its new rank 1's versions complete (it waited
    for ranks 2-3 at the new steps), so they were never coded, and a loss of the node rolled
    the job back silently. A node version is the ranks of its step's layout."""
    store = open_store(tmp_path / "shm")
    prot = protector(store)
    for rank in (2, 3):
        commit_at(store, 3, rank, world=4)
    commit_at(store, 4, 1, world=2)
    nv = prot.node_version("j", 4)
    assert nv is not None and [v.rank for v in nv.versions] == [1]
    assert [v.rank for v in prot.node_version("j", 3).versions] == [2, 3]
    # The report speaks for the current layout only (the new rank), not the old ranks.
    view = prot.node_view("j")
    assert view.ranks == (1,) and view.held == (4,) and view.world == 2


def test_a_step_dropped_here_is_never_rebuilt_from_parity_of_before_the_drop(tmp_path):
    """Second review of issue 14: a daemon restarted on its memory rebuilt a step it had just
    dropped (a new timeline), from parity the group had not freed yet."""
    import json
    import time

    store = open_store(tmp_path / "shm")
    prot = protector(store)
    before = json.dumps({"ranks": [{"committed_at": time.time() - 10}]})
    prot.node_dropped("j", {4})
    after = json.dumps({"ranks": [{"committed_at": time.time() + 10}]})
    assert prot.abandoned("j", 4, before)           # the dropped version: not rebuilt
    assert not prot.abandoned("j", 4, after)        # a version of step 4 saved since: fine
    assert not prot.abandoned("j", 5, before)


@pytest.mark.parametrize("slot", [99, -1])
def test_regression_report_from_a_slot_outside_the_cluster_freezes_retention(tmp_path, slot):
    """Issue 25, finding 7: one Held from slot 99 (or -1) claiming steps 1-2 was taken and
    kept (through floors.json too): the job-wide step froze and every node kept every step
    after it. It is refused, and one already in floors.json is forgotten at start."""
    store = open_store(tmp_path)
    store.hold_unpinned = True
    prot = protector(store)
    prot.report_to = [1]
    hear(prot, pp.Held(1, (pp.JobFloor("j", 2, (1, 2), (1,), 2),)))
    with pytest.raises(StoreError, match="not a node of this cluster"):
        hear(prot, pp.Held(slot, (pp.JobFloor("j", 1, (1, 2), (0,), 2),)))
    # Relayed in a batch (the relay's path): left out, not taken.
    assert prot.learn_all([dataclasses.replace(held(slot, 1), inc=1, seq=next(_SEQ))]) == [None]
    for step in range(1, 9):
        commit_step(store, step)
        prot.report()
        hear(prot, pp.Held(1, (pp.JobFloor("j", step, (step - 1, step), (1,), 2),)))
    assert prot.pin("j") == 8
    assert sorted(v.step for v in store.versions("j")) == [7, 8]
    # A floors.json that holds such a report (an older daemon took it) is cleaned at start.
    prot._floors[slot] = {"j": 1}
    prot._held[slot] = {"j": NodeView(1, (1, 2), (0,), 2)}
    prot._save_floors()
    again = protector(store)
    assert (slot in again._floors) == (slot >= 0)    # a negative slot fails the typed load
    again.report_to = [1]
    assert slot not in again._floors and slot not in again._held
    store.close()
