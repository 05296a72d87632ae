"""Sharded training state against a real daemon (issue 13): FSDP2 x TP and HSDP on 2x2 meshes
(4 real processes over gloo), and values that cannot be stored refused loudly at save().

The torchrun jobs with a rank SIGKILLed are in test_torchrun_sharded.py.
"""

import json
import logging
import os
import uuid

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.testing._internal.two_tensor import TwoTensor

from conftest import list_versions, run_ranks
from snapshotd.ops.export import export
from snapshotd_client import SnapshotClient, SnapshotError

WORKER = os.path.join(os.path.dirname(__file__), "sharded_worker.py")


def run_workers(tmp_path, job, *args, per_node=4):
    """The 4 ranks of sharded_worker.py, ``per_node`` to a node; return each rank's results."""
    run_ranks(WORKER, 4, per_node, "--job", job, "--out", str(tmp_path), *args)
    return [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(4)]


@pytest.mark.timeout(180)
def test_fsdp_tp_and_hsdp_on_2x2_meshes_snapshot_and_restore_in_place(node, tmp_path):
    """Each of 4 ranks: background copies never torn and never eager for guarded DTensors,
    offsets that reassemble the global tensors, a restore into a fresh model and optimizer bit
    for bit with the same placements, another layout refused (see sharded_worker.py)."""
    job = f"sh-{uuid.uuid4().hex[:6]}"
    everyone = run_workers(tmp_path, job, "--endpoint", node.specs[0].control)
    for results in everyone:
        assert [r["layout"] for r in results] == ["fsdp-tp", "hsdp"]
        tp, hsdp = results
        assert tp["strided"] > 0 and tp["reassembled"] > 0 and hsdp["reassembled"] == 8
        assert all(r["eager_bytes"] == 0 and "issue 14" in r["refused"] for r in results)
        assert all(r["split"] == 0 for r in results)        # one daemon, m = 0: stored whole
        # Every save after the first reused the layout (DTensor records included) and, with
        # DCP state dicts, DCP's FQN mapping: the snapshots checked above are those saves'.
        assert all(r["layout_hits"] == r["steps"] - 1 for r in results), results
        assert hsdp["dcp_hits"] == hsdp["steps"] - 1 and tp["dcp_hits"] == 0, results

    # snapshotctl export, outside the job: every rank's local shards, as plain tensors.
    out = tmp_path / "export"
    result = export(node.specs[0].control, f"{job}-hsdp", None, str(out), progress=False)
    assert result["ranks"] == [0, 1, 2, 3]
    dcp_to_torch_save(out, tmp_path / "export.pt")
    exported = torch.load(tmp_path / "export.pt", weights_only=True)
    # HSDP shards the 15 rows of inp.weight over 2 ranks: 8 on shard coordinate 0, 7 on 1.
    assert [exported[f"rank{r}"]["model"]["inp.weight"].shape[0] for r in range(4)] == [8, 7,
                                                                                          8, 7]


@pytest.mark.timeout(180)
def test_hsdp_replicas_split_across_coded_nodes_store_half_and_restore_bit_for_bit(
        cluster_factory, tmp_path):
    """HSDP on a 2x2 (replicate, shard) mesh, ranks 0-1 on node 0 and 2-3 on node 1 (k=1, m=1):
    each DTensor is stored by one rank of its replica pair, so every rank's version holds about
    half of its local shards; raw restores reassemble to the state at save() and
    TrainingState.restore into a fresh model is bit for bit (see sharded_worker.py)."""
    cluster = cluster_factory(2, k=1, m=1, args=["--insecure", "--keep", "4"])
    cluster.start()
    job = f"sh-{uuid.uuid4().hex[:6]}"
    everyone = run_workers(tmp_path, job, "--endpoints",
                           ",".join(spec.control for spec in cluster.specs),
                           "--layouts", "hsdp:dcp", "--hidden", "512", per_node=2)
    for results in everyone:
        (hsdp,) = results
        assert hsdp["split"] == hsdp["steps"] - 1 and hsdp["eager_bytes"] == 0, hsdp
        assert hsdp["reassembled"] == 8 and "issue 14" in hsdp["refused"], hsdp
        assert hsdp["layout_hits"] == hsdp["dcp_hits"] == hsdp["steps"] - 1, hsdp
    # Stored per rank, newest step: its share of the model and both AdamW moments. Whole, a
    # rank of a replica pair would hold all 3 x its local shard bytes; split, the pair's two
    # versions together hold it once (plus small tensors kept whole and the skeleton).
    newest = {}
    for spec in cluster.specs:
        for v in list_versions(spec, f"{job}-hsdp"):
            if v.step == 3:
                newest[v.rank] = v.nbytes
    assert sorted(newest) == [0, 1, 2, 3], newest
    for a, b in ((0, 2), (1, 3)):                # a replica pair: the same local shards
        whole = everyone[a][0]["local_bytes"]
        assert whole == everyone[b][0]["local_bytes"] > 0
        assert 0.3 * whole < newest[a] < 0.75 * whole, (a, newest, whole)
        assert 0.3 * whole < newest[b] < 0.75 * whole, (b, newest, whole)
        assert newest[a] + newest[b] < 1.2 * whole, (newest, whole)
    # An export of node 0's ranks 0-1 would lack what their pairs (2-3, on node 1) stored:
    # refused, naming what to do, instead of writing markers where tensors belong.
    with pytest.raises(SystemExit, match="export those ranks too"):
        export(cluster.specs[0].control, f"{job}-hsdp", None, str(tmp_path / "x"),
               progress=False)


@pytest.mark.timeout(60)
def test_a_value_that_cannot_be_stored_fails_loudly_at_the_first_save(node, caplog):
    caplog.set_level(logging.ERROR, logger="snapshotd_client")
    bad = {"model": {"w": torch.zeros(3)}, "opt": {"x": TwoTensor(torch.zeros(2),
                                                                  torch.zeros(2))}}
    with SnapshotClient(node.specs[0].control, job=f"bad-{uuid.uuid4().hex[:6]}",
                        rank=0) as client, pytest.warns(RuntimeWarning, match="/opt/x"):
        future = client.save(0, bad)
        # Refused at save(), before any copy: the future has failed when save() returns.
        assert future.done()
        with pytest.raises(SnapshotError, match="/opt/x: a tensor of subclass TwoTensor"):
            future.result()
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1 and "UNPROTECTED" in errors[0].getMessage()
        assert "/opt/x" in errors[0].getMessage()
        client.save(1, bad)
        stats = client.stats()
        assert (stats.rejected, stats.failed, stats.committed) == (2, 2, 0)
        assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1
        assert client.save(2, {"model": {"w": torch.zeros(3)}}).result() == 2
        assert client.steps() == [2]
