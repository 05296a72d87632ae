"""Regression tests for issue 24's disk-tier findings (3, the on-disk half of 4, 5 and 7), one
per finding, named after it: real daemons with ``--persist-dir``, real SIGKILLs, a memory loss
is a daemon SIGKILLed and its shared-memory directory removed, a full disk a small tmpfs.
The format they check is docs/protocol.md, "Persistence tier".
"""

import glob
import hashlib
import json
import os
import subprocess
import threading
import time

import pytest
import torch
from harness import FAST, call, log_tail, metric, wait_for

from snapshotd.common import protocol as p
from snapshotd.common.channel import DaemonError
from snapshotd.ops.ctl import main as ctl
from snapshotd_client import DaemonError as ClientError
from snapshotd_client import SnapshotClient

pytest_plugins = ["faultfixtures"]

pytestmark = pytest.mark.timeout(120)

#: One node, no peers: a persist of every 5th step, the two newest kept.
ONE = ["--memory-limit", "256MiB", "--reap-interval", "0.2", "--persist-every", "5"]


def state(step, n=4096):
    """A state whose every byte says which step it is (and which timeline: 1000 + step)."""
    return {"w": torch.full((n,), float(step)), "step": step}


def value(got):
    step, st = got
    return step, float(st["w"][0]), int(st["step"])


def one_node(clusters, persist, *extra):
    cluster = clusters(1, args=[*ONE, "--persist-dir", str(persist), *extra])
    cluster.start()
    return cluster, cluster.specs[0]


def persists(spec):
    """How many node versions the daemon wrote to its persistence tier."""
    return metric(spec, "snapshotd_persist_duration_seconds_count")


def save(spec, job, steps, values=None, token="", n=4096):
    with SnapshotClient(spec.control, job=job, rank=0, token=token) as client:
        for i, step in enumerate(steps):
            client.save(step, state(step if values is None else values[i], n)).result()


def lose_memory(cluster, slot=0):
    cluster.kill(slot)
    cluster.replace(slot, wipe=True)


def persisted(spec, job, rank=0, token=""):
    return sorted(v.step for v in call(spec, p.ListVersions(job, rank, token=token)).versions
                  if v.state == "persisted")


def leftovers(root):
    """Temporaries under ``root`` (hidden files included)."""
    return [os.path.relpath(os.path.join(top, name), root)
            for top, dirs, files in os.walk(root) for name in dirs + files if "tmp" in name]


# --------------------------------------------------------------------------- finding 3


def test_finding3_the_disk_tier_forgets_the_timeline(clusters, tmp_path):
    """save 1-10 (5 and 10 persisted), restore(step=5), save 6'-8': (a) a trainer crash
    resumes 8' from memory, not the abandoned 10 from disk; (b) after the node's memory is
    lost it resumes 5, not 10."""
    persist = tmp_path / "persist"
    cluster, spec = one_node(clusters, persist, "--keep", "10")   # 1-10 in memory too
    save(spec, "tl", range(1, 11))
    wait_for(lambda: persists(spec) >= 2, 20, "steps 5 and 10 persisted")
    with SnapshotClient(spec.control, job="tl", rank=0) as client:
        assert value(client.restore(step=5)) == (5, 5.0, 5)
        for step in (6, 7, 8):                     # the new timeline: 1000 + step
            client.save(step, state(1000 + step)).result()
    held = {v.step: v.state for v in call(spec, p.ListVersions("tl", 0)).versions}
    assert 10 not in held and 9 not in held, held       # nothing of the old timeline listed
    # (a) a trainer crash: the newest step of the new timeline, from memory.
    with SnapshotClient(spec.control, job="tl", rank=0) as client:
        assert value(client.restore()) == (8, 1008.0, 1008)
        assert client.last_restore.tier == "memory"
    # (b) the node's memory lost: the restored step 5 from disk, never the abandoned 10.
    lose_memory(cluster)
    assert persisted(spec, "tl") == [5]
    with SnapshotClient(spec.control, job="tl", rank=0) as client:
        assert value(client.restore()) == (5, 5.0, 5)
        assert client.last_restore.tier == "disk"
        with pytest.raises(ClientError) as err:
            client.read(10)
        assert err.value.code == "not_found", err.value


def test_finding3_a_persist_that_ends_after_the_drop_is_never_restored(clusters, tmp_path):
    """A persist of step 10 still being written when restore(step=5) drops it (the disk tier
    is slow) lands on disk after the drop: its timeline, recorded with it, says it was
    abandoned, so no tier serves it."""
    persist = tmp_path / "persist"
    cluster, spec = one_node(clusters, persist, "--persist-rate", "4000000")
    save(spec, "race", range(1, 6), n=4096)
    wait_for(lambda: persists(spec) >= 1, 20, "step 5 persisted")
    # Step 10 of 8 MiB at 4 MB/s: the persist takes about 2 s.
    save(spec, "race", range(6, 11), n=2 << 20)
    wait_for(lambda: leftovers(persist), 10, "the persist of step 10 to start")
    with SnapshotClient(spec.control, job="race", rank=0) as client:
        assert value(client.restore(step=5)) == (5, 5.0, 5)
    wait_for(lambda: persists(spec) >= 2 and not leftovers(persist), 20,
             "the persist of step 10 to end")
    assert 10 not in persisted(spec, "race")
    lose_memory(cluster)
    with SnapshotClient(spec.control, job="race", rank=0) as client:
        assert value(client.restore()) == (5, 5.0, 5)


