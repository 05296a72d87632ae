"""``snapshotctl``: the operator's tool. Talks to the local daemon over its control socket.

    snapshotctl status                      node, memory, peers, versions
    snapshotctl ls [--job J] [--rank R]     committed versions
    snapshotctl verify --job J              recompute checksums; exit 1 on a mismatch
    snapshotctl drop --job J [--rank R] [--step S]
    snapshotctl persist --job J [--step S]  write to the persistence tier now
    snapshotctl export --job J [--step S] [--rank R] --out DIR   torch.distributed.checkpoint
    snapshotctl export --job J [--step S] --global --out DIR      one global DCP checkpoint
    snapshotctl keygen DIR                  write the cluster CURVE key pair
    snapshotctl plan --nodes N [--domain-size R | --domains MAP] [--schemes 4+2,r3 ...]
                                            survival of failure bursts, per scheme (offline)

Every command takes ``--control ENDPOINT`` (default: the daemon's default socket) and ``--json``
(``keygen`` and ``plan`` need no daemon).

Example (the planner; docs/scale.md)::

    >>> main(["plan", "--nodes", "16", "--schemes", "r2", "--bursts", "2"])   # doctest: +ELLIPSIS
    16 nodes, no failure domains...
    scheme    groups  f=2     ...
    2 copies  8       93.33%  ...
    0
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from ..common import protocol as p
from ..common.channel import Channel, SnapshotError
from ..common.config import Config, ConfigError, default_control, parse_size, slot_domains

__all__ = ["main"]


def _table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _versions(versions: Sequence[p.VersionInfo]) -> str:
    now = time.time()
    rows = [[v.job, v.rank, v.step, _size(v.nbytes), v.state, f"{now - v.committed_at:.1f}s"]
            for v in versions]
    return _table(rows, ["JOB", "RANK", "STEP", "SIZE", "STATE", "AGE"])


def cmd_status(ch: Channel, args: argparse.Namespace) -> tuple[Any, str]:
    st = ch.call(p.Status(token=args.token))
    text = (f"node slot {st.node_slot}  pid {st.pid}  "
            f"{'accepting' if st.accepting else 'shutting down'}"
            f"{'  REBUILDING' if st.rebuilding else ''}\n"
            f"memory {_size(st.bytes_used)} of {_size(st.memory_limit)}  open slots "
            f"{st.open_slots}  open leases {st.open_leases}\n"
            f"peers up {list(st.peers_up)}  down {list(st.peers_down)}\n\n"
            + _versions(st.versions))
    return st, text


def cmd_ls(ch: Channel, args: argparse.Namespace) -> tuple[Any, str]:
    if args.job is None:
        versions = ch.call(p.Status(token=args.token)).versions
    else:
        versions = ch.call(p.ListVersions(args.job, args.rank, token=args.token)).versions
    return p.ListReply(tuple(versions)), _versions(versions)


def cmd_verify(ch: Channel, args: argparse.Namespace) -> tuple[Any, str]:
    reply = ch.call(p.Verify(args.job, args.rank, args.step, token=args.token),
                    timeout=timedelta(minutes=10))
    rows = [[r.job, r.rank, r.step, "OK" if not r.bad else "BAD: " + ", ".join(r.bad)]
            for r in reply.results]
    return reply, _table(rows, ["JOB", "RANK", "STEP", "CHECKSUMS"])


def cmd_drop(ch: Channel, args: argparse.Namespace) -> tuple[Any, str]:
    reply = ch.call(p.Drop(args.job, args.rank, args.step, args.newer_than, token=args.token))
    return reply, f"dropped {reply.count} version(s)"


def cmd_persist(ch: Channel, args: argparse.Namespace) -> tuple[Any, str]:
    reply = ch.call(p.Persist(args.job, args.step, token=args.token), timeout=timedelta(hours=1))
    step = args.step if args.step is not None else "(newest)"
    return reply, f"persisted job {args.job!r} step {step}"


def cmd_export(ch: Channel, args: argparse.Namespace) -> tuple[Any, str]:
    from .export import export, export_global

    if args.whole:
        if args.rank is not None:
            raise SystemExit("--global writes every rank of the job; leave out --rank")
        result = export_global(args.control, args.job, args.step, args.out,
                               progress=not args.json, token=args.token)
        return result, (f"exported job {result['job']!r} step {result['step']} as one global "
                        f"checkpoint of {result['tensors']} tensors from {result['world']} "
                        f"ranks ({result['bytes']} bytes) to {result['out']} "
                        "(torch.distributed.checkpoint format; dcp.load at any world size)")
    result = export(args.control, args.job, args.step, args.out,
                    None if args.rank is None else [args.rank],
                    progress=not args.json, token=args.token)
    return result, (f"exported job {result['job']!r} step {result['step']} ranks "
                    f"{result['ranks']} ({result['bytes']} bytes) to {result['out']} "
                    "(torch.distributed.checkpoint format)")


def cmd_keygen(args: argparse.Namespace) -> tuple[Any, str]:
    import zmq.auth

    os.makedirs(args.dir, mode=0o700, exist_ok=True)
    public, secret = zmq.auth.create_certificates(args.dir, "cluster")
    os.chmod(secret, 0o600)
    return {"public": public, "secret": secret}, (
        f"wrote {public} and {secret}\ncopy the directory to every node (keep it private) and "
        f"start each daemon with --keys {args.dir}")


def cmd_plan(args: argparse.Namespace) -> tuple[Any, str]:
    from ..cluster import planner

    schemes = [planner.Scheme.parse(x) for x in args.schemes.split(",")]
    bursts = [int(x) for x in args.bursts.split(",")]
    state = parse_size(args.state) if args.state else 0
    results, text = [], []
    for nodes in [int(x) for x in args.nodes.split(",")]:
        if args.domains:
            domains = slot_domains(Config(domains=args.domains), nodes)
        elif args.domain_size:
            domains = [f"d{s // args.domain_size}" for s in range(nodes)]
        else:
            domains = None
        ways = [True, False] if domains and not args.ignore_domains else [not args.ignore_domains]
        for aware in ways:
            where = ("no failure domains" if domains is None else
                     f"{len(set(domains))} failure domains, groups "
                     + ("placed across them (--domains)" if aware else
                        "of consecutive slots (no --domains)"))
            plans = planner.plan(nodes, schemes, domains=domains, aware=aware, bursts=bursts,
                                 node_rate=args.node_failures_per_day,
                                 domain_rate=args.domain_failures_per_day,
                                 repair_hours=args.repair_hours, state=state)
            text.append(f"{nodes} nodes, {where}; node failures {args.node_failures_per_day}/"
                        f"node/day, domain failures {args.domain_failures_per_day}/domain/day, "
                        f"down {args.repair_hours} h each"
                        + (f", {_size(state)} of state per node" if state else
                           " (S: state per node)"))
            text.append(planner.render(plans, markdown=args.markdown))
            for sp in plans:
                row: dict[str, Any] = {
                    "nodes": nodes, "aware": aware, "scheme": sp.scheme.name,
                    "error": sp.error, "groups": len(sp.groups), "bursts": sp.bursts,
                    "domain_lost": sp.domain, "max_per_domain": sp.spread,
                    "losses_per_day": sp.per_day, "memory": sp.memory,
                    "network": sp.network, "rebuild": sp.rebuild}
                if args.monte_carlo and not sp.error:
                    row["monte_carlo"] = {}
                    for f in sp.bursts:
                        est = planner.monte_carlo_burst(sp.groups, f, args.monte_carlo,
                                                        seed=f)
                        row["monte_carlo"][f] = dataclasses.asdict(est)
                        agree = est.lo <= sp.bursts[f] <= est.hi
                        text.append(f"  {sp.scheme.name} f={f}: exact {sp.bursts[f]:.6f}, "
                                    f"Monte Carlo {est.p:.6f} [{est.lo:.6f}, {est.hi:.6f}] "
                                    f"({est.trials} bursts): "
                                    + ("agree" if agree else "DISAGREE"))
                results.append(row)
            text.append("")
    return results, "\n".join(text).rstrip()


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="snapshotctl", description=__doc__.split("\n")[0])
    ap.add_argument("--control", default=os.environ.get("SNAPSHOTD_CONTROL") or
                    os.environ.get("SNAPSHOTD_ENDPOINT") or default_control(),
                    help="the daemon's control socket (default $SNAPSHOTD_CONTROL, "
                    "$SNAPSHOTD_ENDPOINT, or the default socket)")
    ap.add_argument("--json", action="store_true", help="machine-readable output")
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the daemon")
    ap.add_argument("--token", default=os.environ.get("SNAPSHOTD_JOB_TOKEN", ""),
                    help="the job's token under --job-isolation (default $SNAPSHOTD_JOB_TOKEN)")
    ap.add_argument("--admin-token-file", metavar="PATH",
                    help="use the daemon's admin token (<shm-dir>/admin.token) to reach any job "
                    "under --job-isolation")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("status", help="node, memory, peers and versions",
                   description="This node's slot, memory by kind, peers up and down, and the "
                   "versions it holds.")
    what = {
        "ls": ("versions held, per rank", "list the versions this node holds (every job, or "
               "one job / one rank) with their state: local, protected, rebuilding"),
        "verify": ("check checksums", "recompute the checksums of a job's versions on this "
                   "node and name every tensor that differs (exit status 1 if any)"),
        "drop": ("delete versions", "delete a job's versions on this node (one rank, one step, "
                 "or every step newer than --newer-than); the group frees their parity"),
        "persist": ("write to --persist-dir", "write a step of a job (default: the newest) "
                    "to the daemon's --persist-dir"),
        "export": ("write a DCP checkpoint", "write a step of a job (every rank this node holds, "
                   "or --rank) as a torch.distributed.checkpoint directory that dcp.load reads"),
    }
    for name, (short, long) in what.items():
        sp = sub.add_parser(name, help=short, description=long[0].upper() + long[1:] + ".")
        sp.add_argument("--job", required=name != "ls",
                        help="the job name" + (" (default: every job)" if name == "ls" else ""))
        sp.add_argument("--rank", type=int, help="one rank only (default: every rank)")
        if name != "ls":
            sp.add_argument("--step", type=int, help="one step only (default: " + (
                "the newest)" if name in ("persist", "export") else "every step)"))
        if name == "drop":
            sp.add_argument("--newer-than", type=int, metavar="STEP",
                            help="drop every step newer than STEP (start a new timeline)")
        if name == "export":
            sp.add_argument("--out", required=True, help="directory to write")
            sp.add_argument("--global", dest="whole", action="store_true",
                            help="one global checkpoint of every rank of the job (read from "
                            "every node that holds one; sharded tensors assembled, replicated "
                            "ones written once) that dcp.load reads at any world size")
    kg = sub.add_parser("keygen", help="write the cluster CURVE key pair into DIR")
    kg.add_argument("dir")
    pl = sub.add_parser(
        "plan", help="survival of failure bursts per coding scheme (offline)",
        description="For a cluster of N nodes, with the groups the daemons would build: the "
        "probability that f simultaneous node failures lose nothing, the share of failure "
        "domains whose loss loses nothing, expected unrecoverable events per day, and memory "
        "and network per node per version, for several schemes side by side (docs/scale.md).")
    pl.add_argument("--nodes", required=True, help="node count(s), comma-separated")
    pl.add_argument("--schemes", default="4+2,6+2,8+2,6+3,r2,r3",
                    help="K+M (Reed-Solomon) or rN (N copies), comma-separated")
    pl.add_argument("--domains", default="", help="failure domain of every slot, as the "
                    "daemon's --domains ('0-31=rack-a,32-63=rack-b')")
    pl.add_argument("--domain-size", type=int, default=0, metavar="R",
                    help="or: failure domains of R consecutive slots (racks of neighbours)")
    pl.add_argument("--ignore-domains", action="store_true", help="only the consecutive "
                    "groups of a cluster without --domains (default: both)")
    pl.add_argument("--bursts", default="2,4,8,16",
                    help="simultaneous node failures f, comma-separated")
    pl.add_argument("--node-failures-per-day", type=float, default=0.004,
                    help="failures per node per day (default 0.004: about one a day per 256 "
                    "nodes)")
    pl.add_argument("--domain-failures-per-day", type=float, default=0.001,
                    help="whole-domain failures per domain per day")
    pl.add_argument("--repair-hours", type=float, default=1.0,
                    help="hours a failed node stays down (until its replacement rebuilt)")
    pl.add_argument("--state", default="", help="snapshot bytes per node per version "
                    "(e.g. 64GiB); without it sizes are in units of S")
    pl.add_argument("--monte-carlo", type=int, default=0, metavar="TRIALS",
                    help="also sample TRIALS bursts per f on the real placement and check the "
                    "exact probability lies in their 99.9%% interval")
    pl.add_argument("--markdown", action="store_true", help="markdown tables")
    return ap


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    return obj


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.admin_token_file:
        try:
            with open(args.admin_token_file) as fh:
                args.token = fh.read().strip()
        except OSError as exc:
            print(f"snapshotctl: cannot read the admin token: {exc}", file=sys.stderr)
            return 2
    try:
        if args.cmd == "keygen":
            result, text = cmd_keygen(args)
        elif args.cmd == "plan":
            try:
                result, text = cmd_plan(args)
            except (ValueError, ConfigError) as exc:
                print(f"snapshotctl plan: {exc}", file=sys.stderr)
                return 2
        else:
            ch = Channel(args.control, timedelta(seconds=args.timeout))
            try:
                result, text = globals()["cmd_" + args.cmd](ch, args)
            finally:
                ch.close()
    except SnapshotError as exc:
        print(f"snapshotctl: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(_jsonable(result), indent=2, default=str) if args.json else text)
    if args.cmd == "verify" and any(r.bad for r in result.results):
        return 1
    if args.cmd == "plan" and any(not est["lo"] <= row["bursts"][f] <= est["hi"]
                                  for row in result
                                  for f, est in row.get("monte_carlo", {}).items()):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
