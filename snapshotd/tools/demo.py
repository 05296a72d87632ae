"""``snapshotd demo``: a local multi-node cluster, a real torchrun job, real failures, recovery.

What it does, all on loopback (``make demo`` runs it):

1. Trains ``examples/train.py`` (a small GPT, DDP over gloo) once without interruption, as the
   reference.
2. Starts a :class:`~snapshotd.tools.localcluster.LocalCluster` (one snapshotd per "node", erasure
   coded across the nodes) and one ``torchrun`` agent per node, joined through torchrun's c10d
   rendezvous, and trains the same job again, snapshotting every step.
3. While it trains: SIGKILLs one trainer process (torchrun restarts the workers, which restore
   from their node's daemon), then kills a whole node (its agent, trainer and daemon) and
   starts a replacement node (an empty daemon rebuilding from its peers, and a new agent) in
   the same slot.
4. Prints a summary per failure, writes ``loss.png`` and checks that the final parameters are
   bit-identical to the reference run's. Exit code 0 only on a match.

Rendezvous on one machine: the demo hosts the rendezvous store itself (``is_host=0`` for every
agent), as an etcd or a dedicated store host would in production, so losing any node never
loses the rendezvous. Each node's agent gets its own loopback address (``--local-addr
127.0.0.1xx``); torchrun orders nodes by address when it assigns ranks, so a replacement node
gets the ranks of the node it replaces - the loopback stand-in for a stable host name
(StatefulSet ordinal). ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` makes every rendezvous round
publish a fresh master address, so no round depends on a process of an earlier one.

The classes here (:class:`TorchrunJob`, :class:`JsonlTail`, :func:`compare_params`) are also used
by the integration tests.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from .localcluster import LocalCluster, free_ports

__all__ = ["main", "TorchrunJob", "JsonlTail", "Failure", "compare_params", "find_script",
           "reference_run", "rebuilt_bytes", "node_addr", "torchrun_env",
           "read_jsonl", "resumed_record", "make_keys", "kill_tree"]

#: torchrun log lines that mean an agent saw its workers fail.
_FAILED = re.compile(r"Worker group (FAILED|UNHEALTHY)|failed \(exitcode|ChildFailedError")


def find_script() -> Path:
    """``examples/train.py`` of this source tree."""
    for base in (Path(__file__).resolve().parents[2], Path.cwd()):
        candidate = base / "examples" / "train.py"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError("examples/train.py not found: run the demo from a source checkout "
                            "(or pass --script)")


def node_addr(slot: int) -> str:
    """The loopback address standing for node ``slot`` (sorts like the slots, up to 155)."""
    return f"127.0.0.{100 + slot}"


def _torchrun() -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run"]


def torchrun_env(**extra: str) -> dict[str, str]:
    """The environment for torchrun agents on loopback.

    ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``: by default the agents' rendezvous store is
    shared with the workers and kept across restarts without a per-attempt key prefix, so a
    restarted worker can read the previous attempt's gloo addresses from it, fail to connect
    ("Connection refused" in connectFullMesh) or hang. Unshared, rank 0 of every attempt
    hosts a fresh store on a fresh port.
    """
    env = dict(os.environ)
    env.update({"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "GLOO_SOCKET_IFNAME": "lo",
                "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                "LOGLEVEL": env.get("LOGLEVEL", "INFO")})
    env.update(extra)
    return env


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> list[int]:
    """Signal ``pid`` and all its descendants (collected first); return the pids signalled."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    hit = []
    for proc in procs:
        try:
            proc.send_signal(sig)
            hit.append(proc.pid)
        except psutil.NoSuchProcess:
            pass
    return hit


# ----------------------------------------------------------------------------- logs


