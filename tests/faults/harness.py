"""The fault-injection harness: real daemons, real trainer processes, faults as data.

A fault is a :class:`Fault` record: a name, what it does, an ``inject(env, rng)`` step and a
``check(env, rng, injected) -> Outcome`` step. :func:`campaign` runs one fault many times, each
run with its own seeded :class:`random.Random`, checks the invariant after every run, and
records runs / survived / data lost / longest stall in :data:`RESULTS`, which is written to
``bench-out/reliability.json`` (``tests/faults/report.py`` renders ``docs/reliability.md``).

The invariant, after every fault: every rank restores exactly its newest committed (or, after
node loss, protected) version, bit for bit, or gets a clear error when the fault exceeds what the
configuration survives; and the daemons keep serving.

Environment:

- ``SNAPSHOTD_FAULT_RUNS``: ``quick`` (default, CI: a few runs per fault, small states) or
  ``long`` (``make faults``: tens of runs per fault, minutes of load).
- ``SNAPSHOTD_FAULT_SEED``: the base seed (default: from the clock). Run ``i`` of a fault uses
  seed ``base + i``; every failure message names it.
- ``SNAPSHOTD_FAULT_REPORT=1``: render docs/reliability.md when the run ends (always in long).

Pieces: :class:`Zygote`/:class:`Trainer` (real trainer processes, ftrainer.py),
:class:`FaultCluster` (LocalCluster whose peer traffic can go through a :class:`Proxy`),
helpers to flip bits in segments and in a daemon's memory, and to speak the peer protocol.
The fixtures are in faultfixtures.py (``pytest_plugins = ["faultfixtures"]``).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
import urllib.request
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import psutil
import pytest

from snapshotd.common import protocol as p
from snapshotd.common.channel import Channel, SnapshotError
from snapshotd.tools.localcluster import LocalCluster

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
FTRAINER = os.path.join(HERE, "ftrainer.py")
RESULTS_PATH = os.path.join(REPO, "bench-out", "reliability.json")

MODE = os.environ.get("SNAPSHOTD_FAULT_RUNS", "quick").strip().lower() or "quick"
if MODE not in ("quick", "long"):
    raise RuntimeError(f"SNAPSHOTD_FAULT_RUNS={MODE!r}: use quick or long")
LONG = MODE == "long"
BASE_SEED = int(os.environ.get("SNAPSHOTD_FAULT_SEED") or (time.time_ns() // 1000) % (1 << 31))


def runs(quick: int, long: int) -> int:
    """How many runs a fault gets in this mode."""
    return long if LONG else quick


def reproduce(nodeid: str, seed: int | None = None) -> str:
    env = f"SNAPSHOTD_FAULT_SEED={BASE_SEED if seed is None else seed}"
    if LONG:
        env += " SNAPSHOTD_FAULT_RUNS=long"
    return f"{env} python -m pytest -q '{nodeid}'"


# --------------------------------------------------------------------------- results


@dataclass
class Outcome:
    """What one run of a fault showed."""

    survived: bool
    lost: int = 0                 # ranks whose committed/protected data did not come back
    stall: float = 0.0            # longest time a client waited because of the fault (s)
    clear_error: bool = False     # the expected clear error for a fault beyond tolerance
    detail: str = ""
    bug: str = ""                 # a known bug (its regression test) this failure matches
    figures: dict = field(default_factory=dict)   # extra per-run numbers (max kept per fault)


@dataclass
class Row:
    name: str
    description: str
    command: str
    runs: int = 0
    survived: int = 0
    lost: int = 0
    longest_stall_s: float = 0.0
    clear_errors: int = 0
    beyond_tolerance: bool = False
    seeds: list[int] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    bugs: dict[str, int] = field(default_factory=dict)
    lost_known: int = 0           # ranks lost in runs that hit a known bug
    figures: dict = field(default_factory=dict)


class Results:
    """Per-fault rows of this session, merged into ``bench-out/reliability.json``."""

    def __init__(self, path: str = RESULTS_PATH) -> None:
        self.path = path
        self.rows: dict[str, Row] = {}
        self._lock = threading.Lock()

    def begin(self, name: str, description: str, command: str,
              beyond_tolerance: bool = False) -> Row:
        with self._lock:
            row = self.rows.get(name)
            if row is None:
                row = self.rows[name] = Row(name, description, command,
                                            beyond_tolerance=beyond_tolerance)
            return row

    def record(self, name: str, seed: int, outcome: Outcome) -> None:
        with self._lock:
            row = self.rows[name]
            row.runs += 1
            row.survived += bool(outcome.survived)
            row.lost += outcome.lost
            row.longest_stall_s = max(row.longest_stall_s, round(outcome.stall, 3))
            row.clear_errors += bool(outcome.clear_error)
            row.seeds.append(seed)
            if not outcome.survived or outcome.lost:
                row.failures.append(f"seed {seed}: {outcome.detail[:1200]}")
            if outcome.bug:
                row.bugs[outcome.bug] = row.bugs.get(outcome.bug, 0) + 1
                row.lost_known += outcome.lost
            for key, value in outcome.figures.items():
                row.figures[key] = max(row.figures.get(key, value), value)
        self.flush()

    def tally(self, name: str, description: str, command: str, *, runs: int, survived: int,
              lost: int = 0, stall: float = 0.0, clear_errors: int = 0, seed: int = 0,
              beyond_tolerance: bool = False, figures: dict | None = None,
              failure: str = "") -> None:
        """Add many runs at once (fuzzing: one run per message)."""
        row = self.begin(name, description, command, beyond_tolerance)
        with self._lock:
            row.runs += runs
            row.survived += survived
            row.lost += lost
            row.longest_stall_s = max(row.longest_stall_s, round(stall, 3))
            row.clear_errors += clear_errors
            row.seeds.append(seed)
            if failure:
                row.failures.append(failure[:300])
            for key, value in (figures or {}).items():
                row.figures[key] = max(row.figures.get(key, value), value)
        self.flush()

    def flush(self) -> None:
        with self._lock:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            try:
                with open(self.path) as fh:
                    data = json.load(fh)
            except (OSError, ValueError):
                data = {}
            section = data.setdefault(MODE, {"faults": {}})
            section["base_seed"] = BASE_SEED
            section["updated"] = time.strftime("%Y-%m-%d %H:%M:%S")
            section["machine"] = f"{os.cpu_count()} cores, " \
                f"{psutil.virtual_memory().total / (1 << 30):.0f} GiB"
            for name, row in self.rows.items():
                section["faults"][name] = {
                    "description": row.description, "command": row.command,
                    "runs": row.runs, "survived": row.survived, "lost": row.lost,
                    "longest_stall_s": row.longest_stall_s, "clear_errors": row.clear_errors,
                    "beyond_tolerance": row.beyond_tolerance, "base_seed": BASE_SEED,
                    "failures": row.failures[-5:], "known_bugs": row.bugs,
                    "lost_in_known_bugs": row.lost_known,
                    "figures": row.figures}
            tmp = self.path + ".tmp"
            with open(tmp, "w") as fh:
                json.dump(data, fh, indent=1, sort_keys=True)
            os.replace(tmp, self.path)


RESULTS = Results()


def _render_report() -> None:
    """After a long campaign (``make faults``), or with SNAPSHOTD_FAULT_REPORT=1, render
    docs/reliability.md from the results when the test process exits."""
    if not RESULTS.rows:
        return
    sys.path.insert(0, HERE)
    import report

    report.main([])


if LONG or os.environ.get("SNAPSHOTD_FAULT_REPORT"):
    import atexit

    atexit.register(_render_report)


@dataclass
class Fault:
    """One fault script: ``inject`` does the damage, ``check`` verifies the invariant."""

    name: str
    description: str
    inject: Callable[[Any, random.Random], Any]
    check: Callable[[Any, random.Random, Any], Outcome]
    runs: tuple[int, int] = (3, 40)          # (quick, long)
    beyond_tolerance: bool = False           # the clear error is the expected outcome


def campaign(fault: Fault, env: Any, nodeid: str, *, seed_offset: int = 0) -> list[Outcome]:
    """Run ``fault`` its number of times; record every run; fail with the seed on the first
    run that breaks the invariant.

    A run whose failure the check recognised as a *known* bug (``Outcome.bug`` names its
    regression test, which is xfail until the fix) is recorded as it is, data lost included,
    and the campaign goes on; at the end the test is marked xfail naming the bug, so CI stays
    green while the bug is open and the numbers in the report stay honest."""
    RESULTS.begin(fault.name, fault.description, reproduce(nodeid), fault.beyond_tolerance)
    outcomes = []
    known: dict[str, list[int]] = {}
    for i in range(runs(*fault.runs)):
        seed = BASE_SEED + seed_offset + i
        rng = random.Random(f"{fault.name}/{seed}")
        try:
            injected = fault.inject(env, rng)
            outcome = fault.check(env, rng, injected)
        except Exception as exc:  # noqa: BLE001 - recorded, then re-raised with the seed
            outcome = Outcome(False, detail=f"{type(exc).__name__}: {exc}")
            RESULTS.record(fault.name, seed, outcome)
            raise AssertionError(
                f"fault {fault.name!r} run {i} (seed {seed}) broke the invariant: {exc}\n"
                f"reproduce: {reproduce(nodeid, BASE_SEED + seed_offset)}\n"
                f"{traceback.format_exc()}") from exc
        RESULTS.record(fault.name, seed, outcome)
        outcomes.append(outcome)
        if outcome.bug and (not outcome.survived or outcome.lost):
            known.setdefault(outcome.bug, []).append(seed)
            continue
        assert outcome.survived and outcome.lost == 0, (
            f"fault {fault.name!r} run {i} (seed {seed}): {outcome.detail}\n"
            f"reproduce: {reproduce(nodeid, BASE_SEED + seed_offset)}")
    if known:
        pytest.xfail("hit known bugs (see their regression tests): " + "; ".join(
            f"{bug} in runs with seeds {seeds}" for bug, seeds in known.items()))
    return outcomes


# --------------------------------------------------------------------------- trainers


class Zygote:
    """One process with torch imported that forks trainer processes on request."""

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        os.makedirs(workdir, exist_ok=True)
        self.proc = subprocess.Popen([sys.executable, FTRAINER, "zygote"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=open(os.path.join(workdir, "zygote.err"), "ab"),
                                     cwd=HERE, start_new_session=True)
        self._cond = threading.Condition()
        self._pids: dict[int, int] = {}
        #: Exit codes by request id (not pid: pids are reused over a long campaign).
        self.exits: dict[int, int] = {}
        self._ids = iter(range(1, 1 << 30))
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            msg = json.loads(line)
            with self._cond:
                if "pid" in msg:
                    self._pids[msg["id"]] = msg["pid"]
                else:
                    self.exits[msg["id"]] = msg["rc"]
                self._cond.notify_all()

    def spawn(self, mode: str, endpoint: str, *args: Any, env: dict | None = None,
              timeout: float = 60.0) -> Trainer:
        rid = next(self._ids)
        out = os.path.join(self.workdir, f"trainer-{rid}.out")
        argv = [mode, "--endpoint", endpoint, *[str(a) for a in args]]
        request = {"id": rid, "argv": argv, "out": out, "env": env or {}}
        assert self.proc.stdin is not None
        with self._cond:
            self.proc.stdin.write((json.dumps(request) + "\n").encode())
            self.proc.stdin.flush()
            if not self._cond.wait_for(lambda: rid in self._pids, timeout):
                raise TimeoutError(f"zygote did not fork a trainer in {timeout}s")
            return Trainer(self, self._pids.pop(rid), out, argv, rid)

    def run(self, mode: str, endpoint: str, *args: Any, env: dict | None = None,
            timeout: float = 120.0) -> dict:
        """Run a trainer to completion and return its last JSON line."""
        trainer = self.spawn(mode, endpoint, *args, env=env)
        trainer.wait(timeout)
        return trainer.result()

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@dataclass
class Trainer:
    """A forked trainer process (a child of the zygote)."""

    zygote: Zygote
    pid: int
    out: str
    argv: list[str]
    rid: int = 0

    def lines(self) -> list[dict]:
        try:
            with open(self.out) as fh:
                text = fh.read()
        except FileNotFoundError:
            return []
        out = []
        for line in text.splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
        return out

    def text(self) -> str:
        try:
            with open(self.out) as fh:
                return fh.read()[-3000:]
        except FileNotFoundError:
            return ""

    @property
    def rc(self) -> int | None:
        with self.zygote._cond:
            return self.zygote.exits.get(self.rid)

    def alive(self) -> bool:
        return self.rc is None

    def wait(self, timeout: float = 120.0) -> int:
        with self.zygote._cond:
            if not self.zygote._cond.wait_for(lambda: self.rid in self.zygote.exits, timeout):
                raise TimeoutError(f"trainer {self.argv} (pid {self.pid}) still running after "
                                   f"{timeout}s:\n{self.text()}")
            return self.zygote.exits[self.rid]

    def kill(self, sig: int = signal.SIGKILL) -> int:
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass
        return self.wait(30)

    def result(self) -> dict:
        lines = self.lines()
        if not lines:
            return {"rc": self.rc, "output": self.text()}
        return lines[-1]

    def committed(self) -> list[int]:
        return [line["committed"] for line in self.lines() if "committed" in line]

    def failed(self) -> list[dict]:
        return [line for line in self.lines() if "failed" in line]

    def latencies(self) -> list[float]:
        return [line["s"] for line in self.lines() if "committed" in line or "failed" in line]

    def wait_line(self, predicate: Callable[[dict], bool], timeout: float = 60.0,
                  what: str = "a line") -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines():
                if predicate(line):
                    return line
            if not self.alive():
                for line in self.lines():
                    if predicate(line):
                        return line
                raise AssertionError(f"trainer exited ({self.rc}) before {what}:\n{self.text()}")
            time.sleep(0.01)
        raise AssertionError(f"trainer: no {what} in {timeout}s:\n{self.text()}")


# --------------------------------------------------------------------------- daemons


def call(spec: Any, msg: Any, timeout: float = 10.0) -> Any:
    ch = Channel(spec.control, timedelta(seconds=timeout))
    try:
        return ch.call(msg)
    finally:
        ch.close()


def status(spec: Any, timeout: float = 10.0) -> p.StatusReply:
    return call(spec, p.Status(), timeout)


def versions(spec: Any, job: str | None = None, rank: int | None = None) -> list:
    return [v for v in status(spec).versions
            if (job is None or v.job == job) and (rank is None or v.rank == rank)]


def steps(spec: Any, job: str, rank: int) -> list[int]:
    return sorted(v.step for v in versions(spec, job, rank))


def metric(spec: Any, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    body = urllib.request.urlopen(f"http://127.0.0.1:{spec.metrics_port}/metrics",
                                  timeout=10).read()
    total = 0.0
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v
                                           for k, v in labels.items()):
                total += sample.value
    return total


def wait_for(predicate: Callable[[], Any], timeout: float = 30.0, what: str = "condition",
             interval: float = 0.05, explain: Callable[[], str] | None = None) -> float:
    """Poll until ``predicate()`` is true; return the seconds it took. On a timeout the error
    carries ``explain()`` (say, :func:`cluster_state`) to tell what the nodes were doing."""
    started = time.monotonic()
    deadline = started + timeout
    last_exc: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            if predicate():
                return time.monotonic() - started
            last_exc = None
        except (SnapshotError, OSError) as exc:
            last_exc = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}"
                         + (f" (last error: {last_exc})" if last_exc else "")
                         + (f"\n{explain()}" if explain is not None else ""))


def cluster_state(cluster: LocalCluster, job: str | None = None, lines: int = 15) -> str:
    """Every node's versions of ``job`` and the end of its log, for a failure message."""
    out = []
    for slot, spec in enumerate(cluster.specs):
        try:
            held = [(v.rank, v.step, v.state) for v in versions(spec, job)]
        except (SnapshotError, OSError) as exc:
            held = [f"no answer: {exc}"]
        out.append(f"--- node {slot}: {held}\n{log_tail(spec, lines)}")
    return "\n".join(out)


