"""Restore at another world size from memory (issue 14): real daemons, real gloo processes.

A job of FSDP2 ranks saves every step through ``TrainingState(state_dicts="dcp")``; a new job
at another world size (new processes, new process group, other initial values) restores, and
every full parameter and AdamW moment equals the one saved, bit for bit. Its ranks read the
saved shards that overlap their new ones from their daemons, which fetch ranks held on other
nodes over the peer transport (elastic_worker.py).
"""

import json
import os
import shutil
import uuid
from datetime import timedelta

import pytest
import torch
import torch.distributed.checkpoint as dcp

from conftest import list_versions, run_ranks, wait_for, where
from snapshotd.common import protocol as p
from snapshotd.common.channel import Channel
from snapshotd.ops.export import export_global

WORKER = os.path.join(os.path.dirname(__file__), "elastic_worker.py")
#: A lost node is called down by its group's heartbeats after --peer-timeout (5 s by default).
FAST_DOWN = ["--heartbeat-interval", "0.5", "--peer-timeout", "2"]


def run(tmp_path, cluster, world, per_node, phase, job, *args):
    endpoints = ",".join(spec.control for spec in cluster.specs)
    run_ranks(WORKER, world, per_node, "--endpoints", endpoints, "--per-node", str(per_node),
              "--job", job, "--out", str(tmp_path), "--phase", phase, *args)
    return [json.loads((tmp_path / f"{phase}-{world}-rank{r}.json").read_text())
            for r in range(world)]


def same(a, b):
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    differ = [k for k in a if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape
              or not torch.equal(a[k].reshape(-1).view(torch.uint8),
                                 b[k].reshape(-1).view(torch.uint8))]
    assert not differ, differ


