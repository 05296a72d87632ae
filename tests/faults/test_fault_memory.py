"""Memory: the budget exhausted by concurrent saves of several ranks, and a load of 16 ranks on
one node saving as fast as they can (quick: seconds, long: minutes).

- Budget: saves over the limit are refused with ``memory_full`` naming the limit, the bytes in
  use never exceed the limit, and every rank still restores its newest committed version.
- Load: no lost commits (every acknowledged step, newest restores bit for bit), bounded daemon
  memory, no leaked segments, slots, leases or file descriptors.
"""

import threading
import time

import pytest
from harness import (
    LONG,
    Fault,
    Outcome,
    assert_serving,
    campaign,
    drop_job,
    manifests,
    proc_stats,
    restore_check,
    shm_files,
    status,
    unique,
    wait_for,
)

pytest_plugins = ["faultfixtures"]

pytestmark = pytest.mark.timeout(900 if LONG else 120)

LIMIT = 24 << 20
LOAD_RANKS = 16
LOAD_SECONDS = 180 if LONG else 6


class Sampler:
    """Polls a daemon every ``interval`` seconds on a thread."""

    def __init__(self, spec, pid, interval=0.05):
        self.spec, self.pid, self.interval = spec, pid, interval
        self.samples = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                st = status(self.spec, timeout=5)
                ps = proc_stats(self.pid)
                self.samples.append({"t": time.monotonic(), "used": st.bytes_used,
                                     "limit": st.memory_limit, "slots": st.open_slots,
                                     "bins": len(shm_files(self.spec)), **ps})
            except Exception:  # noqa: BLE001 - a missed sample is not a failure
                pass
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(10)


@pytest.fixture(scope="module")
def env(clusters, zygote):
    tight = clusters(1, args=["--memory-limit", str(LIMIT), "--reap-interval", "0.2"])
    tight.start()
    return {"tight": tight, "zygote": zygote}


# --------------------------------------------------------------------------- budget


def inject_budget(env, rng):
    cluster, zyg = env["tight"], env["zygote"]
    spec = cluster.specs[0]
    job = unique("mb")
    ranks = rng.randint(3, 6)
    sizes = {rank: rng.choice([1, 2, 3, 4]) for rank in range(ranks)}
    steps = 12 if LONG else 5
    with Sampler(spec, cluster.daemons[0].pid, 0.02) as sampler:
        trainers = {rank: zyg.spawn("save", spec.control, "--job", job, "--rank", rank,
                                    "--mib", sizes[rank], "--steps", 1, steps, "--keep-going")
                    for rank in range(ranks)}
        for t in trainers.values():
            t.wait(120)
    return {"job": job, "sizes": sizes, "trainers": trainers, "samples": sampler.samples}


def check_budget(env, rng, inj):
    cluster, zyg = env["tight"], env["zygote"]
    spec = cluster.specs[0]
    problems, lost, stall = [], 0, 0.0
    over = [s for s in inj["samples"] if s["used"] > s["limit"]]
    if over:
        problems.append(f"bytes in use exceeded the limit: {over[0]}")
    refused = 0
    for rank, t in inj["trainers"].items():
        for fail in t.failed():
            refused += 1
            if fail["code"] != "memory_full" or str(LIMIT) not in fail["message"]:
                problems.append(f"rank {rank}: refused with {fail}, not a clear memory_full")
        acked = t.committed()
        stall = max(stall, *t.latencies())
        ok, out = restore_check(zyg, spec, inj["job"], rank, inj["sizes"][rank],
                                max(acked) if acked else None)
        if not ok:
            lost += 1
            problems.append(f"rank {rank}: restore gave {out}, newest committed "
                            f"{max(acked) if acked else None}")
    wait_for(lambda: status(spec).open_slots == 0, 10, "no open slots")
    if len(manifests(spec)) != len(status(spec).versions):
        problems.append("manifests and versions disagree")
    assert_serving(cluster)
    drop_job(cluster, inj["job"])
    return Outcome(not problems, lost, stall, detail="; ".join(problems),
                   figures={"refused_saves": refused})


# --------------------------------------------------------------------------- load


