"""Parity fragments in files on the daemon's tmpfs directory, next to the data segments.

Parity kept in process memory died with its process: a daemon SIGKILLed (memory kept) at the
moment another node of its group was lost whole lost the data of that node. Each parity record
is now two files in ``--shm-dir``::

    par-12.bin     the parity bytes (mode 0600), mapped by the daemon
    par-12.json    job, step, stripe, index, length, the fragments' infos, the XXH3 checksum,
                   complete, stale; written last (atomically), so a record without it is removed

A daemon restarted on its memory adopts them (:meth:`ParityFiles.scan`); the checksum is
checked whenever a fragment is served. A graceful stop removes them, like the segments.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import re
from collections.abc import Iterator
from typing import Any

from ..node._shm import numbered_files
from . import peerproto as pp

__all__ = ["ParityFiles"]

log = logging.getLogger("snapshotd.parityfiles")
_PAR_RE = re.compile(r"par-(\d+)\.(bin|json|json\.tmp)")


class ParityFiles:
    """The parity files of one daemon. Callers serialise access (the protector's lock)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._next = 1

    def _bin(self, number: int) -> str:
        return os.path.join(self.path, f"par-{number}.bin")

    def _json(self, number: int) -> str:
        return os.path.join(self.path, f"par-{number}.json")

    def write(self, record: Any) -> None:
        """Store ``record.buf`` in a new file; ``record.buf`` becomes its mapping."""
        number = self._next
        self._next += 1
        path = self._bin(number)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(record.buf).cast("B")
            done = 0
            while done < view.nbytes:
                done += os.write(fd, view[done:])
            buf: Any = (mmap.mmap(fd, record.length, mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE)
                        if record.length else bytearray())
        except OSError:
            os.close(fd)
            os.unlink(path)
            raise
        os.close(fd)
        record.number, record.buf = number, buf
        try:
            self.update(record)
        except OSError:
            self.remove(record)
            raise

    def update(self, record: Any) -> None:
        """(Re)write the record's description (atomically)."""
        meta = {"format": 1, "job": record.job, "step": record.step, "stripe": record.stripe,
                "index": record.index, "length": record.length, "checksum": record.checksum,
                "complete": record.complete, "stale": sorted(record.stale),
                "frags": [[f.src, f.frag, f.length, f.manifest, f.floor]
                          for f in record.frags]}
        tmp = self._json(record.number) + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, json.dumps(meta, separators=(",", ":")).encode())
        finally:
            os.close(fd)
        os.rename(tmp, self._json(record.number))

    def remove(self, record: Any) -> None:
        for path in (self._json(record.number), self._bin(record.number)):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        if isinstance(record.buf, mmap.mmap):
            try:
                record.buf.close()
            except BufferError:      # a fragment being served still uses it; the GC unmaps it
                pass

    def scan(self) -> Iterator[tuple[int, dict[str, Any], Any]]:
        """Yield (number, description, mapping) of every whole parity file left behind;
        remove the rest (no description, a size that does not match, temp files)."""
        for number in numbered_files(self.path, _PAR_RE):
            self._next = max(self._next, number + 1)
            meta = self._read(number)
            try:
                size = os.stat(self._bin(number)).st_size
            except FileNotFoundError:
                size = -1
            if meta is None or size != meta.get("length"):
                for path in (self._json(number), self._bin(number)):
                    try:
                        os.unlink(path)
                    except FileNotFoundError:
                        pass
                continue
            buf: Any = bytearray()
            if size:
                fd = os.open(self._bin(number), os.O_RDWR)
                try:
                    buf = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
                finally:
                    os.close(fd)
            yield number, meta, buf

    def _read(self, number: int) -> dict[str, Any] | None:
        try:
            with open(self._json(number), "rb") as fh:
                meta = json.load(fh)
        except (FileNotFoundError, ValueError):
            return None
        return meta if isinstance(meta, dict) and meta.get("format") == 1 else None


def frag_infos(meta: dict[str, Any]) -> tuple[pp.FragInfo, ...]:
    return tuple(pp.FragInfo(int(s), int(f), int(n), str(m), int(fl))
                 for s, f, n, m, fl in meta["frags"])
