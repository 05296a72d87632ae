"""The survival planner (issue 16; snapshotd/cluster/planner.py, docs/scale.md): closed forms
against brute force and against a Monte Carlo that runs the real placement, Gemini's figure,
domain losses, and ``snapshotctl plan``.

Run: python -m pytest -q tests/unit/test_planner.py"""

from __future__ import annotations

import doctest
import itertools
import json
import math

import pytest

from snapshotd.cluster import planner
from snapshotd.cluster.placement import make_groups, stripes
from snapshotd.cluster.planner import (
    Scheme,
    burst_survival,
    domain_survival,
    gemini_replicas,
    losses_per_day,
    monte_carlo_burst,
    plan,
    union_bound,
)
from snapshotd.ops import ctl

pytestmark = pytest.mark.timeout(120)


def test_doctests() -> None:
    assert doctest.testmod(planner).failed == 0
    assert doctest.testmod(ctl).failed == 0


def test_gemini_figure_16_nodes_pairs_2_failures() -> None:
    groups = make_groups(16, 1, 1)                 # replica groups of r = 2
    exact = burst_survival(groups, 2)
    assert exact == pytest.approx(1 - 8 / 120) and round(100 * exact, 1) == 93.3
    assert gemini_replicas(16, 2, 2) == pytest.approx(exact)
    assert union_bound(groups, 2) == pytest.approx(exact)
    est = monte_carlo_burst(groups, 2, trials=40000, seed=16)
    assert est.lo <= exact <= est.hi


def brute_force(groups, f: int) -> float:
    """Every set of f lost nodes, checked stripe by stripe."""
    nodes = sorted(s for g in groups for s in g.slots)
    ok = 0
    for lost in itertools.combinations(nodes, f):
        down = set(lost)
        ok += all(sum(x not in down for x in st.parity + st.data) >= g.k
                  for g in groups for st in stripes(g))
    return ok / math.comb(len(nodes), f)


@pytest.mark.parametrize("nodes,k,m", [(12, 4, 2), (10, 4, 2), (16, 1, 1), (15, 1, 2),
                                       (14, 2, 1), (9, 2, 3)])
def test_exact_survival_is_brute_force(nodes: int, k: int, m: int) -> None:
    groups = make_groups(nodes, k, m)
    for f in range(0, min(nodes, 7) + 1):
        assert burst_survival(groups, f) == pytest.approx(brute_force(groups, f), abs=1e-12)
        assert union_bound(groups, f) <= burst_survival(groups, f) + 1e-12


@pytest.mark.parametrize("r", [2, 3])
def test_gemini_is_the_union_bound_for_replicas_and_exact_below_2r(r: int) -> None:
    nodes = 24
    groups = make_groups(nodes, 1, r - 1)
    for f in range(1, 13):
        assert gemini_replicas(nodes, r, f) == pytest.approx(union_bound(groups, f))
        if f < 2 * r:
            assert gemini_replicas(nodes, r, f) == pytest.approx(burst_survival(groups, f))
        else:
            assert gemini_replicas(nodes, r, f) <= burst_survival(groups, f) + 1e-12


# Closed form vs the Monte Carlo on the real placement: layouts with and without domains,
# uneven last groups, several burst sizes. Seeds are fixed: the check is reproducible; the
# 99.9% interval makes a wrong closed form fail and a right one pass.
MC_CASES = [
    (64, 4, 2, 8, [6, 10, 16]),
    (100, 6, 2, 10, [4, 8, 12]),
    (96, 1, 2, 8, [3, 6, 12]),      # 3 copies
    (64, 1, 1, 16, [2, 4, 8]),      # 2 copies
    (70, 6, 3, 7, [8, 14]),
]


