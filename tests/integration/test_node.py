"""One real daemon, real trainer processes, real signals (issue: node daemon and client)."""

import os
import signal
import time
from datetime import timedelta

import pytest
import torch
import zmq

from conftest import spawn_trainer, status, trainer, wait_for
from snapshotd.common import channel
from snapshotd.common import protocol as p
from snapshotd.common.channel import Channel
from snapshotd_client import DaemonError, DaemonUnavailable, SnapshotClient

pytestmark = pytest.mark.timeout(180)





def test_trainer_killed_mid_copy_loses_nothing_committed(node, tmp_path):
    spec = node.specs[0]
    marker = tmp_path / "copying"
    proc = spawn_trainer(spec.control, "save", "--steps", "1", "5", "--mib", "64",
                         "--hang-step", "6", "--marker", str(marker))
    wait_for(lambda: marker.exists() or proc.poll() is not None, 120, "the copy of step 6")
    assert proc.poll() is None, proc.stderr.read()
    assert status(spec).open_slots == 1                  # step 6 is being written
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    wait_for(lambda: status(spec).open_slots == 0, 10, "the dead writer's slot to be reclaimed")
    steps = [v.step for v in status(spec).versions]
    assert steps == [4, 5]                               # keep=2, and 6 never became visible
    assert trainer(spec.control, "restore", "--mib", "64") == {"step": 5, "exact": True}
    assert trainer(spec.control, "restore", "--mib", "64", "--step", "4") == {
        "step": 4, "exact": True}


def test_over_limit_save_refused_and_earlier_versions_intact(cluster_factory):
    cluster = cluster_factory(1, args=["--memory-limit", "200MiB"])
    cluster.start()
    spec = cluster.specs[0]
    assert trainer(spec.control, "save", "--steps", "1", "2", "--mib", "64") == {"saved": [1, 2]}
    with SnapshotClient(spec.control, job="test", rank=0) as client:
        future = client.save(3, {"big": torch.zeros(150 << 18)})     # 150 MiB
        with pytest.raises(DaemonError) as err:
            future.result(timeout=60)
        assert err.value.code == "memory_full"
        assert str(200 << 20) in str(err.value) and str(150 << 20) in str(err.value)
        assert client.last_error() is err.value
    assert trainer(spec.control, "restore", "--mib", "64") == {"step": 2, "exact": True}
    assert trainer(spec.control, "restore", "--mib", "64", "--step", "1")["exact"] is True


def test_daemon_killed_gives_clear_errors_and_restart_cleans_up(node):
    spec = node.specs[0]
    assert trainer(spec.control, "save", "--steps", "1", "2", "--mib", "8") == {"saved": [1, 2]}
    shm_files = []
    for cycle in range(4):
        ch = Channel(spec.control, timedelta(seconds=5))
        ch.call(p.Alloc("test", 0, 100 + cycle, 8 << 20, os.getpid()))   # left in flight
        ch.close()
        node.kill(0)                                                     # SIGKILL
        with SnapshotClient(spec.control, job="test", rank=0,
                            timeout=timedelta(seconds=5)) as client:
            started = time.monotonic()
            future = client.save(3, {"x": torch.ones(4)})
            with pytest.raises(DaemonUnavailable, match="snapshotd"):
                future.result(timeout=30)
            with pytest.raises(DaemonUnavailable):
                client.restore()
            assert time.monotonic() - started < 15
        node.replace(0, wipe=False)
        shm_files.append(sorted(os.listdir(spec.shm_dir)))
        assert trainer(spec.control, "restore", "--mib", "8") == {"step": 2, "exact": True}
    # The committed versions were adopted; the in-flight slots were removed every time.
    assert all(files == shm_files[0] for files in shm_files), shm_files
    assert len([f for f in shm_files[0] if f.endswith(".bin")]) == 2


def test_sigterm_releases_segments_and_exits_cleanly(node):
    spec = node.specs[0]
    trainer(spec.control, "save", "--steps", "1", "3", "--mib", "4")
    assert len([f for f in os.listdir(spec.shm_dir) if f.endswith(".bin")]) >= 2
    assert node.kill(0, signal.SIGTERM) == 0
    assert [f for f in os.listdir(spec.shm_dir) if not f.startswith(".")] == []
    assert not os.path.exists(spec.control[len("ipc://"):])


def test_permissions_are_owner_only(node):
    spec = node.specs[0]
    trainer(spec.control, "save", "--steps", "1", "1", "--mib", "1")
    assert os.stat(spec.shm_dir).st_mode & 0o777 == 0o700
    for name in os.listdir(spec.shm_dir):
        assert os.stat(os.path.join(spec.shm_dir, name)).st_mode & 0o077 == 0, name
    assert os.stat(spec.control[len("ipc://"):]).st_mode & 0o077 == 0


BAD_FRAMES = [
    [b"\x00\x01garbage"],
    [b'{"v": 7, "op": "status"}'],
    [b'{"v": 1, "op": "alloc", "job": "test", "rank": 0, "step": 1, "nbytes": -5, "pid": 1}'],
    [b'{"v": 1, "op": "alloc", "job": "test", "rank": 0, "step": 3, "nbytes": 1099511627776,'
     b' "pid": 1}'],
    [b'{"v": 1, "op": "open", "job": "test", "rank": 77, "pid": 1, "step": 3}'],
    [b'{"v": 1, "op": "open", "job": "nope", "rank": 0, "pid": 1}'],
    [b'{"v": 1, "op": "commit", "slot": 999, "tensors": [], "meta": "{}"}'],
    [b'{"v": 1, "op": "release", "lease": 5}'],
    [b'{"v": 1, "op": "ok"}'],
    [b"part one", b"part two"],
    [b""],
]


def test_malformed_messages_get_errors_and_daemon_keeps_serving(node):
    spec = node.specs[0]
    trainer(spec.control, "save", "--steps", "1", "2", "--mib", "4")
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(spec.control)
    codes = []
    for frames in BAD_FRAMES:
        sock.send_multipart(frames)
        assert sock.poll(10_000), f"no reply to {frames}"
        _, reply = p.decode(sock.recv())
        assert isinstance(reply, p.Error), frames
        codes.append(reply.code)
    sock.close()
    assert codes == ["malformed", "bad_version", "bad_request", "memory_full", "not_found",
                     "not_found", "unknown_slot", "unknown_lease", "unknown_op", "malformed",
                     "malformed"]
    # Bad commit table against a real slot: refused, slot still usable, nothing published.
    ch = Channel(spec.control, timedelta(seconds=5))
    slot = ch.call(p.Alloc("test", 0, 9, 128, os.getpid()))
    with pytest.raises(channel.DaemonError, match="bad_table"):
        ch.call(p.Commit(slot.slot, (p.TensorEntry("w", "float32", (64,), 0, 256),), "{}"))
    ch.call(p.Abort(slot.slot))
    ch.close()
    assert [v.step for v in status(spec).versions] == [1, 2]
    assert trainer(spec.control, "restore", "--mib", "4") == {"step": 2, "exact": True}
