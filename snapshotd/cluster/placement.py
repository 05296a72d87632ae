"""Stripe placement across nodes (docs/design.md section 4): groups, rotated stripes, replicas.

Nodes are split into groups of ``n = k + m`` consecutive slots; a last, smaller group of ``n'``
nodes keeps ``m`` and uses ``k' = n' - m``. With failure domains (a label per slot: rack, switch,
zone; :func:`make_groups` ``domains=``), groups of the same sizes are drawn across domains so that
no group has more nodes in one domain than the domains force (:func:`domain_spread`), which is at
most ``m`` whenever the domains allow it: then losing any one whole domain loses nothing.

A group has ``n`` stripes: stripe ``s`` puts its ``m`` parity chunks on group positions
``s, s+1, ..., s+m-1 (mod n)`` and takes one data chunk from each of the other ``k`` nodes,
ordered by position ``s+m, s+m+1, ... (mod n)``. Each node is then a data node in ``k`` stripes
and a parity holder in ``m``, and any ``m`` lost nodes of a group leave every stripe at least
``k`` chunks (every stripe uses every node of its group once, so only how many of a group's
nodes are lost matters). With ``m = 0`` stripes are all data and nothing is protected.

Example::

    >>> groups = make_groups(8, 2, 1)
    >>> [g.slots for g in groups], groups[-1].k
    ([(0, 1, 2), (3, 4, 5), (6, 7)], 1)
    >>> stripes(groups[0])[0]
    Stripe(group=0, index=0, parity=(0,), data=(1, 2))
    >>> [(s.index, i) for s, i in data_stripes(0, groups[0])]
    [(1, 1), (2, 0)]
    >>> replicas(4, groups[1], 2)
    (5, 3)

Across failure domains (here 3 racks of 4 nodes, RS(4, 2)): each group has 2 nodes per rack::

    >>> racks = ["a"] * 4 + ["b"] * 4 + ["c"] * 4
    >>> [g.slots for g in make_groups(12, 4, 2, racks)]
    [(0, 1, 4, 5, 8, 9), (2, 3, 6, 7, 10, 11)]
    >>> domain_spread(make_groups(12, 4, 2, racks), racks)
    2
    >>> domain_spread(make_groups(12, 4, 2), racks)    # consecutive: a rack is most of a group
    4
"""

from __future__ import annotations

import heapq
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "Group", "PlacementError", "Stripe", "data_stripes", "domain_counts", "domain_spread",
    "group_of", "group_sizes", "make_groups", "min_spread", "parity_stripes", "replicas",
    "stripes",
]

_GF_SIZE = 255  # k + m bound of the GF(2^8) codecs


class PlacementError(ValueError):
    """The requested layout is impossible; the message says why and what to change."""


@dataclass(frozen=True)
class Group:
    """One group of consecutive node slots, protected by RS(k, m) among themselves."""

    index: int
    slots: tuple[int, ...]
    k: int
    m: int

    def __post_init__(self) -> None:
        if self.k < 1 or self.m < 0 or len(self.slots) != self.k + self.m:
            raise PlacementError(f"group {self.index} has {len(self.slots)} slots, which does "
                                 f"not fit k={self.k} >= 1 plus m={self.m} >= 0")
        if len(set(self.slots)) != len(self.slots):
            raise PlacementError(f"group {self.index} repeats a node slot: {self.slots}")

    @property
    def n(self) -> int:
        return len(self.slots)

    def position(self, slot: int) -> int:
        """Position 0..n-1 of `slot` within the group."""
        try:
            return self.slots.index(slot)
        except ValueError:
            msg = f"node slot {slot} is not in group {self.index} {self.slots}"
            raise PlacementError(msg) from None


@dataclass(frozen=True)
class Stripe:
    """One stripe of a group: global node slots of its m parity and k data chunks, in order."""

    group: int
    index: int
    parity: tuple[int, ...]
    data: tuple[int, ...]