class JsonlTail:
    """Reads the JSON lines appended to a file since the last call."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._pos = 0
        self._partial = b""
        self.records: list[dict[str, Any]] = []

    def poll(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self._pos)
                chunk = fh.read()
        except FileNotFoundError:
            return []
        self._pos += len(chunk)
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()
        new = [json.loads(line) for line in lines if line.strip()]
        self.records.extend(new)
        return new


def resumed_record(losses: list[dict[str, Any]], since: float) -> dict[str, Any] | None:
    """The first step logged by a new trainer process after wall time ``since``.

    Steps logged after ``since`` by the process that was running then (in flight at the
    kill) do not count: only a process started later has restarted.
    """
    before = [r for r in losses if r["time"] <= since]
    old_pid = before[-1].get("pid") if before else None
    for rec in losses:
        if rec["time"] > since and rec.get("pid") != old_pid:
            return rec
    return None


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    tail = JsonlTail(path)
    tail.poll()
    return tail.records


# ----------------------------------------------------------------------------- the job


@dataclass
class _Agent:
    slot: int
    generation: int
    proc: subprocess.Popen
    log_path: Path
    reader: threading.Thread


class TorchrunJob:
    """One torchrun agent per node of a LocalCluster, joined by c10d rendezvous.

    The rendezvous store is hosted here (not by an agent), so any node can die. Agent output
    goes to ``OUT/node{slot}-agent{generation}.log`` with wall-clock stamps; lines that show a
    worker failure are kept in :attr:`failures_seen` as ``(time, slot, line)``.
    """

    def __init__(self, cluster: LocalCluster, script: str | Path, script_args: Sequence[str],
                 out: str | Path, *, nproc_per_node: int = 1, max_restarts: int = 5,
                 keep_alive: int = 1, keep_alive_attempts: int = 5,
                 env: dict[str, str] | None = None) -> None:
        import torch.distributed as dist  # the demo needs torch; the daemon does not

        self.cluster = cluster
        self.nodes = len(cluster.specs)
        self.script, self.script_args = str(script), list(script_args)
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.nproc, self.max_restarts = nproc_per_node, max_restarts
        self.keep_alive, self.keep_alive_attempts = keep_alive, keep_alive_attempts
        self.env = env or {}
        self.run_id = f"snapshotd-{uuid.uuid4().hex[:8]}"
        self.port = free_ports(1)[0]
        self.store = dist.TCPStore("127.0.0.1", self.port, is_master=True,
                                   wait_for_workers=False, multi_tenant=True)
        self.agents: dict[int, _Agent] = {}
        self.generation: dict[int, int] = {}
        self.failures_seen: list[tuple[float, int, str]] = []
        self._lock = threading.Lock()

    def command(self, slot: int) -> list[str]:
        conf = (f"is_host=0,keep_alive_interval={self.keep_alive},"
                f"keep_alive_max_attempt={self.keep_alive_attempts},join_timeout=300")
        return [*_torchrun(), f"--nnodes={self.nodes}", f"--nproc-per-node={self.nproc}",
                f"--node-rank={slot}", "--rdzv-backend=c10d",
                f"--rdzv-endpoint=127.0.0.1:{self.port}", f"--rdzv-id={self.run_id}",
                f"--rdzv-conf={conf}", f"--local-addr={node_addr(slot)}",
                f"--max-restarts={self.max_restarts}", "--monitor-interval=0.2",
                f"--log-dir={self.out / 'torchelastic'}", self.script, *self.script_args]

    def start_agent(self, slot: int) -> _Agent:
        """Start node ``slot``'s torchrun agent, its trainers talking to that node's daemon."""
        gen = self.generation.get(slot, -1) + 1
        self.generation[slot] = gen
        env = {**torchrun_env(), **self.env,
               "SNAPSHOTD_ENDPOINT": self.cluster.specs[slot].control}
        proc = subprocess.Popen(self.command(slot), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
        log_path = self.out / f"node{slot}-agent{gen}.log"
        reader = threading.Thread(target=self._read, args=(slot, proc, log_path), daemon=True,
                                  name=f"agent{slot}-log")
        reader.start()
        agent = _Agent(slot, gen, proc, log_path, reader)
        self.agents[slot] = agent
        return agent

    def start(self) -> None:
        for slot in range(self.nodes):
            self.start_agent(slot)

    def _read(self, slot: int, proc: subprocess.Popen, path: Path) -> None:
        assert proc.stdout is not None
        with open(path, "w") as log:
            for raw in proc.stdout:
                now = time.time()
                line = raw.decode(errors="replace").rstrip("\n")
                log.write(f"{now:.3f} {line}\n")
                log.flush()
                if _FAILED.search(line):
                    with self._lock:
                        self.failures_seen.append((now, slot, line))

    def trainer_pids(self, slot: int) -> list[int]:
        """Pids of node ``slot``'s trainer processes (children of its agent)."""
        agent = self.agents.get(slot)
        if agent is None:
            return []
        try:
            children = psutil.Process(agent.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        pids = []
        for child in children:
            try:
                if any(self.script in part for part in child.cmdline()):
                    pids.append(child.pid)
            except psutil.NoSuchProcess:
                pass
        return pids

    def kill_trainer(self, slot: int) -> int | None:
        """SIGKILL one trainer of node ``slot``; return its pid (None if none was running)."""
        pids = self.trainer_pids(slot)
        if not pids:
            return None
        os.kill(pids[0], signal.SIGKILL)
        return pids[0]

    def kill_node(self, slot: int) -> None:
        """SIGKILL node ``slot`` whole: its agent, its trainers and its daemon."""
        agent = self.agents[slot]
        kill_tree(agent.proc.pid)
        agent.proc.wait(30)
        self.cluster.kill(slot)

    def replace_node(self, slot: int) -> None:
        """A replacement node joins in ``slot``: a fresh empty daemon, then a new agent."""
        self.cluster.replace(slot)
        self.start_agent(slot)

    def first_failure_after(self, when: float) -> float | None:
        with self._lock:
            times = [t for t, _, _ in self.failures_seen if t >= when]
        return min(times) if times else None

    def finished(self) -> bool:
        return all(a.proc.poll() is not None for a in self.agents.values())

    def returncodes(self) -> dict[int, int | None]:
        return {slot: a.proc.poll() for slot, a in self.agents.items()}

    def wait(self, timeout: float) -> dict[int, int | None]:
        deadline = time.monotonic() + timeout
        while not self.finished() and time.monotonic() < deadline:
            time.sleep(0.1)
        return self.returncodes()

    def stop(self) -> None:
        """Kill every agent and trainer still running; close the rendezvous store."""
        for agent in self.agents.values():
            if agent.proc.poll() is None:
                kill_tree(agent.proc.pid)
            try:
                agent.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
            agent.reader.join(5)
        for agent in self.agents.values():
            if agent.proc.stdout is not None:
                agent.proc.stdout.close()
        del self.store

    def __enter__(self) -> TorchrunJob:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def reference_run(script: str | Path, script_args: Sequence[str], out: str | Path,
                  nproc: int, timeout: float = 600.0,
                  progress: Callable[[dict | None], None] | None = None) -> int:
    """Train without snapshots or failures in one ``torchrun --standalone``; return its rc."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cmd = [*_torchrun(), "--standalone", f"--nproc-per-node={nproc}",
           f"--log-dir={out / 'torchelastic'}", str(script), *script_args, "--no-snapshot",
           "--out", str(out)]
    with open(out / "torchrun.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=torchrun_env(),
                                start_new_session=True)
        tail = JsonlTail(out / "loss.jsonl")
        deadline = time.monotonic() + timeout
        try:
            while proc.poll() is None:
                if time.monotonic() > deadline:
                    kill_tree(proc.pid)
                    proc.wait()
                    return 124
                new = tail.poll()
                if progress is not None:
                    progress(new[-1] if new else None)
                time.sleep(0.2)
        finally:
            if proc.poll() is None:
                kill_tree(proc.pid)
                proc.wait()
    return proc.returncode


def reference_key(script: str | Path, args: Sequence[str]) -> str:
    """What a reference run depends on: the script's bytes, its arguments, torch's version."""
    import hashlib

    import torch

    digest = hashlib.sha256(Path(script).read_bytes()).hexdigest()
    return json.dumps({"script": digest, "args": list(args), "torch": torch.__version__,
                       "python": sys.version.split()[0]})


def make_keys(path: str | Path) -> str:
    """Write the cluster CURVE key pair with ``snapshotctl keygen PATH``; return PATH."""
    import contextlib
    import io

    from ..ops.ctl import main as ctl

    path = Path(path)
    shutil.rmtree(path, ignore_errors=True)
    with contextlib.redirect_stdout(io.StringIO()) as said:
        if ctl(["keygen", str(path)]) != 0:
            raise RuntimeError(f"snapshotctl keygen {path} failed: {said.getvalue()}")
    return str(path)


# ----------------------------------------------------------------------------- results


def compare_params(a: str | Path, b: str | Path) -> tuple[bool, str]:
    """Compare two ``torch.save``-d state dicts bit for bit; return (equal, explanation)."""
    import torch

    sa = torch.load(a, map_location="cpu", weights_only=True)
    sb = torch.load(b, map_location="cpu", weights_only=True)
    if sa.keys() != sb.keys():
        return False, f"different tensors: {sorted(set(sa) ^ set(sb))}"
    differ = []
    for name in sa:
        x, y = sa[name], sb[name]
        if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(
                x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)):
            diff = (x.double() - y.double()).abs().max().item() if x.shape == y.shape else None
            differ.append(f"{name} (max |diff| {diff})")
    count = sum(t.numel() for t in sa.values())
    if differ:
        return False, f"{len(differ)} of {len(sa)} tensors differ: {', '.join(differ[:5])}"
    return True, f"{len(sa)} tensors, {count:,} parameters: every bit equal"


def rebuilt_bytes(metrics_port: int, timeout: float = 2.0) -> float | None:
    """``snapshotd_rebuilt_bytes_total`` of one daemon, or None if it is not exported."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                    timeout=timeout) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    values = [float(m.group(1)) for m in re.finditer(
        r"^snapshotd_rebuilt_bytes_total(?:\{[^}]*\})? (\S+)$", text, re.M)]
    return sum(values) if values else None