def protected(spec: Any, job: str, step: int) -> bool:
    vs = [v for v in versions(spec, job) if v.step == step]
    return bool(vs) and all(v.state == "protected" for v in vs)


def all_protected(cluster: LocalCluster, job: str, step: int,
                  slots: Iterable[int] | None = None) -> bool:
    chosen = range(len(cluster.specs)) if slots is None else slots
    return all(protected(cluster.specs[s], job, step) for s in chosen)


def assert_serving(cluster: LocalCluster, timeout: float = 10.0) -> float:
    """Every daemon is alive and answers Status; return the slowest answer's seconds."""
    slowest = 0.0
    for slot, daemon in cluster.daemons.items():
        assert daemon.alive(), f"daemon {slot} died (rc {daemon.proc.returncode}); see " \
                               f"{daemon.spec.log_path}:\n{log_tail(daemon.spec)}"
        started = time.monotonic()
        status(daemon.spec, timeout)
        slowest = max(slowest, time.monotonic() - started)
    return slowest


def log_tail(spec: Any, lines: int = 30) -> str:
    try:
        with open(spec.log_path, errors="replace") as fh:
            return "".join(fh.readlines()[-lines:])
    except OSError:
        return ""


def drop_job(cluster: LocalCluster, job: str) -> None:
    """End of a run: drop the run's job, and every other job a node holds, on every node.

    (Other jobs show up when a replaced node rebuilds versions that were dropped before:
    test_regression_dropped_versions_resurrected_by_rebuild. Clearing them keeps one run's
    leftovers out of the next.)"""
    for daemon in cluster.daemons.values():
        if daemon.alive():
            try:
                jobs = {job} | {v.job for v in status(daemon.spec).versions}
                for name in sorted(jobs):
                    call(daemon.spec, p.Drop(name))
            except SnapshotError:
                pass


