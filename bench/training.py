"""Training overhead: steps/s of examples/train.py under torchrun, snapshot every step vs none.

Both runs use the same model, data and seeds on the same machine, alternating, with a real
daemon for the snapshot runs. Steps/s is measured from rank 0's per-step log after a warm-up.

``python -m bench.training --script train_fsdp.py [--nproc 2] [--daemon-core]``: the same for
another example (the sharded one: FSDP2, ``--state-dicts dcp`` by default), printed as a row.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from typing import Any

from snapshotd.tools.localcluster import LocalCluster, free_ports

from .node import stats

__all__ = ["training_case"]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(out: str, steps: int, snapshot: bool, endpoint: str, nproc: int, size: str,
         cores: list[int] | None = None, copy_cpus: list[int] | None = None,
         script: str = "train.py", script_args: tuple[str, ...] = ()) -> float:
    (port,) = free_ports(1)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", f"--master-port={port}",
           os.path.join(ROOT, "examples", script), "--steps", str(steps), "--out", out,
           "--size", size, "--job", f"bench-{os.path.basename(out)}",
           "--snapshot" if snapshot else "--no-snapshot", *script_args]
    env = {**os.environ, "SNAPSHOTD_ENDPOINT": endpoint, "OMP_NUM_THREADS": "1"}
    env.pop("SNAPSHOTD_COPY_CPUS", None)
    if cores and not copy_cpus:  # the daemon is pinned: the copy thread would follow it
        env["SNAPSHOTD_COPY_CPUS"] = "any"
    # copy_cpus (the daemon's core): nothing set, the client's default moves it there
    pin = (lambda: os.sched_setaffinity(0, cores)) if cores else None   # inherited by workers
    # The copy thread may leave the trainer's core for the daemon's (SNAPSHOTD_COPY_CPUS): a
    # process pinned to {0} can still move one of its threads to {1}.
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                   timeout=900, preexec_fn=pin)
    with open(os.path.join(out, "loss.jsonl")) as fh:
        times = [json.loads(line)["time"] for line in fh]
    warm = len(times) // 5
    return (len(times) - 1 - warm) / (times[-1] - times[warm])


def training_case(steps: int, repeats: int = 2, nproc: int = 2, size: str = "small",
                  daemon_core: bool = False, copy_on_daemon_core: bool = False,
                  script: str = "train.py", script_args: tuple[str, ...] = ()
                  ) -> dict[str, Any]:
    """Steps/s with and without a snapshot every step, alternating runs.

    ``daemon_core``: the shape of a real node (a core per trainer and one left to the
    daemon): the ``nproc`` trainers are pinned to cores ``0..nproc-1`` and the daemon to core
    ``nproc`` (needs ``nproc + 1`` cores); else nothing is pinned. ``copy_on_daemon_core``:
    the trainers' copy threads go to the daemon's core too (``SNAPSHOTD_COPY_CPUS``)."""
    workdir = tempfile.mkdtemp(prefix="snapbench-train-")
    cluster = LocalCluster(1, workdir, args=["--memory-limit", "4GiB", "--log-level", "WARNING"])
    cluster.start()
    cores = None
    if daemon_core and len(os.sched_getaffinity(0)) < nproc + 1:
        daemon_core = False                    # too few cores: nothing pinned (reported)
    if daemon_core:
        cores = sorted(os.sched_getaffinity(0))
        cores, daemon = cores[:nproc], cores[nproc]
        for pid in _tree(cluster.daemons[0].pid):
            os.sched_setaffinity(pid, {daemon})
    try:
        with_snap, without = [], []
        for i in range(repeats):
            # With the daemon pinned, the copy thread follows it (the client's default);
            # without copy_on_daemon_core it is kept on the trainer's core (see _run).
            copy = [daemon] if cores and copy_on_daemon_core else None
            without.append(_run(os.path.join(workdir, f"none{i}"), steps, False,
                                cluster.specs[0].control, nproc, size, cores, copy,
                                script, script_args))
            with_snap.append(_run(os.path.join(workdir, f"snap{i}"), steps, True,
                                  cluster.specs[0].control, nproc, size, cores, copy,
                                  script, script_args))
    finally:
        cluster.stop()
    return {"steps": steps, "nproc": nproc, "size": size, "daemon_core": daemon_core,
            "script": " ".join([script, *script_args]),
            "copy_on_daemon_core": bool(cores and copy_on_daemon_core),
            "steps_per_s_snapshot": stats(with_snap), "steps_per_s_none": stats(without)}


def _tree(pid: int) -> list[int]:
    """``pid`` and its threads (affinity is per thread on Linux)."""
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except FileNotFoundError:
        return [pid]


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--script", default="train_fsdp.py", help="an example in examples/")
    ap.add_argument("--args", default="--state-dicts dcp",
                    help="extra arguments of the script (default: DCP state dicts)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--size", default="small")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--daemon-core", action="store_true",
                    help="trainers pinned to a core each, the daemon to the next one")
    ap.add_argument("--copy-on-daemon-core", action="store_true",
                    help="with --daemon-core: the trainers' copy threads on the daemon's core "
                         "too (SNAPSHOTD_COPY_CPUS)")
    args = ap.parse_args(argv)
    r = training_case(args.steps, args.repeats, args.nproc, args.size, args.daemon_core,
                      args.copy_on_daemon_core, script=args.script,
                      script_args=tuple(args.args.split()))
    snap, none = r["steps_per_s_snapshot"], r["steps_per_s_none"]
    cores = (f"{args.nproc} + 1 for the daemon" if r["daemon_core"] else "shared")
    if r["copy_on_daemon_core"]:
        cores += " and the copy thread"
    print("| run | ranks | cores | model | steps/s with snapshots | steps/s without | slowdown |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print(f"| {args.script} {args.args}, {args.steps} steps | {args.nproc} | {cores} | "
          f"{args.size} | {snap['median']:.2f} ({snap['min']:.2f}-{snap['max']:.2f}) | "
          f"{none['median']:.2f} ({none['min']:.2f}-{none['max']:.2f}) | "
          f"{100 * (1 - snap['median'] / none['median']):.1f}% |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