@dataclass
class Failure:
    """One injected failure and how the job got over it."""

    kind: str
    slot: int
    injected_at: float            # wall time of the kill
    step: int | None           # newest step logged before the kill
    detected_at: float | None = None
    restored: list[Any] | None = None
    resumed_at: float | None = None
    rebuilt: float | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def restored_step(self) -> int | None:
        values = set(self.restored or [])
        return values.pop() if len(values) == 1 else None

    @property
    def steps_lost(self) -> int | None:
        if self.step is None or not self.restored:
            return None
        restored = self.restored_step
        return self.step - (restored if restored is not None else -1)

    def fill(self, losses: list[dict[str, Any]], starts: list[dict[str, Any]],
             job: TorchrunJob) -> None:
        """Find when the job noticed, what it restored and when it trained again."""
        self.detected_at = job.first_failure_after(self.injected_at)
        before = [r for r in losses if r["time"] <= self.injected_at]
        if before:                  # every step the killed process completed, even in flight
            pid = before[-1].get("pid")
            self.step = max(r["step"] for r in losses if r.get("pid") == pid)
        first = resumed_record(losses, self.injected_at)
        if first is not None:
            self.resumed_at = first["time"]
        if self.resumed_at is not None:
            latest: dict[int, Any] = {}
            for ev in starts:
                if self.injected_at < ev["time"] <= self.resumed_at:
                    latest[ev["rank"]] = ev["restored"]
            self.restored = [latest[r] for r in sorted(latest)]


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def summary_table(failures: list[Failure], t0: float) -> str:
    head = ["failure", "injected", "detected at", "restored step", "steps lost",
            "s to resume", "rebuilt from peers"]
    rows = []
    for f in failures:
        detected = (f"{f.detected_at - t0:.1f}s (+{f.detected_at - f.injected_at:.2f}s)"
                    if f.detected_at else "n/a")
        restored = f.restored_step
        if restored is None and f.restored:
            restored_s = "DISAGREE " + ",".join(map(str, f.restored))
        elif restored is None:
            restored_s = "none (fresh start)" if f.restored else "n/a"
        else:
            restored_s = str(restored)
        rows.append([
            f.kind, f"{f.injected_at - t0:.1f}s / step {f.step}", detected, restored_s,
            "n/a" if f.steps_lost is None else str(f.steps_lost),
            f"{f.resumed_at - f.injected_at:.1f}" if f.resumed_at else "n/a",
            _fmt_bytes(f.rebuilt) + (f" {f.note}" if f.note else "")])
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, rows)])


