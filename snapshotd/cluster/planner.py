"""Survival planner: how likely a burst of failures is recoverable from memory (docs/scale.md).

Given the nodes, their failure domains, the coding scheme ``(k, m)`` (or ``r`` copies) and
failure rates, it answers, before anything fails, with the groups the daemons would really
build (:func:`snapshotd.cluster.placement.make_groups`):

- :func:`burst_survival`: the probability that ``f`` simultaneous node failures, uniformly at
  random, leave every group at most ``m`` lost nodes (every stripe at least ``k`` fragments).
  Exact: the number of ways to lose ``f`` nodes with at most ``m`` in each group is the
  coefficient of ``x**f`` in the product over groups of ``sum(C(n_g, j) x**j for j <= m)``.
- :func:`union_bound`: the per-group bound ``1 - sum_g P(group g loses more than m)``
  (hypergeometric), a lower bound; for replica groups of ``r`` it is Gemini's formula
  (:func:`gemini_replicas`), ``1 - (N/r) C(N-r, f-r) / C(N, f)``, exact while ``f < 2r``.
- :func:`monte_carlo_burst`: the same probability by sampling bursts and checking every stripe
  of :func:`~snapshotd.cluster.placement.stripes`, with a Wilson confidence interval; the tests
  hold the closed forms to it.
- :func:`domain_survival`: the share of domains whose loss, alone, loses nothing.
- :func:`losses_per_day`: expected unrecoverable events per day when nodes fail independently
  at ``node_rate`` per day and stay down ``repair_hours`` (until a replacement has rebuilt),
  and whole domains fail at ``domain_rate`` per day: a node failure is unrecoverable when ``m``
  other nodes of its group are down already, a domain failure when some group then has more
  than ``m`` nodes down (its nodes in the domain plus the others down at that moment).
- :func:`plan` puts it together for several schemes side by side, with memory and network per
  node and per version; ``snapshotctl plan`` prints it.

Example (Gemini's figure: 16 nodes, replica groups of 2, 2 failures)::

    >>> round(burst_survival(make_groups(16, 1, 1), 2), 4), round(gemini_replicas(16, 2, 2), 4)
    (0.9333, 0.9333)
    >>> racks = [f"rack-{s // 8}" for s in range(32)]
    >>> domain_survival(make_groups(32, 6, 2, racks), racks)     # groups across the racks
    1.0
    >>> domain_survival(make_groups(32, 6, 2), racks)            # consecutive: a rack a group
    0.0
    >>> est = monte_carlo_burst(make_groups(16, 1, 1), 2, trials=20000, seed=1)
    >>> est.lo <= 0.9333 <= est.hi
    True
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from .placement import Group, PlacementError, domain_counts, domain_spread, make_groups, stripes

__all__ = [
    "Estimate", "Scheme", "SchemePlan", "burst_survival", "domain_survival", "gemini_replicas",
    "losses_per_day", "monte_carlo_burst", "plan", "render", "union_bound",
]


@dataclass(frozen=True)
class Scheme:
    """A coding scheme: RS(k, m), or ``copies`` full copies (the replicate codec: k = 1,
    m = copies - 1).

    >>> Scheme.parse("4+2").name, Scheme.parse("r3").name, Scheme.parse("r3").m
    ('RS(4,2)', '3 copies', 2)
    """

    k: int
    m: int
    replicate: bool = False

    @classmethod
    def parse(cls, text: str) -> Scheme:
        """``K+M`` (Reed-Solomon) or ``rN`` (N copies)."""
        text = text.strip().lower()
        try:
            if text.startswith("r"):
                return cls(1, int(text[1:]) - 1, True)
            k, m = text.split("+")
            return cls(int(k), int(m))
        except ValueError:
            raise PlacementError(f"scheme {text!r} is not K+M (e.g. 4+2) or rN (e.g. r3)") \
                from None

    @property
    def name(self) -> str:
        return f"{self.m + 1} copies" if self.replicate else f"RS({self.k},{self.m})"

    @property
    def memory(self) -> float:
        """Memory per node per version, in units of the node's state S: its data plus its
        share of parity (or copies)."""
        return 1 + self.m / self.k

    @property
    def network(self) -> float:
        """Bytes each node sends per version, in units of S: its k data chunks to the stripes'
        first parity holders, and the m - 1 parity chunks it forwards as a first holder
        (docs/design.md section 4); the same again received."""
        return 0.0 if self.m == 0 else 1 + (self.m - 1) / self.k

    @property
    def rebuild(self) -> float:
        """Bytes a replacement node reads to rebuild its data, in units of S: k fragments of
        S/k for each of its k data stripes (0 without parity: nothing to rebuild from)."""
        return float(self.k) if self.m else 0.0


def burst_survival(groups: Sequence[Group], f: int) -> float:
    """Exact probability that ``f`` node failures, uniform over the nodes, lose nothing."""
    nodes = sum(g.n for g in groups)
    if not 0 <= f <= nodes:
        raise ValueError(f"a burst of {f} failures among {nodes} nodes")
    def times(a: list[int], b: list[int]) -> list[int]:    # product, cut above x**f
        out = [0] * min(len(a) + len(b) - 1, f + 1)
        for i, x in enumerate(a[:len(out)]):
            if x:
                for j, y in enumerate(b[:len(out) - i]):
                    out[i + j] += x * y
        return out

    poly = [1]                     # ways to lose j nodes with at most m in each group
    for (n, m), count in Counter((g.n, g.m) for g in groups).items():
        factor = [math.comb(n, j) for j in range(min(m, n) + 1)]
        while count:               # poly * factor**count, by squaring
            if count & 1:
                poly = times(poly, factor)
            factor, count = times(factor, factor), count >> 1
    ways = poly[f] if f < len(poly) else 0
    return ways / math.comb(nodes, f)


def union_bound(groups: Sequence[Group], f: int) -> float:
    """``1 - sum over groups of P(the group loses more than m of f failures)``: a lower bound
    on :func:`burst_survival` (the per-group hypergeometric bound)."""
    nodes = sum(g.n for g in groups)
    total = math.comb(nodes, f)
    lost = 0
    for g in groups:
        lost += sum(math.comb(g.n, j) * math.comb(nodes - g.n, f - j)
                    for j in range(g.m + 1, min(g.n, f) + 1))
    return 1 - lost / total


def gemini_replicas(nodes: int, r: int, f: int) -> float:
    """Gemini's (SOSP'23) probability that ``f`` failures among ``nodes`` leave a copy of
    everything with replica groups of ``r``: ``1 - (N/r) C(N-r, f-r) / C(N, f)``.

    >>> round(gemini_replicas(16, 2, 2), 3)
    0.933
    """
    if f < r:
        return 1.0
    return 1 - (nodes / r) * math.comb(nodes - r, f - r) / math.comb(nodes, f)


@dataclass(frozen=True)
class Estimate:
    """A Monte Carlo estimate and its Wilson confidence interval."""

    p: float
    lo: float
    hi: float
    trials: int


def _wilson(hits: int, trials: int, z: float) -> Estimate:
    p = hits / trials
    d = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / d
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / d
    return Estimate(p, max(0.0, centre - half), min(1.0, centre + half), trials)


def monte_carlo_burst(groups: Sequence[Group], f: int, trials: int = 10000, seed: int = 0,
                      z: float = 3.29) -> Estimate:
    """Sample ``trials`` bursts of ``f`` distinct failed nodes and count those after which
    every stripe of the real placement (:func:`stripes`) keeps at least ``k`` fragments;
    ``z`` = 3.29 is a 99.9% interval."""
    slots = [s for g in groups for s in g.slots]
    owner = {s: g.index for g in groups for s in g.slots}
    layout = {g.index: (g.k, [frozenset(s.parity + s.data) for s in stripes(g)])
              for g in groups}
    rng = random.Random(seed)
    hits = 0
    for _ in range(trials):
        lost = set(rng.sample(slots, f))
        ok = True
        for index in {owner[s] for s in lost}:
            k, held = layout[index]
            if any(len(stripe - lost) < k for stripe in held):
                ok = False
                break
        hits += ok
    return _wilson(hits, trials, z)


def _lost_with(group: Group, down: set[int], cache: dict[int, list[tuple[int, ...]]]) -> bool:
    """Does some stripe of ``group`` keep fewer than ``k`` fragments with ``down`` lost?"""
    held = cache.get(group.index)
    if held is None:
        held = cache[group.index] = [st.parity + st.data for st in stripes(group)]
    return any(sum(s not in down for s in stripe) < group.k for stripe in held)


def _by_domain(groups: Sequence[Group], domains: Sequence[str]
               ) -> dict[str, list[tuple[Group, int]]]:
    """Failure domain -> (group, how many of its nodes are in the domain), for every group
    with a node there."""
    out: dict[str, list[tuple[Group, int]]] = {d: [] for d in sorted(set(domains))}
    for g in groups:
        for d, c in sorted(domain_counts(g, domains).items()):
            out[d].append((g, c))
    return out


def domain_survival(groups: Sequence[Group], domains: Sequence[str]) -> float:
    """The share of failure domains whose loss alone leaves every stripe ``k`` fragments
    (checked on every stripe of the real placement)."""
    by_domain = _by_domain(groups, domains)
    cache: dict[int, list[tuple[int, ...]]] = {}
    ok = 0
    for d, touched in by_domain.items():
        down = {s for g, _ in touched for s in g.slots if domains[s] == d}
        ok += not any(_lost_with(g, down, cache) for g, _ in touched)
    return ok / len(by_domain)


def _at_least(n: int, p: float, j: int) -> float:
    """P(Binomial(n, p) >= j)."""
    if j <= 0:
        return 1.0
    return sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(j, n + 1))


def losses_per_day(groups: Sequence[Group], domains: Sequence[str] | None, node_rate: float,
                   domain_rate: float, repair_hours: float) -> tuple[float, float]:
    """Expected unrecoverable events per day: (from node failures, from domain failures).

    Each node fails at ``node_rate`` per day and is down for ``repair_hours``, so at a random
    moment it is down with probability ``p = node_rate * repair_hours / 24``. A node failure
    is unrecoverable when at least ``m`` other nodes of its group are down already; a domain
    failure when, for some group, its nodes in the domain plus its other nodes down exceed
    ``m``. (First order in ``p``; failures of different groups are independent.)"""
    p = min(1.0, node_rate * repair_hours / 24)
    nodes = sum(_at_least(g.n - 1, p, g.m) * g.n for g in groups) * node_rate
    if not domains or domain_rate <= 0:
        return nodes, 0.0
    total = 0.0
    for touched in _by_domain(groups, domains).values():
        fine = 1.0
        for g, c in touched:
            fine *= 0.0 if c > g.m else 1 - _at_least(g.n - c, p, g.m - c + 1)
        total += 1 - fine
    return nodes, total * domain_rate


@dataclass
class SchemePlan:
    """What :func:`plan` says about one scheme."""

    scheme: Scheme
    nodes: int
    groups: list[Group] = field(repr=False)
    error: str = ""
    spread: int = 0                       # most nodes of a group in one domain
    bursts: dict[int, float] = field(default_factory=dict)
    domain: float | None = None           # P(one random domain lost loses nothing)
    per_day: tuple[float, float] = (0.0, 0.0)
    memory: float = 0.0                   # bytes per node per version
    network: float = 0.0                  # bytes sent per node per version
    rebuild: float = 0.0                  # bytes a replacement reads to rebuild its data


def plan(nodes: int, schemes: Sequence[Scheme], *, domains: Sequence[str] | None = None,
         aware: bool = True, bursts: Sequence[int] = (2, 4, 8, 16), node_rate: float = 0.004,
         domain_rate: float = 0.001, repair_hours: float = 1.0, state: float = 0.0
         ) -> list[SchemePlan]:
    """One :class:`SchemePlan` per scheme. ``domains`` are the physical failure domains of
    the slots; ``aware`` places groups across them (``--domains``), otherwise groups are
    consecutive slots (no ``--domains``) and the domains only decide what a domain loss
    takes. ``state`` is bytes of snapshot per node per version."""
    out = []
    for scheme in schemes:
        try:
            groups = make_groups(nodes, scheme.k, scheme.m, domains if aware else None)
        except PlacementError as exc:
            out.append(SchemePlan(scheme, nodes, [], error=str(exc)))
            continue
        sp = SchemePlan(scheme, nodes, groups)
        sp.bursts = {f: burst_survival(groups, f) for f in bursts if f <= nodes}
        if domains:
            sp.spread = domain_spread(groups, domains)
            sp.domain = domain_survival(groups, domains)
        sp.per_day = losses_per_day(groups, domains, node_rate, domain_rate, repair_hours)
        sp.memory, sp.network = scheme.memory * state, scheme.network * state
        sp.rebuild = scheme.rebuild * state
        out.append(sp)
    return out


def _size(n: float) -> str:
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def _prob(p: float) -> str:
    if p >= 1.0:
        return "1"
    if p > 0.9999:
        return f"1 - {1 - p:.1e}"
    return f"{100 * p:.2f}%"


def render(plans: Sequence[SchemePlan], markdown: bool = False) -> str:
    """A table, one row per scheme (markdown: a docs/ table)."""
    bursts = sorted({f for sp in plans for f in sp.bursts})
    head = ["scheme", "groups", *[f"f={f}" for f in bursts], "domain lost", "max/domain",
            "losses/day (nodes)", "losses/day (domains)", "memory/node", "sent/node",
            "rebuild reads"]
    rows = []
    for sp in plans:
        if sp.error:
            rows.append([sp.scheme.name, "-", *["-"] * len(bursts), "-", "-", "-", "-", "-", "-",
                         sp.error.split(":")[0]])
            continue
        rows.append([sp.scheme.name, str(len(sp.groups)),
                     *[_prob(sp.bursts[f]) if f in sp.bursts else "-" for f in bursts],
                     "-" if sp.domain is None else _prob(sp.domain),
                     str(sp.spread) if sp.domain is not None else "-",
                     f"{sp.per_day[0]:.2e}", f"{sp.per_day[1]:.2e}",
                     *[_size(v) if sp.memory else f"{factor:.2f} S" for v, factor in (
                         (sp.memory, sp.scheme.memory), (sp.network, sp.scheme.network),
                         (sp.rebuild, sp.scheme.rebuild))]])
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
                     for r in [head, *rows])


def scale_tables(node_counts: Sequence[int] = (960, 1920, 3840, 7680, 15360),
                 schemes: Sequence[str] = ("4+2", "6+2", "8+2", "6+3", "r2", "r3"),
                 rack: int = 32, bursts: Sequence[int] = (2, 4, 8, 16, 32),
                 node_rate: float = 0.004, domain_rate: float = 0.001,
                 repair_hours: float = 1.0, trials: int = 20000) -> str:
    """The tables of docs/scale.md (``python -m snapshotd.cluster.planner``): burst survival
    per scheme and cluster size, then domain losses with and without ``--domains``, checked
    against the Monte Carlo (``trials`` bursts per cell; 0: no check)."""
    parsed = [Scheme.parse(s) for s in schemes]
    burst_rows, domain_rows, checks, disagree = [], [], 0, []
    for nodes in node_counts:
        racks = [f"rack-{s // rack}" for s in range(nodes)]
        aware = plan(nodes, parsed, domains=racks, aware=True, bursts=bursts,
                     node_rate=node_rate, domain_rate=domain_rate, repair_hours=repair_hours)
        plain = plan(nodes, parsed, domains=racks, aware=False, bursts=(),
                     node_rate=node_rate, domain_rate=domain_rate, repair_hours=repair_hours)
        for a, b in zip(aware, plain):
            name = a.scheme.name
            if a.error:
                burst_rows.append([f"{nodes}", name, *["-"] * len(bursts)])
                continue
            for f in bursts if trials else ():
                est = monte_carlo_burst(a.groups, f, trials, seed=nodes + f)
                checks += 1
                if not est.lo <= a.bursts[f] <= est.hi:
                    disagree.append(f"{nodes} {name} f={f}")
            burst_rows.append([f"{nodes}", name, *[_prob(a.bursts[f]) for f in bursts]])
            domain_rows.append([
                f"{nodes}", name, f"{a.scheme.memory:.2f} S", f"{a.scheme.network:.2f} S",
                f"{a.per_day[0]:.1e}",
                f"{b.spread} / {_prob(b.domain or 0)} / {b.per_day[1]:.1e}",
                f"{a.spread} / {_prob(a.domain or 0)} / {a.per_day[1]:.1e}"])
    head_b = ["nodes", "scheme", *[f"f = {f}" for f in bursts]]
    head_d = ["nodes", "scheme", "memory / node / version", "sent / node / version",
              "unrecoverable node failures / day",
              f"one rack of {rack} lost, consecutive groups: max per rack / survivable / "
              "unrecoverable per day",
              "the same with --domains"]

    def md(head: list[str], rows: list[list[str]]) -> str:
        return "\n".join(["| " + " | ".join(head) + " |", "|" + " --- |" * len(head),
                          *["| " + " | ".join(r) + " |" for r in rows]])

    note = (f"Monte Carlo: {checks} cells, {trials} bursts each on the real placement; "
            + (f"the exact value is outside the 99.9% interval in: {', '.join(disagree)}"
               if disagree else "every exact value lies in its 99.9% interval.")
            if trials else "")
    return md(head_b, burst_rows) + "\n\n" + md(head_d, domain_rows) + "\n\n" + note + "\n"


if __name__ == "__main__":
    print(scale_tables())
