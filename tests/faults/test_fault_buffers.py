"""A trainer whose forward changes buffers in place (BatchNorm running statistics, a counter
buffer) is SIGKILLed mid-step, at a random moment, many times: every restore is exactly the
state at that step's ``save()`` (parameters, buffers, optimizer moments, data position), and
the run resumes from it bit-identically (the check recomputes the state from scratch)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from harness import LONG, Fault, Outcome, campaign, drop_job, unique

pytest_plugins = ["faultfixtures"]

pytestmark = pytest.mark.timeout(1800 if LONG else 240)

BNTRAINER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bntrainer.py")


@pytest.fixture(scope="module")
def env(clusters):
    cluster = clusters(1, args=["--memory-limit", "512MiB", "--reap-interval", "0.2"])
    cluster.start()
    return {"cluster": cluster, "spec": cluster.specs[0]}


def _run(spec, *args, timeout=120):
    out = subprocess.run([sys.executable, BNTRAINER, *args, "--endpoint", spec.control],
                         capture_output=True, text=True, timeout=timeout)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        raise AssertionError(f"bntrainer {args[0]} failed ({out.returncode}): {out.stderr[-2000:]}")
    return json.loads(lines[-1])


def inject(env, rng):
    spec = env["spec"]
    job = unique("bn")
    kills = []
    for _ in range(rng.choice([1, 2]) if not LONG else rng.choice([1, 2, 3])):
        proc = subprocess.Popen([sys.executable, BNTRAINER, "train", "--endpoint", spec.control,
                                 "--job", job], stdout=subprocess.PIPE, text=True)
        target = rng.randint(2, 12)
        saved, committed = -1, -1
        while saved < target:
            line = proc.stdout.readline()
            if not line:
                raise AssertionError(f"bntrainer exited early ({proc.wait()})")
            saved = json.loads(line).get("saved", saved)
            committed = max(committed, json.loads(line).get("committed", -1))
        time.sleep(rng.uniform(0, 0.03))              # somewhere inside the next step
        os.kill(proc.pid, signal.SIGKILL)
        # What the trainer saw committed before it died must come back (a save still in
        # flight at the kill may or may not).
        for line in proc.stdout:
            committed = max(committed, json.loads(line).get("committed", -1))
        proc.wait()
        kills.append(committed)
    return {"job": job, "kills": kills}


def check(env, rng, inj):
    spec = env["spec"]
    started = time.monotonic()
    out = _run(spec, "check", "--job", inj["job"])
    stall = time.monotonic() - started
    problems = []
    if inj["kills"][-1] >= 0 and (out.get("step") is None or out["step"] < inj["kills"][-1]):
        problems.append(f"restored {out.get('step')}, committed at least {inj['kills'][-1]}")
    if not out.get("exact"):
        problems.append(f"step {out.get('step')} differs from the state at its save(): "
                        f"{out.get('diff')}")
    drop_job(env["cluster"], inj["job"])
    return Outcome(not problems, int(bool(problems)), stall, detail="; ".join(problems))


FAULT = Fault("trainer SIGKILL mid-step, buffers changed by forward",
              "a BatchNorm model (and a buffer its forward bumps) saved every step is killed at a "
              "random moment of the next step, 1-3 times in a row; the restore must equal the "
              "state at that step's save()", inject, check, runs=(1, 30))


def test_buffers_changed_by_forward_never_torn(env, request):
    campaign(FAULT, env, request.node.nodeid)
