"""Replica splitting (issue 13): the plan is the same on every replica and balanced, a split
leaves the live state untouched, and two real gloo processes reassemble every tensor bit for
bit (odd sizes and dtypes whose byte offsets do not align)."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from snapshotd_client import _replicas as r

pytestmark = pytest.mark.timeout(120)


def state():
    torch.manual_seed(0)
    opt_state = {0: {"exp_avg": torch.randn(300, 7), "step": torch.tensor(3.0)},
                 1: {"exp_avg": torch.randn(1000, dtype=torch.float64)}}
    return {"model": {"w": torch.randn(513, 3), "b": torch.randn(2000).to(torch.bfloat16),
                      "mask": torch.rand(4099) > 0.5, "tiny": torch.ones(3)},
            "optimizer": {"state": opt_state, "param_groups": [{"lr": 0.1, "params": [0, 1]}]}}


def test_the_plan_is_deterministic_balanced_and_leaves_small_tensors_whole():
    items = r.entries(state())
    owners = r.plan(items, 2)
    assert owners == r.plan(list(reversed(items)), 2)         # order of discovery: irrelevant
    assert ("model", "tiny") not in owners and ("optimizer", "state", 0, "step") not in owners
    loads = [sum(n for p, _, _, n in items if owners.get(p) == o) for o in range(2)]
    assert max(loads) <= 1.6 * min(loads), loads


def test_a_split_marks_what_others_own_and_does_not_touch_the_live_state():
    live = state()
    inner = live["optimizer"]["state"][0]
    owners = r.plan(r.entries(live), 2)
    for me in range(2):
        mine = r.split(live, owners, me)
        for path, owner in owners.items():
            leaf = mine
            for key in path:
                leaf = leaf[key]
            assert r.is_marker(leaf) == (owner != me), path
    assert isinstance(inner["exp_avg"], torch.Tensor)         # the optimizer's own dict
    assert live["optimizer"]["state"][0] is inner


def _worker(rank, port, queue):
    import torch.distributed as dist

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    dist.init_process_group("gloo", rank=rank, world_size=2)
    full = state()
    owners = r.plan(r.entries(full), 2)
    back = r.reassemble(r.split(full, owners, rank), dist.group.WORLD, 2)
    same = all(torch.equal(a, b) and a.dtype == b.dtype
               for (_, a), (_, b) in zip(r._walk(full), r._walk(back), strict=True))
    queue.put((rank, same, any(r.is_marker(leaf) for _, leaf in r._walk(back))))
    dist.destroy_process_group()


def test_two_replicas_reassemble_every_tensor_bit_for_bit():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(rank, port, queue)) for rank in range(2)]
    for proc in procs:
        proc.start()
    results = sorted(queue.get(timeout=90) for _ in procs)
    for proc in procs:
        proc.join(30)
    assert results == [(0, True, False), (1, True, False)], results


def _dtensor_worker(rank, port, queue):
    """One of 4 ranks on a 2x2 (replicate, shard) mesh, HSDP's layout: DTensors replicated
    over dimension 0 (and one over both) are split and reassembled bit for bit."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    dist.init_process_group("gloo", rank=rank, world_size=4)
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    torch.manual_seed(0)                            # the same global tensors on every rank
    hsdp, both = [Replicate(), Shard(0)], [Replicate(), Replicate()]
    full = {"model": {"w": distribute_tensor(torch.randn(301, 7), mesh, hsdp),   # uneven
                      "e": distribute_tensor(torch.randn(64, 33).bfloat16(), mesh, hsdp),
                      "r": distribute_tensor(torch.randn(700).double(), mesh, both),
                      "tiny": distribute_tensor(torch.randn(4, 2), mesh, hsdp),
                      "plain": torch.arange(5000)},
            "optimizer": {"state": {0: {"exp_avg": distribute_tensor(torch.randn(300, 9), mesh,
                                                                      hsdp),
                                        "step": torch.tensor(2.0)}}}}
    split = r.split_dtensors(full)
    kept = [p for p, leaf in r._walk(split, (), r._dtensor_leaf) if not r.is_marker(leaf)]
    marks = [p for p, leaf in r._walk(split, (), r._dtensor_leaf) if r.is_marker(leaf)]
    # JSON-like round trip of the markers, as a snapshot's skeleton gives them back.
    import json
    split = r._rebuild(split, (), lambda p, leaf: json.loads(json.dumps(leaf))
                       if r.is_marker(leaf) else leaf, r._dtensor_leaf)
    back = r.reassemble_dtensors(split, [mesh])
    same = True
    for (pa, a), (pb, b) in zip(r._walk(full, (), r._dtensor_leaf),
                                r._walk(back, (), r._dtensor_leaf), strict=True):
        same &= (pa == pb and a.placements == b.placements and a.shape == b.shape
                 and a.device_mesh is b.device_mesh
                 and torch.equal(a.to_local().view(-1).view(torch.uint8),
                                 b.to_local().view(-1).view(torch.uint8)))
    same &= back["model"]["plain"] is full["model"]["plain"]
    queue.put((rank, same, sorted(map(repr, kept)), sorted(map(repr, marks))))
    dist.destroy_process_group()


