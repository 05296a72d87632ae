"""DLRover Flash Checkpoint save-to-memory stall, next to one memcpy of the same state.

``run(sizes, repeats)`` installs ``dlrover`` (pinned, with the few modules it imports) into a
cache directory outside the project's virtual environment with ``pip --target``, then measures
each size in a fresh subprocess that has that directory on ``PYTHONPATH``.

What is measured: ``DdpCheckpointer(dir).save_checkpoint(step, state,
storage_type=StorageType.MEMORY)`` on the state from ``bench.node.make_state``, the public
Flash Checkpoint API for a replicated (DDP) state dict, in its standalone mode (no
``dlrover-run``): a saver process forked with dlrover's own ``start_saver_process`` owns the
lock/queue/metadata sockets, the training process owns the shared-memory segment. (We fork it
before building the checkpointer and wait until it serves, instead of letting the engine fork
it: in dlrover 0.6.1 the engine's first post to a just-forked saver is lost about one time in
five, and the engine then blocks 60 s and raises; see ``_wait_queue``.)

A save to memory is synchronous: on the calling thread it takes the shared lock (local-socket
round trip), sends the metadata to the saver (socket), copies every tensor into one
``/dev/shm`` segment with torch ``copy_``, sends the metadata again and releases the lock.
Nothing is left to the background, so the stall is the whole save; the tensor copy inside it is
timed too (``shm_copy``). The first save also creates and faults in the segment; it is reported
as ``first_save`` and is one of the ``WARMUP`` saves left out of the statistics. The memcpy
baseline (torch ``copy_`` of the same tensors into preallocated, warm tensors) is interleaved
with the saves, so that both see the same background load.

``python bench/dlrover.py [--sizes MiB,...] [--repeats N]`` prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

__all__ = ["run", "DLROVER_VERSION"]

MIB = 1 << 20
DLROVER_VERSION = "0.6.1"
# dlrover's declared runtime deps are psutil, pynvml, deprecated, requests, packaging; the
# flash-checkpoint import chain also needs grpc (ckpt_saver -> master_client -> comm) and does
# not need pynvml. psutil, packaging, typing_extensions and torch come from the project venv;
# everything else is installed --no-deps so nothing in the venv is shadowed.
PACKAGES = [f"dlrover=={DLROVER_VERSION}", "requests", "urllib3", "idna", "charset-normalizer",
            "certifi", "deprecated", "wrapt", "grpcio"]
IMPORT_CHECK = "from dlrover.trainer.torch.flash_checkpoint.ddp import DdpCheckpointer, StorageType"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOCK_DIR = "/tmp/ckpt_sock"          # dlrover.python.common.multi_process.SOCKET_TMP_DIR
WARMUP = 2


def cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.environ.get("SNAPSHOTD_DLROVER_DIR") or os.path.join(
        base, "snapshotd-bench", f"dlrover-{DLROVER_VERSION}")


def _env(target: str, job: str = "") -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (target, ROOT, os.environ.get("PYTHONPATH", "")) if p)
    env["DLROVER_LOG_LEVEL"] = "WARNING"
    if job:
        env["TORCHELASTIC_RUN_ID"] = job   # namespaces dlrover's sockets and shm segment
    return env


def _tail(text: str, lines: int = 6) -> str:
    keep = [ln for ln in text.strip().splitlines() if "is ignored: it is neither" not in ln]
    return " | ".join(keep[-lines:])


def ensure_installed(timeout: float = 150.0) -> tuple[str | None, str | None]:
    """Return (target dir, None), or (None, reason)."""
    target = cache_dir()
    marker = os.path.join(target, ".snapshotd-ok")
    if os.path.exists(marker):
        return target, None
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".dlrover-install-", dir=parent)
    try:
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
               "--no-deps", "--target", staging, *PACKAGES]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return None, f"`pip install --target` of {PACKAGES} timed out after {timeout:.0f}s"
        if proc.returncode != 0:
            return None, (f"`pip install --no-deps --target` of {PACKAGES} failed "
                          f"(rc {proc.returncode}): {_tail(proc.stderr + proc.stdout)}")
        check = subprocess.run([sys.executable, "-c", IMPORT_CHECK], capture_output=True,
                               text=True, timeout=120, env=_env(staging), cwd=ROOT)
        if check.returncode != 0:
            return None, (f"dlrover {DLROVER_VERSION} installed but `{IMPORT_CHECK}` fails: "
                          f"{_tail(check.stderr, 2)}")
        open(os.path.join(staging, ".snapshotd-ok"), "w").close()
        if os.path.exists(target):
            shutil.rmtree(target, ignore_errors=True)
        os.rename(staging, target)
        staging = ""
        return target, None
    finally:
        if staging:
            shutil.rmtree(staging, ignore_errors=True)


def _cleanup(job: str) -> None:
    shutil.rmtree(os.path.join(SOCK_DIR, job), ignore_errors=True)
    try:
        os.rmdir(SOCK_DIR)          # only if no other dlrover user left sockets there
    except OSError:
        pass
    for name in os.listdir("/dev/shm") if os.path.isdir("/dev/shm") else []:
        if name.startswith(job + "_"):
            try:
                os.unlink(os.path.join("/dev/shm", name))
            except OSError:
                pass


def _measure_size(target: str, nbytes: int, repeats: int, timeout: float) -> dict[str, Any]:
    job = f"snapbench-dlrover-{os.getpid()}-{nbytes}"
    cmd = [sys.executable, "-m", "bench.dlrover", "--worker", str(nbytes), str(repeats)]
    env = _env(target, job)
    dump_after = max(1.0, timeout - 5)
    env["SNAPBENCH_DUMP_AFTER"] = str(dump_after)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=ROOT, start_new_session=True)
    timed_out = False
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)      # the worker and the saver process it forked
        out, err = proc.communicate()
    if timed_out or proc.returncode != 0:
        try:                                     # a saver process orphaned by a hard exit
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _cleanup(job)
    for line in reversed(out.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    stuck = _stuck_at(err)
    why = (f"timed out after {timeout:.0f}s" if timed_out
           else f"exited with rc {proc.returncode} and no result")
    if stuck or "Timeout (0:" in err:            # faulthandler's dump at the deadline
        why = f"hung for {dump_after:.0f}s and was stopped"
    return {"bytes": nbytes,
            "error": f"Flash Checkpoint worker {why}{stuck or ': ' + _tail(err, 4)}"}


def _stuck_at(stderr: str) -> str:
    """Innermost frames of the worker's main thread from its faulthandler dump, if any."""
    lines = stderr.splitlines()
    starts = [i for i, ln in enumerate(lines) if ln.startswith("Current thread")
              or ln.startswith("Thread 0x") and "most recent call first" in ln]
    if not starts:
        return ""
    main = lines[starts[-1] + 1:]
    frames = [ln.strip() for ln in main if ln.strip().startswith("File ")][:3]
    return "; blocked in: " + " <- ".join(frames) if frames else ""


