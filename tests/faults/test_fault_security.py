"""Attacks: peers without the cluster key, another local user, another job.

- A peer without the cluster key (plain TCP), one with its own key pair, one that presents the
  cluster's public key without its secret, and a whole daemon started with another key can
  neither read nor write: requests get no answer, nothing stored or protected changes, and the
  cluster goes on protecting and rebuilding.
- Another local user can open neither the control socket nor the segment directory or files.
- A client of job A cannot read or drop job B's snapshots (``--job-isolation``), an operator
  with the daemon's admin token can.
"""

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time

import pytest
import zmq
import zmq.auth
from harness import (
    LONG,
    RESULTS,
    all_protected,
    call,
    make_cluster,
    peer_socket,
    reproduce,
    restore_all,
    save_on,
    status,
    versions,
    wait_for,
)

from snapshotd.cluster import peerproto as pp
from snapshotd.cluster.protection import frames_checksum
from snapshotd.common import protocol as p
from snapshotd.ops.ctl import main as ctl

pytest_plugins = ["faultfixtures"]

pytestmark = pytest.mark.timeout(600 if LONG else 120)

NODES = 3
ARGS = ["--memory-limit", "512MiB", "--heartbeat-interval", "0.2", "--peer-timeout", "1.5",
        "--encode-timeout", "3"]


@pytest.fixture(scope="module")
def guarded(clusters, zygote, cluster_keys):
    cluster = clusters(NODES, k=2, m=1, keys=cluster_keys, args=ARGS)
    cluster.start()
    save_on(zygote, cluster, "keep", 1, 2, 1)
    wait_for(lambda: all_protected(cluster, "keep", 2), 20, "step 2 protected")
    return {"cluster": cluster, "zygote": zygote, "keys": cluster_keys}


def snapshot_of(cluster):
    return [[(v.job, v.rank, v.step, v.state, v.committed_at) for v in status(s).versions]
            for s in cluster.specs]


def attack_requests():
    """What an attacker would send: read data and parity, write data, parity, protection."""
    body = [b"x" * 64]
    info = pp.FragInfo(1, 0, 64, "{}")
    return [pp.Inventory(0), pp.GetData("keep", 2, 0), pp.GetParity("keep", 2, 0, 0),
            (pp.PutData("keep", 3, 0, info, frames_checksum(body)), body),
            (pp.PutParity("keep", 2, 0, 1, 64, (info,), frames_checksum(body)), body),
            pp.Protected("keep", 9, 0), pp.Protected("keep", 9, 1), pp.Ping(0, "snapshotd")]


def send_all(sock, reads_only=False):
    """Queue every attack request (or only the reads) on ``sock``."""
    for item in attack_requests():
        if reads_only and (isinstance(item, tuple) or isinstance(item, pp.Protected)):
            continue
        msg, body = item if isinstance(item, tuple) else (item, [])
        try:
            sock.send_multipart([p.encode(msg, 1), *body], zmq.NOBLOCK)
        except zmq.Again:
            pass                                        # not even connected: nothing sent


def count_answers(socks, wait_s=2.0):
    """How many answers each socket got within ``wait_s`` (all waited on together)."""
    got = {key: 0 for key in socks}
    poller = zmq.Poller()
    for sock in socks.values():
        poller.register(sock, zmq.POLLIN)
    by_sock = {sock: key for key, sock in socks.items()}
    deadline = time.monotonic() + wait_s
    while (left := deadline - time.monotonic()) > 0:
        for sock, _ in poller.poll(int(left * 1000) + 1):
            sock.recv_multipart()
            got[by_sock[sock]] += 1
    return got


