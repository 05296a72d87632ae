"""Replica splitting (issue 13): what each rank stores, and what it costs, at d = 1, 2, 4.

``python -m bench.replicas [--mib 32] [--steps 6]``: d processes (gloo on CPU) train an MLP of
``--mib`` MiB of parameters with AdamW (state = 3x that) and save every step through
``TrainingState`` into node 0 of a two-daemon loopback cluster (RS k=1, m=1: node 0's data is
coded onto node 1, so splitting is allowed). For DDP, each d is run with replicas split
(default) and whole (``split_replicas=False``) in the same run; FSDP2 shards the state itself;
HSDP (``--kinds hsdp,hsdp-whole``, d >= 4 on a 2 x d/2 replicate x shard mesh) shards over
``d/2`` and splits its replicated shards over the replicate dimension (ratios against FSDP2 at
d = 1).
Printed per case: bytes per rank (the newest version), the save stall (``state.save``), ingest
(``save`` until copied), and what node 0 holds for the job once retention settled (every
rank's kept versions).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from snapshotd.common import protocol as p
from snapshotd.common.channel import Channel
from snapshotd.tools.localcluster import LocalCluster, free_ports

MIB = 1 << 20


def _model(mib: int) -> torch.nn.Module:
    width = 1024
    layers = max(1, mib * MIB // (4 * width * width))
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])


def _worker(rank: int, world: int, port: int, endpoint: str, kind: str, mib: int,
            steps: int, queue: Any) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "RANK": str(rank), "WORLD_SIZE": str(world),
                       "LOCAL_WORLD_SIZE": str(world)})
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=timedelta(seconds=300))
    from snapshotd_client import SnapshotClient, TrainingState

    model = _model(mib)
    if kind == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            fully_shard(layer)
        fully_shard(model)
        wrapped: torch.nn.Module = model
    elif kind.startswith("hsdp"):                  # 2-D mesh: replicate x shard
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
        for layer in model:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        wrapped = model
    else:
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    client = SnapshotClient(endpoint, job=f"bench-{kind}-{world}", rank=rank)
    state = TrainingState(wrapped, optimizer, split_replicas=not kind.endswith("-whole"),
                          rng=False)
    stall, ingest = [], []
    x = torch.randn(8, 1024)
    for step in range(steps):
        wrapped(x).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        start = time.perf_counter()
        state.save(client, step)
        stall.append(time.perf_counter() - start)
        client.wait_copied()
        ingest.append(time.perf_counter() - start)
        client.wait()
    client.close()
    dist.barrier()
    dist.destroy_process_group()
    # The first save decides (and lays out) once: report the steady state.
    queue.put((rank, statistics.median(stall[1:]), statistics.median(ingest[1:])))


def _case(cluster: LocalCluster, kind: str, world: int, mib: int, steps: int) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_ports(1)[0]
    endpoint = cluster.specs[0].control
    procs = [ctx.Process(target=_worker, args=(r, world, port, endpoint, kind, mib, steps,
                                               queue)) for r in range(world)]
    for proc in procs:
        proc.start()
    results = [queue.get(timeout=600) for _ in procs]
    for proc in procs:
        proc.join(60)
    time.sleep(4.0)                          # report rounds: retention settles
    ch = Channel(endpoint, timedelta(seconds=30))
    try:
        job = f"bench-{kind}-{world}"
        held = ch.call(p.ListVersions(job)).versions
        newest = max(v.step for v in held)
        per_rank = [v.nbytes for v in held if v.step == newest]
        used = sum(v.nbytes for v in held)  # every version of the job the node keeps
        ch.call(p.Drop(job))
    finally:
        ch.close()
    return {"kind": kind, "d": world, "bytes_per_rank": statistics.mean(per_rank),
            "stall_ms": 1e3 * statistics.median(r[1] for r in results),
            "ingest_ms": 1e3 * statistics.median(r[2] for r in results),
            "node_bytes": used}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=int, default=32, help="MiB of parameters (state: 3x)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--worlds", default="1,2,4")
    ap.add_argument("--kinds", default="ddp,ddp-whole,fsdp2,hsdp,hsdp-whole",
                    help="hsdp runs at even d >= 4 only (a 2 x d/2 mesh)")
    args = ap.parse_args(argv)
    workdir = tempfile.mkdtemp(prefix="snapbench-replicas-")
    cluster = LocalCluster(2, workdir, k=1, m=1, args=[
        "--insecure", "--memory-limit", f"{100 * args.mib}MiB", "--keep", "2",
        "--log-level", "WARNING"])
    cluster.start()
    rows = []
    try:
        for world in [int(w) for w in args.worlds.split(",")]:
            for kind in args.kinds.split(","):
                if (kind == "ddp-whole" and world == 1) or (
                        kind.startswith("hsdp") and (world < 4 or world % 2)):
                    continue
                rows.append(_case(cluster, kind, world, args.mib, args.steps))
    finally:
        cluster.stop()
    base = {r["kind"]: r for r in rows if r["d"] == 1}
    print(f"state: {args.mib} MiB of parameters + AdamW ({3 * args.mib} MiB), "
          f"{args.steps} saves per rank, node 0 of RS k=1 m=1\n")
    print("| state | d | bytes per rank | vs d=1 | save stall | ingest (until copied) | "
          "held for the job |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        ref = base.get("fsdp2" if r["kind"].startswith("hsdp") else
                       "ddp" if r["kind"].startswith("ddp") else r["kind"])
        ratio = r["bytes_per_rank"] / ref["bytes_per_rank"] if ref else float("nan")
        print(f"| {r['kind']} | {r['d']} | {r['bytes_per_rank'] / MIB:.1f} MiB | {ratio:.2f}x "
              f"| {r['stall_ms']:.1f} ms | {r['ingest_ms']:.1f} ms | "
              f"{r['node_bytes'] / MIB:.0f} MiB |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
