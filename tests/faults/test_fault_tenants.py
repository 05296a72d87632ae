"""Several jobs and tenants on one cluster (issue 24, findings 1 and 2), with real daemons and
real clients.

- Finding 1: two unrelated 1-rank jobs with the same name on two nodes restored each other's
  state (the survey took the newest layout held anywhere in the cluster). A job is its name
  *and* its run identity (``TORCHELASTIC_RUN_ID``, or ``SNAPSHOTD_RUN``): a restore takes only
  versions of its own run, a torchrun restart (same run id, ranks moved to other nodes) still
  restores, and there is no default job name.
- Finding 2: ``--job-isolation`` stopped at the node: a client of node 0 holding another
  tenant's token read the victim's step from node 1 (``GetVersion``), dropped all of it
  (``DropNewer``), listed it (``Where``), squatted on its name on its own node, and ``Status``
  without a token listed every job. The binding now holds on every node.
"""

import functools
import hashlib
import os
import time
import uuid

import pytest
import torch
from harness import BASE_SEED, RESULTS, call, peer_call, reproduce, wait_for

from snapshotd.cluster import peerproto as pp
from snapshotd.common import protocol as p
from snapshotd.common.channel import DaemonError
from snapshotd.tools.localcluster import free_ports

pytest_plugins = ["faultfixtures"]

pytestmark = pytest.mark.timeout(120)

ARGS = ["--insecure", "--memory-limit", "256MiB", "--heartbeat-interval", "0.2",
        "--peer-timeout", "1.5"]


def row(name: str, description: str):
    """Record the test as a campaign row (docs/reliability.md): one run, survived when it
    passed."""
    def wrap(test):
        @functools.wraps(test)
        def run(*args, **kwargs):
            started, ok = time.monotonic(), False
            try:
                test(*args, **kwargs)
                ok = True
            finally:
                nodeid = f"tests/faults/test_fault_tenants.py::{test.__name__}"
                RESULTS.tally(name, description, reproduce(nodeid), runs=1, survived=int(ok),
                              lost=int(not ok), stall=time.monotonic() - started,
                              seed=BASE_SEED)
        return run
    return wrap


