"""Issue 12's sequences as campaign rows, with the nodes, steps and timings drawn at random:
re-commits while a parity holder is down, daemons restarted while the others save, a parity
holder crashed as a data node of its stripe is lost, a rank's new timeline across a restart and
a loss, and drops a down holder missed. Each run gets a fresh cluster; a node loss is its
daemon SIGKILLed and its shared memory removed. The invariant: every rank of the lost node
gets back, bit for bit, the newest step its node held as protected (or the bytes it re-saved
and saw protected), and the job keeps a step every rank holds.

The quick suite runs each sequence once, fixed, as a regression test
(test_fault_issue12.py); these rows run in the long campaign (``make faults``)."""

import time

import pytest
from harness import (
    FAST,
    FAST_SETTLE_S,
    LONG,
    Fault,
    Outcome,
    all_protected,
    call,
    campaign,
    cluster_state,
    lose,
    protected,
    save_on,
    versions,
    wait_for,
)

from snapshotd.common import protocol as p

pytest_plugins = ["faultfixtures"]

pytestmark = [pytest.mark.timeout(1800),
              pytest.mark.skipif(not LONG, reason="long campaign only (make faults); the "
                                 "quick suite runs these sequences in test_fault_issue12.py")]

RESUME_S = FAST_SETTLE_S + 10      # the long campaign draws bigger states


@pytest.fixture(scope="module")
def env(clusters, zygote):
    return {"clusters": clusters, "zygote": zygote}


def restore(env, cluster, slot, salt=0, step=None):
    args = ["--step", step] if step is not None else []
    return env["zygote"].run("restore", cluster.specs[slot].control, "--job", "job", "--rank",
                             slot, "--mib", 1, "--salt", salt, *args, timeout=120)


def save(env, cluster, slot, first, last, salt=0):
    t = env["zygote"].spawn("save", cluster.specs[slot].control, "--job", "job", "--rank", slot,
                            "--mib", 1, "--steps", first, last, "--salt", salt,
                            env={"LOCAL_WORLD_SIZE": "1"})
    assert t.wait(120) == 0, t.text()


def newest_protected(cluster, slot):
    return max((v.step for v in versions(cluster.specs[slot], "job")
                if v.state == "protected"), default=None)


def held(cluster, slot):
    return {v.step for v in call(cluster.specs[slot], p.ListVersions("job", slot),
                                 timeout=60).versions}


def start(env, rng, kinds=((2, 2), (3, 1)), keeps=(1, 2)):
    k, m = rng.choice(kinds)
    cluster = env["clusters"](k + m, k=k, m=m, args=[*FAST, "--keep", str(rng.choice(keeps))])
    cluster.start()
    save_on(env["zygote"], cluster, "job", 1, 3, 1)
    wait_for(lambda: all_protected(cluster, "job", 3), RESUME_S, "step 3 protected")
    return cluster


def outcome(cluster, results, problems):
    """results: (slot, restore output, wanted step or (lowest, highest) steps, wanted salt)."""
    lost = 0
    for slot, out, step, salt in results:
        low, high = step if isinstance(step, tuple) else (step, step)
        got = out.get("step")
        if got is None or not low <= got <= high or out.get("exact") is not True:
            lost += 1
            problems.append(f"node {slot}: restore gave {out}, want step {step} salt {salt}")
    detail = "; ".join(problems)
    if problems:
        detail += "\n" + cluster_state(cluster, "job")
    cluster.stop()
    return Outcome(not problems, lost, detail=detail)


# --------------------------------------------------------------------------- rows


def inject_recommit(env, rng):
    cluster = start(env, rng)
    nodes = len(cluster.specs)
    data, holder = rng.sample(range(nodes), 2)
    cluster.kill(holder)                     # a crash: its memory stays
    save(env, cluster, data, 3, 3, salt=1)   # the data node commits step 3 again
    time.sleep(rng.uniform(0, 3))            # encode retries while the holder is down
    cluster.restart(holder)
    return {"cluster": cluster, "data": data, "holder": holder}


def check_recommit(env, rng, inj):
    cluster, data, problems = inj["cluster"], inj["data"], []
    try:
        wait_for(lambda: protected(cluster.specs[data], "job", 3), RESUME_S,
                 "the re-committed step 3 protected")
    except AssertionError as exc:
        problems.append(str(exc))
    time.sleep(rng.uniform(0, 3))
    lose(cluster, data)
    cluster.replace(data)
    return outcome(cluster, [(data, restore(env, cluster, data, salt=1), 3, 1)], problems)


def inject_restart_while_saving(env, rng):
    cluster = start(env, rng)
    nodes = len(cluster.specs)
    down = rng.randrange(nodes)
    cluster.kill(down)
    others = [s for s in range(nodes) if s != down]
    save_on(env["zygote"], cluster, "job", 4, 3 + rng.randint(1, 3), 1, slots=others)
    cluster.restart(down)
    time.sleep(rng.uniform(0.5, 2.5))
    return {"cluster": cluster, "lost": rng.choice(others)}


def check_restart_while_saving(env, rng, inj):
    cluster, slot = inj["cluster"], inj["lost"]
    want = newest_protected(cluster, slot)
    newest = max(v.step for v in versions(cluster.specs[slot], "job"))
    lose(cluster, slot)
    cluster.replace(slot)
    # Its newest protected step when it was lost, or a newer one whose protection completed
    # meanwhile (the restarted node's stripes finish encoding): never an older one.
    return outcome(cluster, [(slot, restore(env, cluster, slot), (want, newest), 0)], [])


