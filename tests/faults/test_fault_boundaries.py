"""Campaign rows for issue 24 (the promise at the cluster's boundaries): the disk tier shared by
every node, a disk that fills up, a disk tier whose files lie. Real daemons, a memory loss is
every daemon SIGKILLed and its shared-memory directory removed; the invariant is that every
rank restores one step, the same on every rank, bit for bit, and never a step that is not
complete on disk (regression tests of each finding: test_fault_disk_tier.py)."""

import contextlib
import glob
import os
import random
import subprocess
import threading

import pytest
import torch
from harness import FAST, LONG, Fault, Outcome, call, campaign, metric, unique, wait_for

from snapshotd.common import protocol as p
from snapshotd_client import SnapshotClient

pytest_plugins = ["faultfixtures"]

pytestmark = pytest.mark.timeout(3600 if LONG else 240)

RANKS = 3


def state(step: int, rank: int, salt: int, n: int) -> dict:
    g = torch.Generator().manual_seed(salt * 1_000_003 + step * 101 + rank)
    return {"w": torch.randn(n, generator=g), "step": step, "rank": rank}


def exact(got, step: int, rank: int, salt: int, n: int) -> bool:
    want = state(step, rank, salt, n)
    return got is not None and got[0] == step and torch.equal(got[1]["w"], want["w"]) and \
        got[1]["rank"] == rank


@contextlib.contextmanager
def world(size: int):
    """Clients made inside say the job has ``size`` ranks (``WORLD_SIZE``)."""
    before = os.environ.get("WORLD_SIZE")
    os.environ["WORLD_SIZE"] = str(size)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("WORLD_SIZE", None)
        else:
            os.environ["WORLD_SIZE"] = before


def persisted(spec, job: str, rank: int) -> list[int]:
    return sorted(v.step for v in call(spec, p.ListVersions(job, rank), timeout=30).versions
                  if v.state == "persisted")


def save_everywhere(cluster, job: str, last: int, salt: int, n: int, rng: random.Random
                    ) -> list[str]:
    """One rank per node saves steps 1..last, the nodes concurrently; returns save errors."""
    errors: list[str] = []

    def run(spec) -> None:
        try:
            with SnapshotClient(spec.control, job=job, rank=spec.slot) as client:
                for step in range(1, last + 1):
                    try:
                        client.save(step, state(step, spec.slot, salt, n)).result()
                    except Exception as exc:  # noqa: BLE001 - counted by the row
                        errors.append(f"rank {spec.slot} step {step}: {exc}")
        except Exception as exc:  # noqa: BLE001
            errors.append(f"rank {spec.slot}: {exc}")

    threads = [threading.Thread(target=run, args=(s,)) for s in cluster.specs]
    with world(len(cluster.specs)):
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    return errors


def lose_every_memory(cluster) -> None:
    for slot in range(len(cluster.specs)):
        cluster.kill(slot)
    for slot in range(len(cluster.specs)):
        cluster.replace(slot, wipe=True)


def restore_everywhere(cluster, job: str, salt: int, n: int, allowed: set[int]
                       ) -> tuple[int, list[str], set]:
    """Every rank restores the newest step every rank lists, as TrainingState agrees on one
    (ranks lost, problems, steps restored). When a rank cannot restore the agreed step (its
    file on disk is damaged: set aside as it is found), every rank tries again with what
    they list then, as a job restarted by torchrun would (at most three rounds)."""
    problems: list[str] = []
    for _ in range(3):
        listed = []
        for spec in cluster.specs:
            listed.append({v.step for v in call(spec, p.ListVersions(job, spec.slot),
                                                timeout=60).versions})
        common = set.intersection(*listed)
        if not common:
            return len(cluster.specs), [f"no step every rank lists: {listed}"], set()
        step = max(common)
        results, failed = {}, []
        for spec in cluster.specs:
            with world(len(cluster.specs)), SnapshotClient(spec.control, job=job,
                                                           rank=spec.slot) as client:
                try:
                    results[spec.slot] = client.restore(step)
                except Exception as exc:  # noqa: BLE001 - the job tries again
                    failed.append(f"rank {spec.slot} step {step}: {exc}")
        if failed:
            problems = failed
            continue
        lost = [slot for slot, got in results.items()
                if step not in allowed or not exact(got, step, slot, salt, n)]
        return len(lost), [f"ranks {lost} restored step {step} wrong (allowed "
                           f"{sorted(allowed)})"] * bool(lost), {step}
    return len(cluster.specs), problems, set()


