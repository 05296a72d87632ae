"""Job-wide retention (the floors nodes report to each other): what a node asks the others
to keep, that a daemon restarted on its memory remembers what it heard, and that a node still
recovering does not wipe what was heard from it. A real Store on a tmp directory; no peers."""

import pytest

from snapshotd import peerproto as pp
from snapshotd.codec import make_codec
from snapshotd.placement import make_groups
from snapshotd.protection import NodeView, Protector, job_wide
from snapshotd.protocol import TensorEntry
from snapshotd.store import Store, spare_steps

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


def test_pins_are_the_lowest_floor_and_survive_a_restart_on_the_same_memory(tmp_path):
    store = open_store(tmp_path / "shm")
    prot = protector(store)
    prot.on_held(held(1, 7))
    prot.on_held(held(2, 5))
    assert store.pins == {"j": 5}
    assert prot.reported(1) and prot.reported(2) and not prot.reported(3)
    prot.on_held(held(2, 3))                         # a node's floor goes down (new timeline)
    assert store.pins == {"j": 3}
    # The daemon is SIGKILLed and restarted on its memory: it starts from what it knew (node
    # 2, which may be down now, relies on step 3), but waits for fresh reports to recover.
    again = protector(open_store(tmp_path / "shm"))
    assert again.store.pins == {"j": 3}
    assert not again.reported(2)
    again.close()                                    # a graceful stop forgets it
    assert protector(open_store(tmp_path / "shm")).store.pins == {}


def test_a_recovering_node_is_heard_but_keeps_its_last_floors(tmp_path):
    store = open_store(tmp_path / "shm")
    prot = protector(store)
    prot.on_held(held(1, 4))
    prot.on_held(held(2, 6))
    prot.on_held(pp.Held(1, (), recovering=True))    # node 1 lost, its replacement rebuilding
    assert store.pins == {"j": 4}
    assert prot.reported(1)
    recovering = protector(open_store(tmp_path / "other"), ready=False).report()
    assert recovering.recovering and recovering.jobs == ()


def test_a_corrupt_floors_file_is_ignored_with_a_warning(tmp_path, caplog):
    store = open_store(tmp_path / "shm")
    (tmp_path / "shm" / "floors.json").write_text("{not json")
    prot = protector(store)
    assert store.pins == {} and "floors.json" in caplog.text
    prot.on_held(held(1, 2))
    assert store.pins == {"j": 2}


# The job-wide step from the steps every node holds (third review, F3: nodes saving faster than
# a report round evicted the step a slower node reported next).

V = NodeView


def test_the_job_wide_step_is_the_newest_step_every_node_holds():
    views = {0: V(5, (2, 3, 4, 5)), 1: V(5, (2, 4, 5)), 2: V(3, (2, 3))}
    pin, spare = job_wide(views, keep=2)
    assert pin == 2                          # 3 is not on node 1: the lowest floor would be 3
    assert spare == (2, 5, False)            # node 2 reported up to 3: keep up to 3 + keep
    assert spare_steps(range(1, 12), spare, keep=2) == {3, 4, 5}


def test_the_job_wide_step_prefers_steps_no_newer_than_every_floor():
    views = {0: V(2, (2, 3)), 1: V(5, (2, 3, 5))}
    assert job_wide(views, keep=2)[0] == 2   # 3 is common but node 0 has not protected it


def test_nothing_common_falls_back_to_the_lowest_floor_and_old_reports_keep_nothing_more():
    assert job_wide({0: V(5, (4, 5)), 1: V(3, (2, 3))}, keep=2)[0] == 3
    assert job_wide({0: V(5, (4, 5)), 1: V(3)}, keep=2) == (3, None)   # a daemon without held
    assert job_wide({}, keep=2) == (-1, None)


def test_until_every_rank_is_reported_the_oldest_steps_above_the_pin_are_kept():
    views = {0: V(5, (3, 4, 5), (0, 1), 4), 1: V(3, (2, 3), (2,), 4)}     # rank 3 not heard
    pin, spare = job_wide(views, keep=2)
    assert pin == 3 and spare[2] is True
    assert spare_steps(range(1, 30), spare, keep=2) == {4, 5, 6}
    views[2] = V(3, (1, 2, 3), (3,), 4)
    assert job_wide(views, keep=2) == (3, (3, 5, False))


def test_a_node_keeps_its_spare_steps_and_reports_its_ranks_and_world(tmp_path):
    store = open_store(tmp_path)
    prot = protector(store)
    # Node 1 reported holding steps 1-2 of the job's 2 ranks' rank 1; this node saves 1-6.
    prot.on_held(pp.Held(1, (pp.JobFloor("j", 2, (1, 2), (1,), 2),)))
    for step in range(1, 7):
        slot = store.alloc("j", 0, step, 64, 100, world_size=2)
        store.commit(slot.number, (TensorEntry("t", "uint8", (64,), 0, 64),), "{}")
        prot.report()                        # this node's own report (every heartbeat)
    held_steps = sorted(v.step for v in store.versions("j"))
    assert held_steps == [2, 3, 4, 5, 6], held_steps   # pin 2, spare 3-4, window 5-6
    report = prot.report().jobs[0]
    assert (report.ranks, report.world) == ((0,), 2)
    # The slower node reports step 4: it becomes the job-wide step, 2 and 3 may go.
    prot.on_held(pp.Held(1, (pp.JobFloor("j", 4, (3, 4), (1,), 2),)))
    slot = store.alloc("j", 0, 7, 64, 100, world_size=2)
    store.commit(slot.number, (TensorEntry("t", "uint8", (64,), 0, 64),), "{}")
    assert sorted(v.step for v in store.versions("j")) == [4, 5, 6, 7]
    store.close()


def test_spare_steps_give_way_when_memory_is_needed(tmp_path, caplog):
    store = open_store(tmp_path)
    store.spare = {"j": (0, 100, True)}      # keep the oldest 3 above step 0 for a slow node
    for step in range(1, 6):
        slot = store.alloc("j", 0, step, 4096, 100)
        store.commit(slot.number, (TensorEntry("t", "uint8", (4096,), 0, 4096),), "{}")
    assert sorted(v.step for v in store.versions("j")) == [1, 2, 3, 4, 5]
    store.memory_limit = store._used() + 100  # full: no room for a sixth version
    # The next save needs room: the newest spare version goes first, the save succeeds.
    slot = store.alloc("j", 0, 6, 4096, 100)
    assert "step 3 evicted" in caplog.text, caplog.text
    store.commit(slot.number, (TensorEntry("t", "uint8", (4096,), 0, 4096),), "{}")
    assert [v.step for v in store.versions("j")][-2:] == [5, 6]
    store.close()
