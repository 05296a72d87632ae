"""Real torchrun jobs with real daemons: restarts resume bit-exactly (issue: torchrun + demo).

Every test trains ``examples/train.py --size tiny`` under ``torch.distributed.run`` (gloo on
loopback, one snapshotd per node) and compares the final parameters with an uninterrupted run
of the same script, bit for bit:

(a) a rank SIGKILLed at a random step is restarted by torchrun and restores from its daemon;
(b) a whole node (torchrun agent, trainer, daemon) is SIGKILLed and replaced by a node with an
    empty daemon, which rebuilds the lost data from its peers;
(c) ranks whose newest versions differ (one rank died before committing the newest step) all
    restore the same older step.
"""

import os
import random
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from conftest import list_versions, torchrun_standalone
from snapshotd.common import protocol as p
from snapshotd.common.channel import Channel
from snapshotd.tools.torchrun import (
    JsonlTail,
    TorchrunJob,
    compare_params,
    find_script,
    read_jsonl,
    rebuilt_bytes,
    reference_run,
)

SCRIPT = find_script()
TINY = ["--size", "tiny"]


def reference(tmp_path, nproc, steps, *args):
    out = tmp_path / "reference"
    rc = reference_run(SCRIPT, [*TINY, "--steps", str(steps), *args], out, nproc, timeout=180)
    assert rc == 0, (out / "torchrun.log").read_text()[-6000:]
    return out / "final.pt"


def starts(out):
    return [e for e in read_jsonl(Path(out) / "events.jsonl") if e["event"] == "start"]


def assert_same_params(reference_pt, run_pt):
    same, detail = compare_params(reference_pt, run_pt)
    assert same, detail


def newest_bytes(spec, job):
    """The size of the newest version the daemon holds for the job (its one rank)."""
    return max(list_versions(spec, job), key=lambda v: v.step).nbytes


def versions(spec, job):
    ch = Channel(spec.control, timedelta(seconds=30))
    try:
        return {(v.rank, v.step) for v in ch.call(p.ListVersions(job)).versions}
    finally:
        ch.close()


# --------------------------------------------------------------------------------------- (a)


LONG = os.environ.get("SNAPSHOTD_FAULT_RUNS", "quick").strip().lower() == "long"


@pytest.mark.timeout(240)
@pytest.mark.parametrize("replicas", [
    pytest.param("whole", marks=pytest.mark.skipif(
        not LONG, reason="make faults (SNAPSHOTD_FAULT_RUNS=long): the split run covers the "
        "same restore; this one the daemon without peers, which stores replicas whole")),
    "split"])
def test_rank_killed_at_random_step_resumes_bit_exact(cluster_factory, tmp_path, replicas):
    steps = 40
    rng = random.Random(os.environ.get("SNAPSHOTD_TEST_SEED") or time.time_ns())
    rank, step = rng.randrange(2), rng.randrange(4, steps - 2)
    # keep=4: one node has no peers, so no version is ever protected, and commits are
    # asynchronous: when a rank dies in step s the others may have committed s while its own
    # newest is s-2 or s-3. With the default keep=2 the ranks may then share no version and
    # the job starts over (deterministic, but nothing restored).
    # "split": a second node codes node 0's data (k=1, m=1), so the two ranks (both on node 0)
    # split their replicated state; "whole": one node without peers (m = 0) keeps it whole.
    if replicas == "whole":
        cluster = cluster_factory(1, args=["--keep", "4"])
    else:
        cluster = cluster_factory(2, k=1, m=1, args=["--keep", "4", "--insecure"])
    cluster.start()
    job, out = f"a-{uuid.uuid4().hex[:6]}", tmp_path / "faulted"
    torchrun_standalone(SCRIPT, 2, cluster.specs[0].control, out, "--steps", str(steps),
                        "--job", job,
                        "--fail-at", f"{rank}:{step}")
    why = f"(rank {rank} killed at step {step})"
    events = starts(out)
    first = [e for e in events if e["attempt"] == 0]
    restarted = [e for e in events if e["attempt"] == 1]
    assert len(first) == 2 and all(e["restored"] is None for e in first), (why, events)
    assert sorted(e["rank"] for e in restarted) == [0, 1], (why, events)
    restored = {e["restored"] for e in restarted}
    assert len(restored) == 1, (why, events)            # every rank restored the same step
    (restored,) = restored
    # The killed rank died in step `step` before its optimizer step: it saved up to step-1,
    # of which the last one or two commits may still have been in flight.
    assert restored is not None and step - 3 <= restored <= step - 1, (why, restored)
    losses = read_jsonl(out / "loss.jsonl")
    assert [r["step"] for r in losses if r["attempt"] == 1][0] == restored + 1
    held = list_versions(cluster.specs[0], job)
    stored = [v.nbytes for v in held if v.step == max(h.step for h in held)]
    model_bytes = sum(t.numel() * t.element_size()
                      for t in torch.load(out / "final.pt").values())
    share = 0.5 if replicas == "split" else 1.0   # of the parameters and both Adam moments
    assert len(stored) == 2 and all(
        0.9 * share * 3 * model_bytes < n < (share * 3 + 0.2) * model_bytes for n in stored), (
        stored, model_bytes)
    assert_same_params(reference(tmp_path, 2, steps), out / "final.pt")