# --------------------------------------------------------------------------- shared directory


def inject_shared(env, rng):
    cluster = env["cluster"]
    job, salt, n = unique("shr"), rng.randrange(1 << 20), rng.choice([1024, 16384, 65536])
    last = rng.randrange(5, 12 if not LONG else 20)
    errors = save_everywhere(cluster, job, last, salt, n, rng)
    newest = last - last % 2
    try:
        wait_for(lambda: _markers(env["root"], job, newest) == len(cluster.specs), 30,
                 f"step {newest} persisted by every node")
    except AssertionError as exc:
        errors.append(f"{exc}: {_listing(env['root'], job)}; listed "
                      f"{ {s.slot: persisted(s, job, s.slot) for s in cluster.specs} }")
    lose_every_memory(cluster)
    return {"job": job, "salt": salt, "n": n, "newest": newest, "errors": errors}


def _markers(root: str, job: str, step: int) -> int:
    """How many nodes wrote their part of ``step`` (their markers, written last)."""
    return len(glob.glob(f"{root}/{job}/step-{step:012d}/node-*.done"))


def _listing(root: str, job: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(top, name), root) for top, _, files in
                  os.walk(os.path.join(root, job)) for name in files)


def check_shared(env, rng, got):
    cluster, job = env["cluster"], got["job"]
    on_disk = {s.slot: persisted(s, job, s.slot) for s in cluster.specs}
    problems = list(got["errors"])
    if len({tuple(v) for v in on_disk.values()}) != 1 or got["newest"] not in on_disk[0]:
        problems.append(f"persisted steps differ or miss step {got['newest']}: {on_disk}")
    lost, more, _ = restore_everywhere(cluster, job, got["salt"], got["n"], {got["newest"]})
    return Outcome(not problems and not more, lost=lost, detail=str(problems + more))


SHARED = Fault("disk tier: one persist directory shared by 3 nodes",
               "3 daemons RS(2,1), one --persist-dir for all (--persist-every 2), a 3-rank job "
               "saving concurrently, then every node's memory lost: every rank lists the same "
               "complete persisted steps and restores the newest bit for bit",
               inject_shared, check_shared, runs=(1, 10))


@pytest.fixture(scope="module")
def shared_env(clusters, tmp_path_factory):
    root = tmp_path_factory.mktemp("shared")
    cluster = clusters(RANKS, k=2, m=1, args=[*FAST, "--persist-every", "2", "--persist-keep",
                                              "3", "--persist-dir", str(root)])
    cluster.start()
    return {"cluster": cluster, "root": str(root)}


def test_disk_tier_shared_by_every_node(shared_env, request):
    campaign(SHARED, shared_env, request.node.nodeid)


# --------------------------------------------------------------------------- flipped bytes


def inject_corrupt(env, rng):
    cluster, root = env["cluster"], env["root"]
    job, salt, n = unique("cor"), rng.randrange(1 << 20), rng.choice([4096, 65536])
    errors = save_everywhere(cluster, job, 6, salt, n, rng)
    try:
        wait_for(lambda: _markers(root, job, 6) == len(cluster.specs), 30,
                 "steps 4 and 6 persisted by every node")
    except AssertionError as exc:
        errors.append(str(exc))
    lose_every_memory(cluster)
    files = sorted(glob.glob(f"{root}/{job}/step-000000000006/rank-*"))
    victim = rng.choice(files)
    how = rng.choice(["flip", "truncate", "empty"])
    with open(victim, "r+b") as fh:
        size = os.path.getsize(victim)
        if how == "flip" and size:
            at = rng.randrange(size)
            fh.seek(at)
            byte = fh.read(1)[0]
            fh.seek(at)
            fh.write(bytes([byte ^ (1 << rng.randrange(8))]))
        elif how == "truncate":
            fh.truncate(rng.randrange(max(1, size)))
        else:
            fh.truncate(0)
    return {"job": job, "salt": salt, "n": n, "errors": errors,
            "victim": f"{how} {os.path.basename(victim)}"}


def check_corrupt(env, rng, got):
    """The newest step is 6 unless its damaged file was caught (then 4, on every rank: a step
    is restored whole or not at all). A flip in a manifest's free text (JSON whitespace is
    not there: compact) is caught by the JSON or its fields; a flip in bytes by the tensor
    checksums."""
    cluster = env["cluster"]
    lost, problems, steps = restore_everywhere(cluster, got["job"], got["salt"], got["n"], {4, 6})
    return Outcome(not problems and not got["errors"], lost=lost,
                   detail=f"{got['victim']}: restored {sorted(steps, key=str)}; "
                          f"{problems + got['errors']}")


