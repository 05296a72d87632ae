"""The fault campaign's trainer: real processes that save deterministic state, stop at chosen
points of a save, and restore and check bit for bit.

Every trainer is a real process with its own pid (the daemon tracks writers by pid and start
time), but importing torch costs seconds on a small machine, so the campaign starts one
*zygote* per session that imports torch and the client once and forks a trainer per request::

    python ftrainer.py zygote          stdin:  {"id": 1, "argv": [...], "out": PATH, "env": {}}
                                       stdout: {"id": 1, "pid": 4242}   {"exit": 4242, "rc": 0}

A trainer writes JSON lines to its ``out`` file (flushed one by one, so the harness can follow
it while it runs)::

    save --steps A B [--stop-at POINT --stop-step S]   {"committed": s, "s": latency} per step
    loop --start A [--count N] [--duration T] [--interval I]
                                                       {"committed": s} or {"failed": s, ...}
    restore [--step N]                                 {"step": N, "exact": true} or {"error":...}

``--stop-at`` is fault injection: the save of step ``S`` stops at POINT (``before_alloc``,
``mid_copy``, ``before_commit``, ``after_commit``), writes ``{"point": POINT}`` and waits to be
killed. The state of (job, rank, step) is regenerated from a seed, so a new process can check a
restore bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import sys
import time
import zlib
from datetime import timedelta

import torch

import snapshotd_client
from snapshotd_client import SnapshotClient

POINTS = ("before_alloc", "mid_copy", "before_commit", "after_commit")


def make_state(job: str, rank: int, step: int, mib: float, tensors: int = 6,
               salt: int = 0) -> dict:
    """The state of (job, rank, step); another ``salt`` gives other bytes for the same step
    (a step saved again on another timeline)."""
    seed = (zlib.crc32(job.encode()) * 1_000_003 + rank * 100_003 + step
            + salt * 7_000_003) % (1 << 62)
    g = torch.Generator().manual_seed(seed)
    total = max(64, int(mib * (1 << 20)))
    per = max(1, total // 4 // tensors)
    state = {"params": {f"w{i}": torch.randn(per, generator=g) for i in range(tensors)},
             "ints": torch.randint(0, 1 << 30, (17,), generator=g, dtype=torch.int64),
             "half": torch.randn(33, generator=g).to(torch.bfloat16),
             "step": step, "rank": rank, "job": job, "note": f"{job} rank {rank} step {step}",
             "nested": [1, (2.5, None), {"k": True}, float("inf")]}
    return state


def equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
                and torch.equal(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return (type(a) is type(b) and len(a) == len(b)
                and all(equal(x, y) for x, y in zip(a, b)))
    return a == b


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def hang(point: str, step: int) -> None:
    emit(point=point, step=step, pid=os.getpid())
    while True:
        time.sleep(3600)


def install_stop(point: str, step: int, nth_tensor: int) -> None:
    """Patch the client so that the save of ``step`` stops at ``point``."""
    from snapshotd_client import _channel, _client
    from snapshotd_client import _protocol as p

    real_call = _channel.Channel.call
    state = {"alloc_step": None}

    def call(self, msg, timeout=None):
        if isinstance(msg, p.Alloc):
            state["alloc_step"] = msg.step
            if msg.step == step and point == "before_alloc":
                hang(point, step)
        if isinstance(msg, p.Commit) and state["alloc_step"] == step:
            if point == "before_commit":
                hang(point, step)
            reply = real_call(self, msg, timeout)
            if point == "after_commit":
                hang(point, step)
            return reply
        return real_call(self, msg, timeout)

    _channel.Channel.call = call
    # A save that uses the spare slot its last commit reserved sends no Alloc: the point
    # "before alloc" is then before it takes that slot.
    real_take = _client.SnapshotClient._take_spare

    def take_spare(self, job):
        state["alloc_step"] = job.step
        if job.step == step and point == "before_alloc":
            hang(point, step)
        return real_take(self, job)

    _client.SnapshotClient._take_spare = take_spare
    real_view = _client.view_of
    count = {"n": 0}

    def view_of(buf, entry):
        if state["alloc_step"] == step and point == "mid_copy":
            count["n"] += 1
            if count["n"] == nth_tensor:
                hang(point, step)
        return real_view(buf, entry)

    _client.view_of = view_of


def client_for(args) -> SnapshotClient:
    return SnapshotClient(args.endpoint, job=args.job, rank=args.rank,
                          timeout=timedelta(seconds=args.timeout))


def cmd_save(args) -> int:
    if args.stop_at:
        install_stop(args.stop_at, args.stop_step, args.nth_tensor)
    client = client_for(args)
    for step in range(args.steps[0], args.steps[1] + 1):
        started = time.monotonic()
        try:
            client.save(step, make_state(args.job, args.rank, step, args.mib,
                                         salt=args.salt)).result()
        except snapshotd_client.SnapshotError as exc:
            emit(failed=step, code=getattr(exc, "code", type(exc).__name__), message=str(exc),
                 s=time.monotonic() - started)
            if not args.keep_going:
                return 4
            continue
        emit(committed=step, s=time.monotonic() - started)
    client.close()
    emit(done=True)
    return 0


def cmd_loop(args) -> int:
    client = client_for(args)
    deadline = time.monotonic() + args.duration if args.duration else None
    step = args.start
    done = 0
    while (args.count is None or done < args.count) and (
            deadline is None or time.monotonic() < deadline):
        started = time.monotonic()
        try:
            client.save(step, make_state(args.job, args.rank, step, args.mib)).result()
            emit(committed=step, s=time.monotonic() - started)
        except snapshotd_client.SnapshotError as exc:
            emit(failed=step, code=getattr(exc, "code", type(exc).__name__),
                 message=str(exc)[:300], s=time.monotonic() - started)
        step += 1
        done += 1
        if args.interval:
            time.sleep(args.interval)
    client.close()
    emit(done=True, last=step - 1)
    return 0


def cmd_restore(args) -> int:
    client = client_for(args)
    started = time.monotonic()
    try:
        restored = client.restore(args.step)
    except snapshotd_client.SnapshotError as exc:
        emit(error=type(exc).__name__, code=getattr(exc, "code", None), message=str(exc),
             s=time.monotonic() - started)
        return 3
    seconds = time.monotonic() - started
    if restored is None:
        emit(step=None, s=seconds)
        return 0
    step, state = restored
    emit(step=step, exact=equal(make_state(args.job, args.rank, step, args.mib,
                                           salt=args.salt), state), s=seconds)
    client.close()
    return 0


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["save", "loop", "restore"])
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--job", default="faults")
    ap.add_argument("--rank", type=int, default=0)
    ap.add_argument("--mib", type=float, default=1)
    ap.add_argument("--timeout", type=float, default=30)
    ap.add_argument("--steps", type=int, nargs=2, default=(1, 3))
    ap.add_argument("--stop-at", choices=POINTS)
    ap.add_argument("--stop-step", type=int)
    ap.add_argument("--nth-tensor", type=int, default=2)
    ap.add_argument("--keep-going", action="store_true")
    ap.add_argument("--start", type=int, default=1)
    ap.add_argument("--count", type=int)
    ap.add_argument("--duration", type=float)
    ap.add_argument("--interval", type=float, default=0.0)
    ap.add_argument("--step", type=int)
    ap.add_argument("--salt", type=int, default=0)
    return ap.parse_args(argv)


def run(argv: list[str]) -> int:
    args = parse(argv)
    return {"save": cmd_save, "loop": cmd_loop, "restore": cmd_restore}[args.mode](args)


def child(request: dict) -> None:
    """In the forked child: point stdout at the request's file and run one trainer."""
    rc = 1
    try:
        os.setpgid(0, 0)
        fd = os.open(request["out"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        sys.stdout = os.fdopen(1, "w", buffering=1)
        sys.stderr = os.fdopen(2, "w", buffering=1)
        os.environ.update(request.get("env", {}))
        rc = run(request["argv"])
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - reported in the output file
        import traceback
        traceback.print_exc()
        rc = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(rc)


def zygote() -> int:
    """Fork one trainer per request line on stdin; report pids and exit codes on stdout."""
    torch.set_num_threads(1)
    make_state("warm", 0, 0, 0.01)       # load torch's lazy modules once, before forking
    out = sys.stdout
    children: dict[int, int] = {}         # pid -> the request's id
    buf = b""
    while True:
        ready, _, _ = select.select([0], [], [], 0.02)
        if ready:
            data = os.read(0, 1 << 16)
            if not data:
                break
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                request = json.loads(line)
                pid = os.fork()
                if pid == 0:
                    child(request)
                children[pid] = request["id"]
                out.write(json.dumps({"id": request["id"], "pid": pid}) + "\n")
                out.flush()
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            rid = children.pop(pid, None)
            rc = os.waitstatus_to_exitcode(status)
            # By request id: over a long campaign pids are reused, and an exit recorded by pid
            # made a later trainer with the same pid look finished before it ran.
            out.write(json.dumps({"exit": pid, "id": rid, "rc": rc}) + "\n")
            out.flush()
    for pid in children:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["zygote"]:
        sys.exit(zygote())
    sys.exit(run(sys.argv[1:]))
