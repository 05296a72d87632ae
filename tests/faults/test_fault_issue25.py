"""Issue 25, findings 5, 6, 8 and 9: what a daemon adopts from its shm directory at start.

Real daemons (3 nodes, RS(2,1), one rank per node, 1 MiB per rank, 0.2 s heartbeats, as the
review ran them): a daemon is SIGKILLed, files in its directory are damaged as the review
damaged them, and it is started again on that memory.

- 5: a manifest whose step was flipped (2 -> 3) is refused (its checksum), never served.
- 6: valid JSON of the wrong types (manifests, parity descriptions, floors.json without
  ``held``) never stops the daemon from starting, nor Status/ListVersions, housekeeping or a
  later rebuild (Inventory) from working; the rest of the node's versions stay.
- 8: each discard at adoption is a WARNING naming the file, and job/rank/step where readable.
- 9: parity flipped while its node was down is found by the background scrub, counted, and
  re-created from the data nodes: a later loss of a data node of that stripe rebuilds exactly.
"""

import json
import os
import re

import pytest
from harness import (
    FAST,
    FAST_SETTLE_S,
    all_protected,
    call,
    lose,
    metric,
    peer_call,
    restore_all,
    save_on,
    status,
    wait_for,
)

from snapshotd.cluster import peerproto as pp
from snapshotd.common import protocol as p
from snapshotd.node._shm import seal

pytest_plugins = ["faultfixtures"]

pytestmark = pytest.mark.timeout(240)

RESUME_S = FAST_SETTLE_S


def started(clusters, zygote, jobs, steps=(1, 2)):
    """A running 3-node RS(2,1) cluster where every job in ``jobs`` saved ``steps`` (one rank
    per node, 1 MiB) and the last step is protected on every node."""
    cluster = clusters(3, k=2, m=1, args=FAST)
    cluster.start()
    for job in jobs:
        save_on(zygote, cluster, job, steps[0], steps[-1], 1)
    for job in jobs:
        wait_for(lambda job=job: all_protected(cluster, job, steps[-1]), RESUME_S,
                 f"{job} step {steps[-1]} protected")
    return cluster


def records(spec, prefix):
    """(path, record) of every ``prefix-N.json`` in a daemon's directory."""
    out = []
    for name in sorted(os.listdir(spec.shm_dir)):
        if name.startswith(prefix + "-") and name.endswith(".json"):
            path = os.path.join(spec.shm_dir, name)
            with open(path) as fh:
                out.append((path, json.load(fh)))
    return out


def manifest_of(spec, job, rank, step):
    (found,) = [path for path, m in records(spec, "seg")
                if (m["job"], m["rank"], m["step"]) == (job, rank, step)]
    return found


def parity_of(spec, job, step):
    return [(path, m) for path, m in records(spec, "par") if (m["job"], m["step"]) == (job, step)]


def rewrite(path, change):
    """Rewrite a sealed record with ``change`` applied and sealed again (valid JSON, a valid
    checksum: only the types are wrong)."""
    with open(path) as fh:
        record = json.load(fh)
    record.pop("check", None)
    change(record)
    with open(path, "w") as fh:
        fh.write(seal(json.dumps(record, separators=(",", ":"))))


def warnings_in(spec):
    with open(spec.log_path, errors="replace") as fh:
        return [line for line in fh if " WARNING " in line]


def held_steps(spec, job):
    return sorted(v.step for v in status(spec).versions if v.job == job)


# --------------------------------------------------------------------------- finding 5


def test_finding5_a_flipped_step_in_a_manifest_is_refused_not_served(clusters, zygote):
    cluster = started(clusters, zygote, ["job"])
    spec = cluster.specs[0]
    cluster.kill(0)
    path = manifest_of(spec, "job", 0, 2)
    with open(path, "rb") as fh:
        data = fh.read()
    assert data.count(b'"step":2,') == 1
    with open(path, "wb") as fh:                    # one bit: '2' (0x32) -> '3' (0x33)
        fh.write(data.replace(b'"step":2,', b'"step":3,'))
    cluster.restart(0)
    assert 3 not in held_steps(spec, "job"), "step 3 was never committed"
    assert 3 not in [v.step for v in call(spec, p.ListVersions("job")).versions]
    lines = [w for w in warnings_in(spec) if os.path.basename(path) in w]
    assert lines and "checksum" in lines[0] and "'job'" in lines[0], warnings_in(spec)
    # Step 2 is still what rank 0 restores (rebuilt from the group), bit for bit.
    lost, _, problems, _ = restore_all(zygote, cluster, "job", 1, {(0, 0): 2, (1, 1): 2})
    assert lost == 0, problems
    assert 3 not in held_steps(spec, "job")


# --------------------------------------------------------------------------- finding 6

#: Manifest fields of the wrong type (one job each, its step 2 on node 0), as the review wrote them.
MANIFEST_TYPES = {
    "m-world": ("world_size", "x"), "m-step": ("step", "2"), "m-job": ("job", ["j"]),
    "m-lws": ("local_world_size", "1"), "m-at": ("committed_at", "yesterday"),
}
#: Parity description fields of the wrong type (one job each, its step-1 parity on node 0).
PARITY_TYPES = {"m-world": ("job", ["j"]), "m-step": ("step", "2"), "m-job": ("checksum", 5)}


