"""Restore at another world size from memory (issue 14): real daemons, real gloo processes.

A job of FSDP2 ranks saves every step through ``TrainingState(state_dicts="dcp")``; a new job
at another world size (new processes, new process group, other initial values) restores, and
every full parameter and AdamW moment equals the one saved, bit for bit. Its ranks read the
saved shards that overlap their new ones from the daemons of their nodes (elastic_worker.py).
"""

import json
import os
import subprocess
import sys
import uuid

import pytest
import torch

from snapshotd.tools.localcluster import free_ports

WORKER = os.path.join(os.path.dirname(__file__), "elastic_worker.py")


def run(tmp_path, cluster, world, per_node, phase, job, *args):
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
             "--job", job, "--out", str(tmp_path), "--phase", phase, *args], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=150)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    failed = [(r, p.returncode, outputs[r][-3000:]) for r, p in enumerate(procs)
              if p.returncode != 0]
    assert not failed, failed
    return [json.loads((tmp_path / f"{phase}-{world}-rank{r}.json").read_text())
            for r in range(world)]


def same(a, b):
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    differ = [k for k in a if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape
              or not torch.equal(a[k].reshape(-1).view(torch.uint8),
                                 b[k].reshape(-1).view(torch.uint8))]
    assert not differ, differ


@pytest.mark.timeout(240)
def test_fsdp2_saved_by_2_ranks_restores_at_4_and_then_at_2_bit_for_bit(cluster_factory,
                                                                       tmp_path):
    """2 ranks (one node) save; 4 ranks on 2 nodes restore from node 0's daemon (ranks 2-3
    read nothing locally: their shards come from ranks 0-1), then save one more step; then 2
    ranks restore that 4-rank layout, whose ranks 2-3 are on node 1."""
    cluster = cluster_factory(2, k=1, m=1, args=["--keep", "3", "--insecure"])
    cluster.start()
    job = f"el-{uuid.uuid4().hex[:6]}"
    saved = run(tmp_path, cluster, 2, 2, "save", job)
    restored = run(tmp_path, cluster, 4, 2, "restore", job)
    assert [r["step"] for r in restored] == [3] * 4
    assert [r["world_from"] for r in restored] == [2] * 4
    assert restored[2]["from_peers"] > 0 and restored[3]["from_peers"] > 0
    assert all(r["next_committed"] == 1 for r in restored)
    same(torch.load(tmp_path / "saved.pt"), torch.load(tmp_path / "restored-4.pt"))
    # RNGs: ranks 0-1 existed before and get their own back; 2-3 are new and get derived
    # seeds (deterministic, and not each other's).
    assert [r["rng"] for r in restored[:2]] == [s["rng"] for s in saved]
    assert restored[2]["rng"] != restored[3]["rng"]

    # The 4-rank job saved step 4 (ranks 0-1 on node 0, 2-3 on node 1): 2 ranks, one per
    # node, restore it; each reads the old ranks its node holds and sends the other its part
    # (new rank 0's shards are old ranks 0-1's rows, all on its own node; new rank 1 needs
    # old ranks 2-3's, on node 1, and the optimizer step counts, which rank 0 serves).
    again = run(tmp_path, cluster, 2, 1, "restore", job)
    assert [r["step"] for r in again] == [4, 4] and [r["world_from"] for r in again] == [4, 4]
    assert again[1]["from_peers"] > 0
    same(torch.load(tmp_path / "after-4.pt"), torch.load(tmp_path / "restored-2.pt"))
