"""Fixtures of the fault campaign, loaded by each test module as a plugin
(``pytest_plugins = ["faultfixtures"]``): the trainer zygote, a cluster factory, the keys."""

from __future__ import annotations

from typing import Any

import pytest
from harness import FaultCluster, Zygote, make_cluster


@pytest.fixture(scope="session")
def zygote(tmp_path_factory):
    """One process with torch imported that forks the campaign's trainer processes."""
    z = Zygote(str(tmp_path_factory.mktemp("trainers")))
    yield z
    z.close()


@pytest.fixture(scope="module")
def clusters(tmp_path_factory):
    """A factory of FaultClusters, stopped at the end of the module."""
    made: list[FaultCluster] = []
    root = str(tmp_path_factory.mktemp("faults"))

    def make(nodes: int = 1, **kw: Any) -> FaultCluster:
        cluster = make_cluster(root, nodes, **kw)
        made.append(cluster)
        return cluster

    make.made = made                                   # type: ignore[attr-defined]
    yield make
    for cluster in made:
        cluster.stop()


@pytest.fixture(autouse=True)
def _stop_the_clusters_of_the_test(request):
    """The clusters a test makes itself are stopped when it ends; those of module fixtures
    (an ``env``) at the end of the module. (Left running, a module's idle daemons, 4 per test,
    heartbeating every 0.2 s, took the later tests of test_fault_issue12.py from 8 s to 75 s.)"""
    if "clusters" not in request.fixturenames:
        yield
        return
    made = request.getfixturevalue("clusters").made
    mark = len(made)
    yield
    for cluster in made[mark:]:
        cluster.stop()
    del made[mark:]


@pytest.fixture(scope="session")
def cluster_keys(tmp_path_factory):
    """A cluster CURVE key pair written by ``snapshotctl keygen``."""
    from snapshotd.ops.ctl import main as ctl

    path = str(tmp_path_factory.mktemp("keys") / "cluster")
    assert ctl(["keygen", path]) == 0
    return path
