"""The overlay the job-wide retention reports travel on (docs/protocol.md, "Job-wide
retention"; docs/scale.md section 5).

Every node's report (``Held``) must reach every node, but a daemon should keep connections to
its group and a few more, not to the whole cluster. The reports are *relayed*, each keeping its
origin's identity (nothing is aggregated): the members of a group exchange reports with each
other (they are connected already, for data, parity and heartbeats), and the groups form a
tree of fixed fan-out ``F`` over their indices (group ``g``'s parent is ``(g - 1) // F``, its
children ``F g + 1 ... F g + F``). Each tree edge is carried by one member of each of its two
groups: the first member, in an order that depends on the edge, that the member's own
heartbeats say is up (so a group's edges are spread over its members, and an edge falls over
to the next member when one is down); its partner on the other side is the first member of
that group's order for the edge that answered lately (tried in order).

Everything here is a pure function of the membership (the groups every daemon computes from the
same ``--peers``/``--domains``): every daemon computes the same overlay.

When the tree would not save any connection (a cluster of at most ``flat_limit`` nodes: one or
two small groups) the overlay is *flat*: every node sends its report to every other node, as
before the relay existed.

>>> from snapshotd.cluster.placement import make_groups
>>> groups = make_groups(32, 6, 2)
>>> o = overlay(9, groups, fanout=2)
>>> o.flat, o.local[:3], [(e.other, e.mine[0], e.theirs[0]) for e in o.edges]
(False, (8, 10, 11), [(0, 8, 1), (3, 9, 24)])
>>> depth(4, 2), hops(4, 2)
(2, 9)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .placement import Group, PlacementError, group_of

__all__ = ["FANOUT", "Edge", "Overlay", "overlay", "parent", "children", "depth", "hops",
           "edge_order", "gateway", "flat_limit", "steady_degree", "worst_degree"]

#: Children per group in the tree of groups. With groups of 8, 2048 groups (16,384 nodes) make
#: a tree of depth 6.
FANOUT = 4


@dataclass(frozen=True)
class Edge:
    """One tree edge between this node's group and group ``other``: ``mine`` are this group's
    members and ``theirs`` the other group's, each in the order in which they carry it."""

    other: int
    mine: tuple[int, ...]
    theirs: tuple[int, ...]


@dataclass(frozen=True)
class Overlay:
    """This node's part of the overlay."""

    me: int
    #: The nodes this node exchanges reports with directly: its group peers (every other
    #: node of the cluster when flat).
    local: tuple[int, ...]
    #: The tree edges of this node's group (none when flat or with one group).
    edges: tuple[Edge, ...]
    #: Depth of the tree of groups (0: one group, or flat), and the most relay hops a report
    #: takes from its origin to any node (1 when flat: direct).
    depth: int
    hops: int
    flat: bool


def parent(group: int, fanout: int = FANOUT) -> int | None:
    """The parent of ``group`` in the tree (None for the root, group 0)."""
    return None if group == 0 else (group - 1) // fanout


def children(group: int, count: int, fanout: int = FANOUT) -> range:
    """The children of ``group`` among ``count`` groups."""
    first = fanout * group + 1
    return range(min(first, count), min(first + fanout, count))


def depth(count: int, fanout: int = FANOUT) -> int:
    """Edges from the root to the deepest of ``count`` groups."""
    d, g = 0, count - 1
    while g > 0:
        g = (g - 1) // fanout
        d += 1
    return d


def hops(count: int, fanout: int = FANOUT) -> int:
    """The most relay hops a report takes between two nodes of a tree of ``count`` groups:
    one inside the origin's group (to the member carrying the edge out), then for each of at
    most ``2 depth`` edges one hop across it and one inside the next group (to the member
    carrying the next edge, or to every member at the end). Each hop waits at most one report
    interval (urgent reports, after a drop, are forwarded at once)."""
    d = depth(count, fanout)
    return 1 if d == 0 else 1 + 4 * d


def edge_order(group: Group, edge: int) -> tuple[int, ...]:
    """The members of ``group`` in the order in which they carry its edge number ``edge`` (0:
    the edge to its parent, ``i``: the edge to its ``i``-th child): its slots rotated by
    ``edge``, so that consecutive edges start at different members."""
    slots = sorted(group.slots)
    shift = edge % len(slots)
    return tuple(slots[shift:] + slots[:shift])


def _edge_index(child: int, fanout: int) -> int:
    """The number of the edge from ``child``'s parent to it, at the parent (1..fanout)."""
    return (child - 1) % fanout + 1


def steady_degree(n: int, fanout: int = FANOUT) -> int:
    """The most peers (either direction) a node of a group of ``n`` talks to while every node
    is up: its ``n - 1`` group peers plus, for each edge it carries (its group has at most
    ``fanout + 1`` edges, dealt out over its ``n`` members), the member carrying it on the
    other side."""
    return (n - 1) + math.ceil((fanout + 1) / n)


def worst_degree(n: int, fanout: int = FANOUT) -> int:
    """The most peers a node can talk to for the reports while others are down: its group
    peers, and for every edge of its group the member it sends to and the one that sends to
    it, which may differ while a fall-over settles (independent of the cluster's size)."""
    return (n - 1) + 2 * (fanout + 1)


def flat_limit(groups: Sequence[Group], fanout: int = FANOUT) -> int:
    """The largest cluster that stays flat: where every other node is no more peers than the
    tree could need (:func:`worst_degree` of the largest group)."""
    return worst_degree(max(g.n for g in groups), fanout) + 1


def overlay(me: int, groups: Sequence[Group], fanout: int = FANOUT) -> Overlay:
    """This node's part of the overlay of ``groups`` (every slot of the cluster)."""
    if fanout < 1:
        raise PlacementError(f"the report tree needs a fan-out of at least 1, got {fanout}")
    nodes = sum(g.n for g in groups)
    mine = group_of(me, groups)
    if nodes <= flat_limit(groups, fanout):
        others = tuple(s for g in groups for s in sorted(g.slots) if s != me)
        return Overlay(me, tuple(sorted(others)), (), 0, 1, True)
    by_index = {g.index: g for g in groups}
    count = len(groups)
    edges = []
    up = parent(mine.index, fanout)
    if up is not None:
        edges.append(Edge(up, edge_order(mine, 0),
                          edge_order(by_index[up], _edge_index(mine.index, fanout))))
    for i, child in enumerate(children(mine.index, count, fanout), start=1):
        edges.append(Edge(child, edge_order(mine, i), edge_order(by_index[child], 0)))
    local = tuple(s for s in sorted(mine.slots) if s != me)
    return Overlay(me, local, tuple(edges), depth(count, fanout), hops(count, fanout), False)


def gateway(order: Sequence[int], up: Callable[[int], bool]) -> int:
    """The member that carries an edge: the first of ``order`` that is up (the first of all
    when none is)."""
    for slot in order:
        if up(slot):
            return slot
    return order[0]