@pytest.mark.timeout(300)
def test_fsdp2_resharded_2_to_3_then_continues_at_2_after_a_node_loss(cluster_factory,
                                                                    tmp_path):
    """3 nodes, RS(2,1). 2 ranks (nodes 0-1) save; 3 ranks, one per node, restore (rank 2,
    on node 2, holds nothing: its shards come from ranks 0-1 on the other nodes) and save one
    more step. Node 2 is lost (daemon SIGKILLed, memory removed) and not replaced: the job
    continues with 2 ranks on nodes 0-1, whose daemons decode the lost rank's version from the
    group (a data chunk of one node and parity of the other). Every full parameter and AdamW
    moment is the one saved, bit for bit; so is the global export of the step, decoded the
    same way. (2 -> 4 -> 3 under torchrun: test_torchrun_sharded.py; 4 -> 2 with a holder
    lost during the restore: tests/faults/test_fault_elastic.py.)"""
    cluster = cluster_factory(3, k=2, m=1, args=["--keep", "3", "--insecure", *FAST_DOWN])
    cluster.start()
    job = f"el-{uuid.uuid4().hex[:6]}"
    saved = run(tmp_path, cluster, 2, 1, "save", job)
    restored = run(tmp_path, cluster, 3, 1, "restore", job)
    assert [r["step"] for r in restored] == [3] * 3
    assert [r["world_from"] for r in restored] == [2] * 3
    assert restored[2]["from_peers"] > 0
    assert all(r["next_committed"] == 1 for r in restored)
    same(torch.load(tmp_path / "saved.pt"), torch.load(tmp_path / "restored-3.pt"))
    # RNGs: ranks 0-1 existed before and get their own back; 2 is new and gets a derived
    # seed (deterministic, and not another rank's).
    assert [r["rng"] for r in restored[:2]] == [s["rng"] for s in saved]
    assert restored[2]["rng"] not in [s["rng"] for s in saved]
    # The restore named its new timeline: the same token on every node (each got it from its
    # own rank's drop), and each node's reports carry it to the others (floors.json).
    def timelines():
        out = []
        for spec in cluster.specs:
            floors = json.loads(open(os.path.join(spec.shm_dir, "floors.json")).read())
            out.append((tuple(floors.get("timelines", {}).get(job, (0, -1))),
                        {h[job][6] for h in floors["held"].values() if job in h}))
        return out

    wait_for(lambda: len({t for t, _ in timelines()}) == 1 and timelines()[0][0][0] != 0
             and all(heard == {timelines()[0][0][0]} for _, heard in timelines()))
    assert timelines()[0][0][1] == 3                  # the base: the restored step

    # Step 4 of the 3-rank layout protected on every node, and node 0 told of it; then node 2
    # is lost for good.
    node2 = cluster.specs[2]
    wait_for(lambda: {(v.rank, v.state) for v in list_versions(node2, job) if v.step == 4}
             == {(2, "protected")})
    wait_for(lambda: all(any(n.slot == 2 and 4 in n.steps and set(n.ranks) == {2}
                             for n in where(spec, job)) for spec in cluster.specs[:2]))
    # Where lists what an up node holds; what it reported *protected* (all a down node's
    # entry keeps) is in the report each node took (floors.json: held[slot][job][5]). Node 2's
    # report of step 4 as protected may come a heartbeat after the one saying it holds it.
    def told_protected(spec):
        floors = json.loads(open(os.path.join(spec.shm_dir, "floors.json")).read())
        return 4 in floors["held"].get("2", {}).get(job, [0, [], [], 0, -1, []])[5]

    wait_for(lambda: all(told_protected(spec) for spec in cluster.specs[:2]))
    cluster.kill(2)
    shutil.rmtree(node2.shm_dir, ignore_errors=True)
    # Called down by the heartbeats (--peer-timeout): of a node that does not answer, Where
    # lists the steps it reported protected (its group can decode them).
    wait_for(lambda: any(n.slot == 2 and not n.up for n in where(cluster.specs[0], job)))
    lost = [n for n in where(cluster.specs[0], job) if n.slot == 2]
    assert len(lost) == 1 and not lost[0].up and 4 in lost[0].steps

    # One global checkpoint of step 4 (ranks 0-1 from nodes 0-1, 2 decoded from the group),
    # loaded by plain dcp.load in one process (a third world size): the full tensors saved.
    out = tmp_path / "global"
    result = export_global(cluster.specs[0].control, job, 4, str(out), progress=False)
    assert result["world"] == 3 and result["step"] == 4
    after = torch.load(tmp_path / "after-3.pt")
    target = {"model": {}, "optimizer": {"state": {}}}
    for key, value in after.items():
        kind, name = key.split("/", 1)
        if kind == "param":
            target["model"][name] = torch.zeros_like(value)
        else:
            target["optimizer"]["state"].setdefault(name, {})[kind] = torch.zeros_like(value)
    dcp.load(target, checkpoint_id=str(out), no_dist=True)
    loaded = {f"param/{n}": t for n, t in target["model"].items()}
    loaded |= {f"{k}/{n}": t for n, d in target["optimizer"]["state"].items()
               for k, t in d.items()}
    same(after, loaded)

    again = run(tmp_path, cluster, 2, 1, "restore", job)
    assert [r["step"] for r in again] == [4, 4] and [r["world_from"] for r in again] == [3, 3]
    assert any(r["from_peers"] > 0 for r in again)    # rank 2 of step 4: decoded
    same(torch.load(tmp_path / "after-3.pt"), torch.load(tmp_path / "restored-2.pt"))
    # Nothing of the lost node was installed elsewhere: each node holds its own rank only.
    assert [{v.rank for v in list_versions(spec, job)} for spec in cluster.specs[:2]] == \
        [{0}, {1}]


@pytest.mark.timeout(120)
def test_a_drop_everywhere_removes_a_ranks_newer_versions_on_the_node_that_holds_it(
        cluster_factory):
    """The new timeline of an elastic restore (review of issue 14: without it a later restore
    combined one run's step 4 of ranks 0-1 with another run's step 4 of ranks 2-3): a drop
    sent to node 0 with ``everywhere`` removes rank 2's versions newer than step 3 on node 1,
    which holds rank 2, and keeps the older ones."""
    from snapshotd_client import SnapshotClient

    cluster = cluster_factory(2, k=1, m=1, args=["--insecure", "--keep", "4"])
    cluster.start()
    job = f"el-{uuid.uuid4().hex[:6]}"
    with SnapshotClient(cluster.specs[1].control, job=job, rank=2) as client:
        for step in (2, 3, 4, 5):
            client.save(step, {"w": torch.full((256,), float(step))}).result()
    wait_for(lambda: any(n.slot == 1 and 2 in n.ranks and 5 in n.steps
                         for n in where(cluster.specs[0], job)))
    ch = Channel(cluster.specs[0].control, timedelta(seconds=30))
    try:
        dropped = ch.call(p.Drop(job, rank=2, newer_than=3, everywhere=True)).count
    finally:
        ch.close()
    assert dropped == 2
    assert sorted(v.step for v in list_versions(cluster.specs[1], job)) == [2, 3]