def shm_files(spec: Any, suffix: str = ".bin") -> list[str]:
    try:
        return sorted(f for f in os.listdir(spec.shm_dir)   # data segments, not par-* parity
                      if f.startswith("seg-") and f.endswith(suffix))
    except FileNotFoundError:
        return []


def proc_stats(pid: int) -> dict[str, int]:
    """RSS, peak RSS (VmHWM) and open file descriptors of a process."""
    proc = psutil.Process(pid)
    peak = 0
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                peak = int(line.split()[1]) * 1024
    return {"rss": proc.memory_info().rss, "peak": peak, "fds": proc.num_fds(),
            "threads": proc.num_threads()}


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


class FaultCluster(LocalCluster):
    """A LocalCluster whose peer traffic can run through a :class:`Proxy`.

    With ``proxied=True`` every (source, destination) pair of daemons gets its own proxy port:
    daemon ``s`` reaches peer ``d`` at ``proxy(s -> d)``, so one node's traffic, in both
    directions, can be held, dropped or delayed while the others talk normally."""

    def __init__(self, nodes: int, workdir: str, *, proxied: bool = False, **kw: Any) -> None:
        super().__init__(nodes, workdir, **kw)
        self.proxy: Proxy | None = None
        for _ in range(5 if proxied else 0):
            self.proxy = Proxy()
            for src in self.specs:
                for dst in self.specs:
                    if src.slot != dst.slot:
                        self.proxy.add(src.slot, dst.slot, dst.port)
            # The daemons' ports were free a moment ago and are not bound yet: the OS may
            # have given one of them to a proxy route ("Address already in use" at start).
            taken = {s.port for s in self.specs} | {s.metrics_port for s in self.specs}
            if not taken & {r.port for r in self.proxy.routes.values()}:
                break
            self.proxy.close()
            super().__init__(nodes, workdir, **kw)

    def slot_peer_args(self, slot: int) -> list[str]:
        entries = []
        for spec in self.specs:
            port = spec.port
            if self.proxy is not None and spec.slot != slot:
                port = self.proxy.port(slot, spec.slot)
            entries.append(f"{spec.slot}=127.0.0.1:{port}")
        return ["--peers", ",".join(entries), "--k", str(self.k), "--m", str(self.m)]

    def daemon_args(self, slot: int) -> list[str]:
        extra = self.slot_args.get(slot, [])
        if len(self.specs) == 1:
            return [*self.args, *extra]
        keys = ["--keys", self.keys] if self.keys else []
        return ["--listen", self.specs[slot].listen, *self.slot_peer_args(slot), *keys,
                *self.args, *extra]

    def restart(self, slot: int, timeout: float = 30.0) -> None:
        """SIGKILL (if alive) and start again on the same memory (no wipe)."""
        self.replace(slot, wipe=False, timeout=timeout)

    def stop(self) -> None:
        """Stop the daemons (LocalCluster.stop: all at once), then the proxy."""
        try:
            super().stop()
        finally:
            if self.proxy is not None:
                self.proxy.close()


