"""Regression tests for bugs the fault campaign found, one per bug, named after it.

Each is marked ``xfail(strict=True)`` until the daemon is fixed; the fix removes the mark.
Each reproduces the state a random fault run reached, deterministically.
"""

import glob
import json
import os
import time

import pytest
from harness import (
    FAST,
    FAST_SETTLE_S,
    all_protected,
    call,
    log_tail,
    protected,
    restore_all,
    save_on,
    status,
    wait_for,
)

from snapshotd.common import protocol as p

pytest_plugins = ["faultfixtures"]

pytestmark = pytest.mark.timeout(120)

RESUME_S = FAST_SETTLE_S


def hard_stop(cluster):
    """SIGKILL a cluster whose daemons may be stuck in peer calls (a graceful stop would wait
    for them: test_regression_hardcoded_60s_peer_timeout_stalls_protection)."""
    import signal

    for daemon in cluster.daemons.values():
        if daemon.alive():
            daemon.kill(signal.SIGKILL)


def test_regression_protected_state_lost_on_restart(clusters, zygote):
    cluster = clusters(3, k=2, m=1, args=FAST)
    cluster.start()
    save_on(zygote, cluster, "job", 1, 1, 1)
    wait_for(lambda: all_protected(cluster, "job", 1), RESUME_S, "step 1 protected")
    cluster.kill(0)
    cluster.restart(0)                       # same memory: step 1 is adopted
    # The group still holds step 1's parity; the node should say so again.
    wait_for(lambda: protected(cluster.specs[0], "job", 1), 1.5 + 2 + 1.5,
             "step 1 protected again on the restarted node")


def test_regression_partial_rebuild_not_resumed(clusters, zygote):
    cluster = clusters(3, k=2, m=1, args=FAST)
    cluster.start()
    save_on(zygote, cluster, "job", 1, 2, 1, ranks=2)
    wait_for(lambda: all_protected(cluster, "job", 2), RESUME_S, "step 2 protected")
    cluster.kill(1)
    cluster.replace(1)                       # empty: rebuilds ranks 2 and 3 of step 2
    lost, _, problems, _ = restore_all(zygote, cluster, "job", 1, {(1, 2): 2, (1, 3): 2})
    assert lost == 0, problems
    # A SIGKILL between installing rank 2 and rank 3 leaves exactly this on the node:
    cluster.kill(1)
    for path in glob.glob(os.path.join(cluster.specs[1].shm_dir, "seg-*.json")):
        with open(path) as fh:
            if json.load(fh)["rank"] == 3:
                os.unlink(path)
                os.unlink(path[:-len(".json")] + ".bin")
    cluster.restart(1)
    lost, _, problems, _ = restore_all(zygote, cluster, "job", 1, {(1, 2): 2, (1, 3): 2})
    assert lost == 0, f"{problems}\n{log_tail(cluster.specs[1])}"


def test_regression_dropped_versions_resurrected_by_rebuild(clusters, zygote):
    cluster = clusters(4, k=2, m=2, args=FAST)
    cluster.start()
    save_on(zygote, cluster, "job", 1, 2, 1)
    wait_for(lambda: all_protected(cluster, "job", 2), RESUME_S, "step 2 protected")
    # The job restarts from step 1 (restore agreed on it): step 2 is an abandoned timeline.
    for spec in cluster.specs:
        assert call(spec, p.Drop("job", newer_than=1)).count == 1
    cluster.kill(0)
    cluster.replace(0)
    lost, _, problems, _ = restore_all(zygote, cluster, "job", 1, {(0, 0): 1})
    assert lost == 0, problems


def test_regression_parity_of_dropped_versions_never_freed(clusters, zygote):
    from harness import metric

    cluster = clusters(3, k=2, m=1, args=FAST)
    cluster.start()
    save_on(zygote, cluster, "job", 1, 2, 1)
    wait_for(lambda: all_protected(cluster, "job", 2), RESUME_S, "step 2 protected")
    assert all(metric(s, "snapshotd_memory_used_bytes", kind="parity") > 0
               for s in cluster.specs)
    for spec in cluster.specs:
        call(spec, p.Drop("job"))
    wait_for(lambda: all(metric(s, "snapshotd_memory_used_bytes", kind="parity") == 0
                         for s in cluster.specs), 4, "the dropped job's parity freed")


def test_regression_slow_heartbeat_answers_mark_peer_down(clusters):
    cluster = clusters(3, k=2, m=1, proxied=True,
                       args=["--insecure", "--heartbeat-interval", "0.5", "--peer-timeout", "3"])
    cluster.start()
    wait_for(lambda: all(len(status(s).peers_up) == 2 for s in cluster.specs), 10, "peers up")
    cluster.proxy.slow(2, 0.3)               # 0.6 s round trip: slow, well under 3 s
    deadline = time.monotonic() + 3 + 2
    while time.monotonic() < deadline:
        for spec in cluster.specs[:2]:
            assert 2 in status(spec).peers_up, (
                f"node {spec.slot} marked node 2 down although it answers every ping in "
                f"0.6 s and --peer-timeout is 3 s")
        time.sleep(0.25)


