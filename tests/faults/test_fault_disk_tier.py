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


def tmpfs(tmp_path, size):
    """A ``size`` tmpfs mounted under ``tmp_path`` (a disk that fills up), unmounted after."""
    if os.geteuid() != 0:
        pytest.skip("a full disk is a small tmpfs, which needs root to mount")
    path = tmp_path / "small"
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip()}")
    yield path
    subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture
def small_disk(tmp_path):
    yield from tmpfs(tmp_path, "2m")


@pytest.fixture
def disk_4m(tmp_path):
    yield from tmpfs(tmp_path, "4m")


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


# --------------------------------------------------------------------------- review of issue 24
# The adversarial review of the disk tier (its scripts e2-e6): one regression test per finding.

CLOCKSHIFT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "clockshift")


def clock_env(path, offset):
    """A daemon whose wall clock the file at ``path`` shifts (clockshift/sitecustomize.py)."""
    with open(path, "w") as fh:
        fh.write(str(offset))
    return {"SNAPSHOTD_TEST_CLOCK_FILE": str(path),
            "PYTHONPATH": os.pathsep.join(x for x in (CLOCKSHIFT, os.environ.get(
                "PYTHONPATH", "")) if x)}


def fifteen_steps(clusters, tmp_path, job):
    """One node, steps 1-15 saved (5, 10 and 15 persisted), then its memory lost: the
    manifest of step 15 is the caller's to damage before :func:`lose_memory`'s restart."""
    persist = tmp_path / "persist"
    cluster, spec = one_node(clusters, persist, "--keep", "3", "--persist-keep", "4")
    with SnapshotClient(spec.control, job=job, rank=0) as client:
        for step in range(1, 16):
            client.save(step, state(step) | {"tag": "abcdefgh"}).result()
    wait_for(lambda: persists(spec) >= 3, 20, "steps 5, 10 and 15 persisted")
    cluster.kill(0)
    return cluster, spec, persist / job / "step-000000000015" / "rank-0.json"


def rewrite(manifest, change, reseal=False):
    """Change a persisted manifest's record; ``reseal``: with a check that matches (a record
    whose seal holds but which says something else)."""
    from snapshotd.node._shm import seal
    record = json.loads(manifest.read_text())
    change(record)
    record.pop("check", None)
    text = json.dumps(record, separators=(",", ":"))
    manifest.write_text(seal(text) if reseal else text)


def restores_step_10_not_15(cluster, spec, job, manifest):
    cluster.replace(0, wipe=True)
    with SnapshotClient(spec.control, job=job, rank=0) as client:
        got = client.restore(zero_copy=False)
        assert got is not None, "restore() said there is no snapshot: the job starts at 0"
        assert value((got[0], got[1])) == (10, 10.0, 10) and got[1]["tag"] == "abcdefgh"
        assert client.last_restore.tier == "disk"
        with pytest.raises(ClientError) as err:             # asked for: a clear error
            client.restore(step=15)
        assert err.value.code in ("corrupt", "not_found"), err.value
    assert os.path.exists(str(manifest) + ".corrupt")       # set aside
    assert "corrupt" in log_tail(spec, 200)


def test_review24_a_full_disk_brings_the_abandoned_step_back(clusters, disk_4m):
    """restore(5) on a full disk: the drop log cannot be written, the abandoned step 10 is
    removed all the same, so after a memory loss the restore is 5, never 10 (e3)."""
    cluster, spec = one_node(clusters, disk_4m, "--keep", "12", "--persist-keep", "4")
    n = 256 << 10                                       # 1 MiB a step
    save(spec, "fd", range(1, 11), n=n)
    wait_for(lambda: persists(spec) >= 2, 20, "steps 5 and 10 persisted")
    filler = disk_4m / "filler"
    with open(filler, "wb") as fh:
        with pytest.raises(OSError):
            while True:
                fh.write(b"x" * 65536)
                fh.flush()
    with SnapshotClient(spec.control, job="fd", rank=0) as client:
        assert value(client.restore(step=5)) == (5, 5.0, 5)
        for step in (6, 7):
            client.save(step, state(1000 + step, n)).result()
    assert not glob.glob(f"{disk_4m}/fd/step-000000000010/rank-0.*"), "10 not removed"
    assert "could not be recorded" in log_tail(spec, 200)
    lose_memory(cluster)
    with SnapshotClient(spec.control, job="fd", rank=0) as client:
        assert value(client.restore()) == (5, 5.0, 5)
        assert client.last_restore.tier == "disk"


def test_review24_a_clock_stepped_back_across_a_memory_loss_stops_the_disk_tier(
        clusters, tmp_path):
    """The clock an hour ahead through restore(5), set right while the memory is lost: the
    new timeline's step 10 is persisted and restored, not taken as abandoned by the old drop
    (stamped an hour ahead) (e2)."""
    persist, clock = tmp_path / "persist", tmp_path / "clock"
    cluster = clusters(1, args=[*ONE, "--persist-dir", str(persist), "--keep", "10"])
    cluster.slot_env[0] = clock_env(clock, 3600)
    cluster.start()
    spec = cluster.specs[0]
    save(spec, "ck", range(1, 11))
    wait_for(lambda: persists(spec) >= 2, 20, "steps 5 and 10 persisted")
    with SnapshotClient(spec.control, job="ck", rank=0) as client:
        assert value(client.restore(step=5)) == (5, 5.0, 5)
        client.save(6, state(1006)).result()
    clock.write_text("0")                                 # NTP, during the reboot
    lose_memory(cluster)
    with SnapshotClient(spec.control, job="ck", rank=0) as client:
        assert value(client.restore()) == (5, 5.0, 5)
        for step in range(6, 11):
            client.save(step, state(2000 + step)).result()
    wait_for(lambda: persists(spec) >= 1, 20, "the new step 10 persisted")
    lose_memory(cluster)
    assert persisted(spec, "ck") == [5, 10]
    with SnapshotClient(spec.control, job="ck", rank=0) as client:
        assert value(client.restore()) == (10, 2010.0, 2010)


