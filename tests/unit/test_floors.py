"""Job-wide retention (the floors nodes report to each other): what a node asks the others
to keep, that a daemon restarted on its memory remembers what it heard, and that a node still
recovering does not wipe what was heard from it. A real Store on a tmp directory; no peers."""

import pytest

from snapshotd import peerproto as pp
from snapshotd.codec import make_codec
from snapshotd.placement import make_groups
from snapshotd.protection import Protector
from snapshotd.protocol import TensorEntry
from snapshotd.store import Store

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