def test_regression_unrepairable_checksum_error_reported_as_unknown_lease(clusters, zygote):
    import random

    from harness import flip_segment_bits

    from snapshotd.common.channel import DaemonError

    cluster = clusters(1, args=["--memory-limit", "256MiB"])
    cluster.start()
    spec = cluster.specs[0]
    assert zygote.run("save", spec.control, "--job", "job", "--steps", 1, 1)["done"]
    hit = flip_segment_bits(spec, "job", 0, 1, random.Random(1), flips=3)
    with pytest.raises(DaemonError) as err:
        call(spec, p.Open("job", 0, os.getpid(), 1))
    assert err.value.code == "checksum_mismatch", err.value
    assert all(name in err.value.message for name in hit)
    assert status(spec).open_leases == 0


@pytest.mark.parametrize("where", ["parity", "data"])
def test_regression_bad_fragment_aborts_rebuild(clusters, zygote, where):
    import random

    from harness import flip_process_memory, flip_segment_bits, peer_call

    from snapshotd.cluster import peerproto as pp

    cluster = clusters(4, k=2, m=2, args=FAST)
    cluster.start()
    save_on(zygote, cluster, "job", 1, 1, 1)
    wait_for(lambda: all_protected(cluster, "job", 1), RESUME_S, "step 1 protected")
    # Stripe 0 of RS(2,2) on 4 nodes: parity on nodes 0 and 1, data from nodes 2 and 3.
    if where == "parity":
        request = pp.GetParity("job", 1, 0, 0)
        _, frames = peer_call(cluster.specs[0], request)
        assert flip_process_memory(cluster.daemons[0].pid, frames[0][:256], 1000, 3)
        reply, _ = peer_call(cluster.specs[0], request)
        assert isinstance(reply, p.Error) and reply.code == "corrupt"   # detected at the holder
    else:
        hit = flip_segment_bits(cluster.specs[3], "job", 3, 1, random.Random(2), flips=40)
        assert hit
    # Node 2 is lost: stripe 0 still has k=2 good fragments out of the 3 left.
    cluster.kill(2)
    cluster.replace(2)
    lost, _, problems, _ = restore_all(zygote, cluster, "job", 1, {(2, 2): 1})
    assert lost == 0, f"{problems}\n{log_tail(cluster.specs[2])}"


def _save_two_jobs_keep_one(clusters, zygote):
    cluster = clusters(1, args=["--memory-limit", "256MiB", "--reap-interval", "0.2",
                                "--keep", "1"])
    cluster.start()
    spec = cluster.specs[0]
    assert zygote.run("save", spec.control, "--job", "job", "--steps", 1, 1, "--mib", 2)["done"]
    return cluster, spec


def _evicted_and_freed(zygote, spec):
    """Save step 2 (keep=1 evicts step 1); True once step 1's segment is unpinned."""
    from harness import manifests

    assert zygote.run("save", spec.control, "--job", "job", "--steps", 2, 2, "--mib", 2)["done"]
    time.sleep(1.0)                          # a few reaper passes
    st = status(spec)
    return st.open_leases == 0 and [m["step"] for _, m in manifests(spec)] == [2]


def test_regression_open_with_negative_pid_pins_version(clusters, zygote):
    from snapshotd.common.channel import DaemonError

    cluster, spec = _save_two_jobs_keep_one(clusters, zygote)
    with pytest.raises(DaemonError) as err:
        call(spec, p.Open("job", 0, -1))
    assert err.value.code in ("bad_request", "malformed"), err.value
    assert _evicted_and_freed(zygote, spec), status(spec)


def test_regression_lease_of_dead_pid_never_reaped(clusters, zygote):
    cluster, spec = _save_two_jobs_keep_one(clusters, zygote)
    proc = __import__("subprocess").Popen(["true"])
    proc.wait()                              # a pid that is certainly not running now
    try:
        call(spec, p.Open("job", 0, proc.pid))
    except Exception:  # noqa: BLE001 - refusing the request is a fine fix too
        pass
    assert _evicted_and_freed(zygote, spec), status(spec)


def test_regression_put_parity_declared_length_allocated_before_check(clusters):
    from harness import peer_call, proc_stats

    from snapshotd.cluster import peerproto as pp
    from snapshotd.cluster.placement import make_groups, stripes

    cluster = clusters(4, k=2, m=2, args=["--insecure", "--memory-limit", "256MiB"])
    cluster.start()
    stripe = [s for s in stripes(make_groups(4, 2, 2)[0]) if s.parity[1] == 0][0]
    before = proc_stats(cluster.daemons[0].pid)["peak"]
    reply, _ = peer_call(cluster.specs[0], pp.PutParity("x", 1, stripe.index, 1, 1 << 30, (),
                                                        "0"), [b"four"], timeout=60)
    assert isinstance(reply, p.Error) and reply.code == "corrupt"
    grew = proc_stats(cluster.daemons[0].pid)["peak"] - before
    assert grew < 64 << 20, f"peak RSS grew by {grew >> 20} MiB for a 4-byte request"


