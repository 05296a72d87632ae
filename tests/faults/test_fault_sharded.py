"""Campaign rows for sharded and split state (issue 13): real torchrun jobs on a loopback
cluster, a rank SIGKILLed (``--fail-at``) or a whole node lost (agent, trainers and daemon
SIGKILLed, its memory removed) and replaced; the job must end bit-identical to an
uninterrupted run (parameters, and for FSDP2 the AdamW moments too).

- FSDP2 (``examples/train_fsdp.py``, ``fully_shard``): each rank stores its own shards.
- DDP with replicas split (``examples/train.py``; the daemons code, so each rank stores its
  share of the replicated state and a restore gathers them).
- HSDP with replicas split (``examples/train_fsdp.py --parallel hsdp``, 2 ranks per node, a
  2 x 3 replicate x shard mesh whose replica pairs sit on different nodes): each rank stores
  its share of its replicated shards.

Long campaign only (``make faults``): every run is a torchrun job and its reference run. The
same behaviours run once in the default suite (tests/integration/test_torchrun*.py).
"""

import shutil
import time
import uuid
from pathlib import Path

import pytest
from harness import LONG, Fault, Outcome, campaign

from snapshotd.tools.torchrun import (
    JsonlTail,
    TorchrunJob,
    compare_params,
    read_jsonl,
    reference_run,
)

pytest_plugins = ["faultfixtures"]

pytestmark = [pytest.mark.timeout(3600),
              pytest.mark.skipif(not LONG, reason="long campaign only (make faults): each run "
                                 "is a torchrun job; tests/integration covers one of each")]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SCRIPTS = {"fsdp2": EXAMPLES / "train_fsdp.py", "ddp-split": EXAMPLES / "train.py",
           "hsdp-split": EXAMPLES / "train_fsdp.py"}
#: (ranks per node, extra script arguments) of each kind; 3 nodes.
SHAPES = {"fsdp2": (1, []), "ddp-split": (1, []), "hsdp-split": (2, ["--parallel", "hsdp"])}


def job_with_a_fault(kind, what):
    def inject(env, rng):
        clusters, tmp = env["clusters"], env["tmp"]
        nodes = 3
        cluster = clusters(nodes, k=2, m=1, args=["--insecure", "--keep", "3"])
        cluster.start()
        steps = rng.randrange(30, 50)
        at = rng.randrange(8, steps - 8)
        per_node, extra = SHAPES[kind]
        victim = rng.randrange(nodes * per_node if what == "rank" else nodes)   # rank / node
        out = tmp / f"{kind}-{what}-{uuid.uuid4().hex[:6]}"
        args = ["--size", "tiny", "--steps", str(steps), "--job", out.name, "--out", str(out),
                "--step-delay", "0.05", *extra]
        if what == "rank":
            args += ["--fail-at", f"{victim}:{at}"]
        losses = JsonlTail(out / "loss.jsonl")
        started = time.monotonic()
        with TorchrunJob(cluster, SCRIPTS[kind], args, out, nproc_per_node=per_node) as job:
            job.start()
            if what == "node":
                while not losses.records or losses.records[-1]["step"] < at:
                    assert not job.finished(), job.returncodes()
                    assert time.monotonic() - started < 240, "the job never reached the step"
                    time.sleep(0.05)
                    losses.poll()
                job.kill_node(victim)
                time.sleep(0.5)
                job.replace_node(victim)
            codes = job.wait(300)
        cluster.stop()
        return {"out": out, "steps": steps, "at": at, "victim": victim, "codes": codes,
                "kind": kind, "what": what}
    return inject


def check(env, rng, run):
    out, kind = run["out"], run["kind"]
    why = f"({kind}: {run['what']} {run['victim']} killed at step {run['at']})"
    if any(code != 0 for code in run["codes"].values()):
        return Outcome(False, detail=f"job failed {run['codes']} {why}")
    starts = [e for e in read_jsonl(out / "events.jsonl") if e["event"] == "start"]
    resumed = [e for e in starts if e["restored"] is not None]
    if not resumed:
        return Outcome(False, lost=3, detail=f"nothing restored {why}: {starts}")
    ref = env["tmp"] / f"ref-{uuid.uuid4().hex[:6]}"
    per_node, extra = SHAPES[kind]
    rc = reference_run(SCRIPTS[kind], ["--size", "tiny", "--steps", str(run["steps"]), *extra],
                       ref, 3 * per_node, timeout=300)
    if rc != 0:
        raise RuntimeError(f"reference run failed ({rc}): "
                           f"{(ref / 'torchrun.log').read_text()[-3000:]}")
    same, detail = compare_params(ref / "final.pt", out / "final.pt")
    shutil.rmtree(ref, ignore_errors=True)
    stall = max((e.get("restore_s", 0.0) for e in resumed), default=0.0)
    lost_steps = run["at"] - max(e["restored"] for e in resumed)
    return Outcome(same, lost=0 if same else 3, stall=stall,
                   detail="" if same else f"final parameters differ {why}: {detail}",
                   figures={"steps_redone": lost_steps})


WHAT = {"fsdp2": "FSDP2 fully_shard", "ddp-split": "DDP, replicas split",
        "hsdp-split": "HSDP 2x3, 2 ranks per node, replicas split"}
FAULTS = [Fault(f"{kind} {what} SIGKILL" if what == "rank" else f"{kind} node lost whole",
                f"torchrun job ({WHAT[kind]}) on 3 loopback nodes (RS k=2 m=1), a "
                + ("rank SIGKILLed at a random step" if what == "rank" else
                   "node (agent, trainer, daemon) SIGKILLed, its memory removed, replaced")
                + "; final state bit-identical to an uninterrupted run",
                job_with_a_fault(kind, what), check, runs=(1, 3))
          for kind in ("fsdp2", "ddp-split", "hsdp-split") for what in ("rank", "node")]


@pytest.mark.parametrize("fault", FAULTS, ids=[f.name for f in FAULTS])
def test_sharded_and_split_state_survive(clusters, tmp_path, request, fault):
    campaign(fault, {"clusters": clusters, "tmp": tmp_path}, request.node.nodeid)