def plot_loss(path: Path, reference: list[dict], faulted: list[dict],
              failures: list[Failure], t0: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 7.5))
    if reference:
        ax1.plot([r["step"] for r in reference], [r["loss"] for r in reference], color="0.6",
                 lw=3, label="uninterrupted reference")
    attempts: dict[int, list[dict]] = {}
    segment, last_pid = -1, None
    for r in faulted:                       # one segment per trainer process (restart)
        if r.get("pid") != last_pid or segment < 0:
            segment += 1
            last_pid = r.get("pid")
        attempts.setdefault(segment, []).append(r)
    for i, recs in attempts.items():
        ax1.plot([r["step"] for r in recs], [r["loss"] for r in recs], lw=1.2,
                 label="with failures" if i == 0 else f"after failure {i}")
        ax2.plot([r["time"] - t0 for r in recs], [r["step"] for r in recs], lw=1.5)
    colors = ["tab:red", "tab:purple", "tab:brown", "tab:olive"]
    for i, f in enumerate(failures):
        c = colors[i % len(colors)]
        if f.step is not None:
            ax1.axvline(f.step, color=c, ls="--", lw=1)
            restored = "nothing" if f.restored_step is None else f"step {f.restored_step}"
            ax1.annotate(f"{f.kind}\nrestored {restored}", (f.step, 1), xycoords=(
                "data", "axes fraction"), xytext=(4, -4), textcoords="offset points",
                va="top", fontsize=8, color=c)
        ax2.axvline(f.injected_at - t0, color=c, ls="--", lw=1)
        if f.resumed_at:
            ax2.axvspan(f.injected_at - t0, f.resumed_at - t0, color=c, alpha=0.15)
        ax2.annotate(f.kind, (f.injected_at - t0, 0.02), xycoords=("data", "axes fraction"),
                     xytext=(4, 2), textcoords="offset points", fontsize=8, color=c)
    ax1.set_xlabel("step")
    ax1.set_ylabel("training loss (rank 0)")
    ax1.set_title("snapshotd demo: training loss, failures marked (grey: uninterrupted run)")
    ax1.legend(loc="upper right", fontsize=8)
    ax2.set_xlim(left=0)
    ax2.set_xlabel("seconds since the torchrun agents started")
    ax2.set_ylabel("step")
    ax2.set_title("progress; shaded: from the kill to the first step after the restore")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- progress


