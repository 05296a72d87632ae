"""Regression tests for issue 25 (the daemon's own robustness), one per finding, named after
it, with real daemons, real trainer processes, real SIGKILLs and SIGSTOPs. (Findings 1, 3 and
7 are unit tests: tests/unit/test_locks.py, test_protection_drops.py, test_floors.py; the
lock-order checker runs in every test.)"""

import signal
import time

import pytest
from harness import (
    FAST,
    FAST_SETTLE_S,
    all_protected,
    call,
    log_tail,
    lose,
    restore_check,
    save_on,
    wait_for,
)

from snapshotd.common import protocol as p

pytest_plugins = ["faultfixtures"]

pytestmark = pytest.mark.timeout(180)


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
