"""Torchrun jobs on a local cluster, for the demo and the tests: one ``torchrun`` agent per
"node" joined through c10d rendezvous (:class:`TorchrunJob`), whole-node kills and
replacements, reference runs without snapshots, and comparing final parameters.

See :mod:`snapshotd.tools.demo` for how the demo uses them (rendezvous on one machine,
loopback addresses per node, ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``).
"""

from __future__ import annotations

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from ..common import locks
from .localcluster import LocalCluster, free_ports

__all__ = ["TorchrunJob", "JsonlTail", "compare_params", "find_script", "reference_run",
           "reference_key", "rebuilt_bytes", "node_addr", "torchrun_env", "read_jsonl",
           "resumed_record", "make_keys", "kill_tree"]

#: torchrun log lines that mean an agent saw its workers fail.
_FAILED = re.compile(r"Worker group (FAILED|UNHEALTHY)|failed \(exitcode|ChildFailedError")


def find_script(name: str = "train.py") -> Path:
    """``examples/<name>`` of this source tree."""
    for base in (Path(__file__).resolve().parents[2], Path.cwd()):
        candidate = base / "examples" / name
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"examples/{name} not found: run the demo from a source checkout "
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
                 env: dict[str, str] | None = None, min_nodes: int | None = None,
                 last_call: float = 30.0) -> None:
        import torch.distributed as dist  # the demo needs torch; the daemon does not

        self.cluster = cluster
        self.nodes = len(cluster.specs)
        self.script, self.script_args = str(script), list(script_args)
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.nproc, self.max_restarts = nproc_per_node, max_restarts
        self.keep_alive, self.keep_alive_attempts = keep_alive, keep_alive_attempts
        self.env = env or {}
        #: Elastic membership (``--nnodes=MIN:MAX``): with fewer than all nodes the agents
        #: wait ``last_call`` seconds for the others, then go on with the nodes they have.
        self.min_nodes, self.last_call = min_nodes or self.nodes, last_call
        self.run_id = f"snapshotd-{uuid.uuid4().hex[:8]}"
        self.port = free_ports(1)[0]
        self.store = dist.TCPStore("127.0.0.1", self.port, is_master=True,
                                   wait_for_workers=False, multi_tenant=True)
        self.agents: dict[int, _Agent] = {}
        self.lost: set[int] = set()
        self.generation: dict[int, int] = {}
        self.failures_seen: list[tuple[float, int, str]] = []
        self._lock = locks.lock("tool")

    def command(self, slot: int) -> list[str]:
        conf = (f"is_host=0,keep_alive_interval={self.keep_alive},"
                f"keep_alive_max_attempt={self.keep_alive_attempts},join_timeout=300")
        nnodes = str(self.nodes)
        if self.min_nodes < self.nodes:
            nnodes = f"{self.min_nodes}:{self.nodes}"
            conf += f",last_call_timeout={self.last_call:g}"
        return [*_torchrun(), f"--nnodes={nnodes}", f"--nproc-per-node={self.nproc}",
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

    def lose_node(self, slot: int) -> None:
        """Node ``slot`` is lost for good: killed whole, its memory (shm directory) gone, and
        nothing takes its place; the job goes on without it (``min_nodes``)."""
        self.kill_node(slot)
        shutil.rmtree(self.cluster.specs[slot].shm_dir, ignore_errors=True)
        self.lost.add(slot)

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
        """Exit codes of the agents of the nodes not lost for good."""
        return {slot: a.proc.poll() for slot, a in self.agents.items() if slot not in self.lost}

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
                  progress: Callable[[dict | None], None] | None = None,
                  attempts: int = 2) -> int:
    """Train without snapshots or failures in one ``torchrun --standalone``; return its rc.

    The reference is a baseline, not the thing under test: a run that fails (a worker of an
    unfaulted gloo job was seen to abort in native code, "terminate called without an active
    exception", once in hundreds of runs) is run again from scratch, up to ``attempts`` runs in
    all; the failed run's log is kept as ``torchrun.<n>.log`` and a warning names it.
    """
    out = Path(out)
    deadline = time.monotonic() + timeout
    rc = 1
    for attempt in range(attempts):
        if attempt:
            failed = out / f"torchrun.{attempt}.log"
            (out / "torchrun.log").replace(failed)
            for name in ("loss.jsonl", "events.jsonl", "digests.jsonl", "final.pt"):
                (out / name).unlink(missing_ok=True)
            print(f"reference run failed (rc {rc}, log {failed}); running it again",
                  file=sys.stderr)
        rc = _reference_once(script, script_args, out, nproc, deadline, progress)
        if rc in (0, 124):
            return rc
    return rc


def _reference_once(script: str | Path, script_args: Sequence[str], out: Path, nproc: int,
                    deadline: float, progress: Callable[[dict | None], None] | None) -> int:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [*_torchrun(), "--standalone", f"--nproc-per-node={nproc}",
           f"--log-dir={out / 'torchelastic'}", str(script), *script_args, "--no-snapshot",
           "--out", str(out)]
    with open(out / "torchrun.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=torchrun_env(),
                                start_new_session=True)
        tail = JsonlTail(out / "loss.jsonl")
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
