"""Regression tests for issue 25 (the daemon's own robustness), one per finding, named after
it, with real daemons, real trainer processes, real SIGKILLs and SIGSTOPs. (Findings 1, 3 and
7 are unit tests: tests/unit/test_locks.py, test_protection_drops.py, test_floors.py; the
lock-order checker runs in every test.)"""

import os
import signal
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
    drop_job,
    log_tail,
    lose,
    peer_call,
    restore_check,
    save_on,
    status,
    unique,
    wait_for,
)

from snapshotd.cluster import peerproto as pp
from snapshotd.common import protocol as p

pytest_plugins = ["faultfixtures"]

pytestmark = pytest.mark.timeout(3600 if LONG else 240)


def test_regression_replacement_gives_up_its_rebuild_after_a_peer_pause(clusters, zygote):
    """Finding 4: steps 1-3 protected; node 2 SIGSTOPped; node 1 lost and replaced; node 2
    resumed 3-10 s later: every restore on node 1 still got ``cannot_rebuild: group 0 lost
    slots [1, 2]`` 40 s on (the rebuild ran once). It is tried again when node 2 answers,
    and a restore meanwhile waits for it (or says it waits for slot 2, not that it is lost)."""
    cluster = clusters(3, k=2, m=1, args=FAST)
    cluster.start()
    save_on(zygote, cluster, "job", 1, 3, 1)
    wait_for(lambda: all_protected(cluster, "job", 3), FAST_SETTLE_S, "step 3 protected")
    paused = cluster.daemons[2].proc
    paused.send_signal(signal.SIGSTOP)
    try:
        lose(cluster, 1)
        cluster.replace(1)
        time.sleep(7.0)                        # the replacement's first pass is over
        log = log_tail(cluster.specs[1], 80)
        assert "cannot be rebuilt" in log or "lost slots" in log, log
    finally:
        paused.send_signal(signal.SIGCONT)
    assert paused.poll() is None
    # A restore now waits for the retry (node 2 answers again), and gets step 3 bit for bit.
    ok, out = restore_check(zygote, cluster.specs[1], "job", 1, 1, 3, step=3)
    assert ok, f"{out}\n{log_tail(cluster.specs[1], 40)}"
    held = {v.step for v in call(cluster.specs[1], p.ListVersions("job", 1), timeout=60).versions}
    assert 3 in held, held
    assert "on a later try" in log_tail(cluster.specs[1], 200)


def test_regression_drop_newer_with_a_negative_rank_is_refused(clusters, zygote):
    """Review of issue 25, E: a peer's ``DropNewer`` for rank -1 (or newer_than below -1)
    was answered ``Ok``; it is refused (``bad_request``) and nothing held is touched."""
    cluster = clusters(2, k=1, m=1, args=FAST)
    cluster.start()
    save_on(zygote, cluster, "job", 1, 2, 0.25)
    for rank, newer in ((-1, 0), (0, -5)):
        reply, _ = peer_call(cluster.specs[0], pp.DropNewer("job", rank, newer))
        assert isinstance(reply, p.Error) and reply.code == "bad_request", reply
    assert [v.step for v in call(cluster.specs[0], p.ListVersions("job", 0)).versions] == [1, 2]


# --------------------------------------------------------------------------- campaign rows

CLOCKSHIFT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "clockshift")


def _clock_env(path: str) -> dict[str, str]:
    """A daemon whose wall clock the file at ``path`` shifts (clockshift/sitecustomize.py)."""
    with open(path, "w") as fh:
        fh.write("0")
    return {"SNAPSHOTD_TEST_CLOCK_FILE": path,
            "PYTHONPATH": os.pathsep.join(p for p in (CLOCKSHIFT, os.environ.get(
                "PYTHONPATH", "")) if p)}


def _restore_salted(zygote, spec, job, rank, mib, step, salt, timeout=120.0):
    out = zygote.run("restore", spec.control, "--job", job, "--rank", rank, "--mib", mib,
                     "--salt", salt, timeout=timeout)
    return out.get("step") == step and out.get("exact") is True, out