@pytest.mark.timeout(240)
def test_a_resharded_restore_into_an_optimizer_holding_some_state_is_refused_everywhere(
        cluster_factory, tmp_path):
    """Where the optimizer holds state already for some parameters (an in-process restore
    after a step) but none for one the saved layout holds state of, DCP would not read that
    state, and the parameter would come back without its moments: every rank refuses before
    writing a byte, and a restore into fresh optimizers then works."""
    cluster = cluster_factory(2, k=1, m=1, args=["--insecure"])
    cluster.start()
    job = f"el-{uuid.uuid4().hex[:6]}"
    run(tmp_path, cluster, 2, 1, "save", job)
    refused = run(tmp_path, cluster, 3, 2, "restore", job, "--warm-first")
    assert all("saved state would not be read" in r["refused"] for r in refused), refused
    assert all("up.weight" in r["refused"] for r in refused), refused
    assert all(r["untouched"] for r in refused)
    restored = run(tmp_path, cluster, 3, 2, "restore", job)
    assert [r["step"] for r in restored] == [3] * 3
    same(torch.load(tmp_path / "saved.pt"), torch.load(tmp_path / "restored-3.pt"))


@pytest.mark.timeout(240)
def test_ddp_with_replicas_split_restored_at_another_world_size(cluster_factory, tmp_path):
    """DDP on 2 coded nodes (RS k=1 m=1): each of the 2 ranks stores only its share of the
    replicated parameters and AdamW moments (split replicas, issue 13). A 3-rank DDP job
    restores that layout from memory: every rank gets every full parameter and moment back,
    bit for bit, as saved."""
    cluster = cluster_factory(2, k=1, m=1, args=["--keep", "3", "--insecure"])
    cluster.start()
    job = f"el-{uuid.uuid4().hex[:6]}"
    run(tmp_path, cluster, 2, 1, "save", job, "--layout", "ddp")
    saved = torch.load(tmp_path / "saved.pt")
    whole = sum(t.numel() * t.element_size() for t in saved.values())
    stored = []                          # the model and optimizer bytes each rank stored
    for spec in cluster.specs:
        ch = Channel(spec.control, timedelta(seconds=30))
        try:
            for v in list_versions(spec, job):
                if v.step == 3:
                    lease = ch.call(p.Open(job, v.rank, os.getpid(), 3))
                    ch.call(p.Release(lease.lease))
                    stored.append(sum(t.nbytes for t in lease.tensors
                                      if t.name.startswith(("/model/", "/optimizer/"))))
        finally:
            ch.close()
    assert len(stored) == 2 and all(n < 0.75 * whole for n in stored), (stored, whole)
    restored = run(tmp_path, cluster, 3, 2, "restore", job, "--layout", "ddp")
    assert [r["step"] for r in restored] == [3] * 3
    assert [r["world_from"] for r in restored] == [2] * 3
    same(saved, torch.load(tmp_path / "restored-3.pt"))


@pytest.mark.timeout(240)
def test_regression_rank_permutation_at_same_world_size_refused(cluster_factory, tmp_path):
    """Issue 24, finding 8: a 2-rank DDP job with a default ``TrainingState(model,
    optimizer)`` restarted with its ranks swapped across the nodes (torchrun's c10d
    rendezvous orders nodes by host name and pid: a replacement host can shift every rank)
    failed on both ranks with "restoring at another world size needs
    TrainingState(..., state_dicts='dcp')". Each rank now restores its own saved rank, read
    through its daemon from the node that holds it, bit for bit, and goes on saving."""
    cluster = cluster_factory(2, k=1, m=1, args=["--keep", "3", "--insecure"])
    cluster.start()
    job = f"el-{uuid.uuid4().hex[:6]}"
    saved = run(tmp_path, cluster, 2, 1, "save", job, "--layout", "ddp",
                "--state-dicts", "default")
    restored = run(tmp_path, cluster, 2, 1, "restore", job, "--layout", "ddp",
                   "--state-dicts", "default", "--swap")
    assert [r["step"] for r in restored] == [3, 3]
    assert [r["world_from"] for r in restored] == [None, None]     # not resharded
    assert all(r["from_peers"] > 0 for r in restored)              # each from the other node
    assert [r["rng"] for r in restored] == [s["rng"] for s in saved]   # its own rank's RNGs
    assert all(r["next_committed"] == 1 for r in restored)
    same(torch.load(tmp_path / "saved.pt"), torch.load(tmp_path / "restored-2.pt"))