def inject_holder_crash_and_loss(env, rng):
    cluster = start(env, rng, kinds=((3, 1), (2, 2)))
    holder, lost = rng.sample(range(len(cluster.specs)), 2)
    cluster.kill(holder)                     # SIGKILL, memory kept ...
    lose(cluster, lost)                      # ... as another node is lost whole
    if rng.random() < 0.5:
        cluster.restart(holder)
        cluster.replace(lost)
    else:
        cluster.replace(lost)
        cluster.restart(holder)
    return {"cluster": cluster, "lost": lost}


def check_holder_crash_and_loss(env, rng, inj):
    cluster, slot = inj["cluster"], inj["lost"]
    return outcome(cluster, [(slot, restore(env, cluster, slot), 3, 0)], [])


def inject_new_timeline(env, rng):
    # --keep 2: every rank still holds step 3 when one goes back to it (a job goes back only
    # to a step every rank holds: TrainingState agrees on it first).
    cluster = start(env, rng, kinds=((2, 2),), keeps=(2,))
    save_on(env["zygote"], cluster, "job", 4, 4, 1)
    wait_for(lambda: all_protected(cluster, "job", 4), RESUME_S, "step 4 protected")
    nodes = len(cluster.specs)
    assert all(3 in held(cluster, s) for s in range(nodes))
    back, crashed, lost = rng.sample(range(nodes), 3)
    out = restore(env, cluster, back, step=3)        # a new timeline from step 3
    assert out.get("step") == 3 and out.get("exact") is True, out
    time.sleep(0.5)
    cluster.kill(crashed)
    others = [s for s in range(nodes) if s not in (back, crashed)]
    save_on(env["zygote"], cluster, "job", 5, 6, 1, slots=others)
    cluster.restart(crashed)
    time.sleep(rng.uniform(0.5, 2.0))
    lose(cluster, lost)
    cluster.replace(lost)
    return {"cluster": cluster, "nodes": nodes}


def check_new_timeline(env, rng, inj):
    cluster, problems = inj["cluster"], []
    per_rank = {s: held(cluster, s) for s in range(inj["nodes"])}
    if not all(3 in h for h in per_rank.values()):
        problems.append(f"step 3 is not held by every rank: {per_rank}")
    results = [(s, restore(env, cluster, s, step=3), 3, 0) for s in range(inj["nodes"])]
    return outcome(cluster, results, problems)


def inject_missed_drop(env, rng):
    cluster = start(env, rng, keeps=(2,))     # step 2 still held to go back to
    data, holder = rng.sample(range(len(cluster.specs)), 2)
    cluster.kill(holder)                     # misses the drop of step 3 below
    out = restore(env, cluster, data, step=2)
    assert out.get("step") == 2 and out.get("exact") is True, out
    save(env, cluster, data, 3, 3, salt=1)   # the new timeline's step 3
    cluster.restart(holder)
    return {"cluster": cluster, "data": data}


def check_missed_drop(env, rng, inj):
    cluster, data, problems = inj["cluster"], inj["data"], []
    try:
        wait_for(lambda: protected(cluster.specs[data], "job", 3), RESUME_S,
                 "the new timeline's step 3 protected")
    except AssertionError as exc:
        problems.append(str(exc))
    lose(cluster, data)
    cluster.replace(data)
    return outcome(cluster, [(data, restore(env, cluster, data, salt=1), 3, 1)], problems)


ROWS = [
    Fault("re-commit while a parity holder is down, then that data node lost",
          "RS 2+2 or 3+1: a data node commits step 3 again while a random parity holder is "
          "SIGKILLed (memory kept); the holder restarts, the data node is lost: its new bytes "
          "come back", inject_recommit, check_recommit, runs=(0, 8)),
    Fault("daemon restarted while the others save, then a node lost",
          "a random daemon SIGKILLed while the other nodes save 1-3 more steps, restarted on its "
          "memory, then another node lost: its newest protected step comes back",
          inject_restart_while_saving, check_restart_while_saving, runs=(0, 8)),
    Fault("parity holder crashed as a data node of its stripe is lost",
          "RS 3+1 or 2+2: a daemon SIGKILLed (memory kept) at the moment another node is lost "
          "whole; restarted and replaced in either order: step 3 comes back",
          inject_holder_crash_and_loss, check_holder_crash_and_loss, runs=(0, 8)),
    Fault("new timeline, daemon restart and node loss",
          "a rank restores step 3 of 4 (a new timeline), another daemon crashes while the rest "
          "save 5-6 and restarts, a third node is lost: every rank still holds step 3",
          inject_new_timeline, check_new_timeline, runs=(0, 6)),
    Fault("drop missed by a down parity holder, then a node lost",
          "a rank goes back to step 2 and re-saves 3 while a parity holder is down; the holder "
          "restarts (it missed the drop), the rank's node is lost: the new step 3 comes back",
          inject_missed_drop, check_missed_drop, runs=(0, 8)),
]


@pytest.mark.parametrize("fault", ROWS, ids=["recommit", "restart", "holder_crash",
                                             "new_timeline", "missed_drop"])
def test_retention(env, fault, request):
    campaign(fault, env, request.node.nodeid)