def test_replicated_dtensors_split_over_their_mesh_dimension_and_reassemble_bit_for_bit():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_dtensor_worker, args=(rank, port, queue)) for rank in range(4)]
    for proc in procs:
        proc.start()
    results = sorted(queue.get(timeout=90) for _ in procs)
    for proc in procs:
        proc.join(30)
    assert all(same for _, same, _, _ in results), results
    big = {"('model', 'w')", "('model', 'e')", "('model', 'r')",
           "('optimizer', 'state', 0, 'exp_avg')"}
    for rank, _, kept, marks in results:
        assert "('model', 'tiny')" in kept and "('model', 'tiny')" not in marks  # < 1 KiB
        assert set(kept) | set(marks) == big | {"('model', 'tiny')"}
        assert 1 <= len(marks) <= 3, (rank, marks)     # the group splits, nobody keeps all
    # Ranks 0 and 2 (and 1 and 3) are one replica group: each big tensor is kept by one.
    by_rank = {rank: set(kept) & big for rank, _, kept, _ in results}
    for a, b in ((0, 2), (1, 3)):
        assert by_rank[a] | by_rank[b] == big and not by_rank[a] & by_rank[b], by_rank


def test_an_export_fills_every_marker_from_the_rank_that_stored_it():
    w, v = torch.randn(300, 4), torch.randn(500)
    mesh = {"device": "cpu", "dims": ["replicate", "shard"], "ranks": [[0, 1], [2, 3]]}

    def dt_marker(owner):
        return {r.MARK: owner, "dtype": "float32", "shape": [500], "mesh": mesh, "dim": 0,
                "global": [1000], "stride": [1], "placements": ["R", "S(0)"]}

    states = {
        0: {"model": {"w": w, "v": v}, "optimizer": None, "replicas": {"dtensors": True}},
        1: {"model": {"w": w.clone(), "v": v + 1}, "optimizer": None,
            "replicas": {"dtensors": True}},
        2: {"model": {"w": w.clone(), "v": dt_marker(0)}, "optimizer": None,
            "replicas": {"dtensors": True}},
        3: {"model": {"w": {r.MARK: 0, "dtype": "float32", "shape": [300, 4]},   # DDP-style
                      "v": dt_marker(0)}, "optimizer": None, "replicas": {"size": 4}},
    }
    assert r.fill_from_owners(states) == []
    assert states[2]["model"]["v"] is v                   # rank 2's pair is rank 0
    assert torch.equal(states[3]["model"]["v"], v + 1)    # rank 3's pair is rank 1
    assert states[3]["model"]["w"] is w                   # DDP: the owner's global rank
    assert all("replicas" not in s for s in states.values())

    alone = {2: {"model": {"v": dt_marker(0)}, "optimizer": None,
                 "replicas": {"dtensors": True}}}
    missing = r.fill_from_owners(alone)
    assert missing == ["rank 2 ('model', 'v'): stored by rank 0"]
    assert r.is_marker(alone[2]["model"]["v"]) and "replicas" in alone[2]
