"""Failure-domain-aware group placement (issue 16; docs/design.md section 4, docs/scale.md).

Property-based (hypothesis, a declared test dependency): for any domain labelling, the groups
keep today's sizes and indices, cover every slot once, are the same for the same labels, and
put no more nodes of a group in one domain than the domains force (checked against an
independent max-flow), so whenever that is at most ``m``, losing any one whole domain leaves
every stripe at least ``k`` fragments.

Run: python -m pytest -q tests/unit/test_placement_domains.py"""

from __future__ import annotations

import doctest
import re
from collections import Counter, deque

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snapshotd.cluster import placement
from snapshotd.cluster.placement import (
    PlacementError,
    domain_spread,
    group_sizes,
    make_groups,
    min_spread,
    stripes,
)

pytestmark = pytest.mark.timeout(120)


def test_doctests() -> None:
    assert doctest.testmod(placement).failed == 0


def max_flow_fits(sizes: list[int], domains: list[str], t: int) -> bool:
    """Independent check (Edmonds-Karp): can groups of ``sizes`` be filled from ``domains``
    with at most ``t`` nodes of a group per domain?"""
    labels = sorted(set(domains))
    supply = Counter(domains)
    d, g = len(labels), len(sizes)
    src, sink = 0, 1 + d + g
    cap: dict[tuple[int, int], int] = {}
    adj: dict[int, set[int]] = {i: set() for i in range(sink + 1)}

    def edge(a: int, b: int, c: int) -> None:
        cap[(a, b)] = cap.get((a, b), 0) + c
        cap.setdefault((b, a), 0)
        adj[a].add(b)
        adj[b].add(a)

    for i, label in enumerate(labels):
        edge(src, 1 + i, supply[label])
        for j in range(g):
            edge(1 + i, 1 + d + j, t)
    for j, size in enumerate(sizes):
        edge(1 + d + j, sink, size)
    flow = 0
    while True:
        parent = {src: src}
        queue = deque([src])
        while queue and sink not in parent:
            a = queue.popleft()
            for b in adj[a]:
                if b not in parent and cap[(a, b)] > 0:
                    parent[b] = a
                    queue.append(b)
        if sink not in parent:
            return flow == len(domains)
        push, b = min(cap[(parent[b], b)] for b in _path(parent, sink)), sink
        for b in _path(parent, sink):
            cap[(parent[b], b)] -= push
            cap[(b, parent[b])] += push
        flow += push


def _path(parent: dict[int, int], node: int) -> list[int]:
    out = []
    while parent[node] != node:
        out.append(node)
        node = parent[node]
    return out


