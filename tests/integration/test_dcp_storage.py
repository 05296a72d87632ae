"""snapshotd as DCP storage (issue 14 part 2): ``dcp.save`` through ``SnapshotdWriter`` and
``dcp.load`` through ``SnapshotdReader`` against a real daemon, at the world size of the save
and at others (DCP's planners reshard), with sharded DTensors, replicated tensors and
non-tensor values; and items held by another node read through this node's daemon."""

import os
import socket
import time

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp

from conftest import where
from snapshotd_client.dcp import META_SUFFIX, SnapshotdReader, SnapshotdWriter

pytestmark = pytest.mark.timeout(180)

GLOBAL = torch.arange(60, dtype=torch.float32).reshape(12, 5)
BIAS = torch.linspace(0, 1, 7)


def message(exc):
    """The storage's own message (DCP wraps it in a CheckpointException per rank; some torch
    versions drop it from read_metadata, so the storage logs it too)."""
    return str(exc) + " ".join(str(e) for e in getattr(exc, "failures", {}).values())


@pytest.fixture
def daemon(cluster_factory):
    cluster = cluster_factory(1, args=["--memory-limit", "256MiB"])
    cluster.start()
    return cluster.specs[0].control


def test_one_process_round_trip_by_step_and_by_checkpoint_id(daemon, caplog):
    state = {"w": torch.randn(6, 3), "extra": {"epoch": 3, "name": "x"}}
    dcp.save(state, storage_writer=SnapshotdWriter("d1", step=4, endpoint=daemon), no_dist=True)
    state2 = {"w": state["w"] * 2, "extra": {"epoch": 4, "name": "y"}}
    dcp.save(state2, checkpoint_id="9", storage_writer=SnapshotdWriter("d1", endpoint=daemon),
             no_dist=True)
    back = {"w": torch.zeros(6, 3), "extra": {"epoch": 0, "name": ""}}
    dcp.load(back, storage_reader=SnapshotdReader("d1", step=4, endpoint=daemon), no_dist=True)
    assert torch.equal(back["w"], state["w"]) and back["extra"] == {"epoch": 3, "name": "x"}
    newest = {"w": torch.zeros(6, 3), "extra": {"epoch": 0, "name": ""}}
    dcp.load(newest, storage_reader=SnapshotdReader("d1", endpoint=daemon), no_dist=True)
    assert torch.equal(newest["w"], state2["w"]) and newest["extra"]["epoch"] == 4
    with pytest.raises(BaseException) as err:       # DCP wraps it: CheckpointException
        dcp.load(back, storage_reader=SnapshotdReader("nothing", endpoint=daemon), no_dist=True)
    assert "no DCP checkpoint of job 'nothing'" in message(err.value) + caplog.text


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _job(rank, world, port, daemon, action, queue):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world)})
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    try:
        if action == "save":
            state = {"w": distribute_tensor(GLOBAL, mesh, [Shard(0)]), "bias": BIAS.clone(),
                     "meta": {"step": 7}}
            dcp.save(state, storage_writer=SnapshotdWriter("dsh", step=7, endpoint=daemon))
            queue.put((rank, True))
        elif action == "save-6":
            for step in range(6):
                state = {"w": distribute_tensor(GLOBAL + step, mesh, [Shard(0)])}
                dcp.save(state, storage_writer=SnapshotdWriter("dtrim", step=step,
                                                               endpoint=daemon))
            queue.put((rank, True))
        else:
            state = {"w": distribute_tensor(torch.zeros(12, 5), mesh, [Shard(0)]),
                     "bias": torch.zeros(7), "meta": {"step": 0}}
            dcp.load(state, storage_reader=SnapshotdReader("dsh", step=7, endpoint=daemon))
            ok = (torch.equal(state["w"].full_tensor(), GLOBAL)
                  and torch.equal(state["bias"], BIAS) and state["meta"] == {"step": 7})
            queue.put((rank, ok))
    finally:
        dist.destroy_process_group()


def _spawn(world, daemon, action):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _port()
    procs = [ctx.Process(target=_job, args=(r, world, port, daemon, action, queue))
             for r in range(world)]
    for proc in procs:
        proc.start()
    results = sorted(queue.get(timeout=120) for _ in procs)
    for proc in procs:
        proc.join(30)
    return results


