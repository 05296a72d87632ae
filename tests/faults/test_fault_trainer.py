"""Trainer SIGKILL at precise points of a save (before allocate, mid-copy, between copy and
commit, after the commit was sent): the rank's newest committed version comes back bit for bit,
nothing half-written is ever visible, the dead writer's slot is reclaimed."""

import time

import pytest
from harness import (
    LONG,
    Fault,
    Outcome,
    assert_serving,
    campaign,
    drop_job,
    restore_check,
    shm_files,
    status,
    steps,
    unique,
    wait_for,
)

pytest_plugins = ["faultfixtures"]

pytestmark = pytest.mark.timeout(900 if LONG else 120)

POINTS = ("before_alloc", "mid_copy", "before_commit", "after_commit")


@pytest.fixture(scope="module")
def env(clusters, zygote):
    cluster = clusters(1, args=["--memory-limit", "512MiB", "--reap-interval", "0.2"])
    cluster.start()
    return {"cluster": cluster, "zygote": zygote, "spec": cluster.specs[0]}


def inject(point):
    def run(env, rng):
        spec, zyg = env["spec"], env["zygote"]
        job = unique("tk")
        ranks = rng.choice([1, 2, 3])
        victim = rng.randrange(ranks)
        mib = rng.choice([0.25, 1, 2] if not LONG else [0.25, 1, 4, 16])
        before = rng.randint(1, 3)
        trainers = {}
        for rank in range(ranks):
            if rank == victim:
                args = ["--stop-at", point, "--stop-step", before + 1,
                        "--nth-tensor", rng.randint(1, 6)]
            else:
                args = []
            trainers[rank] = zyg.spawn("save", spec.control, "--job", job, "--rank", rank,
                                       "--mib", mib, "--steps", 1, before + 1, *args)
        trainers[victim].wait_line(lambda line: line.get("point") == point, 60,
                                   f"the {point} point")
        time.sleep(rng.uniform(0, 0.05))
        trainers[victim].kill()
        for rank, t in trainers.items():
            if rank != victim:
                assert t.wait(60) == 0, t.text()
        return {"job": job, "ranks": ranks, "victim": victim, "mib": mib, "before": before}
    return run


def check(point):
    def run(env, rng, inj):
        spec, zyg = env["spec"], env["zygote"]
        job, before = inj["job"], inj["before"]
        wait_for(lambda: status(spec).open_slots == 0, 10, "the dead writer's slot reclaimed")
        lost, stall, problems = 0, 0.0, []
        for rank in range(inj["ranks"]):
            newest = before + 1
            if rank == inj["victim"] and point != "after_commit":
                newest = before
            held = steps(spec, job, rank)
            if held != list(range(max(1, newest - 1), newest + 1)):
                problems.append(f"rank {rank}: held steps {held}, newest committed {newest}")
            ok, out = restore_check(zyg, spec, job, rank, inj["mib"], newest)
            stall = max(stall, out.get("s", 0))
            if not ok:
                lost += 1
                problems.append(f"rank {rank}: restore gave {out}, want step {newest} exact")
        # Nothing half-written is visible; manifests and versions agree; the daemon serves.
        st = status(spec)
        manifests = shm_files(spec, ".json")
        if len(manifests) != len(st.versions):
            problems.append(f"{len(manifests)} manifests for {len(st.versions)} versions")
        stall = max(stall, assert_serving(env["cluster"]))
        # The rank goes on saving where it left off.
        out = zyg.run("save", spec.control, "--job", job, "--rank", inj["victim"],
                      "--mib", inj["mib"], "--steps", before + 2, before + 2)
        if out.get("done") is not True:
            problems.append(f"the next save after the kill failed: {out}")
        drop_job(env["cluster"], job)
        return Outcome(not problems, lost, stall, detail="; ".join(problems))
    return run


FAULTS = [Fault(f"trainer SIGKILL {point.replace('_', ' ')}",
                f"a trainer (1 of 1-3 ranks saving at once) is killed {point.replace('_', ' ')} "
                "of a save", inject(point), check(point), runs=(2, 30))
          for point in POINTS]


@pytest.mark.parametrize("fault", FAULTS, ids=POINTS)
def test_trainer_killed_during_save(env, fault, request):
    campaign(fault, env, request.node.nodeid)