@pytest.fixture
def one_rank_group():
    """A 1-rank gloo job in this process: ``TrainingState.restore`` surveys the cluster."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_ports(1)[0]}",
                            rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def where(spec, job, token="", **run):
    return call(spec, p.Where(job, token=token, **run)).nodes


@row("tenants: two jobs of one name",
     "2 daemons, two unrelated 1-rank jobs with the same name on two nodes (other runs), "
     "TrainingState.restore surveying the cluster; no job name: refused with a message; a "
     "torchrun restart of one run (ranks moved to other nodes) still restores: no job ever "
     "restores the other's bytes")
def test_two_jobs_of_one_name_never_restore_each_others_state(clusters, one_rank_group,
                                                                 monkeypatch):
    from snapshotd_client import SnapshotClient, SnapshotError, TrainingState

    cluster = clusters(2, k=1, m=1, args=ARGS)
    cluster.start()
    node0, node1 = cluster.specs
    job = "same-" + uuid.uuid4().hex[:6]
    for name in ("SNAPSHOTD_JOB", "SNAPSHOTD_RUN", "TORCHELASTIC_RUN_ID", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)

    # Job A (torchrun run id run-a) on node 0 saves step 1002 of a model of ones.
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "run-a")
    model = torch.nn.Linear(8, 8)
    with torch.no_grad():
        for prm in model.parameters():
            prm.fill_(1.0)
    with SnapshotClient(node0.control, job=job, rank=0) as client:
        TrainingState(model, rng=False).save(client, 1002).result()
    wait_for(lambda: any(1002 in n.steps for n in where(node1, job)), 20,
             "node 1 hears that node 0 holds step 1002")

    # Job B, unrelated (run id run-b), same name, on node 1: nothing of its own to restore.
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "run-b")
    other = torch.nn.Linear(8, 8)
    with torch.no_grad():
        for prm in other.parameters():
            prm.fill_(0.0)
    with SnapshotClient(node1.control, job=job, rank=0) as client:
        assert TrainingState(other, rng=False).restore(client) is None
        assert client.last_restore is None
    assert all(bool((prm == 0).all()) for prm in other.parameters()), "job A's weights"
    # And job B's start from scratch dropped nothing of job A's on node 0.
    assert [v.step for v in call(node0, p.ListVersions(job)).versions] == [1002]

    # A torchrun restart of job A (same run id) with its rank now on node 1 restores 1002,
    # read from node 0 (only versions of run-a taken).
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "run-a")
    back = torch.nn.Linear(8, 8)
    with SnapshotClient(node1.control, rank=0) as client:        # named by the run id
        assert client.job == "run-a"
    with SnapshotClient(node1.control, job=job, rank=0) as client:
        assert TrainingState(back, rng=False).restore(client) == 1002
        assert client.last_restore.bytes_from_peers > 0
    assert all(bool((prm == 1).all()) for prm in back.parameters())

    # No silent default name: the client says how to name the job.
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    with pytest.raises(SnapshotError, match="SNAPSHOTD_JOB"):
        SnapshotClient(node0.control, rank=0)


TOKEN_VICTIM, TOKEN_ATTACKER = "token-of-the-victim", "token-of-the-attacker"


@row("tenants: two tenants on one cluster, --job-isolation",
     "2 daemons with --job-isolation: a client holding another tenant's token reads, drops, "
     "lists (Where, Status) and squats on the victim's job through either node (GetVersion, "
     "DropNewer between daemons): every request refused (forbidden), the victim's versions "
     "intact, restored bit for bit")
def test_job_isolation_holds_on_every_node_of_the_cluster(clusters, monkeypatch):
    from snapshotd_client import SnapshotClient

    for name in ("SNAPSHOTD_RUN", "TORCHELASTIC_RUN_ID", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    cluster = clusters(2, k=1, m=1, args=[*ARGS, "--job-isolation", "--keep", "3"])
    cluster.start()
    node0, node1 = cluster.specs
    job = "victim-" + uuid.uuid4().hex[:6]
    with SnapshotClient(node1.control, job=job, rank=0, token=TOKEN_VICTIM) as client:
        for step in (1, 2):
            client.save(step, {"w": torch.full((256,), float(step))}).result()
    wait_for(lambda: any(2 in n.steps for n in where(node0, job, TOKEN_VICTIM)), 20,
             "node 0 hears that node 1 holds step 2")

    def refused(spec, msg):
        with pytest.raises(DaemonError) as err:
            reply = call(spec, msg)
            if isinstance(reply, p.OpenReply):
                call(spec, p.Release(reply.lease))
        return err.value.code == "forbidden"

    pid = os.getpid()
    # Node 0 never held the job: the binding that node 1's reports carry refuses the
    # attacker's token there, for every request naming the job.
    attacks = [p.Where(job, token=TOKEN_ATTACKER),
               p.Open(job, 0, pid, 2, token=TOKEN_ATTACKER, remote=True),
               p.Drop(job, 0, newer_than=0, token=TOKEN_ATTACKER, everywhere=True),
               p.ListVersions(job, token=TOKEN_ATTACKER),
               p.Alloc(job, 0, 9, 4096, pid, token=TOKEN_ATTACKER)]       # squatting the name
    assert [refused(node0, msg) for msg in attacks] == [True] * len(attacks)
    # The holder checks the binding itself, whatever the requesting daemon let through.
    digest = hashlib.sha256(TOKEN_ATTACKER.encode()).hexdigest()
    for msg in (pp.GetVersion(job, 0, 2, owner=digest), pp.DropNewer(job, 0, 0, owner=digest)):
        reply, frames = peer_call(node1, msg)
        assert isinstance(reply, p.Error) and reply.code == "forbidden" and not frames, reply
    assert sorted(v.step for v in call(node1, p.ListVersions(job, token=TOKEN_VICTIM))
                  .versions) == [1, 2]
    # Status lists only the jobs of the token it is given (none without one).
    for spec in (node0, node1):
        assert call(spec, p.Status()).versions == ()
        assert call(spec, p.Status(token=TOKEN_ATTACKER)).versions == ()
    assert {v.job for v in call(node1, p.Status(token=TOKEN_VICTIM)).versions} == {job}
    # The victim's own remote read through node 0 works, and its restore finds its own step.
    lease = call(node0, p.Open(job, 0, pid, 2, token=TOKEN_VICTIM, remote=True))
    call(node0, p.Release(lease.lease))
    assert lease.tier == "peer" and lease.step == 2
    with SnapshotClient(node1.control, job=job, rank=0, token=TOKEN_VICTIM) as client:
        step, state = client.restore()
    assert step == 2 and bool((state["w"] == 2.0).all())


def _admin(spec):
    with open(os.path.join(spec.shm_dir, "admin.token")) as fh:
        return fh.read().strip()


@pytest.mark.parametrize("attack", ["read", "squat"])
def test_regression_a_tenant_races_the_replacements_rebuild(clusters, monkeypatch, attack):
    """Second review of issue 24, findings 1-2: two tenants on 3 nodes with --job-isolation,
    node 1 lost and replaced; the attacker asked the replacement for the victim's job from
    the moment it answered. Before it heard any report or rebuilt anything it knew no
    binding: ``Open`` leased the victim's rebuilt rank (4/4), and an ``Alloc`` bound the job
    to the attacker, whose binding then owned the victim's rebuilt versions (4/4). Requests
    naming a job wait for the rebuild; a rebuilt version is never installed under another
    token's binding."""
    import threading
    from datetime import timedelta

    from snapshotd.common.channel import Channel, SnapshotError
    from snapshotd.tools.localcluster import DaemonProcess
    from snapshotd_client import SnapshotClient

    victim, attacker = "victim-token", "attacker-token"
    for name in ("SNAPSHOTD_RUN", "TORCHELASTIC_RUN_ID", "SNAPSHOTD_JOB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "3")
    cluster = clusters(3, k=2, m=1, args=[*ARGS, "--job-isolation"])
    cluster.start()
    n = cluster.specs
    for job, tok, base in (("jv", victim, 1000.0), ("ja", attacker, 5000.0)):
        for r in range(3):
            with SnapshotClient(n[r].control, job=job, rank=r, token=tok, run=job) as c:
                for step in (1, 2):
                    c.save(step, {"w": torch.full((4096,), base + 10 * r + step)}).result()

    def protected():
        held = [v for s in n for v in call(s, p.Status(token=_admin(s))).versions]
        return sum(v.step == 2 and v.state == "protected" for v in held) == 6

    wait_for(protected, 40, "step 2 protected everywhere")
    cluster.kill(1)
    import shutil
    shutil.rmtree(n[1].shm_dir, ignore_errors=True)
    wait_for(lambda: 1 in call(n[0], p.Status()).peers_down, 10, "node 1 down")
    pid = os.getpid()
    msg = (p.Open("jv", 1, pid, token=attacker, run="jv") if attack == "read" else
           p.Alloc("jv", 1, 50, 4096, pid, token=attacker, run="jv"))
    answer: list = []

    def hammer():
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and not answer:
            ch = Channel(n[1].control, timedelta(seconds=30))
            try:
                answer.append(ch.call(msg))
            except DaemonError as exc:
                answer.append(exc)
            except SnapshotError:
                time.sleep(0.005)                      # not listening yet
            finally:
                ch.close()

    thread = threading.Thread(target=hammer)
    cluster.daemons[1] = DaemonProcess(n[1], cluster.daemon_args(1)).start()
    thread.start()
    thread.join(60)
    assert answer and isinstance(answer[0], DaemonError) and answer[0].code == "forbidden", \
        answer
    cluster.daemons[1].wait_ready(30)
    wait_for(lambda: not call(n[1], p.Status()).rebuilding, 30, "rebuilt")
    # The victim's rank 1 came back to the victim, and only to the victim.
    with SnapshotClient(n[1].control, job="jv", rank=1, token=victim, run="jv") as c:
        step, state = c.restore()
    assert step == 2 and torch.equal(state["w"], torch.full((4096,), 1012.0))
    with pytest.raises(DaemonError) as err:
        call(n[1], p.Open("jv", 1, pid, token=attacker, run="jv"))
    assert err.value.code == "forbidden"
