"""The store: slots, commit, retention, memory budget, leases, reaping and adoption."""

import os

import pytest

from snapshotd.common.protocol import ProtocolError, TensorEntry
from snapshotd.node.store import Store, StoreError

pytestmark = pytest.mark.timeout(30)


class Procs:
    """A fake process table: pid -> start time; a missing pid is a dead process."""

    def __init__(self):
        self.alive = {100: 1.0, 200: 2.0}

    def __call__(self, pid):
        return self.alive.get(pid)


@pytest.fixture
def procs():
    return Procs()


@pytest.fixture
def store(tmp_path, procs):
    s = Store(str(tmp_path / "shm"), memory_limit=1 << 20, keep=2, identity=procs)
    s.open()
    return s


def write(store, step, payload=b"x" * 64, rank=0, pid=100, job="j"):
    slot = store.alloc(job, rank, step, len(payload), pid)
    view = store.dir.view(slot.number, slot.size)
    view[:len(payload)] = payload
    view.release()
    return slot


def commit(store, step, payload=b"x" * 64, rank=0, job="j"):
    slot = write(store, step, payload, rank, job=job)
    entry = TensorEntry("t", "uint8", (len(payload),), 0, len(payload))
    return store.commit(slot.number, (entry,), f'{{"step": {step}}}')


def steps(store, rank=0):
    return [v.step for v in store.versions("j", rank)]


def test_commit_makes_version_visible_with_checksum(store):
    slot = write(store, 1)
    assert steps(store) == []                           # invisible before commit
    version = store.commit(slot.number, (TensorEntry("t", "uint8", (64,), 0, 64),), "{}")
    assert steps(store) == [1]
    assert len(version.tensors[0].checksum) == 16
    assert store.verify(version) == []


def test_retention_keeps_newest_n(store):
    for step in range(1, 6):
        commit(store, step)
    assert steps(store) == [4, 5]


def test_retention_keeps_newest_protected(store):
    commit(store, 1)
    store.mark_protected("j", 0, 1)
    commit(store, 2)
    commit(store, 3)
    assert steps(store) == [1, 2, 3]
    store.mark_protected("j", 0, 3)
    assert steps(store) == [2, 3]


def test_recommit_of_a_step_replaces_it(store):
    commit(store, 1, b"a" * 64)
    v = commit(store, 1, b"b" * 64)
    assert steps(store) == [1]
    assert bytes(store.dir.view(v.number, 64)) == b"b" * 64


def test_over_limit_refused_and_versions_intact(store):
    commit(store, 1, b"a" * 300_000)
    commit(store, 2, b"b" * 300_000)
    with pytest.raises(StoreError) as err:
        store.alloc("j", 0, 3, 600_000, 100)
    assert err.value.code == "memory_full"
    assert "600000 bytes" in err.value.message and str(1 << 20) in err.value.message
    assert steps(store) == [1, 2]
    lease = store.lease("j", 0, 100)
    assert lease.version.step == 2 and store.verify(lease.version) == []


def test_pool_segments_are_reused_and_freed_for_new_sizes(store):
    for step in range(1, 5):
        commit(store, step, b"z" * 200_000)
    assert store.stats()["pool_segments"] <= 2
    commit(store, 5, b"q" * 500_000)          # needs the pool's memory back
    assert steps(store) == [4, 5]


def test_abort_and_dead_writer_are_reclaimed(store, procs):
    slot = write(store, 1)
    store.abort(slot.number)
    with pytest.raises(StoreError, match="unknown_slot"):
        store.commit(slot.number, (), "{}")
    write(store, 2, pid=200)
    del procs.alive[200]
    assert store.reap() == 1
    assert store.stats()["open_slots"] == 0
    assert steps(store) == []


def test_recycled_pid_is_not_mistaken_for_the_writer(store, procs):
    write(store, 1, pid=200)
    procs.alive[200] = 99.0                    # same pid, another process
    assert store.reap() == 1


def test_lease_defers_eviction(store):
    commit(store, 1)
    lease = store.lease("j", 0, 100, step=1)
    commit(store, 2)
    commit(store, 3)
    assert steps(store) == [2, 3]               # step 1 hidden ...
    assert store.verify(lease.version) == []    # ... but its bytes stay until release
    store.release(lease.id)
    with pytest.raises(StoreError, match="unknown_lease"):
        store.release(lease.id)