def test_saved_by_two_ranks_loaded_at_one_and_three(daemon):
    assert _spawn(2, daemon, "save") == [(0, True), (1, True)]
    # One process, no process group: the global tensors from both ranks' items.
    full = {"w": torch.zeros(12, 5), "bias": torch.zeros(7), "meta": {"step": 0}}
    dcp.load(full, storage_reader=SnapshotdReader("dsh", step=7, endpoint=daemon), no_dist=True)
    assert torch.equal(full["w"], GLOBAL) and torch.equal(full["bias"], BIAS)
    assert full["meta"] == {"step": 7}
    # Three ranks, the rows resharded 4/4/4 from the saved 6/6.
    assert _spawn(3, daemon, "load") == [(0, True), (1, True), (2, True)]


def test_items_of_a_rank_on_another_node_are_read_through_this_node(cluster_factory, caplog):
    cluster = cluster_factory(2, k=1, m=1, args=["--insecure"])
    cluster.start()
    a, b = (s.control for s in cluster.specs)
    os.environ["RANK"] = "1"
    try:
        dcp.save({"x": torch.arange(3.0)}, storage_writer=SnapshotdWriter("far", step=1,
                                                                          endpoint=b),
                 no_dist=True)
    finally:
        del os.environ["RANK"]
    # Everything (the metadata too) is on node b: a load through node a reads it from b, once
    # a has b's report of what it holds (every heartbeat).
    deadline = time.monotonic() + 30
    while {"far", "far" + META_SUFFIX} - {job for job in ("far", "far" + META_SUFFIX)
                                          if any(n.steps for n in where(cluster.specs[0],
                                                                        job))}:
        assert time.monotonic() < deadline, "node a never heard of node b's versions"
        time.sleep(0.2)
    back = {"x": torch.zeros(3)}
    dcp.load(back, storage_reader=SnapshotdReader("far", step=1, endpoint=a), no_dist=True)
    assert torch.equal(back["x"], torch.arange(3.0))
    # A step nobody holds: named.
    with pytest.raises(BaseException) as err:       # DCP wraps it: CheckpointException
        dcp.load(back, storage_reader=SnapshotdReader("far", step=2, endpoint=a), no_dist=True)
    assert "no DCP checkpoint of job 'far' at step 2" in message(err.value) + caplog.text


def test_regression_dcp_storage_metadata_never_trimmed(cluster_factory):
    """Issue 24, finding 10: ``SnapshotdWriter.finish`` wrote ``<job>.dcp-meta`` from rank 0
    with a client that counted the job's 2 ranks (``WORLD_SIZE``), so the daemon waited for
    a rank 1 of the metadata job that never comes and kept every metadata version (12 of 12
    in a torchtitan run). Two ranks save 6 checkpoints (the daemon keeps 2 per rank): as
    many metadata versions are kept as data versions, and the newest one still loads."""
    from conftest import list_versions, wait_for

    cluster = cluster_factory(2, k=1, m=1, args=["--insecure"])    # retention is job-wide
    cluster.start()
    node = cluster.specs[0]
    daemon = node.control
    assert _spawn(2, daemon, "save-6") == [(0, True), (1, True)]

    def kept():
        data: dict[int, list[int]] = {}
        for v in list_versions(node, "dtrim"):
            data.setdefault(v.rank, []).append(v.step)
        meta = [v.step for v in list_versions(node, "dtrim" + META_SUFFIX)]
        return {r: sorted(s) for r, s in data.items()}, sorted(meta)

    try:
        wait_for(lambda: kept() == ({0: [4, 5], 1: [4, 5]}, [4, 5]), timeout=15)
    except AssertionError:
        raise AssertionError(f"kept (data by rank, metadata): {kept()}; expected the newest "
                             "2 of each") from None
    full = {"w": torch.zeros(12, 5)}
    dcp.load(full, storage_reader=SnapshotdReader("dtrim", endpoint=daemon), no_dist=True)
    assert torch.equal(full["w"], GLOBAL + 5)