def test_review24_a_listed_step_that_fails_not_found_starts_the_job_at_0(clusters, tmp_path):
    """Step 15's manifest and marker disagree on its commit time (its seal holds): the step
    answers corrupt and is set aside, and restore() falls back to step 10, never "no
    snapshot" (e4 committed)."""
    cluster, spec, manifest = fifteen_steps(clusters, tmp_path, "cm")
    rewrite(manifest, lambda m: m.update(committed_at=m["committed_at"] + 1e-3), reseal=True)
    restores_step_10_not_15(cluster, spec, "cm", manifest)


def test_review24_a_flipped_byte_in_a_manifests_meta_is_served(clusters, tmp_path):
    """A byte of step 15's meta changed (and, in another file, a dtype): the manifest's seal
    fails, the step is corrupt, restore() falls back to 10 (e4 meta)."""
    cluster, spec, manifest = fifteen_steps(clusters, tmp_path, "mt")
    rewrite(manifest, lambda m: m.update(meta=m["meta"].replace("abcdefgh", "abcdefgX")))
    restores_step_10_not_15(cluster, spec, "mt", manifest)


def test_review24_a_changed_dtype_in_a_manifest_is_served(clusters, tmp_path):
    cluster, spec, manifest = fifteen_steps(clusters, tmp_path, "dt")
    rewrite(manifest, lambda m: m["tensors"][0].update(dtype="int32"))
    restores_step_10_not_15(cluster, spec, "dt", manifest)


def test_review24_a_flipped_shape_digit_answers_bad_table(clusters, tmp_path):
    """A shape that does not fit its bytes, even under a seal that holds: corrupt (set aside,
    fall back to 10), never bad_table (e4 shape)."""
    cluster, spec, manifest = fifteen_steps(clusters, tmp_path, "sh")
    rewrite(manifest, lambda m: m["tensors"][0].update(shape=[2048]), reseal=True)
    restores_step_10_not_15(cluster, spec, "sh", manifest)


@pytest.mark.parametrize("everywhere", [True, False], ids=["drop-everywhere", "no-drop"])
def test_review24_node_clocks_apart_abandon_a_moved_ranks_new_timeline(
        clusters, tmp_path, monkeypatch, everywhere):
    """One --persist-dir, node 1's clock 30 s ahead. Rank 0 saves 1-10 on node 1, moves to
    node 0, restores step 5 (read from node 1; with a drop of the newer steps everywhere:
    node 1's drop record carries node 1's stamp) and saves 6'-10' there. Both memories lost:
    the restore is the new 10', neither taken as abandoned by node 1's drop nor hidden by node
    1's marker of the old 10 (e6)."""
    monkeypatch.setenv("WORLD_SIZE", "1")
    persist = tmp_path / "shared"
    cluster = clusters(2, k=1, m=1, args=[*FAST, "--persist-every", "5", "--persist-dir",
                                          str(persist), "--keep", "10"])
    cluster.slot_env[1] = clock_env(tmp_path / "clock", 30)
    cluster.start()
    s0, s1 = cluster.specs
    save(s1, "sk", range(1, 11))
    wait_for(lambda: persists(s1) >= 2, 20, "steps 5 and 10 persisted by node 1")
    with SnapshotClient(s0.control, job="sk", rank=0) as client:
        assert value(client.restore(step=5)) == (5, 5.0, 5)
        if everywhere:
            call(s0, p.Drop("sk", 0, newer_than=5, everywhere=True, timeline=12345))
        for step in range(6, 11):
            client.save(step, state(1000 + step)).result()
    wait_for(lambda: persists(s0) >= 1, 20, "the new step 10 persisted by node 0")
    for slot in (0, 1):
        cluster.kill(slot)
    for slot in (0, 1):
        cluster.replace(slot, wipe=True)
    assert persisted(s0, "sk") == [5, 10]
    with SnapshotClient(s0.control, job="sk", rank=0) as client:
        got = client.restore()
        assert got is not None and value(got) == (10, 1010.0, 1010)


def test_review24_a_damaged_drop_log_is_not_read_as_no_drops(clusters, tmp_path):
    """A truncated drop log: the versions of its node answer corrupt (loud, naming the file)
    instead of being served as if no restore had abandoned any; removing it serves them."""
    persist = tmp_path / "persist"
    cluster, spec = one_node(clusters, persist, "--keep", "10")
    save(spec, "dl", range(1, 11))
    wait_for(lambda: persists(spec) >= 2, 20, "steps 5 and 10 persisted")
    with SnapshotClient(spec.control, job="dl", rank=0) as client:
        assert value(client.restore(step=5)) == (5, 5.0, 5)
    (log_file,) = glob.glob(f"{persist}/dl/drops/rank-0.*.json")
    lose_memory(cluster)
    with open(log_file, "r+") as fh:
        fh.truncate(20)
    with pytest.raises(ClientError) as err:
        with SnapshotClient(spec.control, job="dl", rank=0) as client:
            client.restore()
    assert err.value.code == "corrupt" and "drop log" in err.value.message, err.value
    os.unlink(log_file)
    with SnapshotClient(spec.control, job="dl", rank=0) as client:
        assert value(client.restore()) == (5, 5.0, 5)
