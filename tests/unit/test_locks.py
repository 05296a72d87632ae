"""The daemon's lock order (docs/design.md section 6) and its test-mode checker.

Issue 25, finding 1: the control thread held the store's lock in ``Store.alloc_spare`` and
waited for the protector's (the budget read ``Protector.parity_bytes``), while the peers thread
held the protector's lock in ``Protector.retry`` and waited for the store's (``vid`` ->
``Store.owner``): the daemon answered nothing for good. The checker finds such an inversion
the first time both orders are taken, deadlock or not; the suite runs with it on
(tests/conftest.py) in this process and in every daemon it starts."""
import threading
import time

import pytest
from test_protection_drops import commit, protectors

from snapshotd.common import locks
from snapshotd.node.store import Store


@pytest.fixture
def checker(monkeypatch):
    monkeypatch.setenv("SNAPSHOTD_LOCKDEP", "1")
    monkeypatch.delenv("SNAPSHOTD_LOCKDEP_DIR", raising=False)
    saved = (dict(locks._edges), list(locks._violations), set(locks._reported))
    locks.reset()
    yield
    locks.reset()
    locks._edges.update(saved[0])
    locks._violations.extend(saved[1])
    locks._reported.update(saved[2])


@pytest.mark.lockdep_provoked
def test_an_inversion_is_reported_before_it_deadlocks(checker):
    store, protector = locks.lock("store"), locks.lock("protector")
    with protector, store:                       # the documented order: fine
        pass
    assert locks.violations() == []
    with store, protector:                       # the other way round, one thread, no deadlock
        pass
    found = locks.violations()
    assert [(v["kind"], v["held"], v["taken"]) for v in found] == [
        ("order", "store", "protector")]
    assert "test_locks.py" in found[0]["stack"]


@pytest.mark.lockdep_provoked
def test_a_cycle_through_a_third_lock_is_reported(checker, monkeypatch):
    # Three names in a cycle, each edge in the documented order but one: the last edge closes
    # it; with the order check off the cycle is still found.
    monkeypatch.setattr(locks, "_RANK", {n: 0 for n in locks.ORDER})
    a, b, c = locks.lock("rebuild"), locks.lock("reads"), locks.lock("relay")
    with a, b:
        pass
    with b, c:
        pass
    assert locks.violations() == []
    with c, a:
        pass
    (found,) = locks.violations()
    assert (found["kind"], found["held"], found["taken"]) == ("cycle", "relay", "rebuild")
    assert "rebuild -> reads -> relay" in found["other"]


@pytest.mark.lockdep_provoked
def test_two_locks_of_one_name_nested_are_reported_a_reentrant_one_is_not(checker):
    one, two = locks.lock("store"), locks.lock("store")
    with one, two:
        pass
    assert [v["kind"] for v in locks.violations()] == ["nested"]
    locks.reset()
    again = locks.rlock("reads")
    with again, again:
        pass
    assert locks.violations() == []


def test_an_unknown_lock_name_is_refused():
    with pytest.raises(ValueError, match="not in snapshotd.common.locks.ORDER"):
        locks.lock("mine")


def test_without_the_checker_locks_are_plain(monkeypatch):
    monkeypatch.setenv("SNAPSHOTD_LOCKDEP", "0")
    assert type(locks.lock("store")) is type(threading.Lock())


def test_a_condition_over_a_checked_lock_waits_and_is_notified(checker):
    cond, box = locks.condition("relay.done"), []

    def later():
        time.sleep(0.05)
        with cond:
            box.append(1)
            cond.notify_all()

    threading.Thread(target=later).start()
    with cond:
        assert cond.wait_for(lambda: box, timeout=5)
    assert locks.violations() == []


def test_tally_sums_sizes_as_the_dict_changes():
    t = locks.Tally(lambda r: r)
    t["a"] = 3
    t["b"] = 4
    t["a"] = 10                                  # replaced: 3 out, 10 in
    assert t.total == 14
    assert t.pop("b") == 4 and t.pop("zz", None) is None
    t.setdefault("c", 1)
    t.update(d=2)
    del t["c"]
    assert t.total == 12 == sum(t.values())
    t.clear()
    assert t.total == 0


def test_regression_deadlock_store_alloc_spare_against_protector_retry(tmp_path, checker):
    """The two threads of the deadlock, for two seconds, with the checker on: no inversion
    is seen and neither thread hangs."""
    group = protectors(tmp_path)
    prot = group[0]
    store: Store = prot.store
    for step in (1, 2, 3):
        commit(store, step)
    slot = store.alloc("j", 0, 4, 64, 100)
    stop = time.monotonic() + 2.0
    errors: list[BaseException] = []

    def control() -> None:
        try:
            while time.monotonic() < stop:
                spare = store.alloc_spare(slot, 64)
                if spare is not None:
                    store.abort(spare.number)
                store.stats()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    def peers() -> None:
        try:
            while time.monotonic() < stop:
                prot._sent.clear()                # every retry gets as far as the version id
                prot.retry()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    prot._pool.submit = lambda *a, **k: None     # the sends themselves are not under test
    threads = [threading.Thread(target=control), threading.Thread(target=peers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert not any(t.is_alive() for t in threads), "deadlock: a thread never returned"
    assert errors == []
    assert locks.violations() == []