def make_cluster(tmp_root: str, nodes: int, *, args: Sequence[str] = (), **kw: Any
                 ) -> FaultCluster:
    workdir = os.path.join(tmp_root, unique("c"))
    return FaultCluster(nodes, workdir, args=list(args), **kw)


# --------------------------------------------------------------------------- network faults


class _Conn:
    def __init__(self) -> None:
        self.transports: list[asyncio.BaseTransport] = []
        self.poisoned = False
        self.sent_up = 0              # bytes the connecting side sent through

    def abort(self) -> None:
        for t in self.transports:
            t.abort()  # type: ignore[attr-defined]


class _Route:
    def __init__(self, src: int, dst: int, target: int) -> None:
        self.src, self.dst, self.target = src, dst, target
        self.port = 0
        self.mode = "pass"            # pass | hold | drop
        self.delay = 0.0
        self.lose_replies_after = 0   # > 0: drop answers on connections that sent this much
        self.conns: set[_Conn] = set()
        self.server: Any = None


class Proxy:
    """A TCP proxy on loopback between daemons, one listening port per (src, dst) route.

    Modes per route: ``pass``; ``hold`` (stop forwarding: bytes wait, as in a partition where
    TCP keeps retransmitting, and are delivered on heal); ``drop`` (bytes are thrown away; on
    heal the damaged connections are reset, as after a partition long enough for TCP to give
    up); plus a one-way ``delay`` on every chunk (a slow peer)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.routes: dict[tuple[int, int], _Route] = {}
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True,
                                        name="fault-proxy")
        self._thread.start()

    def _run(self, coro: Any, timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def add(self, src: int, dst: int, target_port: int) -> int:
        route = _Route(src, dst, target_port)

        async def start() -> int:
            route.server = await asyncio.start_server(
                lambda r, w: self._serve(route, r, w), "127.0.0.1", 0)
            return route.server.sockets[0].getsockname()[1]

        route.port = self._run(start())
        self.routes[(src, dst)] = route
        return route.port

    def port(self, src: int, dst: int) -> int:
        return self.routes[(src, dst)].port

    def _touching(self, slot: int) -> list[_Route]:
        return [r for r in self.routes.values() if slot in (r.src, r.dst)]

    def partition(self, slot: int, how: str = "hold") -> None:
        assert how in ("hold", "drop")
        for route in self._touching(slot):
            route.mode = how

    def block(self, src: int, dst: int) -> None:
        """Drop what ``src`` sends to ``dst`` (one route only; ``unblock`` resets it)."""
        self.routes[(src, dst)].mode = "drop"

    def unblock(self, src: int, dst: int) -> None:
        self._reset([self.routes[(src, dst)]])

    def heal(self, slot: int) -> None:
        self._reset(self._touching(slot))

    def _reset(self, routes: list[_Route]) -> None:
        def reset() -> None:
            for route in routes:
                for conn in list(route.conns):
                    if conn.poisoned:
                        conn.abort()
                        route.conns.discard(conn)
                route.mode = "pass"

        done = threading.Event()
        self.loop.call_soon_threadsafe(lambda: (reset(), done.set()))
        done.wait(10)

    def slow(self, slot: int, delay: float) -> None:
        for route in self._touching(slot):
            route.delay = delay

    def lose_replies(self, slot: int, after_bytes: int) -> None:
        """Requests to ``slot`` on connections that sent more than ``after_bytes`` (data
        fragments, not heartbeats) are delivered, but the answers are lost: the requester sees
        a peer that took the request and never answered (as when it dies right after)."""
        for route in self.routes.values():
            if route.dst == slot:
                route.lose_replies_after = after_bytes

    async def _serve(self, route: _Route, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        conn = _Conn()
        conn.transports.append(writer.transport)
        route.conns.add(conn)
        try:
            if route.mode == "drop":          # a blackholed SYN: nothing gets through
                conn.poisoned = True
                while await reader.read(1 << 16):
                    pass
                return
            try:
                up_r, up_w = await asyncio.open_connection("127.0.0.1", route.target)
            except OSError:
                return
            conn.transports.append(up_w.transport)
            await asyncio.gather(self._pump(route, conn, reader, up_w, upstream=True),
                                 self._pump(route, conn, up_r, writer, upstream=False),
                                 return_exceptions=True)
        finally:
            route.conns.discard(conn)
            conn.abort()

    async def _pump(self, route: _Route, conn: _Conn, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter, upstream: bool = True) -> None:
        queue: deque[tuple[float, bytes]] = deque()
        wake = asyncio.Event()
        eof = False

        async def send() -> None:
            while True:
                while not queue:
                    if eof:
                        return
                    wake.clear()
                    await wake.wait()
                due, data = queue[0]
                now = self.loop.time()
                if due > now:
                    await asyncio.sleep(due - now)
                    continue
                while route.mode == "hold":
                    await asyncio.sleep(0.02)
                queue.popleft()
                writer.write(data)
                await writer.drain()

        sender = asyncio.ensure_future(send())
        try:
            while True:
                while route.mode == "hold":
                    await asyncio.sleep(0.02)
                data = await reader.read(1 << 16)
                if not data:
                    break
                if route.mode == "drop" or conn.poisoned:
                    conn.poisoned = True
                    continue
                if upstream:
                    conn.sent_up += len(data)
                elif 0 < route.lose_replies_after < conn.sent_up:
                    continue                  # the answer is lost
                queue.append((self.loop.time() + route.delay, data))
                wake.set()
        finally:
            eof = True
            wake.set()
            try:
                await sender
            except (ConnectionError, OSError):
                pass
            conn.abort()

    def close(self) -> None:
        async def stop() -> None:
            for route in self.routes.values():
                route.server.close()
                for conn in list(route.conns):
                    conn.abort()

        try:
            self._run(stop())
        except Exception:  # noqa: BLE001
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


def restore_check(zygote: Zygote, spec: Any, job: str, rank: int, mib: float,
                  expect: int | None, timeout: float = 120.0, step: int | None = None
                  ) -> tuple[bool, dict]:
    """Restore (job, rank) (its newest version, or ``step``) through a real trainer; True if
    it got step ``expect`` bit-exactly."""
    args = ["--step", step] if step is not None else []
    out = zygote.run("restore", spec.control, "--job", job, "--rank", rank, "--mib", mib,
                     *args, timeout=timeout)
    ok = out.get("step") == expect and (expect is None or out.get("exact") is True)
    return ok, out


def cleanup_dirs(*paths: str) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


#: Daemon flags of the retention and regression scenarios: fast heartbeats, short timeouts.
FAST = ["--insecure", "--memory-limit", "512MiB", "--heartbeat-interval", "0.2",
        "--peer-timeout", "1.5", "--encode-timeout", "2", "--reap-interval", "0.2"]
#: How long those scenarios wait for protection or a rebuild to settle with FAST (seconds).
FAST_SETTLE_S = 1.5 + 2 + 10


def lose(cluster: LocalCluster, slot: int) -> None:
    """A node loss: its daemon SIGKILLed and its memory (the shm directory) gone."""
    cluster.kill(slot)
    shutil.rmtree(cluster.specs[slot].shm_dir, ignore_errors=True)


def save_on(zygote: Zygote, cluster: LocalCluster, job: str, first: int, last: int,
            mib: float, ranks: int = 1, slots: Iterable[int] | None = None,
            extra: Sequence[Any] = (), wait: bool = True, world: int = 0
            ) -> dict[tuple[int, int], Trainer]:
    """One trainer per (node, local rank) saving steps first..last; global rank is
    ``slot * ranks + local``. Waits for all of them unless ``wait`` is False. ``world``: the
    job's number of ranks the trainers tell the daemons (``WORLD_SIZE``; 0: not said)."""
    chosen = range(len(cluster.specs)) if slots is None else slots
    trainers = {}
    for slot in chosen:
        for local in range(ranks):
            rank = slot * ranks + local
            trainers[(slot, rank)] = zygote.spawn(
                "save", cluster.specs[slot].control, "--job", job, "--rank", rank, "--mib",
                mib, "--steps", first, last, *extra,
                env={"LOCAL_WORLD_SIZE": str(ranks), "WORLD_SIZE": str(world)})
    if wait:
        for (slot, rank), t in trainers.items():
            rc = t.wait(180)
            assert rc == 0, f"trainer of node {slot} rank {rank} failed ({rc}):\n{t.text()}"
    return trainers


