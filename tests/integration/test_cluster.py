"""Six real daemons on loopback, k=4, m=2: any two nodes lost lose nothing (issue 3)."""

import glob
import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import TRAINER, status, wait_for
from snapshotd.ops.ctl import main as ctl
from snapshotd.tools.localcluster import LocalCluster

pytestmark = pytest.mark.timeout(300)
MIB = "32"



def metric(spec, name, **labels):
    body = urllib.request.urlopen(f"http://127.0.0.1:{spec.metrics_port}/metrics").read()
    total = 0.0
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total




def save_everywhere(cluster, slots=None, mib=MIB, steps=("1", "3")):
    """One trainer process per node, all at once, each saving its own distinct state."""
    procs = [subprocess.Popen([sys.executable, TRAINER, "save", "--steps", *steps, "--mib", mib,
                               "--rank", str(s.slot), "--endpoint", s.control],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for s in cluster.specs if slots is None or s.slot in slots]
    for proc in procs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err


def restore_on(cluster, slots, mib=MIB):
    procs = {slot: subprocess.Popen([sys.executable, TRAINER, "restore", "--mib", mib, "--rank",
                                     str(slot), "--endpoint", cluster.specs[slot].control],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for slot in slots}
    out = {}
    for slot, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=180)
        out[slot] = json.loads(stdout.strip().splitlines()[-1]) if stdout.strip() else stderr
    return out


def all_protected(cluster, step):
    return all(any(v.step == step and v.state == "protected" for v in status(s).versions)
               for s in cluster.specs)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("keys") / "cluster")
    assert ctl(["keygen", path]) == 0
    return path


@pytest.fixture(scope="module")
def six(tmp_path_factory, keys):
    """One six-node cluster for the tests below, which run in file order: the first two leave
    it whole (every lost node replaced and rebuilt), the three-node loss comes last."""
    cluster = LocalCluster(6, str(tmp_path_factory.mktemp("six")), k=4, m=2, keys=keys,
                           args=["--memory-limit", "1GiB", "--peer-timeout", "3"])
    cluster.start()
    try:
        save_everywhere(cluster)
        wait_for(lambda: all_protected(cluster, 3), 60, "step 3 protected on every node")
        yield cluster
    finally:
        cluster.stop()


def test_any_two_lost_nodes_are_rebuilt_bit_exactly(six):
    # adjacent; the two parity holders of stripe 5 (wrapping); apart (node 0 again: a node
    # that was itself rebuilt is a source now)
    long = os.environ.get("SNAPSHOTD_FAULT_RUNS", "quick").strip().lower() == "long"
    for pair in [(1, 2), (5, 0), (0, 3)] if long else [(5, 0)]:     # make faults: all three
        for slot in pair:
            six.kill(slot)
        for slot in pair:
            six.replace(slot)
        assert restore_on(six, pair) == {s: {"step": 3, "exact": True} for s in pair}, pair
        for slot in pair:
            assert metric(six.specs[slot], "snapshotd_rebuilt_bytes_total") >= 32 << 20
        wait_for(lambda: not any(status(s).rebuilding for s in six.specs), 60, "rebuilds")
        assert all_protected(six, 3)
    survivors = restore_on(six, range(6))
    assert all(r == {"step": 3, "exact": True} for r in survivors.values()), survivors


def test_corrupted_segment_is_detected_and_rebuilt(six):
    spec = six.specs[2]
    rebuilds = metric(spec, "snapshotd_rebuilds_total")
    failures = metric(spec, "snapshotd_checksum_failures_total")
    manifests = [json.load(open(f)) for f in glob.glob(os.path.join(spec.shm_dir, "seg-*.json"))]
    (seg,) = [f for f, m in zip(glob.glob(os.path.join(spec.shm_dir, "seg-*.json")), manifests)
              if m["step"] == 3]
    tensor = json.load(open(seg))["tensors"][3]
    with open(seg.replace(".json", ".bin"), "r+b") as fh:
        fh.seek(tensor["offset"] + 1000)
        fh.write(b"\xde\xad\xbe\xef")
    assert ctl(["--control", spec.control, "verify", "--job", "test"]) == 1
    assert restore_on(six, [2]) == {2: {"step": 3, "exact": True}}
    assert metric(spec, "snapshotd_checksum_failures_total") >= failures + 1
    assert metric(spec, "snapshotd_rebuilds_total") == rebuilds + 1
    assert ctl(["--control", spec.control, "verify", "--job", "test"]) == 0


def test_three_lost_nodes_give_a_clear_error_and_survivors_serve(six):
    for slot in (1, 2, 3):
        six.kill(slot)
    six.replace(1)
    out = restore_on(six, [1, 0, 4])
    assert out[0] == out[4] == {"step": 3, "exact": True}
    assert out[1]["error"] == "DaemonError"
    msg = out[1]["message"]
    assert "cannot_rebuild" in msg and "group 0" in msg and "[1, 2, 3]" in msg
    assert "step 3" in msg and "m=2" in msg


@pytest.mark.skipif(os.environ.get("SNAPSHOTD_FAULT_RUNS", "quick").strip().lower() != "long",
                    reason="make faults: 14 s; tests/faults/test_fault_security.py checks "
                    "peers without the cluster key in every run")
def test_peer_with_the_wrong_key_can_neither_read_nor_write(cluster_factory, keys, tmp_path):
    assert ctl(["keygen", str(tmp_path / "other")]) == 0
    cluster = cluster_factory(3, k=2, m=1, keys=keys, args=["--peer-timeout", "2"])
    cluster.slot_args[2] = ["--keys", str(tmp_path / "other")]
    cluster.start()
    save_everywhere(cluster, mib="1")
    time.sleep(3)
    for spec in cluster.specs[:2]:
        assert 2 in status(spec).peers_down
        assert metric(spec, "snapshotd_memory_used_bytes", kind="parity") == 0   # not written
        assert all(v.state == "local" for v in status(spec).versions)
    assert status(cluster.specs[2]).peers_up == ()
    cluster.kill(2)
    cluster.replace(2)                          # empty, still the wrong key: nothing to read
    assert restore_on(cluster, [2], mib="1") == {2: {"step": None}}
    cluster.slot_args[2] = []                   # the right key: the same node now takes part
    cluster.replace(2)
    save_everywhere(cluster, mib="1", steps=("4", "4"))
    wait_for(lambda: all_protected(cluster, 4), 30, "step 4 protected once keys match")


@pytest.mark.parametrize("codec, k, m, lose", [("reedsolo", 2, 1, (0,)),
                                              ("replicate", 1, 2, (1, 2))])
def test_fallback_codecs_recover_lost_nodes(cluster_factory, keys, codec, k, m, lose):
    cluster = cluster_factory(3, k=k, m=m, keys=keys, args=["--codec", codec])
    cluster.start()
    save_everywhere(cluster, mib="1")
    wait_for(lambda: all_protected(cluster, 3), 60, "step 3 protected")
    for slot in lose:
        cluster.kill(slot)
    for slot in lose:
        cluster.replace(slot)
    assert restore_on(cluster, lose, mib="1") == {s: {"step": 3, "exact": True} for s in lose}
