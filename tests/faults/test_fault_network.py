"""Network faults through a TCP proxy between every pair of daemons.

- A peer partitioned for a while (its traffic held, or dropped with the connections reset on
  heal), then healed: nobody's saves, restores or status requests hang meanwhile, and
  protection resumes within the configured timeouts after the heal.
- A slow peer (every byte to and from it delayed): saves on the other nodes are not blocked by
  it, and versions still get protected.
"""

import time

import pytest
from harness import (
    LONG,
    Fault,
    Outcome,
    all_protected,
    assert_serving,
    campaign,
    drop_job,
    restore_all,
    save_on,
    status,
    unique,
    wait_for,
)

pytest_plugins = ["faultfixtures"]

pytestmark = pytest.mark.timeout(2400 if LONG else 180)

HEARTBEAT, PEER_TIMEOUT, ENCODE_TIMEOUT = 0.5, 2.0, 3.0
#: After a heal, protection must resume within the configured timeouts plus slack.
RESUME_S = HEARTBEAT + PEER_TIMEOUT + ENCODE_TIMEOUT + 5
#: A save that does not wait for the network: anything near this is a stall.
SAVE_BOUND_S = 5.0
NODES = 3
LAST = 5 if LONG else 2                # steps each node saves next to the slow peer


@pytest.fixture(scope="module")
def env(clusters, zygote, cluster_keys):
    cluster = clusters(NODES, k=2, m=1, keys=cluster_keys, proxied=True,
                       args=["--memory-limit", "1GiB", "--heartbeat-interval", str(HEARTBEAT),
                             "--peer-timeout", str(PEER_TIMEOUT),
                             "--encode-timeout", str(ENCODE_TIMEOUT)])
    cluster.start()
    return {"cluster": cluster, "zygote": zygote}


def timed_status(cluster):
    slowest = 0.0
    for spec in cluster.specs:
        started = time.monotonic()
        status(spec, timeout=SAVE_BOUND_S)
        slowest = max(slowest, time.monotonic() - started)
    return slowest


# --------------------------------------------------------------------------- partition


def inject_partition(env, rng):
    cluster, zyg = env["cluster"], env["zygote"]
    job, mib = unique("np"), rng.choice([0.5, 1, 2])
    save_on(zyg, cluster, job, 1, 1, mib)
    wait_for(lambda: all_protected(cluster, job, 1), RESUME_S, "step 1 protected")
    victim = rng.randrange(NODES)
    how = rng.choice(["hold", "drop"])
    duration = rng.uniform(1.0, 4.0) if not LONG else rng.uniform(1.0, 15.0)
    started = time.monotonic()
    cluster.proxy.partition(victim, how)
    # Meanwhile every node saves (local commits need no peer), and answers status.
    trainers = save_on(zyg, cluster, job, 2, 4, mib)
    stall = max(max(t.latencies()) for t in trainers.values())
    stall = max(stall, timed_status(cluster))
    time.sleep(max(0.0, duration - (time.monotonic() - started)))
    stall = max(stall, timed_status(cluster))
    cluster.proxy.heal(victim)
    return {"job": job, "mib": mib, "victim": victim, "how": how, "duration": duration,
            "stall": stall, "healed": time.monotonic()}


def check_partition(env, rng, inj):
    cluster, zyg = env["cluster"], env["zygote"]
    problems = []
    if inj["stall"] > SAVE_BOUND_S:
        problems.append(f"a save or status waited {inj['stall']:.1f}s during the partition")
    resume = None
    try:
        wait_for(lambda: all_protected(cluster, inj["job"], 4), RESUME_S,
                 "step 4 (saved during the partition) protected on every node")
        resume = time.monotonic() - inj["healed"]
    except AssertionError as exc:
        problems.append(f"protection did not resume after the heal ({inj['how']}, "
                        f"{inj['duration']:.1f}s): {exc}")
    expect = {(s, s): 4 for s in range(NODES)}
    lost, restore_s, probs, _ = restore_all(zyg, cluster, inj["job"], inj["mib"], expect)
    problems += probs
    assert_serving(cluster)
    drop_job(cluster, inj["job"])
    return Outcome(not problems, lost, max(inj["stall"], restore_s),
                   detail=f"node {inj['victim']} partitioned ({inj['how']}): "
                   + "; ".join(problems),
                   figures={"resume_after_heal_s": round(resume or RESUME_S, 2)})


# --------------------------------------------------------------------------- slow peer


def inject_slow(env, rng):
    cluster, zyg = env["cluster"], env["zygote"]
    job, mib = unique("ns"), rng.choice([0.5, 1, 2])
    victim = rng.randrange(NODES)
    # One-way delay; round trips stay under the heartbeat's answer window (0.8 x interval),
    # see test_regression_slow_heartbeat_answers_mark_peer_down for slower peers.
    delay = rng.uniform(0.02, 0.15 if LONG else 0.08)
    cluster.proxy.slow(victim, delay)
    started = time.monotonic()
    trainers = save_on(zyg, cluster, job, 1, LAST, mib)
    others = [t for (slot, _), t in trainers.items() if slot != victim]
    stall = max(max(t.latencies()) for t in others)
    return {"job": job, "mib": mib, "victim": victim, "delay": delay, "stall": stall,
            "started": started}


def check_slow(env, rng, inj):
    cluster, zyg = env["cluster"], env["zygote"]
    problems = []
    if inj["stall"] > SAVE_BOUND_S:
        problems.append(f"a save on a healthy node waited {inj['stall']:.1f}s")
    protect_s = None
    try:
        wait_for(lambda: all_protected(cluster, inj["job"], LAST), RESUME_S + 10,
                 f"step {LAST} protected despite the slow peer")
        protect_s = time.monotonic() - inj["started"]
    except AssertionError as exc:
        problems.append(str(exc))
    cluster.proxy.slow(inj["victim"], 0.0)
    lost, restore_s, probs, _ = restore_all(zyg, cluster, inj["job"], inj["mib"],
                                            {(s, s): LAST for s in range(NODES)})
    problems += probs
    assert_serving(cluster)
    drop_job(cluster, inj["job"])
    return Outcome(not problems, lost, inj["stall"],
                   detail=f"node {inj['victim']} delayed {inj['delay'] * 1000:.0f} ms: "
                   + "; ".join(problems),
                   figures={"protected_after_s": round(protect_s or 0, 2)})


PARTITION = Fault("peer partitioned, then healed",
                  "all traffic of one of 3 nodes held or dropped for 1-4 s (long: 1-15 s) while "
                  "every node saves; then healed", inject_partition, check_partition,
                  runs=(2, 25))
SLOW = Fault(f"slow peer (20-{150 if LONG else 80} ms one-way delay)",
             f"all traffic of one of 3 nodes delayed while every node saves {LAST} steps",
             inject_slow, check_slow, runs=(2, 20))


def test_partitioned_peer_heals_without_hangs(env, request):
    campaign(PARTITION, env, request.node.nodeid)


def test_slow_peer_does_not_block_other_nodes(env, request):
    campaign(SLOW, env, request.node.nodeid)