# --------------------------------------------------------------------------- finding 4


def test_finding4_persisted_versions_carry_their_owner_across_a_reboot(clusters, tmp_path):
    persist = tmp_path / "persist"
    cluster, spec = one_node(clusters, persist, "--job-isolation")
    victim, thief = "victim-token-1234567890", "thief-token-0987654321"
    save(spec, "iso", range(1, 6), token=victim)
    wait_for(lambda: persists(spec) >= 1, 20, "step 5 persisted")
    digest = hashlib.sha256(victim.encode()).hexdigest()
    manifests = glob.glob(f"{persist}/iso/step-*/rank-0*.json")
    assert manifests
    for path in glob.glob(f"{persist}/**", recursive=True):
        if os.path.isfile(path):
            with open(path, "rb") as fh:
                assert victim.encode() not in fh.read(), path       # never the token
    for path in manifests:
        with open(path) as fh:
            assert json.load(fh)["owner"] == digest
    lose_memory(cluster)                       # a reboot: memory lost, the disk kept
    for msg in (p.ListVersions("iso", 0, token=thief),
                p.Open("iso", 0, os.getpid(), token=thief),
                p.Open("iso", 0, os.getpid(), 5, token=thief),
                p.Alloc("iso", 0, 6, 64, os.getpid(), token=thief)):
        with pytest.raises(DaemonError) as err:
            call(spec, msg)
        assert err.value.code == "forbidden", (msg, err.value)
    # The job is still the victim's: its restore comes from disk, its saves go on.
    with SnapshotClient(spec.control, job="iso", rank=0, token=victim) as client:
        assert value(client.restore()) == (5, 5.0, 5)
        assert client.last_restore.tier == "disk"
        client.save(6, state(6)).result()


# --------------------------------------------------------------------------- finding 5