def restore_all(zygote: Zygote, cluster: LocalCluster, job: str, mib: float,
                expect: dict[tuple[int, int], Any], timeout: float = 120.0
                ) -> tuple[int, float, list[str], dict]:
    """Restore every (slot, rank) in ``expect`` at once through real trainers.

    ``expect[(slot, rank)]`` is a step, or a (low, high) range of acceptable steps. Returns
    (ranks lost, longest restore seconds, problems, raw outputs)."""
    trainers = {key: zygote.spawn("restore", cluster.specs[key[0]].control, "--job", job,
                                  "--rank", key[1], "--mib", mib)
                for key in expect}
    lost, stall, problems, outs = 0, 0.0, [], {}
    for key, t in trainers.items():
        t.wait(timeout)
        out = outs[key] = t.result()
        stall = max(stall, out.get("s", 0.0))
        want = expect[key]
        lo, hi = want if isinstance(want, tuple) else (want, want)
        step = out.get("step")
        if step is None or not lo <= step <= hi or out.get("exact") is not True:
            lost += 1
            problems.append(f"node {key[0]} rank {key[1]}: restore gave {out}, want step "
                            f"{want} bit-exact")
    return lost, stall, problems, outs


# --------------------------------------------------------------------------- peers and bytes


def peer_socket(endpoint: str, keys: str | None = None, context: Any = None,
                public: bytes | None = None, secret: bytes | None = None,
                server_key: bytes | None = None) -> Any:
    """A raw DEALER to a daemon's peer port: plain, with the cluster keys, or with any keys."""
    import zmq

    from snapshotd.cluster.peers import load_security

    ctx = context or zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if keys:
        load_security(keys, False).client(sock)
    elif secret is not None:
        sock.curve_secretkey = secret
        sock.curve_publickey = public
        sock.curve_serverkey = server_key
    sock.connect(endpoint)
    return sock