# --------------------------------------------------------------------------------------- (c)


@pytest.mark.timeout(240)
def test_ranks_with_different_newest_versions_restore_the_same_older_step(cluster_factory,
                                                                          tmp_path):
    steps = 12
    cluster = cluster_factory(1)
    cluster.start()
    spec = cluster.specs[0]
    job = f"c-{uuid.uuid4().hex[:6]}"
    first, second = tmp_path / "first", tmp_path / "second"
    torchrun_standalone(SCRIPT, 2, spec.control, first, "--steps", str(steps), "--job", job,
                        run=job)
    held = versions(spec, job)
    assert {(0, steps - 1), (1, steps - 1), (0, steps - 2), (1, steps - 2)} <= held, held
    # Rank 1 "died before committing" the newest step: drop it from its daemon.
    ch = Channel(spec.control, timedelta(seconds=30))
    try:
        assert ch.call(p.Drop(job, rank=1, step=steps - 1)).count == 1
    finally:
        ch.close()
    assert (1, steps - 1) not in versions(spec, job) and (0, steps - 1) in versions(spec, job)
    # A new launch of the same run (SNAPSHOTD_RUN: --standalone gives each launch another run
    # id) restores: the newest step both ranks hold is steps-2, not rank 0's steps-1.
    torchrun_standalone(SCRIPT, 2, spec.control, second, "--steps", str(steps), "--job", job,
                        run=job)
    events = starts(second)
    assert sorted(e["rank"] for e in events) == [0, 1], events
    assert {e["restored"] for e in events} == {steps - 2}, events
    assert [r["step"] for r in read_jsonl(second / "loss.jsonl")] == [steps - 1]
    # Redoing the last step from steps-2 gives the same bits as the first run's last step.
    assert_same_params(first / "final.pt", second / "final.pt")


# --------------------------------------------------------------------------------------- (b)


@pytest.mark.skipif(not LONG, reason="make faults (SNAPSHOTD_FAULT_RUNS=long): 42 s; node "
                    "loss is covered in every run by test_cluster.py (rebuilds) and "
                    "test_elastic.py (a stand-in), and by the long campaign's split rows")
@pytest.mark.timeout(300)
def test_node_killed_whole_and_replaced_resumes_bit_exact(cluster_factory, tmp_path):
    steps, kill_at, lost = 90, 40, 2
    cluster = cluster_factory(3, k=2, m=1, args=["--insecure"])
    cluster.start()
    job_name, out = f"b-{uuid.uuid4().hex[:6]}", tmp_path / "faulted"
    args = [*TINY, "--steps", str(steps), "--job", job_name, "--out", str(out),
            "--step-delay", "0.05"]
    losses = JsonlTail(out / "loss.jsonl")
    with TorchrunJob(cluster, SCRIPT, args, out) as job:
        job.start()
        deadline = time.monotonic() + 150
        while not losses.records or losses.records[-1]["step"] < kill_at:
            assert not job.finished(), job.returncodes()
            assert time.monotonic() < deadline, "the job never reached the kill step"
            time.sleep(0.05)
            losses.poll()
        killed_at = time.time()
        job.kill_node(lost)                      # agent, trainer and daemon: SIGKILL
        time.sleep(0.5)
        job.replace_node(lost)                   # empty daemon, new agent, same slot
        codes = job.wait(180)
        assert codes == {0: 0, 1: 0, 2: 0}, (codes, [a.log_path for a in job.agents.values()])
        rebuilt = rebuilt_bytes(cluster.specs[lost].metrics_port)
        stored = {s.slot: newest_bytes(s, job_name) for s in cluster.specs}
    # Replica splitting (the daemons code, m = 1): each of the 3 ranks stored about a third of
    # the parameters and Adam moments (3 x the model's bytes), the node rebuilt its third.
    model_bytes = sum(t.numel() * t.element_size()
                      for t in torch.load(out / "final.pt").values())
    assert all(n < 1.6 * model_bytes for n in stored.values()), (stored, model_bytes)
    assert sum(stored.values()) > 2.7 * model_bytes, (stored, model_bytes)
    after = [e for e in starts(out) if e["time"] > killed_at]
    latest = {e["rank"]: e for e in after}               # the round that trained
    assert sorted(latest) == [0, 1, 2], after
    restored = {e["restored"] for e in latest.values()}
    assert len(restored) == 1, after
    (restored,) = restored
    assert restored is not None, "the replacement node restored nothing: no rebuild from peers"
    assert restored >= kill_at - 15, f"restored step {restored}, killed after step {kill_at}"
    # torchrun orders nodes by --local-addr, so every rank stays with its node's daemon.
    assert {r: e["daemon"] for r, e in latest.items()} == {
        s.slot: s.control for s in cluster.specs}, latest
    if rebuilt is not None:
        assert rebuilt > 0
    assert_same_params(reference(tmp_path, 3, steps, "--step-delay", "0"), out / "final.pt")
