"""Operations: Prometheus scraping a real daemon, export to DCP, persistence tier, verify."""

import glob
import json
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request

import pytest
import torch
import torch.distributed.checkpoint as dcp

from conftest import trainer
from snapshotd.ops.ctl import main as ctl
from snapshotd.tools.localcluster import free_ports
from snapshotd_client import SnapshotClient

pytestmark = pytest.mark.timeout(240)


def state_for(step):
    g = torch.Generator().manual_seed(step)
    return {"model": {"w": torch.randn(64, 32, generator=g), "b": torch.randn(32, generator=g)},
            "optim": {"step": step, "lr": 0.1, "betas": (0.9, 0.99), "name": "adamw"},
            "rng": torch.get_rng_state()}


def assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    else:
        assert a == b or tuple(a) == tuple(b)


def test_export_is_loadable_by_plain_dcp(node, tmp_path):
    spec = node.specs[0]
    with SnapshotClient(spec.control, job="exp", rank=0) as client:
        client.save(7, state_for(7)).result()
    out = tmp_path / "ckpt"
    assert ctl(["--control", spec.control, "export", "--job", "exp", "--out", str(out)]) == 0
    assert os.path.exists(out / ".metadata")
    template = state_for(0)
    template["optim"] = {"step": 0, "lr": 0.0, "betas": (0.0, 0.0), "name": ""}
    dcp.load(template, checkpoint_id=str(out), no_dist=True)
    assert_same(state_for(7), template)


def test_verify_catches_a_corrupted_segment(node):
    spec = node.specs[0]
    trainer(spec.control, "save", "--steps", "1", "1", "--mib", "1")
    assert ctl(["--control", spec.control, "verify", "--job", "test"]) == 0
    (seg,) = glob.glob(os.path.join(spec.shm_dir, "seg-*.bin"))
    with open(seg, "r+b") as fh:
        fh.seek(100)
        fh.write(b"\x00\xff\x00\xff")
    assert ctl(["--control", spec.control, "verify", "--job", "test"]) == 1
    assert trainer(spec.control, "restore", "--mib", "1")["error"] == "DaemonError"


def test_restore_falls_back_to_the_persistence_tier(cluster_factory, tmp_path):
    persist = tmp_path / "persist"
    cluster = cluster_factory(3, k=2, m=1, args=[
        "--insecure", "--persist-every", "2", "--peer-timeout", "2"])
    for spec in cluster.specs:
        cluster.slot_args[spec.slot] = ["--persist-dir", str(persist / f"node{spec.slot}")]
    cluster.start()
    for spec in cluster.specs:
        with SnapshotClient(spec.control, job="p", rank=spec.slot) as client:
            for step in range(1, 6):
                client.save(step, state_for(step * 10 + spec.slot)).result()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not all(
            os.path.isdir(persist / f"node{s}" / "p" / "step-000000000004") for s in range(3)):
        time.sleep(0.2)
    assert all(os.path.isdir(persist / f"node{s}" / "p" / "step-000000000004") for s in range(3))
    assert sorted(os.listdir(persist / "node0" / "p")) == [   # every 2nd step, 2 kept
        "step-000000000002", "step-000000000004"]
    for slot in range(3):                       # every daemon restarted with empty memory
        cluster.kill(slot)
    for slot in range(3):
        cluster.replace(slot)
    for spec in cluster.specs:
        with SnapshotClient(spec.control, job="p", rank=spec.slot) as client:
            step, state = client.restore()
            assert (step, client.last_restore.tier) == (4, "disk")
            assert_same(state_for(40 + spec.slot), state)


def test_prometheus_scrapes_the_snapshot_age(node, tmp_path):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("Debian's prometheus package is not installed (make setup installs it)")
    spec = node.specs[0]
    with SnapshotClient(spec.control, job="prom", rank=3) as client:
        client.save(1, state_for(1)).result()
    (port,) = free_ports(1)
    config = tmp_path / "prometheus.yml"
    config.write_text(f"""
global: {{scrape_interval: 1s, evaluation_interval: 1s}}
scrape_configs:
  - job_name: snapshotd
    static_configs: [{{targets: ["127.0.0.1:{spec.metrics_port}"]}}]
""")
    proc = subprocess.Popen([binary, f"--config.file={config}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        query = urllib.parse.quote('snapshotd_snapshot_age_seconds{exported_job="prom"}')
        deadline = time.monotonic() + 60
        result = []
        while time.monotonic() < deadline and not result:
            time.sleep(0.5)
            try:
                body = urllib.request.urlopen(
                    f"http://127.0.0.1:{port}/api/v1/query?query={query}", timeout=5).read()
            except (TimeoutError, OSError):
                continue
            result = json.loads(body)["data"]["result"]
        assert result, "Prometheus never saw snapshotd_snapshot_age_seconds"
        assert result[0]["metric"]["rank"] == "3"
        assert 0 <= float(result[0]["value"][1]) < 120
    finally:
        proc.terminate()
        proc.wait(30)


def test_every_save_is_timed_spare_slot_saves_included(node):
    """snapshotd_save_duration_seconds counts every save: from the second save on a client
    writes into a spare slot reserved at the previous commit (no Alloc), whose age is not the
    save's time; the client says how long its save took (issue 15: those were not counted)."""
    import re

    spec = node.specs[0]

    def count() -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{spec.metrics_port}/metrics") as resp:
            text = resp.read().decode()
        found = re.search(r"^snapshotd_save_duration_seconds_count (\S+)$", text, re.M)
        return float(found.group(1)) if found else 0.0

    before = count()
    with SnapshotClient(spec.control, job="timed", rank=0) as client:
        for step in range(6):
            client.save(step, {"w": torch.full((4096,), float(step))}).result()
    assert count() - before == 6