def test_lease_picks_newest_under_max_step_and_names_missing(store):
    commit(store, 1)
    commit(store, 2)
    assert store.lease("j", 0, 100, max_step=1).version.step == 1
    with pytest.raises(StoreError) as err:
        store.lease("j", 0, 100, step=9)
    assert err.value.code == "not_found" and "held steps: [1, 2]" in err.value.message


def test_verify_names_corrupted_tensor(store):
    v = commit(store, 1)
    view = store.dir.view(v.number, v.size)
    view[3] ^= 0xFF
    view.release()
    assert store.verify(v) == ["t"]


def test_bad_table_leaves_slot_usable(store):
    slot = write(store, 1)
    with pytest.raises(ProtocolError, match="bad_table"):
        store.commit(slot.number, (TensorEntry("t", "uint8", (65,), 0, 65),), "{}")
    store.commit(slot.number, (TensorEntry("t", "uint8", (64,), 0, 64),), "{}")
    assert steps(store) == [1]


def test_bad_requests(store):
    for args, needle in [(("bad job!", 0, 1, 8, 100), "job name"),
                         (("j", -1, 1, 8, 100), "rank must be"),
                         (("j", 0, 1, 8, 12345), "not a running process")]:
        with pytest.raises(StoreError, match=needle):
            store.alloc(*args)


def test_drop_newer_than(store):
    for step in (1, 2):
        commit(store, step)
    assert store.drop("j", 0, newer_than=1) == 1
    assert steps(store) == [1]


def test_restart_adopts_committed_and_removes_uncommitted(tmp_path, store, procs):
    commit(store, 1, b"a" * 64)
    commit(store, 2, b"b" * 64)
    write(store, 3)                                 # in flight when the daemon "dies"
    again = Store(store.dir.path, memory_limit=1 << 20, keep=2, identity=procs)
    report = again.open()
    assert report == {"adopted": 2, "removed": 1, "discarded": 0, "bytes_removed": 64}
    assert [v.step for v in again.versions("j", 0)] == [1, 2]
    lease = again.lease("j", 0, 100)
    assert again.verify(lease.version) == []
    assert sorted(os.listdir(again.dir.path)) == sorted(
        f"seg-{v.number}.{ext}" for v in again.versions() for ext in ("bin", "json"))


def test_close_releases_every_segment(store):
    commit(store, 1)
    write(store, 2)
    store.close()
    assert os.listdir(store.dir.path) == []
    with pytest.raises(StoreError, match="shutting_down"):
        store.alloc("j", 0, 3, 8, 100)


def test_job_binding_refuses_other_tokens_and_survives_a_restart(tmp_path, store, procs):
    store.authorize("j", "digest-a", bind=True)           # the first writer binds the job
    commit(store, 1)
    store.authorize("j", "digest-a")                       # its own token passes
    with pytest.raises(StoreError) as err:
        store.authorize("j", "digest-b")
    assert err.value.code == "forbidden" and "'j'" in str(err.value)
    with pytest.raises(StoreError):
        store.authorize("j", "digest-b", bind=True)        # no re-binding by a second writer
    store.authorize("other", "digest-b", bind=True)        # other jobs are independent
    again = Store(str(tmp_path / "shm"), memory_limit=1 << 20, keep=2, identity=procs)
    again.open()                                           # the binding is in the manifest
    assert again.owner("j") == "digest-a" and steps(again) == [1]
    with pytest.raises(StoreError):
        again.authorize("j", "digest-b")


def test_alloc_refuses_a_step_older_than_the_newest_held(store):
    commit(store, 5)
    with pytest.raises(StoreError) as err:
        store.alloc("j", 0, 4, 8, 100)
    assert err.value.code == "stale_step" and "restore(step=4)" in err.value.message
    assert store.stats()["open_slots"] == 0
    store.abort(store.alloc("j", 0, 5, 8, 100).number)   # the same step: a replacement
    store.abort(store.alloc("j", 1, 1, 8, 100).number)   # another rank has its own steps
    store.drop("j", 0, newer_than=3)
    store.abort(store.alloc("j", 0, 4, 8, 100).number)   # a new timeline after the drop