@st.composite
def layouts(draw: st.DrawFn) -> tuple[int, int, int, list[str]]:
    """(nodes, k, m, domains): any valid group layout, domains of uneven sizes, slots of a
    domain consecutive or shuffled."""
    k = draw(st.integers(1, 8))
    m = draw(st.integers(0, 3))
    n = k + m
    groups = draw(st.integers(1, 8))
    last = draw(st.sampled_from([0, *range(m + 1, n)]))
    nodes = groups * n + last if groups * n + last > 0 else n
    ndomains = draw(st.integers(1, min(nodes, 12)))
    weights = draw(st.lists(st.integers(1, 6), min_size=ndomains, max_size=ndomains))
    labels = [f"d{draw(st.integers(0, 99)):02d}-{i}" for i in range(ndomains)]
    slots = []
    for label, w in zip(labels, weights):
        slots += [label] * w
    domains = [slots[(i * len(slots)) // nodes] for i in range(nodes)]   # stretch to nodes
    if draw(st.booleans()):
        domains = draw(st.permutations(domains))
    return nodes, k, m, list(domains)


PROPERTY = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(layouts())
def test_groups_keep_sizes_cover_every_slot_once_and_are_deterministic(layout) -> None:
    nodes, k, m, domains = layout
    groups = make_groups(nodes, k, m, domains)
    assert [g.n for g in groups] == group_sizes(nodes, k, m)
    assert [g.index for g in groups] == list(range(len(groups)))
    assert sorted(s for g in groups for s in g.slots) == list(range(nodes))
    assert all(list(g.slots) == sorted(g.slots) and g.m == m for g in groups)
    assert make_groups(nodes, k, m, list(domains)) == groups


@PROPERTY
@given(layouts())
def test_spread_is_the_least_the_domains_allow(layout) -> None:
    nodes, k, m, domains = layout
    sizes = group_sizes(nodes, k, m)
    groups = make_groups(nodes, k, m, domains)
    best = min_spread(sizes, domains)
    if len(set(domains)) > 1:
        assert domain_spread(groups, domains) == best
    assert max_flow_fits(sizes, domains, best)
    assert best == 1 or not max_flow_fits(sizes, domains, best - 1)


@PROPERTY
@given(layouts())
def test_any_one_domain_lost_leaves_k_fragments_whenever_the_domains_allow(layout) -> None:
    nodes, k, m, domains = layout
    groups = make_groups(nodes, k, m, domains)
    allowed = min_spread(group_sizes(nodes, k, m), domains) <= m
    for lost_domain in set(domains):
        lost = {s for s in range(nodes) if domains[s] == lost_domain}
        ok = all(len([x for x in s.parity + s.data if x not in lost]) >= g.k
                 for g in groups for s in stripes(g))
        if allowed and len(set(domains)) > 1:
            assert ok, f"losing domain {lost_domain} lost data: {groups}"
        if not allowed and len(set(domains)) > 1:
            # Not allowed: some domain must break some group (the spread exceeds m).
            assert domain_spread(groups, domains) > m


@pytest.mark.parametrize("nodes,k,m", [(6, 4, 2), (12, 4, 2), (16, 4, 2), (9, 4, 2),
                                       (20, 8, 2), (14, 10, 4), (5, 2, 1), (1, 1, 0)])
def test_without_or_with_one_domain_the_groups_are_consecutive(nodes: int, k: int,
                                                                m: int) -> None:
    today = make_groups(nodes, k, m)
    assert make_groups(nodes, k, m, None) == today
    assert make_groups(nodes, k, m, ["rack"] * nodes) == today
    assert make_groups(nodes, k, m, [""] * nodes) == today


def test_tie_breaks_are_documented_ones() -> None:
    # Uneven racks: a=5, b=3, c=4 slots; RS(2,2) -> 3 groups of 4, at most 2 per rack.
    domains = ["a"] * 5 + ["b"] * 3 + ["c"] * 4
    groups = make_groups(12, 2, 2, domains)
    # Group 0: a (5 unplaced: slot 0), a (4, ties with c: label a sorts first: slot 1; a now has
    # its 2), c (4: slot 8), b (3, ties with c's 3: slot 5). Group 1: a (3: 2), c (3: 9), a (2,
    # ties: 3) and b (2, tie with c's 2: 6). Group 2: c (2: 10), then a, b, c (1 each: 4, 7, 11).
    assert [g.slots for g in groups] == [(0, 1, 5, 8), (2, 3, 6, 9), (4, 7, 10, 11)]
    assert domain_spread(groups, domains) == 2
    # Only the labels' order matters, not their text.
    renamed = [{"a": "rack-1", "b": "rack-2", "c": "rack-3"}[d] for d in domains]
    assert make_groups(12, 2, 2, renamed) == groups


def test_a_32_node_cluster_of_4_racks() -> None:
    racks = [f"rack-{s // 8}" for s in range(32)]
    groups = make_groups(32, 6, 2, racks)
    assert [g.n for g in groups] == [8, 8, 8, 8]
    assert all(Counter(racks[s] for s in g.slots) == Counter({f"rack-{r}": 2 for r in range(4)})
               for g in groups)
    assert domain_spread(make_groups(32, 6, 2), racks) == 8      # today: a rack is a group


def test_too_few_domains_is_reported_by_the_spread() -> None:
    # RS(4,2) over 2 racks: a group of 6 needs 3 per rack > m = 2, whatever the draw.
    domains = ["a"] * 6 + ["b"] * 6
    assert min_spread(group_sizes(12, 4, 2), domains) == 3
    assert domain_spread(make_groups(12, 4, 2, domains), domains) == 3


def test_wrong_number_of_labels_is_an_error() -> None:
    with pytest.raises(PlacementError, match="3 failure domain labels for 4 node slots"):
        make_groups(4, 1, 1, ["a", "b", "a"])


# --------------------------------------------------------------------------- the daemon's side


def test_domains_setting_names_every_slot() -> None:
    from snapshotd.common.config import build_config, slot_domains

    cfg = build_config(["--domains", "0-2=rack-a,3=rack-b\n4-5=rack-b", "--domain", "rack-a"],
                       environ={})
    assert slot_domains(cfg, 6) == ["rack-a"] * 3 + ["rack-b"] * 3
    assert cfg.domain == "rack-a"
    assert slot_domains(build_config([], environ={}), 6) is None
    env = build_config([], environ={"SNAPSHOTD_DOMAINS": "0=z1,1=z2"})
    assert slot_domains(env, 2) == ["z1", "z2"]


@pytest.mark.parametrize("spec,needle", [
    ("0-2=a", "no failure domain for slot(s) 3"),
    ("0-3=a,3=b", "names slot 3 twice"),
    ("0-4=a", "outside 0..3"),
    ("0-3", "is not SLOT=LABEL"),
    ("x=a", "is not SLOT=LABEL"),
    ("0-3=", "is not SLOT=LABEL"),
])
def test_bad_domains_are_named(spec: str, needle: str) -> None:
    from snapshotd.common.config import ConfigError, build_config, slot_domains

    with pytest.raises(ConfigError, match=re.escape(needle)):
        slot_domains(build_config(["--domains", spec], environ={}), 4)


def _place(argv: list[str]) -> placement.Group:
    from snapshotd.cluster.start import place
    from snapshotd.common.config import build_config

    return place(build_config(argv, environ={}), 12)[0]


def test_the_daemon_places_by_the_map_and_warns_when_domains_cannot_hold_m(caplog) -> None:
    caplog.set_level("INFO", logger="snapshotd.cluster")
    three = "0-3=a,4-7=b,8-11=c"
    group = _place(["--node-slot", "4", "--k", "4", "--m", "2", "--domains", three,
                    "--domain", "b"])
    assert group.slots == (0, 1, 4, 5, 8, 9)
    assert "WARNING" not in caplog.text and "group 0 has {'a': 2, 'b': 2, 'c': 2}" in caplog.text
    caplog.clear()
    _place(["--node-slot", "4", "--k", "4", "--m", "2", "--domains", "0-5=a,6-11=b"])
    assert "cannot keep every group to m=2 nodes per domain: some group has 3" in caplog.text
    caplog.clear()
    _place(["--node-slot", "4", "--k", "4", "--m", "2", "--domains", three, "--domain", "c"])
    assert "says it is in failure domain 'c' but --domains puts slot 4 in 'b'" in caplog.text
    caplog.clear()
    assert _place(["--node-slot", "4", "--k", "4", "--m", "2", "--domain", "c"]).slots == \
        (0, 1, 2, 3, 4, 5)
    assert "there is no --domains map" in caplog.text
