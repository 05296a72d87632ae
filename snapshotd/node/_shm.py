"""Daemon-owned shared-memory segments: files on a tmpfs directory (POSIX shm lives in /dev/shm).

Each daemon owns one directory (mode 0700) holding ``seg-N.bin`` segments (mode 0600) and their
``seg-N.json`` manifests. A segment's memory is reserved with ``posix_fallocate`` when it is
created, so a full tmpfs is an error reply at allocation time, never a SIGBUS in a trainer.

Every JSON record the daemon leaves in the directory for its successor (manifests, parity
descriptions, ``floors.json``) is *sealed* (:func:`seal`): its last field, ``"check"``, is the
XXH3-64 of the record's text before it, so a record changed while the daemon was down (a bit
flipped in memory, a file edited) is told from one it wrote (:func:`unseal`).
"""

from __future__ import annotations

import json
import mmap
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import xxhash

__all__ = ["SegmentDir", "Leftover", "seal", "unseal", "read_sealed"]

#: What :func:`seal` appends: ``,"check":"`` + 16 hex digits + ``"}``.
_CHECK_HEAD = b',"check":"'
_CHECK_LEN = len(_CHECK_HEAD) + 16 + 2


def seal(text: str) -> str:
    """``text`` (a JSON object, compact, without a ``check`` field) with its check appended as
    its last field: the XXH3-64 (hex) of ``text``'s UTF-8 bytes."""
    if not text.endswith("}") or text == "{}":
        raise ValueError("seal() takes a JSON object with at least one field")
    digest = xxhash.xxh3_64_hexdigest(text.encode())
    return f'{text[:-1]},"check":"{digest}"}}'


def unseal(data: bytes) -> tuple[dict[str, Any] | None, str]:
    """The record in ``data`` (a file :func:`seal` wrote) and what is wrong with it: ``''``
    when it can be trusted; else why not (not JSON, not an object, no check: written by an
    older daemon, or a check that does not match its text: changed since it was written).
    The record is None where ``data`` is not a JSON object; where it is one but cannot be
    trusted, it is returned all the same, only to name it in a warning."""
    if not data:
        return None, "the file is empty"
    try:
        record = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        return None, f"not JSON ({exc})"
    if not isinstance(record, dict):
        return None, f"not a JSON object but {type(record).__name__}"
    tail = data[-_CHECK_LEN:]
    if "check" not in record or not tail.startswith(_CHECK_HEAD) or not data.endswith(b'"}'):
        return record, ("no checksum (written by a daemon older than the checksum, or the "
                        "field itself was damaged)")
    body = data[:-_CHECK_LEN] + b"}"
    if xxhash.xxh3_64_hexdigest(body) != tail[len(_CHECK_HEAD):-2].decode("ascii", "replace"):
        return record, "its checksum does not match its contents (changed since it was written)"
    return record, ""


def read_sealed(path: str) -> tuple[dict[str, Any] | None, str]:
    """:func:`unseal` of the file at ``path``: (None, ``''``) when there is no such file."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        return None, ""
    except OSError as exc:
        return None, f"unreadable ({exc.strerror})"
    return unseal(data)

_POPULATE = getattr(mmap, "MAP_POPULATE", 0)
_SEG_RE = re.compile(r"seg-(\d+)\.(bin|json|json\.tmp)")


def numbered_files(path: str, pattern: re.Pattern[str]) -> list[int]:
    """The numbers of the files in ``path`` that ``pattern`` names (group 1: the number,
    group 2: the suffix), in order; stray ``json.tmp`` files (a write cut short) are removed."""
    numbers: set[int] = set()
    for name in os.listdir(path):
        match = pattern.fullmatch(name)
        if not match:
            continue
        if match.group(2) == "json.tmp":
            os.unlink(os.path.join(path, name))
        else:
            numbers.add(int(match.group(1)))
    return sorted(numbers)


@dataclass
class Leftover:
    """What a previous daemon left in the directory: a segment, its manifest (None when there
    is none or it is not a JSON object) and, for a manifest file that is there but cannot be
    trusted, why (see :func:`unseal`: the manifest is then only good for naming it)."""

    number: int
    size: int
    manifest: dict[str, Any] | None
    problem: str = ""


class SegmentDir:
    """The segment files of one daemon. Not thread-safe; the store serialises access."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._maps: dict[int, mmap.mmap] = {}

    def prepare(self) -> None:
        """Create the directory with mode 0700 (or tighten an existing one we own)."""
        os.makedirs(self.path, mode=0o700, exist_ok=True)
        os.chmod(self.path, 0o700)

    def seg_path(self, number: int) -> str:
        return os.path.join(self.path, f"seg-{number}.bin")

    def manifest_path(self, number: int) -> str:
        return os.path.join(self.path, f"seg-{number}.json")

    def create(self, number: int, size: int) -> None:
        """Create and reserve a segment; raise OSError (ENOSPC) if the tmpfs has no room.

        The pages are reserved (``posix_fallocate``) and then faulted in once by mapping the
        segment here, so the writer's first copy runs at memory speed."""
        path = self.seg_path(number)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            if size:
                os.posix_fallocate(fd, 0, size)
        except OSError:
            os.close(fd)
            os.unlink(path)
            raise
        os.close(fd)
        if size:
            self.view(number, size).release()

    def unlink(self, number: int) -> None:
        mapped = self._maps.pop(number, None)
        if mapped is not None:
            try:
                mapped.close()
            except BufferError:  # a view is still in use; the GC unmaps it
                pass
        for path in (self.manifest_path(number), self.seg_path(number)):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def drop_manifest(self, number: int) -> None:
        try:
            os.unlink(self.manifest_path(number))
        except FileNotFoundError:
            pass

    def write_manifest(self, number: int, manifest: dict[str, Any]) -> int:
        """Write the manifest atomically (temp file, fsync-free rename), sealed (see
        :func:`seal`); return its size."""
        return self.write_manifest_text(number, json.dumps(manifest, separators=(",", ":")))

    def write_manifest_text(self, number: int, text: str) -> int:
        """Write a manifest already encoded as JSON text (see :meth:`write_manifest`)."""
        data = seal(text).encode()
        tmp = self.manifest_path(number) + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        os.rename(tmp, self.manifest_path(number))
        return len(data)

    def view(self, number: int, size: int) -> memoryview:
        """A view of a whole segment. The daemon maps each segment once and keeps the mapping
        (populated) until the segment is unlinked, so checksums never pay page faults."""
        mapped = self._maps.get(number)
        if mapped is None or len(mapped) < size:
            if not size:
                return memoryview(b"")
            fd = os.open(self.seg_path(number), os.O_RDWR)
            try:
                mapped = mmap.mmap(fd, os.fstat(fd).st_size, mmap.MAP_SHARED | _POPULATE,
                                   mmap.PROT_READ | mmap.PROT_WRITE)
            finally:
                os.close(fd)
            self._maps[number] = mapped
        return memoryview(mapped)[:size]

    def scan(self) -> Iterator[Leftover]:
        """Yield leftover segments; remove stray temp manifests and orphan manifests."""
        for number in numbered_files(self.path, _SEG_RE):
            try:
                size = os.stat(self.seg_path(number)).st_size
            except FileNotFoundError:
                self.drop_manifest(number)
                continue
            manifest, problem = read_sealed(self.manifest_path(number))
            yield Leftover(number, size, manifest, problem)