def inject_clock_step(env, rng):
    """Steps 1-4 protected, every rank restores step 2 (a new timeline), then node 0's wall
    clock steps back (or forward) and every rank saves new steps 3-4."""
    cluster, zygote = env["cluster"], env["zygote"]
    job, mib = unique("clk"), rng.choice([0.5, 1])
    step_by = rng.choice([-120.0, -5.0, -1.0, 30.0] if not LONG else
                         [-3600.0, -120.0, -5.0, -1.0, -0.2, 30.0, 600.0])
    with open(env["clock"], "w") as fh:
        fh.write("0")
    save_on(zygote, cluster, job, 1, 4, mib)
    wait_for(lambda: all_protected(cluster, job, 4), FAST_SETTLE_S, "step 4 protected")
    for slot, spec in enumerate(cluster.specs):
        out = zygote.run("restore", spec.control, "--job", job, "--rank", slot, "--mib", mib,
                         "--step", 2)
        assert out.get("step") == 2 and out.get("exact") is True, out
    with open(env["clock"], "w") as fh:
        fh.write(str(step_by))
    time.sleep(0.2)
    save_on(zygote, cluster, job, 3, 4, mib, extra=["--salt", 7])
    return {"job": job, "mib": mib, "step_by": step_by}


def check_clock_step(env, rng, got):
    cluster, zygote, job, mib = env["cluster"], env["zygote"], got["job"], got["mib"]
    detail = f"clock of node 0 stepped {got['step_by']:+.1f} s"
    try:
        wait_for(lambda: all_protected(cluster, job, 4), FAST_SETTLE_S,
                 "the new step 4 protected on every node")
    except AssertionError as exc:
        return Outcome(False, lost=len(cluster.specs), detail=f"{detail}: {exc}\n"
                       f"{log_tail(cluster.specs[1], 20)}")
    # Node 0 lost and replaced: its rank comes back from the group, the new step's bytes.
    lose(cluster, 0)
    cluster.replace(0)
    lost, problems = 0, []
    for slot, spec in enumerate(cluster.specs):
        ok, out = _restore_salted(zygote, spec, job, slot, mib, 4, 7)
        if not ok:
            lost += 1
            problems.append(f"node {slot}: {out}")
    with open(env["clock"], "w") as fh:
        fh.write("0")
    drop_job(cluster, job)
    return Outcome(lost == 0, lost=lost, detail=f"{detail}: {problems}")


CLOCK = Fault("wall clock stepped back or forward on one node",
              "3 daemons RS(2,1): steps 1-4 protected, every rank restores step 2 (a new "
              "timeline), node 0's wall clock steps back (0.2 s to an hour) or forward, every "
              "rank saves new steps 3-4: they are protected, and after node 0 is lost and "
              "replaced every rank restores the new step 4 bit for bit",
              inject_clock_step, check_clock_step, runs=(1, 10))


@pytest.fixture(scope="module")
def clock_env(clusters, zygote, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("clock") / "offset")
    cluster = clusters(3, k=2, m=1, args=[*FAST, "--keep", "4"])
    cluster.slot_env[0] = _clock_env(path)
    cluster.start()
    return {"cluster": cluster, "zygote": zygote, "clock": path}


def test_clock_stepped_on_one_node(clock_env, request):
    campaign(CLOCK, clock_env, request.node.nodeid)


def inject_pause_through_replacement(env, rng):
    """Steps 1-3 protected; one node SIGSTOPped; another lost and replaced; the paused one
    resumed some seconds later."""
    cluster, zygote = env["cluster"], env["zygote"]
    job, mib = unique("pause"), rng.choice([0.5, 1, 2])
    save_on(zygote, cluster, job, 1, 3, mib)
    wait_for(lambda: all_protected(cluster, job, 3), FAST_SETTLE_S, "step 3 protected")
    paused, gone = rng.sample(range(len(cluster.specs)), 2)
    pause = rng.uniform(2.0, 10.0)
    proc = cluster.daemons[paused].proc
    proc.send_signal(signal.SIGSTOP)
    try:
        lose(cluster, gone)
        cluster.replace(gone)
        time.sleep(pause)
    finally:
        proc.send_signal(signal.SIGCONT)
    return {"job": job, "mib": mib, "paused": paused, "gone": gone, "pause": pause}


