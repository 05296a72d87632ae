"""Daemon SIGKILL at random points (mid-commit, mid-encode, mid-rebuild), then restart on the
same memory: every rank restores its newest committed version bit for bit, protection resumes,
and the restored parity really protects (a node lost afterwards is rebuilt exactly)."""

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
    log_tail,
    restore_all,
    save_on,
    unique,
    wait_for,
)

pytest_plugins = ["faultfixtures"]

pytestmark = pytest.mark.timeout(1800 if LONG else 180)

RANKS = 2                         # trainer ranks per node
PEER_TIMEOUT = 1.5
ENCODE_TIMEOUT = 3.0
#: Protection must resume within this after a restart: the configured timeouts plus slack.
RESUME_S = PEER_TIMEOUT + ENCODE_TIMEOUT + 10
#: A peer call stuck for its hard-coded 60 s (a known bug) can hold protection up this long.
STUCK_S = 75
BUG_STUCK = "test_regression_hardcoded_60s_peer_timeout_stalls_protection"


def stuck_calls(cluster):
    """How many peer calls so far waited out their hard-coded 60 s (from the daemons' logs)."""
    total = 0
    for spec in cluster.specs:
        try:
            with open(spec.log_path, errors="replace") as fh:
                total += sum(1 for line in fh if "within 60.0s" in line)
        except OSError:
            pass
    return total


def wait_protected(env, job, step, problems, what):
    """Wait until ``step`` is protected everywhere. Past RESUME_S, note a problem; if peer calls
    got stuck meanwhile (the known bug), wait them out so the next run starts clean, and
    return the bug's name."""
    cluster = env["cluster"]
    try:
        wait_for(lambda: all_protected(cluster, job, step), RESUME_S, what)
        return ""
    except AssertionError as exc:
        problems.append(f"protection did not resume: {exc}")
    if stuck_calls(cluster) > env.setdefault("stuck", 0):
        env["stuck"] = stuck_calls(cluster)
        try:
            wait_for(lambda: all_protected(cluster, job, step), STUCK_S, what)
        except AssertionError:
            pass
        env["stuck"] = stuck_calls(cluster)
        return BUG_STUCK
    return ""


@pytest.fixture(scope="module")
def env(clusters, zygote, cluster_keys):
    cluster = clusters(3, k=2, m=1, keys=cluster_keys,
                       args=["--memory-limit", "1GiB", "--reap-interval", "0.2",
                             "--heartbeat-interval", "0.2", "--peer-timeout", str(PEER_TIMEOUT),
                             "--encode-timeout", str(ENCODE_TIMEOUT)])
    cluster.start()
    return {"cluster": cluster, "zygote": zygote}


def mib_for(rng):
    return rng.choice([0.5, 1, 2] if not LONG else [0.5, 1, 4, 16])


def keys_of(cluster):
    return [(slot, slot * RANKS + local) for slot in range(len(cluster.specs))
            for local in range(RANKS)]


def resume_protection(env, job, step, mib, problems):
    """Save ``step`` everywhere and wait until it is protected on every node; return the name
    of the known bug that held it up, if one did."""
    save_on(env["zygote"], env["cluster"], job, step, step, mib, RANKS)
    return wait_protected(env, job, step, problems, f"step {step} protected on every node")


# --------------------------------------------------------------------------- mid-commit


def inject_mid_commit(env, rng):
    cluster, zyg = env["cluster"], env["zygote"]
    job, mib = unique("mc"), rng.choice([0.5, 1, 2] if not LONG else [0.5, 1, 4])
    victim = rng.randrange(len(cluster.specs))
    count = 15 if not LONG else 30
    loops = {key: zyg.spawn("loop", cluster.specs[key[0]].control, "--job", job, "--rank",
                            key[1], "--mib", mib, "--count", count, "--timeout", 5,
                            env={"LOCAL_WORLD_SIZE": str(RANKS)})
             for key in keys_of(cluster)}
    for key, t in loops.items():
        if key[0] == victim:
            t.wait_line(lambda line: "committed" in line, 60, "a first commit")
    time.sleep(rng.uniform(0.0, 0.4))
    cluster.kill(victim)                                  # SIGKILL, saves in flight
    for t in loops.values():
        t.wait(120)
    started = time.monotonic()
    cluster.restart(victim)
    return {"job": job, "mib": mib, "victim": victim, "loops": loops,
            "restart_s": time.monotonic() - started}


def check_mid_commit(env, rng, inj):
    cluster = env["cluster"]
    problems = []
    expect = {}
    last = 0
    for key, t in inj["loops"].items():
        acked = t.committed()
        tried = acked + [f["failed"] for f in t.failed()]
        last = max(last, *tried)
        # An acknowledged commit must survive; one in flight at the kill may or may not.
        expect[key] = (max(acked), max(tried)) if key[0] == inj["victim"] else max(acked)
    lost, stall, probs, _ = restore_all(env["zygote"], cluster, inj["job"], inj["mib"], expect)
    problems += probs
    stall += inj["restart_s"]
    bug = resume_protection(env, inj["job"], last + 1, inj["mib"], problems)
    assert_serving(cluster)
    drop_job(cluster, inj["job"])
    return Outcome(not problems, lost, stall, detail="; ".join(problems),
                   bug=bug if not lost or bug != BUG_STUCK else "")


# --------------------------------------------------------------------------- mid-encode


