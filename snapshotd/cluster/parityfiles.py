"""Parity fragments in files on the daemon's tmpfs directory, next to the data segments.

Parity kept in process memory died with its process: a daemon SIGKILLed (memory kept) at the
moment another node of its group was lost whole lost the data of that node. Each parity record
is now two files in ``--shm-dir``::

    par-12.bin     the parity bytes (mode 0600), mapped by the daemon
    par-12.json    job, step, stripe, index, length, the fragments' infos, the XXH3 checksum,
                   complete, stale; written last (atomically), so a record without it is removed

A daemon restarted on its memory adopts them (:meth:`ParityFiles.scan`): a description is
sealed like a manifest (``_shm.seal``) and decoded with the protocol's typed decoding
(:class:`ParityDescription`); one that fails either, or whose bytes are not the length it
says, is removed with a warning naming the file. The parity bytes' checksum is checked
whenever a fragment is served, and adopted parity is scrubbed in the background
(``Protector`` starts it). A graceful stop removes them, like the segments.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..common import protocol as p
from ..node._shm import numbered_files, read_sealed, seal
from . import peerproto as pp

__all__ = ["ParityFiles", "ParityDescription", "decode_description"]

log = logging.getLogger("snapshotd.parityfiles")
_PAR_RE = re.compile(r"par-(\d+)\.(bin|json|json\.tmp)")
_HEX = frozenset("0123456789abcdef")
#: How each fragment is written in a description: a list of FragInfo's fields, in order.
_FRAG_FIELDS = ("src", "frag", "length", "manifest", "floor")


@dataclass(frozen=True)
class ParityDescription:
    """A parity record's description (``par-N.json``) as a restarted daemon reads it back."""

    format: int
    job: str
    step: int
    stripe: int
    index: int
    length: int
    checksum: str
    complete: bool
    stale: tuple[int, ...]
    frags: tuple[pp.FragInfo, ...]
    #: The seal (see ``_shm.seal``): checked before the fields are decoded.
    check: str = ""


def decode_description(meta: dict[str, Any]) -> ParityDescription:
    """A description's typed record; raise :class:`~snapshotd.common.protocol.ProtocolError`
    naming the first field that is wrong (of the wrong type, missing, out of range)."""
    frags = meta.get("frags")
    if isinstance(frags, list):
        rows = []
        for i, f in enumerate(frags):
            if not isinstance(f, list) or len(f) != len(_FRAG_FIELDS):
                raise p.ProtocolError("malformed", f"parity description.frags[{i}] must be a "
                                      f"list [{', '.join(_FRAG_FIELDS)}]")
            rows.append(dict(zip(_FRAG_FIELDS, f)))
        meta = {**meta, "frags": rows}
    d: ParityDescription = p.decode_as(ParityDescription, meta, "parity description")
    if d.format != 1:
        raise p.ProtocolError("malformed", f"parity description format {d.format}, this "
                              "daemon reads 1")
    p.check_job(d.job)
    for name in ("step", "stripe", "index", "length"):
        if getattr(d, name) < 0:
            raise p.ProtocolError("malformed", f"parity description.{name} is "
                                  f"{getattr(d, name)} (< 0)")
    if len(d.checksum) != 16 or not set(d.checksum) <= _HEX:
        raise p.ProtocolError("malformed", f"parity description.checksum {d.checksum!r} is not "
                              "an XXH3-64 in hex")
    if any(f.length < 0 or f.length > d.length or f.frag < 0 or f.src < 0 for f in d.frags):
        raise p.ProtocolError("malformed", "parity description.frags: a fragment's src, frag "
                              f"or length is out of range (parity length {d.length})")
    return d


def _named(meta: dict[str, Any] | None) -> str:
    """What a description says it is, as far as it can be read (for warnings)."""
    if not isinstance(meta, dict):
        return ""
    said = [f"{key} {meta[key]!r}" for key in ("job", "step", "stripe", "index") if key in meta]
    return f" (it says {', '.join(said)})" if said else ""


class ParityFiles:
    """The parity files of one daemon. Callers serialise access (the protector's lock)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._next = 1

    def _bin(self, number: int) -> str:
        return os.path.join(self.path, f"par-{number}.bin")

    def _json(self, number: int) -> str:
        return os.path.join(self.path, f"par-{number}.json")

    def path_of(self, number: int) -> str:
        """The description file of parity record ``number`` (what warnings name)."""
        return self._json(number)

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
            os.write(fd, seal(json.dumps(meta, separators=(",", ":"))).encode())
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

    def scan(self) -> Iterator[tuple[int, ParityDescription, Any]]:
        """Yield (number, description, mapping) of every whole parity file left behind;
        remove the rest: quietly a write cut short (bytes without a description, temp files),
        with a warning naming the file and what was wrong a description that cannot be trusted
        (see :func:`decode_description`) or bytes that are not the length it says."""
        for number in numbered_files(self.path, _PAR_RE):
            self._next = max(self._next, number + 1)
            meta, problem = read_sealed(self._json(number))
            desc = None
            if meta is not None and not problem:
                try:
                    desc = decode_description(meta)
                except p.ProtocolError as exc:
                    problem = exc.message
            try:
                size = os.stat(self._bin(number)).st_size
            except FileNotFoundError:
                size = -1
            if desc is not None and size != desc.length:
                problem = (f"{self._bin(number)} is missing" if size < 0 else
                           f"{self._bin(number)} holds {size} bytes, the description says "
                           f"{desc.length} (truncated?)")
                desc = None
            if desc is None:
                self._unlink(number)
                if problem:
                    log.warning("discarded parity file %s%s: %s; that parity is encoded again "
                                "when its data nodes send that version again, else a loss of "
                                "one of them is rebuilt from the stripe's other fragments",
                                self._json(number), _named(meta), problem)
                continue
            buf: Any = bytearray()
            if size:
                fd = os.open(self._bin(number), os.O_RDWR)
                try:
                    buf = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
                finally:
                    os.close(fd)
            yield number, desc, buf

    def _unlink(self, number: int) -> None:
        for path in (self._json(number), self._bin(number)):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
