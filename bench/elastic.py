"""Restore at another world size (issue 14): from the daemons' memory against ``dcp.load`` of
the same state from a DCP checkpoint in /dev/shm, measured in the same run.

``python -m bench.elastic [--mib 64] [--save-world 2] [--restore-world 4]``: ``save-world``
processes (gloo on CPU) hold an FSDP2 MLP of ``--mib`` MiB of parameters with AdamW state
(3x that), save it once through ``TrainingState(state_dicts="dcp")`` into node 0 of a
two-daemon loopback cluster (RS k=1, m=1), and write the same state with ``dcp.save`` to
/dev/shm (the page cache: the fairest disk). Then ``restore-world`` fresh processes build the
model with other values and restore: from memory (``TrainingState.restore``, which reshards)
and, in the same processes, with ``dcp.load`` from the directory. Printed: the median over the
ranks of each restore's wall time (the slowest rank decides), and the ratio.

``--lost``: a node lost for good during the change. Three daemons (RS k=2, m=1), the
``save-world`` ranks one per node in turn; node 2 is then SIGKILLed and its memory removed
(nothing replaces it), and the ``restore-world`` ranks, on nodes 0 and 1 in turn, restore:
the saved ranks that node 2 held are decoded from the other two nodes' data and parity.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from snapshotd.tools.localcluster import LocalCluster, free_ports

MIB = 1 << 20


def _model(mib: int, world: int, seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    width = 1024
    layers = max(1, mib * MIB // (4 * width * width))
    torch.manual_seed(seed)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, width)).pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad()
    return model, optimizer


def _worker(rank: int, world: int, port: int, endpoints: list[str], job: str, ckpt: str,
            mib: int, phase: str, queue: Any) -> None:
    endpoint = endpoints[rank % len(endpoints)]
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "RANK": str(rank), "WORLD_SIZE": str(world),
                       # ranks on this rank's node (ranks go to the nodes in turn)
                       "LOCAL_WORLD_SIZE": str(len(range(rank % len(endpoints), world,
                                                         len(endpoints))))})
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from snapshotd_client import SnapshotClient, TrainingState

    model, optimizer = _model(mib, world, seed=0 if phase == "save" else 1)
    client = SnapshotClient(endpoint, job=job, rank=rank)
    state = TrainingState(model, optimizer, state_dicts="dcp", rng=False)
    if phase == "save":
        state.save(client, 1)
        client.close()
        msd, osd = get_state_dict(model, optimizer)
        dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=ckpt)
        queue.put((rank, 0.0, 0.0, 0))
    else:
        dist.barrier()
        start = time.perf_counter()
        step = state.restore(client)
        memory = time.perf_counter() - start
        assert step == 1, step
        peers = client.last_restore.bytes_from_peers if client.last_restore else 0
        model2, optimizer2 = _model(mib, world, seed=2)
        dist.barrier()
        start = time.perf_counter()
        msd, osd = get_state_dict(model2, optimizer2)
        dcp.load({"model": msd, "optimizer": osd}, checkpoint_id=ckpt)
        set_state_dict(model2, optimizer2, model_state_dict=msd, optim_state_dict=osd)
        disk = time.perf_counter() - start
        client.close()
        queue.put((rank, memory, disk, peers))
    dist.barrier()
    dist.destroy_process_group()


def _run(world: int, endpoints: list[str], job: str, ckpt: str, mib: int, phase: str
         ) -> list:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_ports(1)[0]
    procs = [ctx.Process(target=_worker, args=(r, world, port, endpoints, job, ckpt, mib, phase,
                                               queue)) for r in range(world)]
    for proc in procs:
        proc.start()
    results = [queue.get(timeout=900) for _ in procs]
    for proc in procs:
        proc.join(60)
    return results


def _lose(cluster: LocalCluster, slot: int, job: str) -> None:
    """Once node ``slot``'s versions are protected and its peers heard so (its next job-wide
    retention reports), kill it and remove its memory."""
    from datetime import timedelta

    from snapshotd.common import protocol as p
    from snapshotd.common.channel import Channel

    spec = cluster.specs[slot]
    ch = Channel(spec.control, timedelta(seconds=30))
    try:
        deadline = time.monotonic() + 120
        while True:
            versions = ch.call(p.ListVersions(job)).versions
            if all(v.state == "protected" for v in versions):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"node {slot}'s versions were not protected in 120 s: "
                                   f"{[(v.rank, v.step, v.state) for v in versions]}")
            time.sleep(0.2)
    finally:
        ch.close()
    time.sleep(3.0)                                # a report or two says they are protected
    cluster.kill(slot)
    shutil.rmtree(spec.shm_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=int, default=64, help="MiB of parameters (state: 3x)")
    ap.add_argument("--save-world", type=int, default=2)
    ap.add_argument("--restore-world", type=int, default=4)
    ap.add_argument("--lost", action="store_true",
                    help="3 nodes, ranks spread over them; node 2 lost for good before the "
                         "restore (its saved ranks decoded)")
    args = ap.parse_args(argv)
    workdir = tempfile.mkdtemp(prefix="snapbench-elastic-")
    ckpt = tempfile.mkdtemp(prefix="snapbench-elastic-dcp-", dir="/dev/shm")
    nodes, k = (3, 2) if args.lost else (2, 1)
    cluster = LocalCluster(nodes, workdir, k=k, m=1, args=[
        "--insecure", "--memory-limit", f"{20 * args.mib}MiB", "--log-level",
        os.environ.get("BENCH_LOG_LEVEL", "WARNING")])
    cluster.start()
    try:
        controls = [spec.control for spec in cluster.specs]
        _run(args.save_world, controls if args.lost else controls[:1], "bench-elastic", ckpt,
             args.mib, "save")
        if args.lost:
            _lose(cluster, 2, "bench-elastic")
        results = _run(args.restore_world, controls[:2] if args.lost else controls[:1],
                       "bench-elastic", ckpt, args.mib, "restore")
    finally:
        cluster.stop()
        shutil.rmtree(ckpt, ignore_errors=True)
        shutil.rmtree(workdir, ignore_errors=True)
    memory = max(r[1] for r in results)
    disk = max(r[2] for r in results)
    print(f"state: {args.mib} MiB of parameters + AdamW ({3 * args.mib} MiB), FSDP2 saved by "
          f"{args.save_world} ranks, restored by {args.restore_world} (2 cores, gloo)"
          + (", node 2 of 3 lost for good in between (RS(2,1): its ranks decoded)"
             if args.lost else "") + "\n")
    print("| restore at another world size | slowest rank | median rank | vs dcp.load |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| snapshotd, from memory (resharded) | {memory * 1e3:.0f} ms | "
          f"{statistics.median(r[1] for r in results) * 1e3:.0f} ms | "
          + (f"{disk / memory:.2f}x faster |" if disk >= memory else
             f"{memory / disk:.2f}x slower |"))
    print(f"| dcp.load from /dev/shm | {disk * 1e3:.0f} ms | "
          f"{statistics.median(r[2] for r in results) * 1e3:.0f} ms | 1.00x |")
    print(f"\nbytes each rank received from other ranks (median): "
          f"{statistics.median(r[3] for r in results) / MIB:.1f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