def _check_params(nodes: int, k: int, m: int) -> None:
    if nodes < 1:
        raise PlacementError(f"need at least 1 node, got {nodes}")
    if k < 1 or m < 0:
        raise PlacementError(f"need k >= 1 and m >= 0, got k={k}, m={m}")
    if k + m > _GF_SIZE:
        raise PlacementError(f"k+m={k}+{m}={k + m} exceeds {_GF_SIZE}, the limit of GF(2^8) codes")


def group_sizes(nodes: int, k: int, m: int) -> list[int]:
    """Sizes of the groups of ``nodes`` slots: ``k + m`` each, and a smaller last one (which
    keeps ``m``: it must have at least ``m + 1`` nodes).

    >>> group_sizes(16, 4, 2)
    [6, 6, 4]
    """
    _check_params(nodes, k, m)
    n = k + m
    sizes = [n] * (nodes // n) + ([nodes % n] if nodes % n else [])
    if sizes[-1] - m < 1:
        last = sizes[-1]
        raise PlacementError(
            f"{nodes} nodes in groups of k+m={k}+{m} leave a last group of {last} "
            f"node{'s' if last != 1 else ''}, too small for m={m} parity (needs at "
            f"least {m + 1}): use a multiple of {n} nodes, or one that leaves a remainder "
            f"of at least {m + 1}, or a different k"
        )
    return sizes


def make_groups(nodes: int, k: int, m: int,
                domains: Sequence[str] | None = None) -> list[Group]:
    """Split slots 0..nodes-1 into groups of k+m; a smaller last group uses k' = n' - m.

    Without ``domains`` (or with fewer than two distinct labels) group ``i`` is the consecutive
    slots ``i*(k+m) ...``, as always. With ``domains`` (``domains[slot]`` is the failure domain
    of each slot) the groups keep the same sizes and indices, but their slots are drawn across
    domains so that the largest number of one group's nodes in one domain is the smallest the
    domains allow (:func:`min_spread`). The draw is deterministic, a function of the labels
    alone, so every daemon computes the same groups from the same map. Group by group (index
    order), each next node comes from the domain with the most slots still unplaced, among
    those with fewer than that many nodes in the group already; ties go to the domain whose
    label sorts first; within a domain, slots are taken in ascending order. A group's slots are
    sorted ascending.

    >>> [g.slots for g in make_groups(8, 2, 2, ["x", "x", "x", "x", "y", "y", "y", "y"])]
    [(0, 1, 4, 5), (2, 3, 6, 7)]
    """
    sizes = group_sizes(nodes, k, m)
    if domains is not None and len(domains) != nodes:
        raise PlacementError(f"{len(domains)} failure domain labels for {nodes} node slots: "
                             f"give one label per slot")
    if domains is None or len(set(domains)) < 2:
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        return [Group(i, tuple(range(s, s + size)), size - m, m)
                for i, (s, size) in enumerate(zip(starts, sizes))]
    cap = min_spread(sizes, domains)
    members: dict[str, list[int]] = {}
    for slot, label in enumerate(domains):
        members.setdefault(label, []).append(slot)
    taken = {label: 0 for label in members}
    # One heap of (-slots unplaced, label) for all domains; a domain at the cap waits aside
    # until the next group.
    heap = [(-len(slots), label) for label, slots in members.items()]
    heapq.heapify(heap)
    groups = []
    for index, size in enumerate(sizes):
        per: Counter[str] = Counter()
        chosen: list[int] = []
        full: list[tuple[int, str]] = []
        while len(chosen) < size:
            if not heap:   # cannot happen when min_spread's condition holds (tested)
                raise PlacementError(f"cannot fill group {index} with at most {cap} nodes per "
                                     f"failure domain")
            left, label = heapq.heappop(heap)
            chosen.append(members[label][taken[label]])
            taken[label] += 1
            per[label] += 1
            if left + 1 < 0:
                (heapq.heappush(heap, (left + 1, label)) if per[label] < cap
                 else full.append((left + 1, label)))
        for item in full:
            heapq.heappush(heap, item)
        groups.append(Group(index, tuple(sorted(chosen)), size - m, m))
    return groups


def min_spread(sizes: Sequence[int], domains: Sequence[str]) -> int:
    """The least ``t`` such that groups of ``sizes`` can be drawn from the slots labelled
    ``domains`` with at most ``t`` nodes of any one group in one domain.

    It is the least ``t`` for which, for every ``a``, the ``a`` largest domains hold no more
    slots than ``sum(min(size, a * t) for size in sizes)`` (the max-flow min-cut condition of
    the transport problem domains -> groups with at most ``t`` per pair).

    >>> min_spread([6, 6], ["a"] * 4 + ["b"] * 4 + ["c"] * 4), min_spread([6, 6], ["a"] * 12)
    (2, 6)
    """
    supply = sorted(Counter(domains).values(), reverse=True)
    if sum(supply) != sum(sizes):
        raise PlacementError(f"{sum(supply)} labelled slots for groups of {sum(sizes)} nodes")
    t = max(math.ceil(supply[0] / len(sizes)), math.ceil(max(sizes) / len(supply)))
    by_size = Counter(sizes).items()
    while True:
        total, ok = 0, True
        for a, s in enumerate(supply, 1):
            total += s
            if total > sum(count * min(size, a * t) for size, count in by_size):
                ok = False
                break
        if ok:
            return t
        t += 1


def domain_counts(group: Group, domains: Sequence[str]) -> Counter[str]:
    """How many nodes of ``group`` each failure domain holds.

    >>> domain_counts(Group(0, (0, 1, 2), 2, 1), ["a", "a", "b"])
    Counter({'a': 2, 'b': 1})
    """
    return Counter(domains[slot] for slot in group.slots)


def domain_spread(groups: Sequence[Group], domains: Sequence[str]) -> int:
    """The largest number of one group's nodes in one failure domain: losing a whole domain
    loses nothing exactly when this is at most ``m``.

    >>> domain_spread(make_groups(4, 1, 1), ["a", "a", "b", "b"])
    2
    """
    return max(max(domain_counts(g, domains).values()) for g in groups)


def group_of(slot: int, groups: Sequence[Group]) -> Group:
    """The group holding node `slot`."""
    for group in groups:
        if slot in group.slots:
            return group
    raise PlacementError(f"node slot {slot} is in none of the {len(groups)} groups")


def _stripe(group: Group, s: int) -> Stripe:
    n, at = group.n, group.slots
    parity = tuple(at[(s + j) % n] for j in range(group.m))
    data = tuple(at[(s + group.m + i) % n] for i in range(group.k))
    return Stripe(group.index, s, parity, data)


def stripes(group: Group) -> list[Stripe]:
    """The n stripes of `group`, stripe s with parity on positions s..s+m-1 (mod n)."""
    return [_stripe(group, s) for s in range(group.n)]


def data_stripes(slot: int, group: Group) -> list[tuple[Stripe, int]]:
    """The k stripes where `slot` is a data node, as (stripe, fragment index 0..k-1 in it).

    Entry c is where the slot's chunk c goes: stripe (p + 1 + c) mod n for slot position p,
    in which the slot is fragment k - 1 - c.
    """
    p, n = group.position(slot), group.n
    out = []
    for c in range(group.k):
        s = (p + 1 + c) % n
        out.append((_stripe(group, s), (p - s - group.m) % n))
    return out


def parity_stripes(slot: int, group: Group) -> list[tuple[Stripe, int]]:
    """The m stripes where `slot` holds parity, as (stripe, parity index 0..m-1 in it).

    Entry j is stripe (p - j) mod n for slot position p, whose parity chunk j the slot holds.
    """
    p, n = group.position(slot), group.n
    return [(_stripe(group, (p - j) % n), j) for j in range(group.m)]


def replicas(slot: int, group: Group, m: int) -> tuple[int, ...]:
    """The "replicate" policy: the m nodes after `slot` within its group, wrapping."""
    p, n = group.position(slot), group.n
    if not 0 <= m < n:
        raise PlacementError(
            f"cannot place {m} replicas of node {slot} in group {group.index} of {n} nodes: "
            f"need 0 <= m <= {n - 1} (replicas go to other nodes of the group)"
        )
    return tuple(group.slots[(p + j) % n] for j in range(1, m + 1))
