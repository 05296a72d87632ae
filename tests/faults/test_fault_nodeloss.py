"""Node loss: up to ``m`` daemons of a group killed at once and replaced empty lose nothing
protected; ``m + 1`` give a clear ``cannot_rebuild`` error naming the group, and the survivors
keep serving. Four real daemons, RS(k=2, m=2), CURVE keys."""

import shutil
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
    unique,
    versions,
    wait_for,
)

pytest_plugins = ["faultfixtures"]

pytestmark = pytest.mark.timeout(2400 if LONG else 180)

K, M, NODES = 2, 2, 4
PEER_TIMEOUT, ENCODE_TIMEOUT = 1.5, 3.0
RESUME_S = PEER_TIMEOUT + ENCODE_TIMEOUT + 10


@pytest.fixture(scope="module")
def env(clusters, zygote, cluster_keys):
    cluster = clusters(NODES, k=K, m=M, keys=cluster_keys,
                       args=["--memory-limit", "2GiB", "--heartbeat-interval", "0.2",
                             "--peer-timeout", str(PEER_TIMEOUT),
                             "--encode-timeout", str(ENCODE_TIMEOUT)])
    cluster.start()
    return {"cluster": cluster, "zygote": zygote}


def newest_protected(spec, job):
    held = [v.step for v in versions(spec, job) if v.state == "protected"]
    return max(held) if held else None


def lose_nodes(cluster, lose):
    """SIGKILL every node in ``lose`` at once, then start empty daemons in their slots."""
    for slot in lose:
        cluster.kill(slot)
    for slot in lose:
        shutil.rmtree(cluster.specs[slot].shm_dir, ignore_errors=True)
    started = time.monotonic()
    cluster.start(lose)
    return time.monotonic() - started


def prepare(env, rng, job, mib):
    """Steps 1-2 everywhere and protected; sometimes step 3 on some nodes only."""
    cluster, zyg = env["cluster"], env["zygote"]
    save_on(zyg, cluster, job, 1, 2, mib)
    wait_for(lambda: all_protected(cluster, job, 2), RESUME_S, "step 2 protected")
    committed = {slot: 2 for slot in range(NODES)}
    if rng.random() < 0.5:
        some = rng.sample(range(NODES), rng.randint(1, NODES - 1))
        save_on(zyg, cluster, job, 3, 3, mib, slots=some)
        committed.update({slot: 3 for slot in some})
        time.sleep(0.3)
    return committed


def inject_within_m(env, rng):
    cluster = env["cluster"]
    job, mib = unique("nl"), rng.choice([0.5, 1, 3] if not LONG else [0.5, 1, 2, 4])
    committed = prepare(env, rng, job, mib)
    lose = sorted(rng.sample(range(NODES), rng.randint(1, M)))
    floor = {slot: newest_protected(cluster.specs[slot], job) for slot in lose}
    start_s = lose_nodes(cluster, lose)
    return {"job": job, "mib": mib, "lose": lose, "committed": committed, "floor": floor,
            "start_s": start_s}


def check_within_m(env, rng, inj):
    cluster = env["cluster"]
    expect = {}
    for slot in range(NODES):
        if slot in inj["lose"]:
            expect[(slot, slot)] = (inj["floor"][slot], inj["committed"][slot])
        else:
            expect[(slot, slot)] = inj["committed"][slot]
    lost, stall, problems, _ = restore_all(env["zygote"], cluster, inj["job"], inj["mib"],
                                           expect)
    stall += inj["start_s"]
    save_on(env["zygote"], cluster, inj["job"], 4, 4, inj["mib"])
    try:
        wait_for(lambda: all_protected(cluster, inj["job"], 4), RESUME_S,
                 "the next step protected on every node")
    except AssertionError as exc:
        problems.append(f"protection did not resume: {exc}")
    assert_serving(cluster)
    drop_job(cluster, inj["job"])
    return Outcome(not problems, lost, stall,
                   detail=f"lost nodes {inj['lose']}: " + "; ".join(problems))


def inject_beyond_m(env, rng):
    cluster = env["cluster"]
    job, mib = unique("nx"), rng.choice([0.5, 1, 3])
    committed = prepare(env, rng, job, mib)
    lose = sorted(rng.sample(range(NODES), M + 1))
    start_s = lose_nodes(cluster, lose)
    return {"job": job, "mib": mib, "lose": lose, "committed": committed, "start_s": start_s}


def check_beyond_m(env, rng, inj):
    cluster, zyg = env["cluster"], env["zygote"]
    survivors = {(s, s): inj["committed"][s] for s in range(NODES) if s not in inj["lose"]}
    lost, stall, problems, _ = restore_all(zyg, cluster, inj["job"], inj["mib"], survivors)
    clear = True
    for slot in inj["lose"]:
        out = zyg.run("restore", cluster.specs[slot].control, "--job", inj["job"], "--rank",
                      slot, "--mib", inj["mib"])
        stall = max(stall, out.get("s", 0))
        msg = out.get("message", "")
        # Clear: the code, the group, the slot, the step, and that it cannot be rebuilt.
        if not (out.get("code") == "cannot_rebuild" and "group 0" in msg
                and f"slot {slot}" in msg and "step" in msg and "cannot be rebuilt" in msg):
            clear = False
            problems.append(f"node {slot}: wanted a clear cannot_rebuild error, got {out}")
    stall += inj["start_s"]
    assert_serving(cluster)
    drop_job(cluster, inj["job"])
    return Outcome(not problems, lost, stall, clear_error=clear,
                   detail=f"lost nodes {inj['lose']}: " + "; ".join(problems))


WITHIN = Fault(f"{M} or fewer of {NODES} nodes lost at once (RS {K}+{M})",
               "1..m daemons of the group SIGKILLed together, replaced by empty daemons; the "
               "lost ranks must come back at their newest protected step",
               inject_within_m, check_within_m, runs=(2, 40))
BEYOND = Fault(f"{M + 1} of {NODES} nodes lost at once (RS {K}+{M})",
               "m+1 daemons SIGKILLed and replaced empty: the lost ranks must get a clear "
               "cannot_rebuild error, the survivors restore", inject_beyond_m, check_beyond_m,
               runs=(1, 15), beyond_tolerance=True)


def test_up_to_m_nodes_lost_lose_nothing(env, request):
    campaign(WITHIN, env, request.node.nodeid)


def test_m_plus_one_nodes_lost_give_a_clear_error(env, request):
    campaign(BEYOND, env, request.node.nodeid)