def run(sizes: list[int], repeats: int) -> dict[str, Any]:
    started = time.perf_counter()
    target, reason = ensure_installed()
    if target is None:
        return {"error": reason or "dlrover could not be installed"}
    out: dict[str, Any] = {"dlrover": DLROVER_VERSION, "warmup": WARMUP,
                           "api": "DdpCheckpointer.save_checkpoint(storage_type=MEMORY)",
                           "saver": "dlrover start_saver_process() (standalone, no dlrover-run)",
                           "sizes": []}
    for nbytes in sizes:
        timeout = 60 + 60 * nbytes / (1 << 30) * max(1, repeats / 5)
        out["sizes"].append(_measure_size(target, nbytes, repeats, timeout))
    out["seconds"] = time.perf_counter() - started
    return out


# --------------------------------------------------------------------------- worker (subprocess)

def _wait_queue(queue: Any, what: str, timeout: float = 60.0) -> None:
    """Wait until a dlrover ``SharedQueue`` served by the saver process answers.

    dlrover 0.6.1 starts a queue's socket thread before it assigns the queue
    (``LocalSocketComm.__init__`` runs ``_init_socket`` first, ``SharedQueue.__init__`` sets
    ``_queue`` after), and a client ``put`` ignores the error status, so a message sent in that
    window is lost. ``qsize()`` answers -1 until the queue exists.
    """
    deadline = time.monotonic() + timeout
    while not (queue.is_available() and queue.qsize() >= 0):
        if time.monotonic() > deadline:
            raise TimeoutError(f"dlrover saver process did not serve the {what} queue "
                               f"within {timeout:.0f}s")
        time.sleep(0.02)