def inject_mid_encode(env, rng):
    cluster, zyg = env["cluster"], env["zygote"]
    job, mib = unique("me"), mib_for(rng)
    save_on(zyg, cluster, job, 1, 1, mib, RANKS)
    baseline = []
    bug = wait_protected(env, job, 1, baseline, "step 1 protected")
    victim = rng.randrange(len(cluster.specs))
    save_on(zyg, cluster, job, 2, 2, mib, RANKS)          # encode of step 2 starts now
    time.sleep(rng.uniform(0.0, 0.15))
    cluster.kill(victim)
    started = time.monotonic()
    cluster.restart(victim)
    return {"job": job, "mib": mib, "victim": victim, "restart_s": time.monotonic() - started,
            "baseline": baseline, "bug": bug}


def check_mid_encode(env, rng, inj):
    cluster, zyg = env["cluster"], env["zygote"]
    problems = list(inj["baseline"])
    expect = {key: 2 for key in keys_of(cluster)}
    lost, stall, probs, _ = restore_all(zyg, cluster, inj["job"], inj["mib"], expect)
    problems += probs
    stall += inj["restart_s"]
    # Whatever parity the kill left (or the restart re-created) is real: lose a node now and
    # get back the newest step the group can rebuild (2, or 1 if step 2's encode was cut),
    # bit for bit, never nothing.
    lose = rng.randrange(len(cluster.specs))
    cluster.kill(lose)
    cluster.replace(lose)
    more, s, probs, _ = restore_all(zyg, cluster, inj["job"], inj["mib"],
                                    {k: (1, 2) for k in keys_of(cluster) if k[0] == lose})
    lost += more
    stall = max(stall, s)
    problems += [f"after losing node {lose}: {p}" for p in probs]
    # Protection resumes: the next step is protected everywhere within the timeouts.
    # (A cannot_rebuild here was the open limitation "parity lost with a restarted holder";
    # parity now lives in files adopted on restart, issue 12 item 10: it is a failure now.)
    bug = resume_protection(env, inj["job"], 3, inj["mib"], problems) or inj["bug"]
    assert_serving(cluster)
    drop_job(cluster, inj["job"])
    return Outcome(not problems, lost, stall, detail="; ".join(problems),
                   bug=bug if not lost or bug != BUG_STUCK else "")


# --------------------------------------------------------------------------- mid-rebuild


def inject_mid_rebuild(env, rng):
    cluster, zyg = env["cluster"], env["zygote"]
    job, mib = unique("mr"), mib_for(rng)
    save_on(zyg, cluster, job, 1, 2, mib, RANKS)
    baseline = []
    bug = wait_protected(env, job, 2, baseline, "step 2 protected")
    victim = rng.randrange(len(cluster.specs))
    cluster.kill(victim)
    cluster.replace(victim, wipe=True)                    # empty: the rebuild starts
    time.sleep(rng.uniform(0.0, 0.8))
    cluster.kill(victim)                                  # ... and is cut short
    started = time.monotonic()
    cluster.restart(victim)                               # same memory: a partial rebuild
    return {"job": job, "mib": mib, "victim": victim, "restart_s": time.monotonic() - started,
            "baseline": baseline, "bug": bug}


def check_mid_rebuild(env, rng, inj):
    cluster, zyg = env["cluster"], env["zygote"]
    expect = {key: 2 for key in keys_of(cluster)}
    lost, stall, problems, outs = restore_all(zyg, cluster, inj["job"], inj["mib"], expect)
    probs = list(problems)
    problems += inj["baseline"]
    stall += inj["restart_s"]
    bug = inj["bug"]
    if not problems:
        bug = resume_protection(env, inj["job"], 3, inj["mib"], problems)
    victim_outs = {k: o for k, o in outs.items() if k[0] == inj["victim"]}
    if problems and all(f"node {inj['victim']} " in p for p in probs) and any(
            o.get("step") is None for o in victim_outs.values()) and any(
            o.get("step") == 2 for o in victim_outs.values()):
        bug = "test_regression_partial_rebuild_not_resumed"
    assert_serving(cluster)
    drop_job(cluster, inj["job"])
    if problems:
        problems.append(f"victim log:\n{log_tail(cluster.specs[inj['victim']], 15)}")
    return Outcome(not problems, lost, stall, detail="; ".join(problems),
                   bug=bug if not lost or bug != BUG_STUCK else "")


FAULTS = {
    "mid_commit": Fault("daemon SIGKILL mid-commit",
                        "a daemon is killed while its 2 ranks save in a loop, restarted on the "
                        "same memory", inject_mid_commit, check_mid_commit, runs=(2, 30)),
    "mid_encode": Fault("daemon SIGKILL mid-encode",
                        "a daemon is killed 0-150 ms after a step was committed everywhere "
                        "(chunks and parity in flight), restarted; then another node is lost",
                        inject_mid_encode, check_mid_encode, runs=(2, 30)),
    "mid_rebuild": Fault("daemon SIGKILL mid-rebuild",
                         "a replacement daemon is killed 0-800 ms into its rebuild and "
                         "restarted on its partial memory", inject_mid_rebuild,
                         check_mid_rebuild, runs=(2, 30)),
}


@pytest.mark.parametrize("point", list(FAULTS))
def test_daemon_killed_and_restarted(env, point, request):
    campaign(FAULTS[point], env, request.node.nodeid)
