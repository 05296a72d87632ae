"""Issue 24, finding 6: decoding a lost node's rank happens inside the memory budget.

3 nodes, RS(2,1), one rank of 32 MiB per node, node 1 lost (daemon SIGKILLed, its memory
removed). Node 0 reads rank 1 (``Open(remote=True)``): decoded from the group, stripe by
stripe. Before the fix node 0's heap grew by about 3x the rank (fetched fragments, every
decoded chunk, the payload), none of it counted, and the decoded version stayed for 30 s.
Now every byte is claimed from the budget before it is allocated (``decoding``: fragments and
decode buffers, ``decoded``: chunks kept for the lost node's other ranks, ``remote``: the copy
served) and shows in ``bytes_used`` and ``snapshotd_memory_used_bytes{kind}``; a decode that
does not fit waits for room (bounded), then fails with ``memory_full``.
"""

import os
import threading
import time

import psutil
import pytest
from harness import FAST, call, lose, metric, proc_stats, save_on, status, unique, wait_for

from snapshotd.common import protocol as p
from snapshotd.common.channel import DaemonError

pytest_plugins = ["faultfixtures"]

pytestmark = pytest.mark.timeout(180)

MIB = 32
RANK = MIB << 20
#: Room left in node 0's budget above what it holds before the read: the copy served plus
#: one stripe's fragments (k = 2 of 16 MiB) fit; the old decode (about 3x the rank) does not.
HEADROOM = RANK * 5 // 2
#: Allocator, thread stacks and socket buffers that are not the decode's (bytes).
SLACK = 8 << 20


def heap(pid: int) -> int:
    """A process's private (anonymous) resident bytes: its RSS less the pages of files and
    shared memory it maps (the segments, parity and copies on the tmpfs are counted in the
    budget by their files; a daemon that reads its own parity maps pages counted already)."""
    info = psutil.Process(pid).memory_info()
    return int(info.rss - info.shared)


class Sampler:
    """Samples a daemon's heap and ``bytes_used`` every few milliseconds on a thread."""

    def __init__(self, spec, pid):
        self.spec, self.pid = spec, pid
        self.heap: list[int] = []
        self.used: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                self.heap.append(heap(self.pid))
                self.used.append(status(self.spec, timeout=5).bytes_used)
            except Exception:  # noqa: BLE001 - a missed sample is not a failure
                pass
            self._stop.wait(0.005)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(10)


def reset_peak(pid: int) -> bool:
    """Reset the process's peak RSS (VmHWM) to its RSS now; False where not allowed."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def rss_kinds(pid: int) -> str:
    """The RSS lines of a process's status (anonymous, file, shared memory)."""
    with open(f"/proc/{pid}/status") as fh:
        return " ".join(line.strip() for line in fh if line.startswith("Rss"))


def kinds(spec) -> dict[str, float]:
    return {k: metric(spec, "snapshotd_memory_used_bytes", kind=k)
            for k in ("remote", "decoding", "decoded")}


@pytest.fixture(scope="module")
def lost(clusters, zygote):
    """A cluster whose node 1 is lost after step 1 of one 32 MiB rank per node is protected,
    node 0's budget set to what it holds plus :data:`HEADROOM`."""
    # Node 0 holds its rank (32 MiB), the parity of one stripe (16 MiB) and bookkeeping.
    limit = RANK * 3 // 2 + (1 << 20) + HEADROOM
    job = unique("decode")
    cluster = clusters(3, k=2, m=1, args=FAST)
    cluster.slot_args[0] = ["--memory-limit", str(limit)]
    cluster.start()
    save_on(zygote, cluster, job, 1, 1, MIB, world=3)
    wait_for(lambda: all(v.state == "protected" for s in cluster.specs
                         for v in status(s).versions), 30, "step 1 protected everywhere")

    def told_protected():
        nodes = call(cluster.specs[0], p.Where(job)).nodes
        return any(n.slot == 1 and 1 in n.steps for n in nodes)

    wait_for(told_protected, 30, "node 0 told that node 1's step 1 is protected")
    time.sleep(1.0)
    lose(cluster, 1)
    wait_for(lambda: any(n.slot == 1 and not n.up
                         for n in call(cluster.specs[0], p.Where(job)).nodes), 30,
             "node 1 called down")
    return {"cluster": cluster, "job": job, "limit": limit}