def _worker(nbytes: int, repeats: int) -> dict[str, Any]:
    import faulthandler

    dump_after = float(os.environ.get("SNAPBENCH_DUMP_AFTER", "0"))
    if dump_after:                  # say where a hang is before the parent kills us
        faulthandler.dump_traceback_later(dump_after, exit=True)

    import torch
    from dlrover.python.common.multi_process import SharedQueue
    from dlrover.python.elastic_agent.torch import ckpt_saver
    from dlrover.trainer.torch.flash_checkpoint import engine as fc_engine
    from dlrover.trainer.torch.flash_checkpoint.ddp import DdpCheckpointer, StorageType

    from bench.node import make_state, stats

    # Standalone mode: the engine would fork this same saver process itself
    # (``start_saver_process``) and post to its factory queue at once, which loses the post about
    # one time in five here (see ``_wait_queue``). Fork it first, wait until it serves, and hand
    # it to the engine so that the engine does not fork a second one.
    saver_proc = fc_engine.start_saver_process()
    if saver_proc is None:
        return {"bytes": nbytes, "error": "dlrover start_saver_process() started no saver "
                                          "(ROLE_NAME=dlrover-trainer or LOCAL_RANK != 0 set?)"}
    _wait_queue(SharedQueue(name="factory"), "factory")
    fc_engine.CheckpointEngine.saver_proc = saver_proc

    # Time the tensor copy inside the save (the rest of the stall is lock/metadata IPC).
    # The function recurses through its module-global name: time the outermost call only.
    copy_times: list[float] = []
    copy_to_shm = ckpt_saver._traverse_copy_to_shm
    depth = [0]

    def timed_copy(*args: Any) -> Any:
        depth[0] += 1
        begin = time.perf_counter()
        try:
            return copy_to_shm(*args)
        finally:
            depth[0] -= 1
            if depth[0] == 0:
                copy_times.append(time.perf_counter() - begin)

    ckpt_saver._traverse_copy_to_shm = timed_copy

    ckpt_dir = tempfile.mkdtemp(prefix="snapbench-dlrover-")
    started = time.perf_counter()
    checkpointer = DdpCheckpointer(ckpt_dir)
    engine = checkpointer._engine
    _wait_queue(engine._event_queue, "event")          # the saver object exists now
    setup = time.perf_counter() - started
    try:
        state = make_state(nbytes)
        src = list(state["model"].values())
        dst = [torch.empty_like(t) for t in src]
        for d, s in zip(dst, src):
            d.copy_(s)
        stall, memcpy, first = [], [], 0.0
        for i in range(WARMUP + repeats):
            step = i + 1
            start = time.perf_counter()
            checkpointer.save_checkpoint(step, state, storage_type=StorageType.MEMORY)
            elapsed = time.perf_counter() - start
            if engine._cached_step != step:       # save_state_dict_to_memory returned early
                return {"bytes": nbytes,
                        "error": f"save_checkpoint(step={step}, MEMORY) skipped the save "
                                 "(shared-memory lock not acquired)"}
            # The baseline, interleaved so that both see the same background load.
            start = time.perf_counter()
            for d, s in zip(dst, src):
                d.copy_(s)
            copied = time.perf_counter() - start
            if i == 0:
                first = elapsed
            if i >= WARMUP:
                stall.append(elapsed)
                memcpy.append(copied)
        if len(copy_times) != WARMUP + repeats:
            return {"bytes": nbytes, "error": f"instrumentation saw {len(copy_times)} tensor "
                                              f"copies for {WARMUP + repeats} saves"}
        restored = checkpointer.load_checkpoint()
        verified = (isinstance(restored, dict) and restored.get("step") == state["step"]
                    and all(torch.equal(restored["model"][k], v)
                            for k, v in state["model"].items())
                    and torch.equal(restored["rng"], state["rng"]))
        del restored
        shm = engine._shm_handler.shared_memory
        return {"bytes": nbytes, "stall": stats(stall), "memcpy_torch": stats(memcpy),
                "shm_copy": stats(copy_times[WARMUP:]), "first_save": first, "setup": setup,
                "shm_bytes": shm.size if shm else 0, "verified": bool(verified)}
    finally:
        shm = engine._shm_handler.shared_memory
        if shm is not None:
            shm.close()
            shm.unlink()
        shutil.rmtree(ckpt_dir, ignore_errors=True)


def _fmt(d: Any) -> str:
    return f"{d['median'] * 1e3:9.1f} ms ({d['min'] * 1e3:.1f}-{d['max'] * 1e3:.1f})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", nargs=2, type=int, metavar=("BYTES", "REPEATS"),
                    help=argparse.SUPPRESS)
    ap.add_argument("--sizes", default="64,256,1024", help="state sizes in MiB")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", action="store_true", help="print the raw result as JSON")
    args = ap.parse_args(argv)
    if args.worker:
        nbytes, repeats = args.worker
        try:
            result = _worker(nbytes, repeats)
        except Exception as exc:  # noqa: BLE001 - reported to the parent as the reason
            result = {"bytes": nbytes, "error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(result), flush=True)
        return 0
    result = run([int(s) * MIB for s in args.sizes.split(",")], args.repeats)
    if args.json:
        print(json.dumps(result, indent=1))
    if "error" in result:
        print(f"DLRover Flash Checkpoint not measured: {result['error']}")
        return 1
    print(f"DLRover {result['dlrover']} Flash Checkpoint, {result['api']}, saver "
          f"{result['saver']}; median (min-max) of {args.repeats} after {result['warmup']} "
          f"warm-up saves; {result['seconds']:.0f}s")
    print(f"{'state':>9} | {'save-to-memory stall':>28} | {'of which tensor copy':>28} | "
          f"{'memcpy (torch copy_)':>28} | {'ratio':>6} | first save | verified")
    for pt in result["sizes"]:
        label = f"{pt['bytes'] / MIB:.0f} MiB"
        if "error" in pt:
            print(f"{label:>9} | {pt['error']}")
            continue
        ratio = pt["stall"]["median"] / pt["memcpy_torch"]["median"]
        print(f"{label:>9} | {_fmt(pt['stall']):>28} | {_fmt(pt['shm_copy']):>28} | "
              f"{_fmt(pt['memcpy_torch']):>28} | "
              f"{ratio:5.2f}x | {pt['first_save'] * 1e3:7.1f} ms | {pt['verified']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
