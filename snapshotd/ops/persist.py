"""The persistence tier: node versions written to a directory, in the background, throttled.

The daemon has no torch, so it writes its own format, which is the segment layout on disk::

    DIR/<job>/step-000000000120/rank-0.bin     the rank's slot bytes
    DIR/<job>/step-000000000120/rank-0.json    its manifest (tensor table with checksums, meta)

A step directory is written under a temporary name and renamed when complete, so what is there
is whole. ``snapshotctl export`` turns any version (in memory or here) into a
``torch.distributed.checkpoint`` directory. When memory cannot serve a restore (every daemon
restarted empty, or more than ``m`` nodes lost), the newest persisted step is loaded back,
checked against its checksums, and served with tier ``disk``.

Example::

    persister = Persister(store, "/var/lib/snapshotd", every=100, keep=2, rate=200e6).start()
    persister.request("gpt", 1200)              # on demand
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import shutil
import threading
import time
from collections.abc import Callable
from typing import Any

from ..common.protocol import TensorEntry
from ..node.store import Store, StoreError, Version

__all__ = ["Persister"]

log = logging.getLogger("snapshotd.persist")
_STEP_RE = re.compile(r"step-(\d{12})")
_PIECE = 8 << 20


class Persister:
    """Writes node versions to ``root`` on a background thread at no more than ``rate`` B/s."""

    def __init__(self, store: Store, root: str, *, every: int = 0, keep: int = 2,
                 rate: float = 200e6, metrics: Any = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.store, self.root, self.every, self.keep, self.rate = store, root, every, keep, rate
        self.metrics = metrics
        self._sleep = sleep
        self._queue: queue.Queue[tuple[str, int] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="snapshotd-persist", daemon=True)
        os.makedirs(root, mode=0o700, exist_ok=True)

    def start(self) -> Persister:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=60)

    def maybe(self, job: str, step: int) -> None:
        """Called when a node version is complete (protected, for a node with peers)."""
        if self.every and step % self.every == 0:
            self.request(job, step)

    def request(self, job: str, step: int) -> None:
        self._queue.put((job, step))

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                self.write(*item)
            except Exception as exc:  # noqa: BLE001 - a failed write never stops the daemon
                log.error("persisting job %r step %d failed: %s", item[0], item[1], exc)

    # ------------------------------------------------------------------ writing

    def write(self, job: str, step: int) -> str:
        """Write every local rank's version of (job, step); return the step directory."""
        versions = [v for v in self.store.versions(job) if v.step == step]
        if not versions:
            raise StoreError("not_found", f"job {job!r} step {step} is not in memory here")
        final = self.step_dir(job, step)
        tmp = final + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp, mode=0o700)
        started = time.perf_counter()
        leases = [self.store.lease(job, v.rank, os.getpid(), step=step).id for v in versions]
        try:
            for v in versions:
                self._write_rank(tmp, v)
        finally:
            for lease in leases:
                self.store.release(lease)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        self._trim(job)
        if self.metrics is not None:
            self.metrics.persist_seconds.observe(time.perf_counter() - started)
            self.metrics.persisted_bytes.inc(sum(v.nbytes for v in versions))
        log.info("persisted job %r step %d (%d ranks) to %s", job, step, len(versions), final)
        return final

    def _write_rank(self, directory: str, v: Version) -> None:
        view = self.store.dir.view(v.number, v.size)
        try:
            with open(os.path.join(directory, f"rank-{v.rank}.bin"), "wb") as fh:
                for start in range(0, v.nbytes, _PIECE):
                    began = time.perf_counter()
                    fh.write(view[start:min(start + _PIECE, v.nbytes)])
                    self._throttle(min(_PIECE, v.nbytes - start), time.perf_counter() - began)
                fh.flush()
                os.fsync(fh.fileno())
        finally:
            view.release()
        manifest = {"job": v.job, "rank": v.rank, "step": v.step, "nbytes": v.nbytes,
                    "meta": v.meta, "committed_at": v.committed_at,
                    "local_world_size": v.local_world_size,
                    "tensors": [t.__dict__ | {"shape": list(t.shape)} for t in v.tensors]}
        with open(os.path.join(directory, f"rank-{v.rank}.json"), "w") as fh:
            json.dump(manifest, fh)

    def _throttle(self, nbytes: int, spent: float) -> None:
        if self.rate > 0:
            self._sleep(max(0.0, nbytes / self.rate - spent))

    def _trim(self, job: str) -> None:
        for step in self.steps(job)[:-self.keep] if self.keep > 0 else []:
            shutil.rmtree(self.step_dir(job, step), ignore_errors=True)

    # ------------------------------------------------------------------ reading

    def step_dir(self, job: str, step: int) -> str:
        return os.path.join(self.root, job, f"step-{step:012d}")

    def steps(self, job: str, rank: int | None = None) -> list[int]:
        """Persisted steps of a job (that hold ``rank``, when given), oldest first."""
        base = os.path.join(self.root, job)
        if not os.path.isdir(base):
            return []
        out = []
        for name in os.listdir(base):
            match = _STEP_RE.fullmatch(name)
            if match and (rank is None or os.path.exists(
                    os.path.join(base, name, f"rank-{rank}.json"))):
                out.append(int(match.group(1)))
        return sorted(out)

    def load(self, job: str, rank: int, step: int) -> Version:
        """Load a persisted version into memory (checked against its checksums)."""
        directory = self.step_dir(job, step)
        with open(os.path.join(directory, f"rank-{rank}.json")) as fh:
            m = json.load(fh)
        tensors = tuple(TensorEntry(t["name"], t["dtype"], tuple(t["shape"]), t["offset"],
                                    t["nbytes"], t["checksum"]) for t in m["tensors"])
        path = os.path.join(directory, f"rank-{rank}.bin")

        def fill(view: memoryview) -> None:
            with open(path, "rb") as fh:
                if fh.readinto(view) != view.nbytes:
                    raise StoreError("corrupt", f"{path} is shorter than its manifest says")

        return self.store.install(job, rank, step, m["nbytes"], tensors, m["meta"],
                                  m["local_world_size"], fill, protected=False)
