"""Restores that hand out copy-on-write mappings of a version (issue 15), with a real daemon.

A fresh tensor of ``restore()`` maps the version's segment privately: it must read exactly the
committed bytes, writing it must never reach the daemon's copy, the version must stay leased
while any such tensor lives, and the bytes must never change under it, even after retention
evicted the version and later saves recycled segments.
"""

import os
import subprocess
import sys
import time
import uuid

import pytest
import torch

from conftest import status, wait_for
from snapshotd_client import SnapshotClient

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def keep2(cluster_factory):
    cluster = cluster_factory(1, args=["--memory-limit", "1GiB", "--reap-interval", "0.2",
                                       "--keep", "2"])
    cluster.start()
    return cluster.specs[0]


def _client(spec, job=None):
    return SnapshotClient(spec.control, job=job or "m" + uuid.uuid4().hex[:8], rank=0)


def _leases(spec):
    return status(spec).open_leases


def _mapped_paths():
    with open("/proc/self/maps") as fh:
        return {line.split()[-1] for line in fh if "seg-" in line}


def test_fresh_tensors_map_the_version_copy_on_write(keep2):
    state = {"w": torch.randn(1 << 18), "i": torch.arange(1000), "n": 3}
    with _client(keep2) as c:
        c.save(1, state).result()
        step, got = c.restore()
        assert step == 1 and got["n"] == 3
        assert torch.equal(got["w"], state["w"]) and torch.equal(got["i"], state["i"])
        assert _leases(keep2) == 1                      # pinned while the tensors live
        got["w"].add_(1)                                # a private copy of the touched pages
        assert torch.equal(got["w"], state["w"] + 1)
        _, again = c.restore(zero_copy=False)           # the daemon's copy is untouched
        assert torch.equal(again["w"], state["w"])
        del again
        # Later saves evict step 1 (keep=2) and reuse segments: never the mapped one.
        for step in (2, 3, 4):
            c.save(step, {"w": torch.full((1 << 18,), float(step)), "i": torch.zeros(1000),
                          "n": step}).result()
        assert torch.equal(got["w"], state["w"] + 1) and torch.equal(got["i"], state["i"])
        assert [v.step for v in status(keep2).versions] == [3, 4]
        assert _leases(keep2) == 1
        del got                                         # freed by reference counting (no
        wait_for(lambda: _leases(keep2) == 0, 10, "the mapped lease to be returned")  # GC run)
        assert not any(os.path.basename(p).startswith("seg-") for p in _mapped_paths()
                       if keep2.shm_dir in p and not os.path.exists(p))


def test_copy_restore_returns_the_lease_at_once(keep2):
    with _client(keep2) as c:
        c.save(1, {"w": torch.ones(1000)}).result()
        _, got = c.restore(zero_copy=False)
        assert _leases(keep2) == 0
        assert torch.equal(got["w"], torch.ones(1000))
        into = {"w": torch.zeros(1000)}
        _, back = c.restore(into=into)                  # only into= tensors: copied
        assert back["w"].data_ptr() == into["w"].data_ptr() and _leases(keep2) == 0


def test_mapped_tensor_outlives_the_client_and_is_reaped_with_the_process(keep2):
    job = "m" + uuid.uuid4().hex[:8]
    with _client(keep2, job) as c:
        c.save(1, {"w": torch.arange(4096.0)}).result()
    script = (
        "import sys, time, torch\n"
        "from snapshotd_client import SnapshotClient\n"
        f"c = SnapshotClient({keep2.control!r}, job={job!r}, rank=0)\n"
        "step, got = c.restore()\n"
        "c.close()\n"
        "assert torch.equal(got['w'], torch.arange(4096.0))\n"
        "print('mapped', flush=True)\n"
        "time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "mapped"
        assert _leases(keep2) == 1                      # close() does not drop a live mapping
    finally:
        proc.kill()
        proc.wait()
    wait_for(lambda: _leases(keep2) == 0, 10, "the dead reader's lease to be reclaimed")


def test_training_state_restore_keeps_no_lease_on_cpu(keep2):
    """TrainingState copies restored optimizer state on CPU (it lives for the whole run)."""
    from snapshotd_client import TrainingState

    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    job = "m" + uuid.uuid4().hex[:8]
    with _client(keep2, job) as c:
        TrainingState(model, opt).save(c, 1).result()
    torch.manual_seed(1)
    model2 = torch.nn.Linear(8, 8)
    opt2 = torch.optim.AdamW(model2.parameters())
    with _client(keep2, job) as c:
        assert TrainingState(model2, opt2).restore(c) == 1
        time.sleep(0.2)
        assert _leases(keep2) == 0
    assert torch.equal(model2.weight, model.weight)
    for a, b in zip(opt.state.values(), opt2.state.values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"])