@pytest.mark.parametrize("job", [".", "..", "a/b", "", "x" * 129])
def test_job_names_that_are_not_one_path_component_are_refused(store, job):
    with pytest.raises(StoreError) as err:
        store.alloc(job, 0, 1, 8, 100)
    assert err.value.code == "bad_request"


def test_protected_flag_survives_adoption(tmp_path, procs):
    s = Store(str(tmp_path / "shm"), memory_limit=1 << 20, keep=2, identity=procs)
    s.open()
    for step in (3, 4, 5):
        commit(s, step)
        if step == 3:
            s.mark_protected("j", 0, 3)
    again = Store(str(tmp_path / "shm"), memory_limit=1 << 20, keep=2, identity=procs)
    again.open()                                    # a daemon restarted on its memory
    assert [(v.step, v.state) for v in again.versions("j", 0)] == [
        (3, "protected"), (4, "local"), (5, "local")]


def test_install_keeps_committed_at(store, procs):
    procs.alive[os.getpid()] = 3.0                  # install writes as the daemon itself
    original = commit(store, 1, b"z" * 64)
    store.drop("j")
    v = store.install("j", 0, 1, 64, original.tensors, "{}", 1,
                      lambda view: view.__setitem__(slice(None), b"z" * 64),
                      committed_at=original.committed_at)
    assert v.committed_at == original.committed_at and v.protected


def test_process_identity_does_not_move_with_the_wall_clock(monkeypatch):
    """Suspicion 13 of issue 12: psutil derives create_time from the boot time, which is the
    wall clock minus the uptime; a stepped clock made live writers look dead to the reaper."""
    import subprocess

    import psutil

    from snapshotd.node.store import process_identity

    proc = subprocess.Popen(["sleep", "30"])
    try:
        before = process_identity(proc.pid)
        import psutil._pslinux as pslinux

        real = pslinux.boot_time()
        monkeypatch.setattr(pslinux, "boot_time", lambda: real + 3600.0)   # clock stepped 1 h
        assert psutil.Process(proc.pid).create_time() > real + 3600        # psutil moves
        assert process_identity(proc.pid) == before is not None
        assert process_identity(os.getpid()) != before
    finally:
        proc.kill()
        proc.wait()
    assert process_identity(proc.pid) is None                         # reaped: gone


def test_two_manifests_for_one_step_adopt_the_newer_commit(tmp_path, procs):
    """Suspicion 13 of issue 12: a crash between a re-commit of a step (its manifest written)
    and the eviction of the old version leaves two manifests for one step."""
    import json

    s = Store(str(tmp_path / "shm"), memory_limit=1 << 20, keep=2, identity=procs)
    s.open()
    old = commit(s, 7, b"o" * 64)
    new = commit(s, 8, b"n" * 64)                 # the re-commit, in its own segment
    path = s.dir.manifest_path(new.number)
    with open(path) as fh:
        m = json.load(fh)
    m.pop("check")
    m["step"] = 7                                 # ... of step 7: as if step 7 was re-saved
    s.dir.write_manifest(new.number, m)           # (sealed again, as a daemon writes it)
    again = Store(str(tmp_path / "shm"), memory_limit=1 << 20, keep=2, identity=procs)
    report = again.open()
    (v,) = again.versions("j", 0)
    assert (v.step, v.number, v.committed_at) == (7, new.number, new.committed_at)
    assert report["adopted"] == 1 and report["removed"] == 1
    assert not os.path.exists(again.dir.seg_path(old.number))      # not left outside the index
    assert again.stats()["bytes_used"] == v.size + v.book
    assert again.verify(v) == []


# ------------------------------------------------------------------ issue 15

def test_commit_by_layout_digest_reuses_the_kept_table(store):
    entry = TensorEntry("t", "uint8", (64,), 0, 64)
    slot = write(store, 1)
    first = store.commit(slot.number, (entry,), "{}", layout="d1")
    slot = write(store, 2, b"y" * 64)
    second = store.commit(slot.number, (), "{}", layout="d1")
    assert [t.name for t in second.tensors] == ["t"]
    assert second.tensors[0].checksum != first.tensors[0].checksum
    assert store.verify(second) == []
    slot = write(store, 3)
    with pytest.raises(StoreError) as err:
        store.commit(slot.number, (), "{}", layout="unknown")
    assert err.value.code == "unknown_layout"
    store.abort(slot.number)
    other = write(store, 1, rank=1)                  # another rank does not share the table
    with pytest.raises(StoreError):
        store.commit(other.number, (), "{}", layout="d1")