CORRUPT = Fault("disk tier: a flipped, truncated or emptied file in the newest step",
                "3 daemons sharing one --persist-dir, steps 4 and 6 persisted, every memory "
                "lost, one file of step 6 damaged (a bit flipped, truncated or emptied): every "
                "rank restores one intact step bit for bit (6, or 4 on every rank), never the "
                "damaged bytes",
                inject_corrupt, check_corrupt, runs=(2, 20))


def test_disk_tier_files_that_lie(shared_env, request):
    campaign(CORRUPT, shared_env, request.node.nodeid, seed_offset=1000)


# --------------------------------------------------------------------------- full disk


@pytest.fixture(scope="module")
def full_env(clusters, tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    root = tmp_path_factory.mktemp("full")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(root)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    cluster = clusters(1, args=["--memory-limit", "256MiB", "--reap-interval", "0.2",
                                "--persist-every", "1", "--persist-keep", "4",
                                "--persist-dir", str(root)])
    cluster.start()
    yield {"cluster": cluster, "root": str(root)}
    cluster.stop()
    subprocess.run(["umount", "-l", str(root)])


def inject_full(env, rng):
    """One node persisting every step into a 3 MiB disk with states of 0.2-1.5 MiB: the disk
    fills; then the memory is lost."""
    cluster, root = env["cluster"], env["root"]
    spec = cluster.specs[0]
    job, salt = unique("full"), rng.randrange(1 << 20)
    n = rng.choice([50_000, 150_000, 400_000])            # floats: 0.2-1.6 MiB
    last = rng.randrange(3, 8)
    before = _persists_ended(spec)
    with world(1), SnapshotClient(spec.control, job=job, rank=0) as client:
        for step in range(1, last + 1):
            client.save(step, state(step, 0, salt, n)).result()
        wait_for(lambda: _persists_ended(spec) >= before + last, 60,
                 f"{last} persists written or failed")
        assert exact(client.restore(), last, 0, salt, n)          # memory is untouched
    on_disk = sorted(int(os.path.basename(os.path.dirname(m))[5:]) for m in
                     glob.glob(f"{root}/{job}/step-*/node-*.done"))
    temps = [os.path.relpath(os.path.join(top, name), root) for top, dirs, files in
             os.walk(root) for name in dirs + files if name.endswith(".tmp")]
    lose_every_memory(cluster)
    return {"job": job, "salt": salt, "n": n, "on_disk": on_disk, "temps": temps}


def _persists_ended(spec) -> float:
    """Persists this daemon wrote, or gave up (a full disk, an I/O error)."""
    return metric(spec, "snapshotd_persist_duration_seconds_count") + metric(
        spec, "snapshotd_persist_failures_total")


def check_full(env, rng, got):
    spec = env["cluster"].specs[0]
    problems = [f"temporaries left: {got['temps']}"] * bool(got["temps"])
    with world(1), SnapshotClient(spec.control, job=got["job"], rank=0) as client:
        try:
            restored = client.restore()
        except Exception as exc:  # noqa: BLE001
            restored, problems = None, problems + [f"restore: {exc}"]
    if got["on_disk"]:
        if restored is None or not exact(restored, restored[0], 0, got["salt"], got["n"]) or \
                restored[0] != max(got["on_disk"]):
            problems.append(f"restored {None if restored is None else restored[0]}, on disk "
                            f"{got['on_disk']}")
    elif restored is not None:
        problems.append(f"restored {restored[0]} with nothing complete on disk")
    for name in os.listdir(env["root"]):
        if name.startswith("full-"):
            subprocess.run(["rm", "-rf", os.path.join(env["root"], name)])
    assert call(spec, p.Status()).accepting     # the daemon still serves
    return Outcome(not problems, lost=int(bool(problems)),
                   clear_error=not got["on_disk"],
                   detail=f"on disk {got['on_disk']}: {problems}")


FULL = Fault("disk tier: the disk fills up",
             "one daemon persisting every step into a 3 MiB tmpfs, states of 0.2-1.6 MiB: "
             "persists that do not fit fail (disk_full) and leave no temporaries, memory is "
             "untouched, and after the memory is lost the newest complete persisted step "
             "restores bit for bit (or none, when none fit)",
             inject_full, check_full, runs=(2, 15))


def test_disk_tier_disk_full(full_env, request):
    campaign(FULL, full_env, request.node.nodeid)
