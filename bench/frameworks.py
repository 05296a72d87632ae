"""Training overhead in the frameworks (issue 26): the Hugging Face Trainer and Lightning.

``examples/train_hf.py`` and ``examples/train_lightning.py`` under torchrun (2 ranks, DDP on
gloo, a real daemon), each three ways, alternating: without snapshotd, with a snapshot every
step (``SnapshotdCallback``), and with the framework's own checkpoint every step into
``/dev/shm`` (Trainer ``save_strategy="steps", save_steps=1``; Lightning
``ModelCheckpoint(every_n_train_steps=1)``; the newest checkpoint kept, as by default in
Lightning). Steps/s is measured from rank 0's per-step log after a warm-up (a fifth of the
steps), so start-up and imports are not counted.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Any

from snapshotd.tools.localcluster import LocalCluster, free_ports

from .node import stats

__all__ = ["frameworks_case"]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {"hf": "train_hf.py", "lightning": "train_lightning.py"}
BATCH = 4          # per rank, in both examples


def _run(script: str, out: str, steps: int, mode: str, endpoint: str, nproc: int) -> float:
    (port,) = free_ports(1)
    args = ["--out", out, "--epochs", "1", "--samples", str(steps * BATCH * nproc),
            "--job", f"bench-{os.path.basename(out)}"]
    shm = None
    if mode != "snapshot":
        args.append("--no-snapshot")
    if mode == "framework":
        shm = tempfile.mkdtemp(prefix="snapbench-fwckpt-", dir="/dev/shm")
        args += ["--framework-checkpoint", shm]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", f"--master-port={port}",
           os.path.join(ROOT, "examples", script), *args]
    env = {**os.environ, "SNAPSHOTD_ENDPOINT": endpoint, "OMP_NUM_THREADS": "1",
           "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "HF_HUB_OFFLINE": "1"}
    try:
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, timeout=900)
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"{script} {mode}: {e.stderr.decode(errors='replace')[-2000:]}") \
            from e
    finally:
        if shm:
            shutil.rmtree(shm, ignore_errors=True)
    with open(os.path.join(out, "loss.jsonl")) as fh:
        times = [r["time"] for r in map(json.loads, fh) if r["rank"] == 0]
    warm = len(times) // 5
    return (len(times) - 1 - warm) / (times[-1] - times[warm])


def frameworks_case(steps: int, repeats: int = 1, nproc: int = 2,
                    frameworks: tuple[str, ...] = ("hf", "lightning")) -> list[dict[str, Any]]:
    """One row per framework: steps/s without snapshotd, with a snapshot every step, and with
    the framework's own checkpoint every step (alternating runs, same daemon)."""
    workdir = tempfile.mkdtemp(prefix="snapbench-fw-")
    cluster = LocalCluster(1, workdir, args=["--memory-limit", "4GiB", "--log-level", "WARNING"])
    cluster.start()
    rows = []
    try:
        for fw in frameworks:
            runs: dict[str, list[float]] = {"none": [], "snapshot": [], "framework": []}
            for i in range(repeats):
                for mode in runs:
                    runs[mode].append(_run(SCRIPTS[fw], os.path.join(workdir, f"{fw}-{mode}{i}"),
                                           steps, mode, cluster.specs[0].control, nproc))
            rows.append({"framework": fw, "script": SCRIPTS[fw], "steps": steps, "nproc": nproc,
                         "repeats": repeats, "steps_per_s_none": stats(runs["none"]),
                         "steps_per_s_snapshot": stats(runs["snapshot"]),
                         "steps_per_s_framework": stats(runs["framework"])})
    finally:
        cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return rows