def test_mapped_version_is_never_recycled(store, tmp_path):
    """A reader that maps a version privately sees the file wherever it has not written: once
    the version is freed, its segment is unlinked, never handed to another writer."""
    commit(store, 1)
    lease = store.lease("j", 0, 100, 1, mapped=True)
    number = lease.version.number
    path = store.dir.seg_path(number)
    commit(store, 2)
    commit(store, 3)                                 # keep=2: step 1 evicted, still leased
    assert os.path.exists(path) and 1 not in steps(store)
    store.release(lease.id)
    assert not os.path.exists(path)                  # unlinked, not pooled
    assert number not in store._pool.free
    slot = write(store, 4)
    assert slot.number != number


def test_adopted_versions_count_as_mapped(tmp_path, procs):
    s = Store(str(tmp_path / "shm"), memory_limit=1 << 20, keep=2, identity=procs)
    s.open()
    commit(s, 1)
    again = Store(str(tmp_path / "shm"), memory_limit=1 << 20, keep=2, identity=procs)
    again.open()
    assert all(v.mapped for v in again.versions())


def test_lease_says_how_many_newer_versions_are_held(store):
    for step in (1, 2):
        commit(store, step)
    assert store.lease("j", 0, 100, 1).newer == 1
    assert store.lease("j", 0, 100).newer == 0


def test_large_checksums_by_several_threads_match_one(tmp_path, procs, monkeypatch):
    from snapshotd.node import store as store_mod

    monkeypatch.setattr(store_mod, "_PARALLEL_BYTES", 1024)
    monkeypatch.setattr(store_mod, "_HASHERS", 3)
    s = Store(str(tmp_path / "shm"), memory_limit=1 << 22, keep=2, identity=procs)
    s.open()
    payload = os.urandom(64 * 40)
    slot = write(s, 1, payload)
    table = tuple(TensorEntry(f"t{i}", "uint8", (64,), 64 * i, 64) for i in range(40))
    version = s.commit(slot.number, table, "{}")
    want = [store_mod.checksum(memoryview(payload)[64 * i:64 * (i + 1)]) for i in range(40)]
    assert [t.checksum for t in version.tensors] == want


def test_spare_slot_takes_its_step_at_commit(store):
    first = write(store, 1)
    entry = TensorEntry("t", "uint8", (64,), 0, 64)
    store.commit(first.number, (entry,), "{}")
    spare = store.alloc_spare(first, 64)
    assert spare is not None and spare.step == -1 and spare.pid == first.pid
    view = store.dir.view(spare.number, spare.size)
    view[:64] = b"z" * 64
    view.release()
    with pytest.raises(StoreError) as err:                # the step must be named
        store.commit(spare.number, (entry,), "{}")
    assert err.value.code == "bad_request"
    with pytest.raises(StoreError) as err:                # and is checked like Alloc's
        store.commit(spare.number, (entry,), "{}", step=0)
    assert err.value.code == "stale_step"
    version = store.commit(spare.number, (entry,), "{}", step=2)
    assert version.step == 2 and steps(store) == [1, 2] and store.verify(version) == []


def test_spare_slot_only_with_room_for_another(tmp_path, procs):
    s = Store(str(tmp_path / "shm"), memory_limit=64 * 1024, keep=1, identity=procs)
    s.open()
    slot = write(s, 1, b"x" * 20000)
    s.commit(slot.number, (TensorEntry("t", "uint8", (20000,), 0, 20000),), "{}")
    assert s.alloc_spare(slot, 20000) is not None          # 20k held + 20k spare + 20k room
    assert s.alloc_spare(slot, 20000) is None              # no room left for another
    assert s.stats()["open_slots"] == 1


def test_spare_slot_of_a_dead_writer_is_reclaimed(store, procs):
    slot = write(store, 1)
    store.commit(slot.number, (TensorEntry("t", "uint8", (64,), 0, 64),), "{}")
    assert store.alloc_spare(slot, 64) is not None
    del procs.alive[100]
    assert store.reap() == 1 and store.stats()["open_slots"] == 0
