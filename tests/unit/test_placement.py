"""Stripe placement (docs/design.md section 4).

Run: python -m pytest -q tests/unit/test_placement.py"""

from __future__ import annotations

import itertools
import re
from collections import Counter

import pytest

from snapshotd.cluster.placement import (
    Group,
    PlacementError,
    Stripe,
    data_stripes,
    group_of,
    make_groups,
    parity_stripes,
    replicas,
    stripes,
)

pytestmark = pytest.mark.timeout(60)

# (nodes, k, m): exact multiples, smaller last groups, k=1 (replication-like), m=0, one group.
LAYOUTS = [
    (6, 4, 2), (12, 4, 2), (16, 4, 2), (9, 4, 2), (20, 8, 2), (14, 10, 4), (5, 2, 1), (8, 2, 1),
    (10, 3, 3), (6, 1, 2), (4, 4, 0), (3, 4, 2), (1, 1, 0), (2, 1, 1),
]


def all_groups() -> list[tuple[tuple[int, int, int], Group]]:
    return [(layout, g) for layout in LAYOUTS for g in make_groups(*layout)]


GROUPS = all_groups()
IDS = [f"{nodes}n-rs{k}.{m}-g{g.index}" for (nodes, k, m), g in GROUPS]


@pytest.mark.parametrize("nodes,k,m", LAYOUTS)
def test_groups_cover_all_nodes_consecutively(nodes: int, k: int, m: int) -> None:
    groups = make_groups(nodes, k, m)
    assert [s for g in groups for s in g.slots] == list(range(nodes))
    assert [g.index for g in groups] == list(range(len(groups)))
    for g in groups:
        assert g.m == m and g.k + g.m == len(g.slots) and g.k >= 1
        assert g.k == k or g is groups[-1]
        assert all(b == a + 1 for a, b in zip(g.slots, g.slots[1:]))
        for slot in g.slots:
            assert group_of(slot, groups) is g


@pytest.mark.parametrize("layout,group", GROUPS, ids=IDS)
def test_stripes_use_k_plus_m_distinct_nodes_of_the_group(layout: tuple, group: Group) -> None:
    all_stripes = stripes(group)
    assert [s.index for s in all_stripes] == list(range(len(group.slots)))
    for s in all_stripes:
        assert s.group == group.index
        assert len(s.parity) == group.m and len(s.data) == group.k
        nodes = s.parity + s.data
        assert len(set(nodes)) == group.k + group.m
        assert set(nodes) <= set(group.slots)


@pytest.mark.parametrize("layout,group", GROUPS, ids=IDS)
def test_every_node_holds_parity_in_m_and_data_in_k_stripes(layout: tuple, group: Group) -> None:
    all_stripes = stripes(group)
    parity = Counter(n for s in all_stripes for n in s.parity)
    data = Counter(n for s in all_stripes for n in s.data)
    for slot in group.slots:
        assert parity[slot] == group.m
        assert data[slot] == group.k


@pytest.mark.parametrize("layout,group", GROUPS, ids=IDS)
def test_any_m_lost_nodes_leave_k_chunks_in_every_stripe(layout: tuple, group: Group) -> None:
    all_stripes = stripes(group)
    for count in range(group.m + 1):
        for lost in itertools.combinations(group.slots, count):
            for s in all_stripes:
                alive = [n for n in s.parity + s.data if n not in lost]
                assert len(alive) >= group.k, f"stripe {s.index} after losing {lost}"


@pytest.mark.parametrize("layout,group", GROUPS, ids=IDS)
def test_stripe_rotation_matches_design(layout: tuple, group: Group) -> None:
    n, at = len(group.slots), group.slots
    for s in stripes(group):
        assert s.parity == tuple(at[(s.index + j) % n] for j in range(group.m))
        assert s.data == tuple(at[(s.index + group.m + i) % n] for i in range(group.k))


@pytest.mark.parametrize("layout,group", GROUPS, ids=IDS)
def test_data_and_parity_stripes_of_a_slot(layout: tuple, group: Group) -> None:
    for slot in group.slots:
        mine = data_stripes(slot, group)
        assert len(mine) == group.k
        assert len({s.index for s, _ in mine}) == group.k
        for stripe, frag in mine:
            assert isinstance(stripe, Stripe) and stripe.data[frag] == slot
        held = parity_stripes(slot, group)
        assert [j for _, j in held] == list(range(group.m))
        for stripe, j in held:
            assert stripe.parity[j] == slot
        assert {s.index for s, _ in mine}.isdisjoint({s.index for s, _ in held})


def test_data_stripes_order_follows_the_chunks() -> None:
    group = make_groups(6, 4, 2)[0]
    assert [(s.index, i) for s, i in data_stripes(2, group)] == [(3, 3), (4, 2), (5, 1), (0, 0)]
    assert [(s.index, j) for s, j in parity_stripes(2, group)] == [(2, 0), (1, 1)]


def test_smaller_last_group_keeps_m() -> None:
    groups = make_groups(10, 4, 2)
    assert [(g.slots, g.k, g.m) for g in groups] == [
        ((0, 1, 2, 3, 4, 5), 4, 2), ((6, 7, 8, 9), 2, 2)
    ]
    assert make_groups(3, 4, 2) == [Group(0, (0, 1, 2), 1, 2)]


@pytest.mark.parametrize("nodes,k,m,remainder", [(7, 4, 2, 1), (8, 4, 2, 2), (2, 4, 2, 2)])
def test_too_small_last_group_is_rejected(nodes: int, k: int, m: int, remainder: int) -> None:
    message = re.escape(f"{nodes} nodes in groups of k+m={k}+{m} leave a last group of "
                        f"{remainder} node") + f".*too small for m={m} parity.*multiple of {k + m}"
    with pytest.raises(PlacementError, match=message):
        make_groups(nodes, k, m)


@pytest.mark.parametrize("nodes,k,m", [(0, 4, 2), (6, 0, 2), (6, 4, -1), (300, 250, 10)])
def test_bad_parameters_are_rejected(nodes: int, k: int, m: int) -> None:
    with pytest.raises(PlacementError):
        make_groups(nodes, k, m)


def test_inconsistent_group_and_unknown_slot_are_rejected() -> None:
    with pytest.raises(PlacementError, match="does not fit"):
        Group(0, (0, 1, 2), 2, 2)
    with pytest.raises(PlacementError, match="repeats a node slot"):
        Group(0, (0, 0, 1), 2, 1)
    groups = make_groups(6, 2, 1)
    with pytest.raises(PlacementError, match="node slot 6 is in none of the 2 groups"):
        group_of(6, groups)
    with pytest.raises(PlacementError, match="node slot 4 is not in group 0"):
        data_stripes(4, groups[0])


@pytest.mark.parametrize("layout,group", GROUPS, ids=IDS)
def test_replicas_stay_in_group_and_exclude_the_slot(layout: tuple, group: Group) -> None:
    for m in range(len(group.slots)):
        for slot in group.slots:
            reps = replicas(slot, group, m)
            assert len(reps) == len(set(reps)) == m
            assert slot not in reps
            assert set(reps) <= set(group.slots)
    with pytest.raises(PlacementError, match="cannot place"):
        replicas(group.slots[0], group, len(group.slots))


def test_replicas_are_the_next_nodes_wrapping() -> None:
    group = make_groups(12, 4, 2)[1]
    assert replicas(8, group, 2) == (9, 10)
    assert replicas(11, group, 2) == (6, 7)
    assert replicas(11, group, 0) == ()
