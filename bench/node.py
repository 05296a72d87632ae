"""Benchmarks of one node: save stall, ingest, local restore, memory; baselines in the same run.

Each case starts a real daemon (``LocalCluster``) and drives it with the real client, and measures
its baseline in the same process on the same tensors: one memcpy (torch ``copy_`` into warm
memory, and numpy ``copyto`` single-core), ``torch.save``/``torch.load`` to ``/dev/shm`` and to
disk, and ``torch.distributed.checkpoint`` ``save``/``async_save``.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import psutil
import torch

from snapshotd.tools.localcluster import LocalCluster
from snapshotd_client import SnapshotClient

__all__ = ["make_state", "save_case", "restore_case", "memory_case", "scaling_case", "stats"]

MIB = 1 << 20


def stats(samples: list[float]) -> dict[str, float]:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples),
            "n": len(samples)}


def timed(fn: Callable[[], Any], repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def make_state(nbytes: int, tensors: int = 16) -> dict[str, Any]:
    per = nbytes // 4 // tensors
    g = torch.Generator().manual_seed(0)
    return {"model": {f"layer{i}.weight": torch.randn(per, generator=g) for i in range(tensors)},
            "step": 1, "rng": torch.get_rng_state()}


def _flat(state: dict[str, Any]) -> list[torch.Tensor]:
    return list(state["model"].values())


def memcpy_baselines(state: dict[str, Any], repeats: int) -> dict[str, Any]:
    src = _flat(state)
    warm = [torch.empty_like(t) for t in src]
    for d, s in zip(warm, src):
        d.copy_(s)
    np_src = [t.numpy() for t in src]
    np_dst = [w.numpy() for w in warm]
    out = {"memcpy_torch": stats(timed(lambda: [d.copy_(s) for d, s in zip(warm, src)],
                                       repeats)),
           "memcpy_numpy_1core": stats(timed(
               lambda: [np.copyto(d, s) for d, s in zip(np_dst, np_src)], repeats))}

    def fresh() -> None:
        for s in src:
            torch.empty_like(s).copy_(s)

    out["memcpy_fresh"] = stats(timed(fresh, repeats))
    return out


def _torch_save_load(state: dict[str, Any], directory: str, repeats: int) -> dict[str, Any]:
    path = os.path.join(directory, "bench-state.pt")
    try:
        save = timed(lambda: torch.save(state, path), max(1, repeats // 2))
        load = timed(lambda: torch.load(path, weights_only=True), max(1, repeats))
    finally:
        if os.path.exists(path):
            os.unlink(path)
    return {"save": stats(save), "load": stats(load)}


def _dcp(state: dict[str, Any], directory: str) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp

    out: dict[str, Any] = {}
    target = os.path.join(directory, "bench-dcp")
    try:
        start = time.perf_counter()
        dcp.save(state["model"], checkpoint_id=target)
        out["save"] = time.perf_counter() - start
        shutil.rmtree(target, ignore_errors=True)
        start = time.perf_counter()
        future = dcp.async_save(state["model"], checkpoint_id=target)
        out["async_save_blocking"] = time.perf_counter() - start
        future.result()
    except Exception as exc:  # noqa: BLE001 - reported in the table instead
        out["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        shutil.rmtree(target, ignore_errors=True)
    return out


#: Where the daemons of the single-node rows keep their segments (``--shm-dir``'s parent):
#: ``SNAPSHOTD_BENCH_SHM_ROOT`` measures another tmpfs, e.g. one mounted ``huge=within_size``.
SHM_ROOT = os.environ.get("SNAPSHOTD_BENCH_SHM_ROOT", "/dev/shm")


def _cluster(nbytes: int, spare: bool = True) -> LocalCluster:
    """One daemon whose budget holds a few versions of ``nbytes``; without ``spare`` only one
    (no slot reserved for the next save: the 4 GiB restore row fits the machine that way)."""
    limit = 5 * nbytes + 256 * MIB if spare else nbytes + nbytes // 2
    cluster = LocalCluster(1, tempfile.mkdtemp(prefix="snapbench-"),
                           args=["--memory-limit", str(limit), "--log-level", "WARNING"],
                           shm_root=SHM_ROOT)
    cluster.start()
    return cluster


def save_case(nbytes: int, repeats: int, baselines: bool = True) -> dict[str, Any]:
    """Stall (time save() blocks) and total (until committed) against the baselines.

    The tensors are copied in the background (``copy="lazy"``: what ``protect()`` or
    ``TrainingState`` gives parameters and optimizer state); ``stall_auto`` is a bare
    ``save()`` with the default ``copy="auto"`` and nothing protected, which copies every
    tensor at ``save()`` (into the slot the last commit reserved)."""
    state = make_state(nbytes)
    cluster = _cluster(nbytes)
    try:
        with SnapshotClient(cluster.specs[0].control, job="bench", rank=0,
                            copy="lazy") as client:
            for step in range(3):                      # warm the segment pool
                client.save(step, state).result()
            stall, copied, total = [], [], []
            for step in range(3, 3 + repeats):
                start = time.perf_counter()
                future = client.save(step, state)
                stall.append(time.perf_counter() - start)
                client.wait_copied()
                copied.append(time.perf_counter() - start)
                future.result()
                total.append(time.perf_counter() - start)
                client.wait()
        with SnapshotClient(cluster.specs[0].control, job="bench-auto", rank=0) as client:
            auto = []
            for step in range(3 + repeats):
                start = time.perf_counter()
                future = client.save(step, state)
                auto.append(time.perf_counter() - start)
                future.result()
            del auto[:3]                               # the pool and the spare warming up
        out: dict[str, Any] = {"bytes": nbytes, "stall": stats(stall), "copied": stats(copied),
                               "total": stats(total), "stall_auto": stats(auto)}
    finally:
        cluster.stop()
    if baselines:
        out |= memcpy_baselines(state, repeats)
        out["torch_save_shm"] = _torch_save_load(state, "/dev/shm", repeats)["save"]
        out["torch_save_disk"] = _torch_save_load(state, tempfile.gettempdir(), repeats)["save"]
        out["dcp"] = _dcp(state, tempfile.gettempdir())
    return out


def restore_case(nbytes: int, repeats: int) -> dict[str, Any]:
    """restore() into fresh tensors and into existing ones (``into=``), against a memcpy into
    fresh and into warm memory and ``torch.load`` from ``/dev/shm`` (the page cache) and disk.

    Every timing includes the whole call (``Open``, whose checksums the daemon verifies, the
    timeline's ``Drop`` when there is something newer, mapping, copying); the restored tensors
    are dropped between repeats, so each restore finds the version unpinned, as after a crash.
    Each repeat measures every candidate and baseline in turn (the machine's load drifts), and
    a breakdown of the restores (time in ``Open``, in the copy) explains the ratios."""
    state = make_state(nbytes)
    src = _flat(state)
    into = {"model": {k: torch.empty_like(v) for k, v in state["model"].items()}}
    warm = list(into["model"].values())
    path = os.path.join("/dev/shm", f"bench-state-{os.getpid()}.pt")
    torch.save(state, path)
    # From 2 GiB on the daemon holds the one version restored and nothing more: the state, the
    # into= tensors, the file in /dev/shm, that version and a baseline's fresh copy are 5x.
    cluster = _cluster(nbytes, spare=nbytes < 2048 * MIB)
    parts: dict[str, list[float]] = {}
    times: dict[str, list[float]] = {k: [] for k in (
        "restore", "restore_into", "memcpy_fresh", "memcpy_torch", "torch_load_shm")}

    def fresh() -> None:
        for s in src:
            torch.empty_like(s).copy_(s)

    try:
        with SnapshotClient(cluster.specs[0].control, job="bench", rank=0) as client:
            client.save(1, state).result()
            client.restore()                           # warm the daemon's mapping
            with _breakdown(client, parts):
                for _ in range(repeats):
                    times["restore"] += timed(client.restore, 1)
                    times["memcpy_fresh"] += timed(fresh, 1)
                    times["torch_load_shm"] += timed(
                        lambda: torch.load(path, weights_only=True), 1)
                    times["restore_into"] += timed(lambda: client.restore(into=into), 1)
                    times["memcpy_torch"] += timed(
                        lambda: [d.copy_(s) for d, s in zip(warm, src)], 1)
            exact = all(torch.equal(a, b) for a, b in zip(warm, src))
            got = client.restore()
            assert got is not None
            exact = exact and all(torch.equal(got[1]["model"][k], v)
                                  for k, v in state["model"].items())
            del got
    finally:
        cluster.stop()
        os.unlink(path)
    into.clear()
    out: dict[str, Any] = {"bytes": nbytes, "bit_exact": exact}
    out |= {k: stats(v) for k, v in times.items()}
    out["breakdown"] = {k: statistics.median(v) for k, v in parts.items()}
    out["torch_load_disk"] = _torch_save_load(state, tempfile.gettempdir(), repeats)["load"]
    return out


class _breakdown:
    """Times the client's round trips by operation and its copy-out while active (a bench
    probe: wraps the client's channel and ``_copy_out``)."""

    def __init__(self, client: SnapshotClient, parts: dict[str, list[float]]) -> None:
        self.client, self.parts = client, parts

    def __enter__(self) -> None:
        client, parts = self.client, self.parts
        channel = client._channel
        call, copy_out = channel.call, client._copy_out

        def timed_call(msg: Any, timeout: Any = None) -> Any:
            started = time.perf_counter()
            try:
                return call(msg, timeout)
            finally:
                parts.setdefault(msg.OP, []).append(time.perf_counter() - started)

        def timed_copy(*args: Any, **kw: Any) -> Any:
            started = time.perf_counter()
            try:
                return copy_out(*args, **kw)
            finally:
                key = "map_and_copy" if args[1] else "map"
                parts.setdefault(key, []).append(time.perf_counter() - started)

        channel.call = timed_call                      # type: ignore[method-assign]
        client._copy_out = timed_copy                  # type: ignore[method-assign]

    def __exit__(self, *exc: Any) -> None:
        del self.client._channel.call, self.client._copy_out


def memory_case(nbytes: int, saves: int = 6) -> dict[str, Any]:
    """Daemon RSS and shared memory held for ``nbytes`` of state with --keep 1."""
    state = make_state(nbytes)
    cluster = LocalCluster(1, tempfile.mkdtemp(prefix="snapbench-"),
                           args=["--memory-limit", str(4 * nbytes), "--keep", "1",
                                 "--log-level", "WARNING"])
    cluster.start()
    try:
        proc = psutil.Process(cluster.daemons[0].pid)
        shm_peak = rss_peak = 0
        with SnapshotClient(cluster.specs[0].control, job="bench", rank=0) as client:
            for step in range(saves):
                client.save(step, state).result()
                shm = sum(os.path.getsize(os.path.join(cluster.specs[0].shm_dir, f))
                          for f in os.listdir(cluster.specs[0].shm_dir))
                shm_peak = max(shm_peak, shm)
                info = proc.memory_full_info()
                rss_peak = max(rss_peak, info.rss - getattr(info, "shared", 0))
        return {"bytes": nbytes, "shm_peak": shm_peak, "daemon_private_rss": rss_peak}
    finally:
        cluster.stop()


def scaling_case(sizes: list[int], repeats: int = 3) -> dict[str, Any]:
    """Save stall, save total and restore time across state sizes, with a linear fit.

    One daemon per size with ``--keep 1``; the state is freed before the restores, so the peak
    is about 3·S (state or restored copy, plus the committed version and the slot being
    written): 12 GiB at 4 GiB on this 24 GiB machine.
    """
    points = []
    for nbytes in sizes:
        points.append(_scaling_point(nbytes, repeats))
    return {"points": points, "fit": {key: _fit([p["bytes"] for p in points],
                                                [p[key] for p in points])
                                      for key in ("stall", "total", "restore")}}


def _scaling_point(nbytes: int, repeats: int) -> dict[str, Any]:
    cluster = LocalCluster(1, tempfile.mkdtemp(prefix="snapbench-"),
                           args=["--memory-limit", str(3 * nbytes + 256 * MIB), "--keep", "1",
                                 "--log-level", "WARNING"])
    cluster.start()
    try:
        with SnapshotClient(cluster.specs[0].control, job="bench", rank=0,
                            copy="lazy") as client:          # as in save_case
            state: dict[str, Any] | None = make_state(nbytes)
            client.save(0, state).result()             # warm the segment pool
            stall, total = [], []
            for step in range(1, 1 + repeats):
                start = time.perf_counter()
                future = client.save(step, state)
                stall.append(time.perf_counter() - start)
                future.result()
                total.append(time.perf_counter() - start)
            state = None                               # free S before restoring S
            restore = timed(client.restore, repeats)
    finally:
        cluster.stop()
    return {"bytes": nbytes, "stall": statistics.median(stall),
            "total": statistics.median(total), "restore": statistics.median(restore)}


def _fit(xs: list[float], ys: list[float]) -> dict[str, float]:
    """Least-squares line y = a + b x, and the worst relative deviation from it."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs) or 1.0
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var
    a = my - b * mx
    worst = max(abs(y - (a + b * x)) / max(abs(y), 1e-9) for x, y in zip(xs, ys))
    return {"intercept_s": a, "seconds_per_gib": b * (1 << 30), "worst_deviation": worst}
