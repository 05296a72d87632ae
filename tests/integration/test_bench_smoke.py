"""The benchmark suite on tiny sizes, so it cannot rot (numbers are not checked: no timed tests)."""

import json
import os

import pytest

from bench.__main__ import main

pytestmark = pytest.mark.timeout(600)


@pytest.mark.skipif(os.environ.get("SNAPSHOTD_FAULT_RUNS", "quick").strip().lower() != "long",
                    reason="make faults (SNAPSHOTD_FAULT_RUNS=long) and make bench: about 40 s")
def test_bench_smoke_runs_every_case(tmp_path):
    assert main(["smoke", "--out", str(tmp_path), "--doc", ""]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    cases = results["cases"]
    assert set(cases) == {"save", "restore", "codec", "rebuild", "memory", "scaling", "training",
                          "savecpu"}
    assert cases["save"][0]["stall"]["median"] > 0
    assert cases["rebuild"][0]["sent_per_node"] > 0
    assert cases["training"][0]["steps_per_s_none"]["median"] > 0
    assert cases["restore"][0]["bit_exact"] is True
    assert cases["savecpu"][0]["committed"] > 0 and cases["savecpu"][0]["copy_cpu"] > 0
