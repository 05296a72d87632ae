"""Campaign row for restores at another world size (issue 14): a node lost during the restore.

A 4-rank FSDP2 job (2 ranks on each of 2 nodes, RS k=1 m=1) saves a few steps; node 1 is lost
(daemon SIGKILLed, memory removed) and a stand-in daemon rebuilds its memory from node 0; a
2-rank job on node 0 restores the 4-rank layout, reading ranks 2-3 from the stand-in, and the
stand-in is SIGKILLed at a random moment of that restore. The invariant: that restore either
completes with every full parameter and AdamW moment equal to the ones saved, or fails on
every rank with an error (no rank hangs, none continues with other values); after a second
stand-in rebuilt node 1, a 2-rank restore gives back the saved state bit for bit.

Long campaign only (``make faults``): each run is three multi-process jobs.
"""

import json
import os
import random
import shutil
import subprocess
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from harness import LONG, Fault, Outcome, call, campaign

from snapshotd.common import protocol as p
from snapshotd.common.channel import Channel
from snapshotd.tools.localcluster import free_ports

pytest_plugins = ["faultfixtures"]

pytestmark = [pytest.mark.timeout(1800),
              pytest.mark.skipif(not LONG, reason="long campaign only (make faults): each run "
                                 "is three multi-process jobs; tests/integration/"
                                 "test_elastic.py covers the restore in every run")]

WORKER = Path(__file__).resolve().parents[1] / "integration" / "elastic_worker.py"