def peer_call(spec: Any, msg: Any, frames: Sequence[Any] = (), keys: str | None = None,
              timeout: float = 10.0) -> tuple[Any, list[bytes]]:
    """One request on the peer protocol; returns (reply, payload frames)."""
    from snapshotd.cluster import peerproto as pp

    sock = peer_socket(spec.listen, keys)
    try:
        sock.send_multipart([p.encode(msg, 1), *frames])
        if not sock.poll(int(timeout * 1000)):
            raise TimeoutError(f"no answer to {msg.OP} from {spec.listen} in {timeout}s")
        parts = sock.recv_multipart()
        return pp.decode(parts[0])[1], parts[1:]
    finally:
        sock.close(0)


def manifests(spec: Any) -> list[tuple[str, dict]]:
    """(segment path, manifest) of every committed version in a daemon's directory."""
    out = []
    for name in shm_files(spec, ".json"):
        path = os.path.join(spec.shm_dir, name)
        try:
            with open(path) as fh:
                out.append((path[:-len(".json")] + ".bin", json.load(fh)))
        except (OSError, ValueError):
            pass
    return out


def flip_segment_bits(spec: Any, job: str, rank: int, step: int, rng: random.Random,
                      flips: int = 1, tensors: Sequence[str] | None = None) -> list[str]:
    """Flip ``flips`` random bits inside tensor bytes of one committed version; return the
    names of the tensors hit."""
    found = [(seg, m) for seg, m in manifests(spec)
             if (m["job"], m["rank"], m["step"]) == (job, rank, step)]
    if not found:
        raise AssertionError(f"no segment of {job} rank {rank} step {step} on {spec.slot}")
    seg, m = found[0]
    chosen = [t for t in m["tensors"] if t["nbytes"] and (tensors is None or
                                                          t["name"] in tensors)]
    hit = []
    with open(seg, "r+b") as fh:
        for _ in range(flips):
            t = rng.choice(chosen)
            pos = t["offset"] + rng.randrange(t["nbytes"])
            fh.seek(pos)
            byte = fh.read(1)[0]
            fh.seek(pos)
            fh.write(bytes([byte ^ (1 << rng.randrange(8))]))
            hit.append(t["name"])
    return sorted(set(hit))


def flip_process_memory(pid: int, needle: bytes, offset: int, bit: int) -> int:
    """Flip one bit at ``offset`` after every copy of ``needle`` in a process's writable
    memory (through /proc/PID/mem); return how many copies were hit."""
    hits = 0
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "r+b", buffering=0) as mem:
        regions = []
        for line in maps:
            fields = line.split()
            if fields[1].startswith("rw"):
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                regions.append((lo, hi))
        for lo, hi in regions:
            try:
                mem.seek(lo)
                data = mem.read(hi - lo)
            except OSError:
                continue
            start = 0
            while (i := data.find(needle, start)) >= 0:
                mem.seek(lo + i + offset)
                byte = data[i + offset] if i + offset < len(data) else mem.read(1)[0]
                mem.seek(lo + i + offset)
                mem.write(bytes([byte ^ (1 << bit)]))
                hits += 1
                start = i + 1
    return hits