class Progress:
    """One updating status line on a terminal, plain lines (at most every few s) otherwise."""

    def __init__(self, stream: Any = None, every: float = 3.0) -> None:
        self.stream = stream or sys.stdout
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.every = every
        self._last = 0.0
        self._width = 0

    def update(self, text: str, force: bool = False) -> None:
        now = time.monotonic()
        if self.tty:
            cols = shutil.get_terminal_size((120, 20)).columns - 1
            text = text[:cols]
            self.stream.write("\r" + text.ljust(self._width))
            self._width = len(text)
            self.stream.flush()
        elif force or now - self._last >= self.every:
            self.stream.write(text + "\n")
            self.stream.flush()
            self._last = now

    def say(self, text: str) -> None:
        """A permanent line (an event), above the status line."""
        if self.tty and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self._width = 0
        self.stream.write(text + "\n")
        self.stream.flush()


# ----------------------------------------------------------------------------- main


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="snapshotd demo", description=(
        "Local multi-node cluster on loopback: train a small GPT with torchrun, kill a "
        "trainer and then a whole node, recover from snapshotd, and check the final "
        "parameters against an uninterrupted run bit for bit."))
    ap.add_argument("--nodes", type=int, default=3, help="nodes (one daemon + one agent each)")
    ap.add_argument("--nproc-per-node", type=int, default=1, help="trainers per node")
    ap.add_argument("--k", type=int, default=None, help="data chunks per stripe "
                    "(default nodes-1)")
    ap.add_argument("--m", type=int, default=1, help="parity chunks per stripe")
    ap.add_argument("--steps", type=int, default=200, help="training steps")
    ap.add_argument("--size", default="small", choices=["small", "tiny"],
                    help="model size (examples/train.py --size)")
    ap.add_argument("--out", default="demo-out", help="output directory")
    ap.add_argument("--script", default=None, help="training script (examples/train.py)")
    ap.add_argument("--trainer-kill-at", type=float, default=0.3,
                    help="fraction of the steps at which a trainer is SIGKILLed")
    ap.add_argument("--node-kill-at", type=float, default=0.6,
                    help="fraction of the steps at which a whole node is killed")
    ap.add_argument("--kill-trainer-slot", type=int, default=0,
                    help="node whose trainer is killed")
    ap.add_argument("--kill-node", type=int, default=None,
                    help="node slot killed whole (default: the last one)")
    ap.add_argument("--replace-after", type=float, default=1.0,
                    help="seconds between the node loss and its replacement joining")
    ap.add_argument("--skip-node-loss", action="store_true",
                    help="inject only the trainer crash")
    ap.add_argument("--fresh-reference", action="store_true",
                    help="retrain the reference even if OUT/reference holds one made by the "
                         "same script, arguments and torch version")
    ap.add_argument("--timeout", type=float, default=600,
                    help="give up (FAIL) after this many seconds of the faulted run")
    ap.add_argument("--memory-limit", default="2GiB", help="each daemon's --memory-limit")
    ap.add_argument("--curve", action="store_true",
                    help="encrypt peer traffic: `snapshotctl keygen` into OUT/keys and start "
                         "every daemon with --keys (default: --insecure, plain TCP on "
                         "loopback)")
    args = ap.parse_args(list(argv))
    if args.nodes < 2:
        ap.error("--nodes must be at least 2 (a node loss needs peers)")
    if args.k is None:
        args.k = args.nodes - args.m
    if args.kill_node is None:
        args.kill_node = args.nodes - 1
    return args


