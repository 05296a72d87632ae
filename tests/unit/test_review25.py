"""Review of issue 25 (an adversarial reviewer with real daemons), findings A-C and E, as
unit tests of the piece each was in; E with a real daemon in
tests/faults/test_fault_robustness.py."""
import json
import logging
import math

import pytest

from snapshotd.common import protocol as p
from snapshotd.common._loop import RouterLoop
from snapshotd.daemon import CGROUP_HEADROOM, cgroup_memory_limit, fit_cgroup
from snapshotd.node._shm import seal
from snapshotd.node.store import STAMP_AHEAD, Store


def open_store(path, now=1_800_000_000.0):
    store = Store(str(path), memory_limit=1 << 20, keep=2, identity=lambda pid: 1.0,
                  clock=lambda: now)
    store.open()
    return store


@pytest.mark.parametrize("text", [
    '{"stamp": Infinity}', '{"stamp": NaN}', '{"stamp": 1e300}', '{"stamp": "soon"}',
    '{"stamp": true}', "[1]", "", '{"stamp": 1800000000.5}'])
def test_regression_a_damaged_stamp_file_is_refused_with_a_warning(tmp_path, caplog, text):
    """A: ``{"stamp": Infinity}`` in stamp.json was taken: every commit was stamped inf, the
    first Status reply could not be encoded and the daemon went down (its graceful stop
    released the node's memory), at every start. B: 1e300 froze the stamps (1 us is below
    the float's resolution there). The file is sealed; anything else is ignored, loudly."""
    open_store(tmp_path).close()
    (tmp_path / "stamp.json").write_text(text)
    with caplog.at_level(logging.WARNING):
        store = open_store(tmp_path)
    stamps = [store.stamp() for _ in range(3)]
    assert all(math.isfinite(s) for s in stamps) and stamps == sorted(set(stamps))
    assert stamps[0] < 1_800_000_000.0 + 1          # the wall clock's, nothing from the file
    assert "stamp.json" in caplog.text, caplog.text


def test_a_sealed_plausible_stamp_orders_commits_after_it(tmp_path, caplog):
    ahead = 1_800_000_000.0 + 3600                  # this node's clock was an hour ahead
    open_store(tmp_path).close()
    (tmp_path / "stamp.json").write_text(seal(json.dumps({"stamp": ahead},
                                                         separators=(",", ":"))))
    store = open_store(tmp_path)
    assert store.stamp() > ahead
    store.stamp(durable=True)
    assert open_store(tmp_path).stamp() > ahead     # written sealed, read back
    # Beyond STAMP_AHEAD it is damage, not a clock.
    (tmp_path / "stamp.json").write_text(seal(json.dumps(
        {"stamp": 1_800_000_000.0 + STAMP_AHEAD + 10}, separators=(",", ":"))))
    with caplog.at_level(logging.WARNING):
        assert open_store(tmp_path).stamp() < 1_800_000_000.0 + 1
    assert "not a plausible time" in caplog.text


def test_regression_a_reply_that_cannot_be_encoded_is_answered_internal(caplog):
    """A: the Status reply carried committed_at=inf; ``protocol.encode`` raised inside the
    loop and the daemon exited. A reply that cannot be encoded is answered ``internal``."""
    loop = RouterLoop.__new__(RouterLoop)
    loop._on_reject = lambda code: None
    reply = p.VersionInfo("j", 0, 1, 8, "local", math.inf)
    with caplog.at_level(logging.ERROR):
        frames = loop._frames(b"id", 7, p.ListReply((reply,)))
    req_id, msg = p.decode(frames[1])
    assert req_id == 7 and isinstance(msg, p.Error) and msg.code == "internal", msg
    assert "could not be encoded" in caplog.text


def test_regression_a_cgroup_limit_below_the_budget_lowers_the_budget(tmp_path, caplog):
    """C: a daemon in a 100 MiB memory cgroup with --memory-limit 512MiB was killed by the
    kernel at its first saves. The cgroup's limit (v2 memory.max, v1
    memory.limit_in_bytes) bounds the budget, with room for the daemon itself."""
    proc = tmp_path / "cgroup"
    v2 = tmp_path / "sys" / "job.slice" / "snapshotd.service"
    v2.mkdir(parents=True)
    (v2 / "memory.max").write_text(f"{100 << 20}\n")
    proc.write_text("0::/job.slice/snapshotd.service\n")
    found = cgroup_memory_limit(str(proc), str(tmp_path / "sys"))
    assert found == (100 << 20, str(v2 / "memory.max"))
    with caplog.at_level(logging.WARNING):
        fitted = fit_cgroup(512 << 20, found)
    assert fitted == (100 << 20) - CGROUP_HEADROOM and "memory cgroup" in caplog.text
    assert fit_cgroup(1 << 20, found) == 1 << 20              # fits: unchanged
    (v2 / "memory.max").write_text("max\n")                    # no limit
    assert cgroup_memory_limit(str(proc), str(tmp_path / "sys")) is None
    v1 = tmp_path / "sys" / "memory" / "r25"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text(f"{1 << 30}\n")
    proc.write_text("9:memory:/r25\n2:cpu,cpuacct:/\n")
    assert cgroup_memory_limit(str(proc), str(tmp_path / "sys"))[0] == 1 << 30
    (v1 / "memory.limit_in_bytes").write_text(f"{(1 << 63) - 4096}\n")   # v1 "unlimited"
    assert cgroup_memory_limit(str(proc), str(tmp_path / "sys")) is None