def test_finding6_wrong_types_at_adoption_never_stop_the_node(clusters, zygote):
    cluster = started(clusters, zygote, sorted(MANIFEST_TYPES))
    spec = cluster.specs[0]
    cluster.kill(0)
    damaged = {}
    for job, (name, value) in MANIFEST_TYPES.items():
        path = manifest_of(spec, job, 0, 2)
        rewrite(path, lambda m, name=name, value=value: m.__setitem__(name, value))
        damaged[os.path.basename(path)] = name
    for job, (name, value) in PARITY_TYPES.items():
        (path, _), = parity_of(spec, job, 1)
        rewrite(path, lambda m, name=name, value=value: m.__setitem__(name, value))
        damaged[os.path.basename(path)] = name
    rewrite(os.path.join(spec.shm_dir, "floors.json"), lambda f: f.pop("held"))
    cluster.restart(0)                               # before the fix: exit 1 at start
    # Status and ListVersions answer, and list only committed steps.
    for job in MANIFEST_TYPES:
        assert set(held_steps(spec, job)) <= {1, 2}
        assert {v.step for v in call(spec, p.ListVersions(job)).versions} <= {1, 2}
        assert 1 in held_steps(spec, job), "the intact step 1 was not kept"
    warned = "".join(warnings_in(spec))
    for name, field in damaged.items():
        assert re.search(rf"{re.escape(name)}.*{field}", warned), (name, field, warned)
    assert "floors.json" in warned and "held" in warned
    # Housekeeping and Inventory work: a new step is protected on every node, and a node
    # lost afterwards is rebuilt (its rebuild asks node 0 for its Inventory).
    save_on(zygote, cluster, "m-lws", 3, 3, 1)
    wait_for(lambda: all_protected(cluster, "m-lws", 3), RESUME_S, "step 3 protected")
    inv, _ = peer_call(spec, pp.Inventory(0))
    assert any(h.job == "m-lws" and h.step == 3 for h in inv.data)
    lose(cluster, 1)
    cluster.replace(1)
    lost, _, problems, _ = restore_all(zygote, cluster, "m-lws", 1,
                                       {(0, 0): 3, (1, 1): 3, (2, 2): 3})
    assert lost == 0, problems
    for daemon in cluster.daemons.values():
        assert daemon.alive()


# --------------------------------------------------------------------------- finding 8


def test_finding8_discards_at_adoption_are_warnings_naming_what_was_lost(clusters, zygote):
    cluster = started(clusters, zygote, ["job"])
    spec = cluster.specs[0]
    cluster.kill(0)
    empty, cut = manifest_of(spec, "job", 0, 1), manifest_of(spec, "job", 0, 2)
    with open(empty, "w"):
        pass                                         # a zero-length manifest
    with open(cut[:-len(".json")] + ".bin", "r+b") as fh:
        fh.truncate(4096)                            # a truncated segment
    (par, _), = parity_of(spec, "job", 2)
    with open(par, "r+b") as fh:
        fh.truncate(os.path.getsize(par) // 2)       # truncated parity JSON
    cluster.restart(0)
    warned = warnings_in(spec)
    text = "".join(warned)
    assert os.path.basename(empty) in text and "empty" in text, text
    (line,) = [w for w in warned if os.path.basename(cut) in w]
    assert "'job'" in line and "rank 0" in line and "step 2" in line and "4096" in line, line
    assert os.path.basename(par) in text, text
    assert re.search(r"WARNING segments in .*: adopted 0 committed versions.* 2 of them", text), \
        text


# --------------------------------------------------------------------------- finding 9


def test_finding9_parity_flipped_while_down_is_scrubbed_and_recreated(clusters, zygote):
    cluster = started(clusters, zygote, ["job"])
    holder = 2
    spec = cluster.specs[holder]
    (desc, meta), = parity_of(spec, "job", 2)
    cluster.kill(holder)
    with open(desc[:-len(".json")] + ".bin", "r+b") as fh:
        fh.seek(meta["length"] // 2)
        byte = fh.read(1)[0]
        fh.seek(meta["length"] // 2)
        fh.write(bytes([byte ^ 0x10]))               # one bit, while the daemon is down
    cluster.restart(holder)
    wait_for(lambda: metric(spec, "snapshotd_parity_scrub_failures_total") >= 1, RESUME_S,
             "the scrub to find the flipped parity")
    with open(spec.log_path) as fh:
        wait_for(lambda: "re-created damaged parity" in fh.read(), RESUME_S,
                 "the damaged parity re-created")
    chunk, frames = peer_call(spec, pp.GetParity("job", 2, meta["stripe"], meta["index"]))
    assert chunk.checksum == meta["checksum"] and len(frames[0]) == meta["length"]
    # A data node of that stripe lost: its rebuild needs this parity (k=2, m=1).
    victim = meta["frags"][0][0]
    lose(cluster, victim)
    cluster.replace(victim)
    lost, _, problems, _ = restore_all(zygote, cluster, "job", 1, {(victim, victim): 2})
    assert lost == 0, problems