def inject_load(env, rng):
    zyg = env["zygote"]
    cluster = env["load"]
    spec, pid = cluster.specs[0], cluster.daemons[0].pid
    job = unique("ld")
    mib = rng.choice([0.25, 0.5]) if not LONG else rng.choice([0.5, 1])
    time.sleep(0.5)
    start = proc_stats(pid)
    with Sampler(spec, pid, 0.5) as sampler:
        trainers = {rank: zyg.spawn("loop", spec.control, "--job", job, "--rank", rank, "--mib",
                                    mib, "--duration", LOAD_SECONDS,
                                    env={"LOCAL_WORLD_SIZE": str(LOAD_RANKS)})
                    for rank in range(LOAD_RANKS)}
        for t in trainers.values():
            t.wait(LOAD_SECONDS + 120)
    return {"job": job, "mib": mib, "trainers": trainers, "samples": sampler.samples,
            "start": start}


def check_load(env, rng, inj):
    zyg, cluster = env["zygote"], env["load"]
    spec, pid = cluster.specs[0], cluster.daemons[0].pid
    problems, lost, stall, commits = [], 0, 0.0, 0
    for rank, t in inj["trainers"].items():
        acked, failed = t.committed(), t.failed()
        commits += len(acked)
        if failed:
            problems.append(f"rank {rank}: {len(failed)} saves failed, first {failed[0]}")
        if acked != list(range(1, len(acked) + 1)):
            problems.append(f"rank {rank}: acknowledged steps are not 1..n")
        stall = max(stall, *t.latencies())
        ok, out = restore_check(zyg, spec, inj["job"], rank, inj["mib"],
                                max(acked) if acked else None)
        if not ok:
            lost += 1
            problems.append(f"rank {rank}: restore gave {out}, newest committed {max(acked)}")
    wait_for(lambda: status(spec).open_slots == 0 and status(spec).open_leases == 0, 10,
             "slots and leases of the exited trainers reclaimed")
    samples = inj["samples"]
    warm = [s for s in samples if s["t"] >= samples[0]["t"] + LOAD_SECONDS * 0.25]
    growth = (max(s["rss"] for s in warm) - warm[0]["rss"]) if warm else 0
    if growth > (32 << 20):
        problems.append(f"daemon RSS grew by {growth >> 20} MiB after warm-up")
    end = proc_stats(pid)
    # The daemon keeps one mapping (and, through CPython's mmap, one fd) per segment it holds
    # (versions and the reuse pool, capped): more fds than that would be a leak.
    segments = len(shm_files(spec))
    if end["fds"] > inj["start"]["fds"] + segments + 8:
        problems.append(f"file descriptors {inj['start']['fds']} -> {end['fds']} with "
                        f"{segments} segments mapped")
    most_bins = max(s["bins"] for s in samples)
    if most_bins > LOAD_RANKS * 3 + 64:                     # keep 2 + writing + pool cap
        problems.append(f"{most_bins} segment files at once")
    versions = status(spec).versions
    if len(manifests(spec)) != len(versions) or len(versions) > LOAD_RANKS * 2:
        problems.append(f"{len(manifests(spec))} manifests, {len(versions)} versions")
    over = [s for s in samples if s["used"] > s["limit"]]
    if over:
        problems.append("bytes in use exceeded the limit")
    assert_serving(cluster)
    drop_job(cluster, inj["job"])
    return Outcome(not problems, lost, stall, detail="; ".join(problems), figures={
        "commits": commits, "commits_per_s": round(commits / LOAD_SECONDS, 1),
        "rss_growth_mib": round(growth / (1 << 20), 1),
        "fd_growth": end["fds"] - inj["start"]["fds"], "segments_at_end": segments,
        "max_segment_files": most_bins})


BUDGET = Fault("memory budget exhausted by concurrent saves",
               f"3-6 ranks of 1-4 MiB each save at once into a {LIMIT >> 20} MiB budget",
               inject_budget, check_budget, runs=(2, 30))
LOAD = Fault(f"load: {LOAD_RANKS} ranks saving flat out for {LOAD_SECONDS} s",
             f"{LOAD_RANKS} trainer processes on one node save back to back",
             inject_load, check_load, runs=(1, 1))


def test_memory_budget_exhausted_by_concurrent_saves(env, request):
    campaign(BUDGET, env, request.node.nodeid)


def test_load_many_ranks_no_lost_commits_no_leaks(env, clusters, request):
    env["load"] = clusters(1, args=["--memory-limit", "1GiB", "--reap-interval", "0.2"])
    env["load"].start()
    campaign(LOAD, env, request.node.nodeid)