@pytest.mark.timeout(240)
def test_regression_default_training_state_of_fsdp2_cannot_change_world_size(
        cluster_factory, tmp_path):
    """Issue 24, finding 8: an FSDP2 job saved with a default ``TrainingState(model,
    optimizer)`` (``state_dicts="module"``: its optimizer state keyed by index) could not come
    back at another world size. A 3-rank job restores the 2-rank job's step, every full
    parameter and AdamW moment bit for bit (the indices renamed to DCP's names)."""
    cluster = cluster_factory(2, k=1, m=1, args=["--insecure"])
    cluster.start()
    job = f"el-{uuid.uuid4().hex[:6]}"
    run(tmp_path, cluster, 2, 1, "save", job, "--state-dicts", "default")
    restored = run(tmp_path, cluster, 3, 2, "restore", job, "--state-dicts", "default")
    assert [r["step"] for r in restored] == [3] * 3
    assert [r["world_from"] for r in restored] == [2] * 3
    assert all(r["next_committed"] == 1 for r in restored)
    same(torch.load(tmp_path / "saved.pt"), torch.load(tmp_path / "restored-3.pt"))


RESTORE_ONE = """
import sys, torch, torch.distributed as dist
from snapshotd_client import SnapshotClient, SnapshotError, TrainingState
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:%d", rank=0, world_size=1)
model = torch.nn.Linear(4, 4)
state = TrainingState(model, torch.optim.AdamW(model.parameters()), state_dicts="dcp")
with SnapshotClient(sys.argv[1], job=sys.argv[2], rank=0) as client:
    try:
        print("RETURNED", state.restore(client))
    except SnapshotError as exc:
        print("RAISED", exc)
dist.destroy_process_group()
"""


@pytest.mark.timeout(180)
def test_a_layout_that_a_down_node_keeps_from_completing_fails_loudly_and_keeps_the_rest(
        cluster_factory, tmp_path):
    """Review of issue 14 (F1): when no step is held whole by the nodes that answer because a
    node holding ranks of the job does not answer (its newest steps not protected, or more
    than m nodes lost, or a node paused), a restore is not "nothing to restore": it fails
    loudly, naming the node, and drops nothing (a silent start over dropped this rank's
    versions for good)."""
    import subprocess
    import sys

    from snapshotd.tools.localcluster import free_ports
    from snapshotd_client import SnapshotClient

    # 3 nodes RS(2,1); ranks 0 and 1 of a 2-rank job on nodes 0 and 1 (node 2 holds none:
    # nothing of the job is protected), then node 1 lost.
    cluster = cluster_factory(3, k=2, m=1, args=["--keep", "3", "--insecure", *FAST_DOWN])
    cluster.start()
    job = f"el-{uuid.uuid4().hex[:6]}"
    os.environ["WORLD_SIZE"] = "2"                    # what the clients say the job has
    try:
        for rank in (0, 1):
            with SnapshotClient(cluster.specs[rank].control, job=job, rank=rank) as client:
                for step in range(3):
                    client.save(step, {"w": torch.full((64,), float(step))}).result()
    finally:
        del os.environ["WORLD_SIZE"]
    wait_for(lambda: any(n.slot == 1 and 2 in n.steps for n in where(cluster.specs[0], job)))
    cluster.kill(1)
    shutil.rmtree(cluster.specs[1].shm_dir, ignore_errors=True)
    # Called down by node 0's heartbeats (--peer-timeout): then it lists none of its steps,
    # none being protected.
    wait_for(lambda: any(n.slot == 1 and not n.up and not n.steps
                         for n in where(cluster.specs[0], job)))
    script = tmp_path / "restore_one.py"
    script.write_text(RESTORE_ONE % free_ports(1)[0])
    out = subprocess.run([sys.executable, str(script), cluster.specs[0].control, job],
                         capture_output=True, text=True, timeout=150)
    assert "RAISED" in out.stdout and "nodes [1]" in out.stdout, out.stdout + out.stderr
    assert sorted(v.step for v in list_versions(cluster.specs[0], job)) == [0, 1, 2]