def test_fault_decode_budget_a_lost_ranks_decode_is_counted_and_freed(lost):
    cluster, job, limit = lost["cluster"], lost["job"], lost["limit"]
    spec, pid = cluster.specs[0], cluster.daemons[0].proc.pid
    assert status(spec).memory_limit == limit
    time.sleep(0.5)
    used0, heap0, rss0 = status(spec).bytes_used, heap(pid), proc_stats(pid)["rss"]
    assert limit - used0 >= HEADROOM - SLACK, (limit, used0)
    exact_peak = reset_peak(pid)
    with Sampler(spec, pid) as sampler:
        lease = call(spec, p.Open(job, 1, os.getpid(), step=1, remote=True), timeout=60)
        time.sleep(0.05)
    assert lease.tier == "peer" and lease.nbytes >= RANK and lease.step == 1
    # What the read held: its heap, and the copy it wrote (on the tmpfs: shared memory).
    grew = max(sampler.heap, default=heap0) - heap0 + lease.nbytes
    counted = max(sampler.used, default=used0) - used0
    held = status(spec).bytes_used - used0
    print(f"node 0: heap {heap0 >> 20} MiB before the decode read of a {MIB} MiB rank, "
          f"+{grew >> 20} MiB with the copy at most, counted at most +{counted >> 20} MiB "
          f"({len(sampler.heap)} samples); RSS {rss0 >> 20} MiB before, peak "
          f"{proc_stats(pid)['peak'] >> 20 if exact_peak else '?'} MiB; budget "
          f"{limit >> 20} MiB, {used0 >> 20} MiB used before")
    assert len(sampler.heap) >= 3, "too few samples to tell"
    # The copy served is counted while its lease is held, and shows as its kind.
    assert held >= lease.nbytes, (held, lease.nbytes)
    assert kinds(spec)["remote"] >= lease.nbytes
    # The decode never took the daemon past its budget ...
    assert used0 + grew <= limit + SLACK, (
        f"the read held {grew >> 20} MiB while {used0 >> 20} of {limit >> 20} MiB were in use")
    # ... and what it held was counted while it held it.
    assert grew <= counted + SLACK, (
        f"the read held {grew >> 20} MiB, only {counted >> 20} MiB counted in bytes_used")
    call(spec, p.Release(lease.lease))
    # Freed promptly: no decoded chunk of a one-rank node is kept once its rank was served.
    wait_for(lambda: status(spec).bytes_used <= used0 + SLACK, 2.0, "the copy's bytes freed")
    wait_for(lambda: heap(pid) <= heap0 + SLACK, 2.0,
             "node 0's heap back to where it was within 2 s",
             explain=lambda: f"heap {heap(pid) >> 20} MiB, was {heap0 >> 20} MiB: "
             + rss_kinds(pid))
    assert kinds(spec) == {"remote": 0, "decoding": 0, "decoded": 0}


def test_fault_decode_budget_a_decode_that_does_not_fit_waits_then_fails_clearly(lost):
    """With one lost-rank copy held, a second read of it does not fit (the copy and one
    stripe's fragments): it waits for room, and reads once the first copy is released; held
    on, it fails with memory_full naming --memory-limit, and node 0's heap did not grow."""
    cluster, job, limit = lost["cluster"], lost["job"], lost["limit"]
    spec, pid = cluster.specs[0], cluster.daemons[0].proc.pid
    first = call(spec, p.Open(job, 1, os.getpid(), step=1, remote=True), timeout=60)
    heap0 = heap(pid)
    results: list = []

    def second():
        try:
            results.append(call(spec, p.Open(job, 1, os.getpid(), step=1, remote=True),
                                timeout=60))
        except DaemonError as exc:
            results.append(exc)

    thread = threading.Thread(target=second)
    thread.start()
    time.sleep(1.5)
    assert not results, f"the second read did not wait for room: {results}"
    assert heap(pid) <= heap0 + SLACK
    assert status(spec).bytes_used <= limit
    call(spec, p.Release(first.lease))
    thread.join(60)
    assert len(results) == 1 and isinstance(results[0], p.OpenReply), results
    second_lease = results.pop()
    # Held on: a third read waits its bounded time, then fails clearly.
    started = time.monotonic()
    with pytest.raises(DaemonError) as err:
        call(spec, p.Open(job, 1, os.getpid(), step=1, remote=True), timeout=60)
    waited = time.monotonic() - started
    assert err.value.code == "memory_full", err.value
    assert "--memory-limit" in str(err.value), err.value
    assert 1.0 <= waited < 30.0, waited
    assert heap(pid) <= heap0 + SLACK
    call(spec, p.Release(second_lease.lease))
    wait_for(lambda: kinds(spec) == {"remote": 0, "decoding": 0, "decoded": 0}, 5.0,
             "every read's bytes freed")


def test_regression_a_holder_serving_remote_reads_copies_outside_its_budget(clusters, zygote):
    """Second review of issue 24, finding 3: a live holder served each ``GetVersion`` from a
    copy of the whole rank on its heap, counted nowhere: six readers took node 2 47-76 MiB
    past its --memory-limit. The copy is claimed first (``serving``), made only when it fits
    (else ``memory_full``, nothing copied), and counted until it is sent."""
    from harness import peer_call

    from snapshotd.cluster import peerproto as pp

    job, mib = unique("serve"), 8
    cluster = clusters(2, k=1, m=1, args=FAST)
    cluster.start()
    save_on(zygote, cluster, job, 1, 1, mib, world=2)
    holder = cluster.specs[1]
    used = status(holder).bytes_used
    reply, frames = peer_call(holder, pp.GetVersion(job, 1, 1))
    assert isinstance(reply, pp.VersionData) and reply.nbytes == sum(len(f) for f in frames)
    wait_for(lambda: metric(holder, "snapshotd_memory_used_bytes", kind="serving") == 0, 10,
             "the sent copy let go")
    # A budget with no room for another copy of the rank: refused, the heap unchanged.
    cluster.kill(1)
    cluster.slot_args[1] = ["--memory-limit", str(used + (mib << 20) // 2)]
    cluster.restart(1)
    before = heap(cluster.daemons[1].proc.pid)
    reply, _ = peer_call(holder, pp.GetVersion(job, 1, 1))
    assert isinstance(reply, p.Error) and reply.code == "memory_full", reply
    assert "--memory-limit" in reply.message
    assert heap(cluster.daemons[1].proc.pid) - before < (mib << 20) // 2