@pytest.mark.parametrize("nodes,k,m,rack,bursts", MC_CASES)
def test_closed_form_within_the_monte_carlo_interval(nodes, k, m, rack, bursts) -> None:
    racks = [f"rack-{s // rack}" for s in range(nodes)]
    for domains in (None, racks):
        groups = make_groups(nodes, k, m, domains)
        for f in bursts:
            exact = burst_survival(groups, f)
            est = monte_carlo_burst(groups, f, trials=10000, seed=nodes * 100 + f)
            assert est.lo <= exact <= est.hi, (nodes, k, m, f, exact, est)
            assert est.hi - est.lo < 0.04


def test_domain_loss_with_and_without_domain_placement() -> None:
    racks = [f"rack-{s // 16}" for s in range(64)]          # 4 racks of neighbours
    assert domain_survival(make_groups(64, 4, 2, racks), racks) == 1.0
    assert domain_survival(make_groups(64, 4, 2), racks) == 0.0
    # 3 racks for groups of 6 with m=2: 2 per rack, every rack survivable; m=1 is not.
    three = [f"r{s // 8}" for s in range(24)]
    assert domain_survival(make_groups(24, 4, 2, three), three) == 1.0
    assert domain_survival(make_groups(24, 5, 1, three), three) == 0.0


def test_losses_per_day() -> None:
    groups = make_groups(60, 4, 2)
    racks = [f"r{s // 10}" for s in range(60)]
    # m = 0: every node failure loses that node's data.
    assert losses_per_day(make_groups(60, 6, 0), None, 0.01, 0, 1)[0] == pytest.approx(0.6)
    node, dom = losses_per_day(make_groups(60, 4, 2, racks), racks, 0.004, 0.001, 1.0)
    p = 0.004 / 24
    # First order: a third failure in a group of 6 with two down already.
    assert node == pytest.approx(60 * 0.004 * math.comb(5, 2) * p ** 2, rel=0.01)
    # Domain-aware: a rack takes 1 node of each group (6 racks, groups of 6); loss needs two
    # more of the group's other 5 down at that moment.
    assert dom == pytest.approx(6 * 0.001 * 10 * math.comb(5, 2) * p ** 2, rel=0.01)
    # Consecutive groups: a rack of 10 holds more than m of some group: every rack loss loses.
    assert losses_per_day(groups, racks, 0.004, 0.001, 1.0)[1] == pytest.approx(6 * 0.001)


def test_scheme_costs() -> None:
    rs = Scheme.parse("4+2")
    assert (rs.memory, rs.network, rs.rebuild) == (1.5, 1.25, 4.0)
    three = Scheme.parse("r3")
    assert (three.k, three.m, three.memory, three.network) == (1, 2, 3.0, 2.0)
    with pytest.raises(ValueError, match="is not K\\+M"):
        Scheme.parse("4x2")


def test_plan_reports_a_scheme_that_does_not_fit() -> None:
    out = plan(1024, [Scheme.parse("r3"), Scheme.parse("4+2")], bursts=(2,))
    assert "too small for m=2" in out[0].error
    assert not out[1].error and len(out[1].groups) == 171


def test_snapshotctl_plan(capsys) -> None:
    argv = ["plan", "--nodes", "48", "--schemes", "4+2,r2", "--domain-size", "8",
            "--bursts", "2,4", "--state", "8GiB", "--monte-carlo", "4000"]
    assert ctl.main(argv) == 0
    text = capsys.readouterr().out
    assert "6 failure domains, groups placed across them" in text
    assert "groups of consecutive slots (no --domains)" in text
    assert "12.0 GiB" in text and "DISAGREE" not in text and text.count("agree") == 8
    assert ctl.main(["--json", *argv]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["scheme"], r["aware"], r["domain_lost"]) for r in rows] == [
        ("RS(4,2)", True, 1.0), ("2 copies", True, 1.0),
        ("RS(4,2)", False, 0.0), ("2 copies", False, 0.0)]
    assert ctl.main(["plan", "--nodes", "10", "--schemes", "4x2"]) == 2