def check_pause_through_replacement(env, rng, got):
    cluster, zygote, job = env["cluster"], env["zygote"], got["job"]
    started = time.monotonic()
    lost, problems = 0, []
    for slot, spec in enumerate(cluster.specs):
        ok, out = restore_check(zygote, spec, job, slot, got["mib"], 3, step=3)
        if not ok:
            lost += 1
            problems.append(f"node {slot}: {out}")
    detail = (f"node {got['paused']} paused {got['pause']:.1f} s while node {got['gone']} "
              f"was replaced: {problems}")
    drop_job(cluster, job)
    return Outcome(lost == 0, lost=lost, stall=time.monotonic() - started, detail=detail)


PAUSE = Fault("peer paused through a replacement",
              "3 daemons RS(2,1): steps 1-3 protected, one node SIGSTOPped, another lost and "
              "replaced, the paused one resumed 2-10 s later: the replacement rebuilds once "
              "it answers, every rank restores step 3 bit for bit",
              inject_pause_through_replacement, check_pause_through_replacement, runs=(1, 10))


def test_peer_paused_through_a_replacement(clusters, zygote, request):
    cluster = clusters(3, k=2, m=1, args=FAST)
    cluster.start()
    campaign(PAUSE, {"cluster": cluster, "zygote": zygote}, request.node.nodeid)


def inject_soak(env, rng):
    """Two ranks on node 0 (and one on each other node) save back to back for a while,
    while every daemon's status is asked twice a second."""
    cluster, zygote = env["cluster"], env["zygote"]
    job, seconds = unique("soak"), 600.0 if LONG else 20.0
    keys = [(0, 0), (0, 1), (1, 2), (2, 3)]
    loops = {key: zygote.spawn("loop", cluster.specs[key[0]].control, "--job", job, "--rank",
                               key[1], "--mib", rng.choice([0.25, 0.5, 1]), "--duration",
                               seconds, "--timeout", 30,
                               env={"LOCAL_WORLD_SIZE": str(2 if key[0] == 0 else 1)})
             for key in keys}
    slowest = [0.0] * len(cluster.specs)
    stuck: list[str] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for slot, spec in enumerate(cluster.specs):
            started = time.monotonic()
            try:
                status(spec, timeout=10)
            except Exception as exc:  # noqa: BLE001 - a daemon that does not answer
                stuck.append(f"node {slot}: {exc}")
            slowest[slot] = max(slowest[slot], time.monotonic() - started)
        time.sleep(0.5)
    for t in loops.values():
        t.wait(120)
    return {"job": job, "loops": loops, "slowest": slowest, "stuck": stuck,
            "seconds": seconds}


def check_soak(env, rng, got):
    failed = [f for t in got["loops"].values() for f in t.failed()]
    done = [t.result() for t in got["loops"].values()]
    problems = got["stuck"][:3] + [f"{len(failed)} saves failed: {failed[:3]}"] * bool(failed)
    problems += [f"a loop did not finish: {r}" for r in done if not r.get("done")]
    drop_job(env["cluster"], got["job"])
    return Outcome(not problems, stall=max(got["slowest"]),
                   detail=f"{got['seconds']:.0f} s of back-to-back saves: {problems}",
                   figures={"saves": sum(r.get("last", 0) for r in done)})


SOAK = Fault("soak: back-to-back saves, lock order checked",
             "3 daemons RS(2,1), 2 ranks on node 0 and one on each other node saving back to "
             "back (20 s; 10 min in the long campaign) with every daemon's status asked twice "
             "a second and the lock-order checker on: every daemon answers within 10 s, no "
             "save fails, no lock-order violation",
             inject_soak, check_soak, runs=(1, 1))


def test_deadlock_soak_back_to_back_saves(clusters, zygote, request):
    cluster = clusters(3, k=2, m=1, args=FAST)
    cluster.start()
    campaign(SOAK, {"cluster": cluster, "zygote": zygote}, request.node.nodeid)