def attackers(keys_dir, tmp):
    """name -> socket factory for each kind of attacker."""
    other = os.path.join(tmp, "other")
    ctl(["keygen", other])
    cluster_public, _ = zmq.auth.load_certificate(os.path.join(keys_dir, "cluster.key"))
    own_public, own_secret = zmq.auth.load_certificate(os.path.join(other,
                                                                    "cluster.key_secret"))
    _, random_secret = zmq.curve_keypair()
    return {
        "no CURVE at all": dict(),
        "its own key pair": dict(public=own_public, secret=own_secret,
                                 server_key=cluster_public),
        "the cluster public key, no secret": dict(public=cluster_public, secret=random_secret,
                                                  server_key=cluster_public),
    }


def test_peers_without_the_cluster_key_can_neither_read_nor_write(guarded, tmp_path, request):
    cluster, keys = guarded["cluster"], guarded["keys"]
    before = snapshot_of(cluster)
    ctx = zmq.Context()
    try:
        socks = {(name, spec.slot): peer_socket(spec.listen, context=ctx, **kw)
                 for name, kw in attackers(keys, str(tmp_path)).items()
                 for spec in cluster.specs}
        time.sleep(0.5)                                 # let the handshakes fail
        for sock in socks.values():
            send_all(sock)
        results = count_answers(socks)
        # The key holder's same requests are answered (they are well-formed).
        sock = peer_socket(cluster.specs[0].listen, context=ctx, keys=keys)
        time.sleep(0.3)
        send_all(sock, reads_only=True)
        legit = count_answers({"legit": sock})["legit"]
        for s in [*socks.values(), sock]:
            s.close(0)
    finally:
        ctx.term()
    after = snapshot_of(cluster)
    problems = [f"{name} got {n} answers from node {slot}"
                for (name, slot), n in results.items() if n]
    if legit < 3:
        problems.append(f"the cluster key's own requests got only {legit} answers")
    if after != before:
        problems.append(f"stored versions changed: {before} -> {after}")
    lost, _, probs, _ = restore_all(guarded["zygote"], cluster, "keep", 1,
                                    {(s, s): 2 for s in range(NODES)})
    problems += probs
    RESULTS.tally("attack: peer without the cluster key (3 kinds)",
                  "plain TCP, an own CURVE key pair, the cluster public key with a wrong "
                  "secret; each sends reads and writes to every node", reproduce(
                      request.node.nodeid), runs=len(results),
                  survived=sum(1 for n in results.values() if n == 0), lost=lost,
                  failure="; ".join(problems))
    assert not problems, problems


@pytest.mark.parametrize("rogue", ["other-key", "insecure"])
def test_daemon_with_another_key_joins_nothing(guarded, tmp_path, rogue, request):
    """A whole daemon in slot 2 started with another key (or none): it cannot rebuild the
    slot's data, the others do not use it, and nothing they hold changes. With the right key
    the same slot is rebuilt bit for bit."""
    cluster, zyg = guarded["cluster"], guarded["zygote"]
    other = str(tmp_path / "other")
    ctl(["keygen", other])
    cluster.slot_args[2] = ["--keys", other] if rogue == "other-key" else ["--insecure"]
    if rogue == "insecure":
        cluster.keys, saved = None, cluster.keys
    try:
        cluster.kill(2)
        cluster.replace(2)                                  # empty, wrong key
    finally:
        if rogue == "insecure":
            cluster.keys = saved
    problems = []
    time.sleep(2.0)                                         # > peer timeout
    before = snapshot_of(cluster)[:2]
    out = zyg.run("restore", cluster.specs[2].control, "--job", "keep", "--rank", 2)
    if out.get("step") is not None:
        problems.append(f"the rogue node restored data it must not have: {out}")
    for spec in cluster.specs[:2]:
        if 2 not in status(spec).peers_down:
            problems.append(f"node {spec.slot} counts the rogue as up")
    save_on(zyg, cluster, "keep", 3, 3, 1, slots=[0, 1])
    time.sleep(1.0)
    if any(v.state == "protected" for s in cluster.specs[:2] for v in versions(s, "keep")
           if v.step == 3):
        problems.append("a step was 'protected' through the rogue")
    after = snapshot_of(cluster)[:2]
    if [[v for v in node if v[2] == 2] for node in after] != [
            [v for v in node if v[2] == 2] for node in before]:
        problems.append(f"the rogue changed what the others hold: {before} -> {after}")
    cluster.slot_args[2] = []
    cluster.kill(2)
    cluster.replace(2)                                      # the right key: rebuilt
    lost, _, probs, _ = restore_all(zyg, cluster, "keep", 1, {(2, 2): 2})
    problems += probs
    for spec in cluster.specs[:2]:
        call(spec, p.Drop("keep", step=3))
    RESULTS.tally(f"attack: daemon with {'another key' if rogue == 'other-key' else 'no key'}",
                  "a daemon in a cluster slot with the wrong key (or --insecure) tries to "
                  "rebuild, gets data chunks and protects nothing", reproduce(
                      request.node.nodeid), runs=1, survived=int(not problems), lost=lost,
                  failure="; ".join(problems))
    assert not problems, problems