def start(out: Path, cluster, world: int, per_node: int, phase: str, job: str) -> list:
    port = free_ports(1)[0]
    endpoints = ",".join(spec.control for spec in cluster.specs)
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world),
                   LOCAL_RANK=str(rank % per_node), LOCAL_WORLD_SIZE=str(per_node),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   GLOO_SOCKET_IFNAME="lo")
        procs.append(subprocess.Popen(
            [sys.executable, WORKER, "--endpoints", endpoints, "--per-node", str(per_node),
             "--job", job, "--out", str(out), "--phase", phase], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def finish(procs: list, timeout: float = 240) -> list[tuple[int, str]]:
    results = []
    try:
        for proc in procs:
            results.append((proc.wait(timeout), proc.stdout.read()))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


def versions(spec, job):
    return call(spec, p.ListVersions(job), timeout=30).versions


def wait_for(what, timeout=90.0):
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def stand_in(cluster, job: str) -> None:
    """Node 1 lost and stood in for: its memory rebuilt from node 0, and node 0 told."""
    cluster.kill(1)
    cluster.replace(1)
    wait_for(lambda: {v.rank for v in versions(cluster.specs[1], job) if v.step == 3} == {2, 3})
    ch = Channel(cluster.specs[0].control, timedelta(seconds=30))
    try:
        wait_for(lambda: any(n.slot == 1 and 3 in n.steps for n in ch.call(p.Where(job)).nodes))
    finally:
        ch.close()


def saved_job(env, nodes: int, k: int, world: int, per_node: int):
    """A cluster of ``nodes`` (RS k, m=1) and a ``world``-rank job that saved steps 0-3 into
    it: (cluster, job, its output directory)."""
    cluster = env["clusters"](nodes, k=k, m=1, args=["--insecure", "--keep", "3"])
    cluster.start()
    job = f"el-{uuid.uuid4().hex[:6]}"
    out = env["tmp"] / job
    out.mkdir()
    saved = finish(start(out, cluster, world, per_node, "save", job))
    assert all(rc == 0 for rc, _ in saved), saved
    return cluster, job, out


def restore_again(out: Path, cluster, job: str, per_node: int) -> tuple[dict, list]:
    """Set the first 2-rank restore's results aside (its JSON lines, and its state as
    during.pt / during-after.pt) and run a second one: (the first's results, the second's)."""
    first = {r: json.loads((out / f"restore-2-rank{r}.json").read_text())
             for r in range(2) if (out / f"restore-2-rank{r}.json").exists()}
    for name, to in (("restored-2.pt", "during.pt"), ("after-2.pt", "during-after.pt")):
        if (out / name).exists():
            (out / name).rename(out / to)
    for r in range(2):
        (out / f"restore-2-rank{r}.json").unlink(missing_ok=True)
    return first, finish(start(out, cluster, 2, per_node, "restore", job))


def inject(env, rng: random.Random):
    cluster, job, out = saved_job(env, 2, 1, 4, 2)
    wait_for(lambda: {(v.rank, v.state) for v in versions(cluster.specs[1], job)
                      if v.step == 3} == {(2, "protected"), (3, "protected")})
    stand_in(cluster, job)
    procs = start(out, cluster, 2, 2, "restore", job)
    delay = rng.uniform(0.0, 4.0)                    # the 2-rank job's start to its restore
    time.sleep(delay)
    cluster.kill(1)                                   # the stand-in lost mid-restore
    during = finish(procs)
    stand_in(cluster, job)                            # a second stand-in
    first, again = restore_again(out, cluster, job, 2)
    cluster.stop()
    return {"out": out, "during": during, "first": first, "again": again, "delay": delay}


def same(a: dict, b: dict) -> list[str]:
    if a.keys() != b.keys():
        return sorted(set(a) ^ set(b))
    return [k for k in a if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape
            or not torch.equal(a[k].reshape(-1).view(torch.uint8),
                               b[k].reshape(-1).view(torch.uint8))]


def check(env, rng, run) -> Outcome:
    out = run["out"]
    why = f"({run.get('what', 'stand-in killed')} {run['delay']:.2f} s into the restore)"
    codes = [rc for rc, _ in run["during"]]
    saved = torch.load(out / "saved.pt")             # step 3 of the 4-rank job
    if all(rc == 0 for rc in codes):
        differ = same(saved, torch.load(out / "during.pt"))
        if differ or {r["step"] for r in run["first"].values()} != {3}:
            return Outcome(False, lost=2, detail=f"the restore during the loss gave other "
                           f"values {differ[:4]} {why}")
        # It went on and saved step 4 (2 ranks): the next restore is that one, its own.
        saved = torch.load(out / "during-after.pt")
    elif any(rc == 0 for rc in codes):
        return Outcome(False, lost=2, detail=f"ranks disagreed: exit codes {codes} {why}")
    if any(rc != 0 for rc, _ in run["again"]):
        return Outcome(False, lost=2, detail=f"the restore after it failed "
                       f"{why}: {[o[-2000:] for _, o in run['again']]}")
    differ = same(saved, torch.load(out / "restored-2.pt"))
    if differ:
        return Outcome(False, lost=2, detail=f"restored values differ {differ[:4]} {why}")
    return Outcome(True, figures={"failed_during": int(any(codes))})


FAULT = Fault("elastic restore, node lost during it",
              "4-rank FSDP2 job on 2 nodes (RS k=1 m=1); node 1 lost and stood in for; a "
              "2-rank job restores the 4-rank layout from memory and the stand-in is "
              "SIGKILLed during that restore: it completes bit-exact or fails on every rank; "
              "after a second stand-in the 2-rank restore is bit-exact", inject, check,
              runs=(1, 3))


def test_elastic_restore_with_a_node_lost_during_it(clusters, tmp_path, request):
    campaign(FAULT, {"clusters": clusters, "tmp": tmp_path}, request.node.nodeid)


# ---------------------------------------------------------------------- no stand-in


def inject_lost(env, rng: random.Random):
    """3 nodes, RS(2,1), one rank each save; a 2-rank job on nodes 0-1 restores the 3-rank
    layout (rank 2's version read from node 2) and node 2 is lost for good at a random moment
    of it: nothing takes its slot. Then a second 2-rank restore (rank 2's version decoded
    from nodes 0-1, node 2 gone)."""
    cluster, job, out = saved_job(env, 3, 2, 3, 1)
    wait_for(lambda: {(v.rank, v.state) for v in versions(cluster.specs[2], job)
                      if v.step == 3} == {(2, "protected")})
    time.sleep(3.0)                 # node 2's reports say step 3 is protected (every heartbeat)
    procs = start(out, cluster, 2, 1, "restore", job)
    delay = rng.uniform(0.0, 4.0)
    time.sleep(delay)
    cluster.kill(2)                                   # lost for good: memory removed too
    shutil.rmtree(cluster.specs[2].shm_dir, ignore_errors=True)
    during = finish(procs)
    first, again = restore_again(out, cluster, job, 1)
    cluster.stop()
    return {"out": out, "during": during, "first": first, "again": again, "delay": delay,
            "what": "node 2 lost"}


FAULT_LOST = Fault("elastic restore, node lost for good during it",
                   "3-rank FSDP2 job on 3 nodes (RS k=2 m=1); a 2-rank job on nodes 0-1 "
                   "restores it from memory and node 2 is lost for good (SIGKILL, memory "
                   "removed, no stand-in) during that restore: it completes bit-exact or "
                   "fails on every rank; a second 2-rank restore decodes rank 2 from nodes "
                   "0-1 and is bit-exact", inject_lost, check, runs=(1, 3))


def test_elastic_restore_with_a_node_lost_for_good_during_it(clusters, tmp_path, request):
    campaign(FAULT_LOST, {"clusters": clusters, "tmp": tmp_path}, request.node.nodeid)
