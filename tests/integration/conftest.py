"""Fixtures that start real daemons and real trainer processes."""

import json
import os
import subprocess
import sys
import time
import uuid
from datetime import timedelta

import pytest

from snapshotd.common import protocol as p
from snapshotd.common.channel import Channel
from snapshotd.tools.localcluster import LocalCluster

TRAINER = os.path.join(os.path.dirname(__file__), "trainer.py")


@pytest.fixture
def cluster_factory(tmp_path):
    made = []

    def make(nodes=1, **kw):
        workdir = tmp_path / f"c{uuid.uuid4().hex[:6]}"
        cluster = LocalCluster(nodes, str(workdir), **kw)
        made.append(cluster)
        return cluster

    yield make
    for cluster in made:
        cluster.stop()


@pytest.fixture
def node(cluster_factory):
    """One real daemon (slot 0) with a 1 GiB budget."""
    cluster = cluster_factory(1, args=["--memory-limit", "1GiB", "--reap-interval", "0.2"])
    cluster.start()
    return cluster


def trainer(endpoint, *args, check=True, timeout=120, **popen):
    """Run the trainer script to completion; return its last JSON line."""
    out = subprocess.run([sys.executable, TRAINER, *args, "--endpoint", endpoint],
                         capture_output=True, text=True, timeout=timeout, **popen)
    if check and out.returncode not in (0, 3):
        raise AssertionError(f"trainer failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {"rc": out.returncode, "stderr": out.stderr}


def spawn_trainer(endpoint, *args):
    return subprocess.Popen([sys.executable, TRAINER, *args, "--endpoint", endpoint],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def status(spec):
    """The daemon's StatusReply."""
    ch = Channel(spec.control, timedelta(seconds=30))
    try:
        return ch.call(p.Status())
    finally:
        ch.close()


def wait_for(predicate, timeout=60.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def torchrun_standalone(script, nproc, endpoint, out, *args, timeout=180, run=None):
    """Run one ``torchrun --standalone`` job of ``script --size tiny`` on one node against the
    daemon at ``endpoint`` to the end (c10d rendezvous, up to 2 restarts); return its output.
    ``run``: the job's run identity (``SNAPSHOTD_RUN``): a launch that resumes an earlier one's
    snapshots names its run (``--standalone`` gives every launch a new run id)."""
    from pathlib import Path

    from snapshotd.tools.torchrun import kill_tree, torchrun_env

    env = torchrun_env(SNAPSHOTD_ENDPOINT=endpoint, **({"SNAPSHOTD_RUN": run} if run else {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "--max-restarts=2", "--monitor-interval=0.2",
           f"--log-dir={Path(out) / 'torchelastic'}", str(script), "--size", "tiny", "--out",
           str(out), *args]
    Path(out).mkdir(parents=True, exist_ok=True)
    with open(Path(out) / "torchrun.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            kill_tree(proc.pid)          # the workers run in sessions of their own
            proc.wait()
    text = (Path(out) / "torchrun.log").read_text()
    assert rc == 0, f"torchrun exited with {rc} (None: timed out):\n{text[-6000:]}"
    return text


def ask(spec, msg):
    """The reply of the daemon at ``spec`` to one control request."""
    ch = Channel(spec.control, timedelta(seconds=30))
    try:
        return ch.call(msg)
    finally:
        ch.close()


def list_versions(spec, job):
    return ask(spec, p.ListVersions(job)).versions


def run_ranks(script, world, per_node, *args, timeout=150):
    """Run ``world`` processes of ``script`` as the ranks of one gloo job on loopback,
    ``per_node`` to a node (RANK, WORLD_SIZE, LOCAL_RANK, ... set as torchrun would), to the
    end; assert that every rank exited 0, naming the ones that did not with their output."""
    from snapshotd.tools.localcluster import free_ports

    port = free_ports(1)[0]
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world),
                   LOCAL_RANK=str(rank % per_node), LOCAL_WORLD_SIZE=str(per_node),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   GLOO_SOCKET_IFNAME="lo")
        procs.append(subprocess.Popen([sys.executable, str(script), *args], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=timeout)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    failed = [(r, p.returncode, outputs[r][-3000:]) for r, p in enumerate(procs)
              if p.returncode != 0]
    assert not failed, failed


def where(spec, job):
    """What the daemon at ``spec`` heard the other nodes hold of ``job`` (``Where``)."""
    return ask(spec, p.Where(job)).nodes