# --------------------------------------------------------------------------- local users

USER = "snapfault"
PROBE = r"""
import os, socket, sys, json
out = {}
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(sys.argv[1]); out["socket"] = "connected"
except OSError as e:
    out["socket"] = type(e).__name__
for what, fn in (("list_shm", lambda: os.listdir(sys.argv[2])),
                 ("open_segment", lambda: open(sys.argv[3], "rb").read(16)),
                 ("write_segment", lambda: open(sys.argv[3], "r+b").write(b"x"))):
    try:
        fn(); out[what] = "allowed"
    except OSError as e:
        out[what] = type(e).__name__
print(json.dumps(out))
"""


def make_user():
    """Create the throwaway user; return (runner, created)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create a throwaway user and run as it")
    runner = shutil.which("runuser") or shutil.which("su")
    if runner is None:
        pytest.skip("neither runuser nor su is available")
    try:
        pwd.getpwnam(USER)
        return runner, False
    except KeyError:
        pass
    made = subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", USER],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"useradd is not permitted here: {made.stderr.strip()}")
    return runner, True


def test_another_local_user_cannot_reach_socket_or_segments(zygote, request):
    import json

    runner, created = make_user()
    python = shutil.which("python3", path="/usr/bin:/bin") or "/usr/bin/python3"
    root = tempfile.mkdtemp(prefix="snapfault-")
    os.chmod(root, 0o755)                    # everything but the daemon's own files is open
    cluster = make_cluster(root, 1, args=["--memory-limit", "64MiB"])
    try:
        cluster.start()
        spec = cluster.specs[0]
        assert zygote.run("save", spec.control, "--job", "secret", "--steps", 1, 1)["done"]
        for path in (os.path.dirname(spec.control[6:]),):
            os.chmod(path, 0o755)            # only the socket file's own mode protects it
        segment = os.path.join(spec.shm_dir, sorted(f for f in os.listdir(spec.shm_dir)
                                                    if f.endswith(".bin"))[0])
        cmd = [python, "-c", PROBE, spec.control[6:], spec.shm_dir, segment]
        if runner.endswith("runuser"):
            argv = [runner, "-u", USER, "--", *cmd]
        else:
            argv = [runner, "-s", "/bin/sh", USER, "-c", " ".join(f"'{c}'" for c in cmd)]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd="/")
        assert out.returncode == 0, out.stderr
        seen = json.loads(out.stdout.strip().splitlines()[-1])
        # Sanity: the same probe as root reaches everything, so the refusals are the modes'.
        mine = json.loads(subprocess.run(cmd, capture_output=True, text=True).stdout)
        assert mine["socket"] == "connected" and mine["open_segment"] == "allowed"
        assert seen == {"socket": "PermissionError", "list_shm": "PermissionError",
                        "open_segment": "PermissionError", "write_segment": "PermissionError"}
        assert os.stat(spec.control[6:]).st_mode & 0o077 == 0
        RESULTS.tally("attack: another local user", "a throwaway user tries to connect to the "
                      "control socket and to list, read and write the segments",
                      reproduce(request.node.nodeid), runs=4, survived=4)
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
        if created:
            subprocess.run(["userdel", USER], capture_output=True)


# --------------------------------------------------------------------------- jobs

#: ``--job-isolation`` makes the daemon bind a job to the token its first writer presents
#: (``SNAPSHOTD_JOB_TOKEN``); requests naming the job without that token are refused with
#: ``forbidden``; ``<shm-dir>/admin.token`` (0600) reaches every job.
ISOLATION_ARGS = ["--job-isolation"]
TOKEN_ENV = "SNAPSHOTD_JOB_TOKEN"


def test_client_of_job_a_cannot_read_or_drop_job_b(clusters, zygote):
    from snapshotd.common.channel import DaemonError

    cluster = clusters(1, args=["--memory-limit", "128MiB", *ISOLATION_ARGS])
    cluster.start()
    spec = cluster.specs[0]
    out = zygote.run("save", spec.control, "--job", "b", "--steps", 1, 2,
                     env={TOKEN_ENV: "token-of-b"})
    assert out.get("done"), out
    refused = []
    for msg in (p.Open("b", 0, os.getpid()), p.Drop("b"), p.Drop("b", newer_than=0),
                p.Verify("b"), p.ListVersions("b")):
        try:
            reply = call(spec, msg)                  # a client of job A: no token of b's
            if isinstance(reply, p.OpenReply):
                call(spec, p.Release(reply.lease))
        except DaemonError as exc:
            refused.append(exc.code == "forbidden")
        else:
            refused.append(False)
    assert all(refused), refused
    # A client of job A that knows job b's name but not its token: refused too.
    for msg in (p.Open("b", 0, os.getpid(), token="token-of-a"), p.Drop("b", token="token-of-a"),
                p.Alloc("b", 0, 9, 4096, os.getpid(), token="token-of-a")):
        with pytest.raises(DaemonError) as err:
            call(spec, msg)
        assert err.value.code == "forbidden" and "token" in str(err.value), err.value
    out = zygote.run("restore", spec.control, "--job", "b", env={TOKEN_ENV: "token-of-b"})
    assert out == {"step": 2, "exact": True, "s": out.get("s")}
    # Nothing of b's was lost to the refused requests; the operator's admin token reaches it.
    admin = os.path.join(spec.shm_dir, "admin.token")
    assert os.stat(admin).st_mode & 0o777 == 0o600
    ls = subprocess.run([sys.executable, "-m", "snapshotd.ops.ctl", "--control", spec.control,
                         "--json", "--admin-token-file", admin, "ls", "--job", "b"],
                        capture_output=True, text=True, timeout=60)
    assert ls.returncode == 0, ls.stderr
    assert sorted(v["step"] for v in json.loads(ls.stdout)["versions"]) == [1, 2]
    denied = subprocess.run([sys.executable, "-m", "snapshotd.ops.ctl", "--control", spec.control,
                             "drop", "--job", "b"], capture_output=True, text=True, timeout=60,
                            env={k: v for k, v in os.environ.items() if k != TOKEN_ENV})
    assert denied.returncode == 2 and "forbidden" in denied.stderr, denied.stderr
    # Bound across a daemon restart (the binding lives in the manifests).
    cluster.kill(0)
    cluster.restart(0)
    with pytest.raises(DaemonError) as err:
        call(spec, p.Open("b", 0, os.getpid(), token="token-of-a"))
    assert err.value.code == "forbidden"
    out = zygote.run("restore", spec.control, "--job", "b", env={TOKEN_ENV: "token-of-b"})
    assert out == {"step": 2, "exact": True, "s": out.get("s")}
