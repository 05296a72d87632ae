"""Stripe placement across nodes (docs/design.md section 4): groups, rotated stripes, replicas.

Nodes are split into groups of ``n = k + m`` consecutive slots; a last, smaller group of ``n'``
nodes keeps ``m`` and uses ``k' = n' - m``. A group has ``n`` stripes: stripe ``s`` puts its ``m``
parity chunks on group positions ``s, s+1, ..., s+m-1 (mod n)`` and takes one data chunk from each
of the other ``k`` nodes, ordered by position ``s+m, s+m+1, ... (mod n)``. Each node is then a data
node in ``k`` stripes and a parity holder in ``m``, and any ``m`` lost nodes of a group leave every
stripe at least ``k`` chunks. With ``m = 0`` stripes are all data and nothing is protected.

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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "Group", "PlacementError", "Stripe", "data_stripes", "group_of", "make_groups",
    "parity_stripes", "replicas", "stripes",
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


def make_groups(nodes: int, k: int, m: int) -> list[Group]:
    """Split slots 0..nodes-1 into groups of k+m; a smaller last group uses k' = n' - m."""
    _check_params(nodes, k, m)
    n = k + m
    groups = []
    for index, start in enumerate(range(0, nodes, n)):
        slots = tuple(range(start, min(start + n, nodes)))
        if len(slots) - m < 1:
            raise PlacementError(
                f"{nodes} nodes in groups of k+m={k}+{m} leave a last group of {len(slots)} "
                f"node{'s' if len(slots) != 1 else ''}, too small for m={m} parity (needs at "
                f"least {m + 1}): use a multiple of {n} nodes, or one that leaves a remainder "
                f"of at least {m + 1}, or a different k"
            )
        groups.append(Group(index, slots, len(slots) - m, m))
    return groups


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