def test_finding5_a_shared_persist_directory_loses_data(clusters, tmp_path, monkeypatch):
    """Two nodes, one --persist-dir, a 2-rank job (one rank per node): every persisted step
    holds both ranks; a step only one node wrote is not complete and is not restored; a
    node's start does not remove the other node's temporaries."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    persist = tmp_path / "shared"
    cluster = clusters(2, k=1, m=1, args=[*FAST, "--persist-every", "2", "--persist-dir",
                                          str(persist)])
    cluster.start()
    clients = [SnapshotClient(s.control, job="sh", rank=s.slot) for s in cluster.specs]
    try:
        for step in range(1, 5):
            for c in clients:
                c.save(step, state(step * 10 + c.rank)).result()
        wait_for(lambda: all(persists(s) >= 2 for s in cluster.specs), 30,
                 "steps 2 and 4 persisted by both nodes")
        for step in (2, 4):
            ranks = glob.glob(f"{persist}/sh/step-{step:012d}/rank-*.bin")
            assert len(ranks) == 2, ranks
        # Step 5 persisted by node 0 only: not complete (rank 1 never written).
        for c in clients:
            c.save(5, state(50 + c.rank)).result()
        call(cluster.specs[0], p.Persist("sh", 5), timeout=30)
    finally:
        for c in clients:
            c.close()
    # Another node's temporary (a persist in flight there) survives this node's start.
    theirs = persist / "sh" / "step-000000000004" / ".rank-7.bin.elsewhere.7.0a1b.tmp"
    theirs.write_bytes(b"in flight")
    for slot in (0, 1):
        cluster.kill(slot)
    for slot in (0, 1):
        cluster.replace(slot, wipe=True)
    assert theirs.exists()
    for spec in cluster.specs:
        assert persisted(spec, "sh", spec.slot) == [2, 4], spec.slot
        with SnapshotClient(spec.control, job="sh", rank=spec.slot) as client:
            got = client.restore()
            assert value(got) == (4, 40.0 + spec.slot, 40 + spec.slot)
            assert client.last_restore.tier == "disk"


# --------------------------------------------------------------------------- finding 7


def test_finding7_a_flipped_byte_falls_back_to_the_newest_intact_step(clusters, tmp_path):
    persist = tmp_path / "persist"
    cluster, spec = one_node(clusters, persist)
    save(spec, "flip", range(1, 11))
    wait_for(lambda: persists(spec) >= 2, 20, "steps 5 and 10 persisted")
    lose_memory(cluster)
    (binary,) = glob.glob(f"{persist}/flip/step-000000000010/rank-0*.bin")
    with open(binary, "r+b") as fh:
        fh.seek(100)
        byte = fh.read(1)
        fh.seek(100)
        fh.write(bytes([byte[0] ^ 0x40]))
    with SnapshotClient(spec.control, job="flip", rank=0) as client:
        assert value(client.restore()) == (5, 5.0, 5)
        assert client.last_restore.tier == "disk"
    listed = {v.step for v in call(spec, p.ListVersions("flip", 0)).versions}
    assert listed == {5}, listed                     # the damaged step is listed no more
    assert "corrupt" in log_tail(spec, 200)


def test_finding7_a_truncated_manifest_is_corrupt_not_internal(clusters, tmp_path):
    persist = tmp_path / "persist"
    cluster, spec = one_node(clusters, persist)
    save(spec, "trunc", range(1, 11))
    wait_for(lambda: persists(spec) >= 2, 20, "steps 5 and 10 persisted")
    lose_memory(cluster)
    (manifest,) = glob.glob(f"{persist}/trunc/step-000000000010/rank-0.json")
    with open(manifest, "r+") as fh:
        fh.truncate(40)
    with pytest.raises(DaemonError) as err:
        call(spec, p.Open("trunc", 0, os.getpid(), 10))
    assert err.value.code == "corrupt", err.value
    assert "rank-0.json" in err.value.message, err.value
    with SnapshotClient(spec.control, job="trunc", rank=0) as client:
        assert value(client.restore()) == (5, 5.0, 5)


def test_finding7_an_older_persisted_step_is_restored_and_exported(clusters, tmp_path):
    """Steps 9 and 10 in memory, 5 and 10 on disk: step 5, asked for, is read, exported and
    restored (it was evicted by retention the moment it was loaded: not_found)."""
    persist = tmp_path / "persist"
    cluster, spec = one_node(clusters, persist)
    save(spec, "old", range(1, 11))
    wait_for(lambda: persists(spec) >= 2, 20, "steps 5 and 10 persisted")
    with SnapshotClient(spec.control, job="old", rank=0) as client:
        assert value(client.read(5)) == (5, 5.0, 5)
    out = tmp_path / "export"
    assert ctl(["--control", spec.control, "export", "--job", "old", "--step", "5",
                "--out", str(out)]) == 0
    assert os.path.exists(out / ".metadata")
    with SnapshotClient(spec.control, job="old", rank=0) as client:
        assert value(client.restore(step=5)) == (5, 5.0, 5)
        assert client.last_restore.tier == "disk"


@pytest.fixture
def small_disk(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("a full disk is a small tmpfs, which needs root to mount")
    path = tmp_path / "small"
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip()}")
    yield path
    subprocess.run(["umount", "-l", str(path)], check=False)


def test_finding7_a_full_disk_says_disk_full_and_leaves_no_temporaries(clusters, small_disk):
    cluster, spec = one_node(clusters, small_disk, "--persist-every", "2")
    n = 256 << 10                                   # 1 MiB a step: the second does not fit
    save(spec, "full", range(1, 7), n=n)
    wait_for(lambda: persists(spec) >= 1 and metric(
        spec, "snapshotd_persist_failures_total", reason="disk_full") >= 2, 20,
        "step 2 persisted, steps 4 and 6 refused")
    assert leftovers(small_disk) == []
    log = log_tail(spec, 400)
    assert "Traceback" not in log and "internal" not in log, log
    assert log.count("disk_full") == 1, log          # logged once, counted every time
    with pytest.raises(DaemonError) as err:           # asked for: a clear error
        call(spec, p.Persist("full", 6), timeout=30)
    assert err.value.code == "disk_full", err.value
    assert "--persist-dir" in err.value.message, err.value
    assert metric(spec, "snapshotd_persist_failures_total", reason="disk_full") == 3
    assert leftovers(small_disk) == []
    lose_memory(cluster)
    with SnapshotClient(spec.control, job="full", rank=0) as client:
        got = client.restore()
        assert got[0] == 2 and float(got[1]["w"][0]) == 2.0
        assert client.last_restore.tier == "disk"


def test_finding7_temporaries_of_a_daemon_killed_mid_persist_are_removed(clusters, tmp_path):
    persist = tmp_path / "persist"
    cluster, spec = one_node(clusters, persist, "--persist-every", "1", "--persist-rate",
                             "1000000")
    thread = threading.Thread(target=save, args=(spec, "kill", [1]), kwargs={"n": 1 << 20})
    thread.start()
    thread.join()
    wait_for(lambda: leftovers(persist), 10, "a persist in flight")
    cluster.kill(0)
    assert leftovers(persist)
    time.sleep(0.1)
    cluster.replace(0, wipe=False)
    assert leftovers(persist) == []
    assert persisted(spec, "kill") == []