def test_regression_unhashable_op_is_internal_error(clusters):
    import zmq

    cluster = clusters(1)
    cluster.start()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(cluster.specs[0].control)
    codes = []
    try:
        for op in ("[]", "{}", '["alloc"]'):
            sock.send(b'{"v": 1, "id": 3, "op": %s}' % op.encode())
            assert sock.poll(5000)
            codes.append(p.decode(sock.recv())[1].code)
    finally:
        sock.close(0)
        ctx.term()
    assert all(code in ("unknown_op", "malformed") for code in codes), codes


def test_regression_parity_recreated_from_corrupt_peer_data(clusters, zygote):
    import random

    from harness import flip_segment_bits, peer_call

    from snapshotd.cluster import peerproto as pp

    cluster = clusters(4, k=2, m=2, args=FAST)
    cluster.start()
    save_on(zygote, cluster, "job", 1, 1, 1)
    wait_for(lambda: all_protected(cluster, "job", 1), RESUME_S, "step 1 protected")
    # Node 3's data is damaged (silently: nobody has read it yet).
    assert flip_segment_bits(cluster.specs[3], "job", 3, 1, random.Random(3), flips=40)
    # Node 1 is lost: its own data rebuilds from nodes 0, 2 and parity; then it re-creates the
    # parity it held for stripes 0 and 1, whose data nodes include node 3.
    cluster.kill(1)
    cluster.replace(1)

    def recreated():
        inv, _ = peer_call(cluster.specs[1], pp.Inventory(1))
        return {h.stripe for h in inv.parity if h.job == "job"} >= {0, 1}

    wait_for(recreated, 20, "node 1's parity re-created")
    # Node 3's damage is still within what RS(2,2) repairs: it must restore bit for bit, and
    # so must any node lost afterwards.
    lost, _, problems, _ = restore_all(zygote, cluster, "job", 1, {(3, 3): 1})
    assert lost == 0, f"{problems}\n{log_tail(cluster.specs[3])}"
    cluster.kill(0)
    cluster.replace(0)
    lost, _, problems, _ = restore_all(zygote, cluster, "job", 1, {(0, 0): 1})
    assert lost == 0, problems


def test_regression_hardcoded_60s_peer_timeout_stalls_protection(clusters, zygote):
    cluster = clusters(3, k=2, m=1, proxied=True, args=FAST)
    cluster.start()
    try:
        save_on(zygote, cluster, "job", 1, 1, 1)
        wait_for(lambda: all_protected(cluster, "job", 1), RESUME_S, "step 1 protected")
        # Node 2 takes the data fragments of steps 2 and 3 and its answers are lost (as when
        # a daemon dies right after reading a request); heartbeats are unaffected.
        cluster.proxy.lose_replies(2, 64 << 10)
        save_on(zygote, cluster, "job", 2, 3, 1)
        time.sleep(0.5)
        cluster.proxy.lose_replies(2, 0)     # the network is whole again
        save_on(zygote, cluster, "job", 4, 4, 1)
        # Protection of the next step must not wait for the lost answers beyond the
        # configured timeouts (--peer-timeout 1.5, --encode-timeout 2).
        wait_for(lambda: all_protected(cluster, "job", 4), 1.5 + 2 + 3,
                 "step 4 protected once the network is whole")
    finally:
        hard_stop(cluster)      # SIGTERM would wait for the stuck calls too


def test_regression_restarted_holder_keeps_only_newest_parity(clusters, zygote):
    cluster = clusters(3, k=2, m=1, proxied=True, args=FAST)
    cluster.start()
    try:
        _restarted_holder(cluster, zygote)
    finally:
        hard_stop(cluster)


def _restarted_holder(cluster, zygote):
    save_on(zygote, cluster, "job", 1, 1, 1)
    wait_for(lambda: all_protected(cluster, "job", 1), RESUME_S, "step 1 protected")
    # Step 2 is committed everywhere, but nodes 2 and 1 cannot reach each other (node 1 is
    # the parity holder of node 2's stripe 1, and would otherwise fetch the missing fragment
    # itself): node 2's step 2 stays unprotected, its newest protected step is 1.
    cluster.proxy.block(2, 1)
    cluster.proxy.block(1, 2)
    save_on(zygote, cluster, "job", 2, 2, 1)
    time.sleep(1.0)
    assert not protected(cluster.specs[2], "job", 2)
    # Node 0, parity holder of stripe 0 (data from nodes 1 and 2), restarts on its memory.
    cluster.kill(0)
    cluster.restart(0)
    time.sleep(2.0)                          # its recovery re-creates what it re-creates
    # Node 2 is lost (one node: RS(2,1) survives it); it must come back at step 1.
    cluster.kill(2)
    cluster.proxy.unblock(2, 1)
    cluster.proxy.unblock(1, 2)
    cluster.replace(2)
    lost, _, problems, _ = restore_all(zygote, cluster, "job", 1, {(2, 2): 1})
    assert lost == 0, f"{problems}\n{log_tail(cluster.specs[2])}"