def main(argv: Sequence[str] = ()) -> int:
    args = _parse(argv)
    script = Path(args.script) if args.script else find_script()
    out = Path(args.out).resolve()
    ref_dir, run_dir = out / "reference", out / "faulted"
    shutil.rmtree(run_dir, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    world = args.nodes * args.nproc_per_node
    train_args = ["--steps", str(args.steps), "--size", args.size]
    progress = Progress()
    started = time.time()
    say = progress.say

    say(f"snapshotd demo: {args.nodes} nodes x {args.nproc_per_node} trainer(s), "
        f"RS(k={args.k}, m={args.m}) across nodes "
        f"({'CURVE' if args.curve else 'plain TCP, --insecure'}), {args.steps} steps of "
        f"{script.name} --size {args.size}; output in {out}")

    # 1. the reference ---------------------------------------------------------------------
    key = reference_key(script, [*train_args, f"--nproc={world}"])
    cached = (ref_dir / "final.pt").exists() and (ref_dir / "key.txt").exists() and (
        (ref_dir / "key.txt").read_text() == key)
    if cached and not args.fresh_reference:
        say("[1/3] reference run: reusing " + str(ref_dir / "final.pt")
            + " (same script, arguments and torch; --fresh-reference to retrain)")
    else:
        say(f"[1/3] reference run: torchrun --standalone --nproc-per-node={world}, "
            "no snapshots, no failures")
        shutil.rmtree(ref_dir, ignore_errors=True)
        t_ref = time.time()

        def ref_progress(rec: dict | None) -> None:
            if rec is not None:
                progress.update(f"  reference  step {rec['step'] + 1:>4}/{args.steps}  "
                                f"loss {rec['loss']:.3f}  {time.time() - t_ref:5.1f}s")

        rc = reference_run(script, train_args, ref_dir, world, timeout=args.timeout,
                           progress=ref_progress)
        if rc != 0 or not (ref_dir / "final.pt").exists():
            say(f"\nFAIL: the reference run exited with {rc}; see {ref_dir}/torchrun.log")
            return 1
        (ref_dir / "key.txt").write_text(key)
        say(f"  reference done in {time.time() - t_ref:.1f}s")

    # 2. the cluster and the faulted run ----------------------------------------------------
    daemon_args = ["--memory-limit", args.memory_limit]
    keys: str | None = None
    if args.curve:                             # CURVE-encrypted peer traffic, as in production
        keys = make_keys(out / "keys")
    else:                                      # plain TCP on loopback
        daemon_args.append("--insecure")
    for old in out.glob("cluster-*"):          # daemon logs of an earlier demo run
        shutil.rmtree(old, ignore_errors=True)
    workdir = out / f"cluster-{uuid.uuid4().hex[:6]}"      # unique: names the shm dirs
    job_name = f"demo-{uuid.uuid4().hex[:6]}"
    failures: list[Failure] = []
    t0 = time.time()
    ok = False
    with LocalCluster(args.nodes, str(workdir), k=args.k, m=args.m, args=daemon_args,
                      keys=keys) as cluster:
        cluster.start()
        say(f"[2/3] cluster up: {args.nodes} daemons "
            + ", ".join(f"node{s.slot}={s.listen}" for s in cluster.specs)
            + f"; starting {args.nodes} torchrun agents (c10d rendezvous)")
        job = TorchrunJob(cluster, script, [*train_args, "--job", job_name, "--out",
                                            str(run_dir)], run_dir,
                          nproc_per_node=args.nproc_per_node)
        with job:
            t0 = time.time()
            job.start()
            ok = _drive(job, args, run_dir, failures, progress, t0)
            if ok:
                codes = job.wait(60)
                ok = all(c == 0 for c in codes.values())
                if not ok:
                    say(f"  agents exited with {codes}; see {run_dir}/node*-agent*.log")

    # 3. results -----------------------------------------------------------------------------
    losses = read_jsonl(run_dir / "loss.jsonl")
    starts = [e for e in read_jsonl(run_dir / "events.jsonl") if e.get("event") == "start"]
    for f in failures:
        f.fill(losses, starts, job)
    say("")
    say("[3/3] results")
    say(summary_table(failures, t0))
    say("  injected: wall time since the job started / newest step logged at the kill; "
        "detected: first agent report of the failure; steps lost: steps trained again; "
        "s to resume: kill to the first step completed after the restore")
    try:
        plot_loss(out / "loss.png", read_jsonl(ref_dir / "loss.jsonl"), losses, failures, t0)
        say(f"  loss curve: {out / 'loss.png'}")
    except Exception as exc:  # noqa: BLE001 - the plot is a nicety, never the verdict
        say(f"  (no loss plot: {exc})")
    problems = []
    if not ok:
        problems.append("the faulted run did not finish cleanly")
    for f in failures:
        if f.restored is None:
            problems.append(f"{f.kind}: no restart observed")
        elif f.restored_step is None:
            problems.append(f"{f.kind}: ranks restored different steps {f.restored}"
                            if len(set(f.restored)) > 1 else f"{f.kind}: nothing restored")
    final = run_dir / "final.pt"
    if final.exists():
        same, detail = compare_params(ref_dir / "final.pt", final)
        say(f"  final parameters vs the uninterrupted run: {detail}")
        if not same:
            problems.append("final parameters differ from the reference")
    else:
        problems.append("the faulted run wrote no final parameters")
    total = time.time() - started
    if problems:
        say(f"FAIL ({total:.0f}s): " + "; ".join(problems))
        return 1
    say(f"PASS ({total:.0f}s): {len(failures)} failure(s) recovered from snapshotd, final "
        "model bit-identical to the uninterrupted run")
    return 0


def _drive(job: TorchrunJob, args: argparse.Namespace, run_dir: Path,
           failures: list[Failure], progress: Progress, t0: float) -> bool:
    """Watch the faulted run, inject the failures, print progress; False on timeout/crash."""
    say = progress.say
    losses, events = JsonlTail(run_dir / "loss.jsonl"), JsonlTail(run_dir / "events.jsonl")
    trainer_at = int(args.steps * args.trainer_kill_at)
    node_at = int(args.steps * args.node_kill_at)
    pending_replace: float | None = None
    step, loss = -1, float("nan")
    deadline = t0 + args.timeout
    while True:
        for rec in losses.poll():
            step, loss = rec["step"], rec["loss"]
        for ev in events.poll():
            if ev.get("event") != "start" or ev["rank"] != 0 or not failures:
                continue
            if ev["restored"] is None:
                what = "nothing restored, training starts over"
            else:
                what = f"every rank restored step {ev['restored']} in {ev['restore_s']:.2f}s"
            say(f"  {ev['time'] - t0:6.1f}s  workers restarted (attempt {ev['attempt']}): {what}")
        now = time.time()
        last = failures[-1] if failures else None
        recovered = last is None or resumed_record(losses.records, last.injected_at) is not None
        if recovered and not failures and step + 1 >= trainer_at:
            slot = args.kill_trainer_slot
            pid = job.kill_trainer(slot)
            if pid is not None:
                failures.append(Failure(f"trainer crash (node{slot})", slot, time.time(),
                                        step))
                say(f"  {time.time() - t0:6.1f}s  step {step}: SIGKILL trainer pid {pid} on "
                    f"node{slot}")
        elif (recovered and len(failures) == 1 and not args.skip_node_loss
              and step + 1 >= node_at):
            slot = args.kill_node
            job.kill_node(slot)
            failures.append(Failure(f"node loss (node{slot})", slot, time.time(), step))
            say(f"  {time.time() - t0:6.1f}s  step {step}: node{slot} lost: SIGKILL its "
                "torchrun agent, trainer and snapshotd")
            pending_replace = time.time() + args.replace_after
        if pending_replace is not None and now >= pending_replace:
            pending_replace = None
            slot = args.kill_node
            job.replace_node(slot)
            say(f"  {time.time() - t0:6.1f}s  replacement node{slot}: empty snapshotd started "
                "(rebuilds from peers), new torchrun agent joining the rendezvous")
        if recovered and last is not None and "scraped" not in last.extra:
            last.extra["scraped"] = True
            value = rebuilt_bytes(job.cluster.specs[last.slot].metrics_port)
            last.rebuilt = value
            if value is None:
                last.note = "(metric not exported)"
        if job.finished() and pending_replace is None:
            say(f"  step {step + 1}/{args.steps}  loss {loss:.3f}  {now - t0:5.1f}s  "
                "all agents exited")
            return True
        if now > deadline:
            say(f"  timed out after {args.timeout:.0f}s at step {step}")
            return False
        marks = ", ".join(f.kind for f in failures) or "none yet"
        progress.update(f"  step {step + 1:>4}/{args.steps}  loss {loss:.3f}  "
                        f"{now - t0:5.1f}s  failures: {marks}")
        time.sleep(0.2)
