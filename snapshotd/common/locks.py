"""The daemon's locks, by name, and a test-mode checker of the order they are taken in.

Every lock of the daemon is made here, named after what it guards (:data:`ORDER`, design
section 6 "Locks"). The rule is that a component never calls another while holding its own
lock: it takes what it needs under the lock, lets go, then calls. The few nestings that remain
follow :data:`ORDER` (a lock may be taken while holding only locks that come before it), and
the *leaf* locks (last in the order) never call out at all.

With ``SNAPSHOTD_LOCKDEP=1`` in the environment (the test suite and the fault campaign set it
for every daemon they start) each lock is wrapped in a checker that keeps, per thread, the
locks held, and for the whole process the graph of "taken while holding" edges between lock
names (the kernel's lockdep idea: classes of locks, not instances). An acquisition that takes
a lock out of :data:`ORDER`, or closes a cycle in that graph, or nests two locks of one name,
is a *violation*: logged with both stacks, kept in :func:`violations`, and, when
``SNAPSHOTD_LOCKDEP_DIR`` names a directory, written there as one JSON file per violation
(a daemon is another process: the tests read the directory and fail). The program goes on as
it would without the checker; an inversion is reported the first time the two orders are both
seen, not only when they deadlock.

Example::

    >>> from snapshotd.common import locks
    >>> guard = locks.lock("store")
    >>> with guard:
    ...     pass
"""
from __future__ import annotations

import json
import logging
import os
import threading
import traceback
from collections.abc import Callable
from typing import Any

log = logging.getLogger("snapshotd.locks")

#: Every daemon lock name, in the one order they may nest (a lock is taken only while holding
#: locks before it). Component locks first (outermost), leaves last: a leaf guards a few
#: fields and calls nothing while held.
ORDER: tuple[str, ...] = (
    "reads.decode",       # one decode of a lost node's version at a time (held while decoding)
    "rebuild",            # the rebuild's progress (node replacement)
    "rebuild.pass",       # the count of rebuild passes a restore waits on (condition)
    "reads",              # remote reads and decoded versions, pending drops
    "reads.serve",        # one copy of a whole version to send at a time (held across it)
    "protector.report",   # this node's report: its sequence number and contents
    "protector",          # encode pipeline, parity kept, job-wide retention
    "relay",              # report relay: neighbours and forwarded reports
    "relay.done",         # the relay's push counter (condition)
    "store",              # slots, versions, leases, pool, pins' effect on retention
    "persist",            # the persistence tier's queue, writes in flight, unsaved drops
    "peers",              # peer links: sockets per thread
    "hash-pool",          # the checksum thread pool's creation
    # (common/channel.py's lock, one request/reply socket, is a leaf too; the client shares
    # that file, so it is a plain threading.Lock, unchecked.)
    "tool",               # locks of tools (torchrun jobs, demo), not the daemon
)
_RANK = {name: i for i, name in enumerate(ORDER)}


def enabled() -> bool:
    """Whether locks made now are checked (``SNAPSHOTD_LOCKDEP`` set and not ``0``)."""
    return os.environ.get("SNAPSHOTD_LOCKDEP", "0") not in ("", "0")


def lock(name: str) -> Any:
    """A lock named ``name`` (one of :data:`ORDER`): ``threading.Lock``, checked in test mode."""
    _check_name(name)
    return _Checked(name, threading.Lock()) if enabled() else threading.Lock()


def rlock(name: str) -> Any:
    """A reentrant lock named ``name``, checked in test mode."""
    _check_name(name)
    return _Checked(name, threading.RLock(), reentrant=True) if enabled() else threading.RLock()


def condition(name: str) -> threading.Condition:
    """A condition variable over a lock named ``name``, checked in test mode."""
    return threading.Condition(lock(name))


def _check_name(name: str) -> None:
    if name not in _RANK:
        raise ValueError(f"lock name {name!r} is not in snapshotd.common.locks.ORDER; add it "
                         "there, in the order it may nest, and to docs/design.md section 6")


# ---------------------------------------------------------------------------- the checker

_state = threading.local()
_graph_lock = threading.Lock()      # the checker's own (never a daemon lock)
#: (held, taken) -> the stack where that edge was first seen.
_edges: dict[tuple[str, str], str] = {}
_violations: list[dict[str, str]] = []
_reported: set[tuple[str, str]] = set()


def _held() -> list[tuple[str, int]]:
    held = getattr(_state, "held", None)
    if held is None:
        held = _state.held = []
    return held


def violations() -> list[dict[str, str]]:
    """The violations this process saw (each: ``kind``, ``held``, ``taken``, ``stack``,
    ``other``: the stack of the conflicting edge, if any)."""
    with _graph_lock:
        return list(_violations)


def reset() -> None:
    """Forget what was seen (the graph and the violations): tests that provoke one."""
    with _graph_lock:
        _edges.clear()
        _violations.clear()
        _reported.clear()


def _path(start: str, goal: str) -> list[str] | None:
    """A path start -> ... -> goal in the edge graph (lock held), or None."""
    nexts: dict[str, list[str]] = {}
    for a, b in _edges:
        nexts.setdefault(a, []).append(b)
    seen, todo = {start}, [[start]]
    while todo:
        path = todo.pop()
        if path[-1] == goal:
            return path
        for b in nexts.get(path[-1], ()):
            if b not in seen:
                seen.add(b)
                todo.append(path + [b])
    return None


def _note(held: str, taken: str) -> None:
    """Record the edge held -> taken; report a violation it makes."""
    key = (held, taken)
    if key in _edges:           # checked when first seen: a cycle is found by its last edge
        return
    stack = "".join(traceback.format_stack(limit=16)[:-3])
    found: dict[str, str] | None = None
    with _graph_lock:
        if key in _edges:
            return
        _edges[key] = stack
        if held == taken:
            found = {"kind": "nested", "other": ""}
        elif _RANK[held] > _RANK[taken]:
            found = {"kind": "order", "other": ""}
        else:
            back = _path(taken, held)
            if back is not None:
                found = {"kind": "cycle", "other": " -> ".join(back) + "\n" + _edges.get(
                    (back[0], back[1]), "")}
        if found is None:
            return
        _reported.add(key)
        found.update(held=held, taken=taken, stack=stack, pid=str(os.getpid()),
                     thread=threading.current_thread().name)
        _violations.append(found)
    what = {"nested": "two locks of one name nested",
            "order": "taken against the documented order (snapshotd.common.locks.ORDER)",
            "cycle": "closes a cycle of lock orders (a deadlock waiting to happen)"}
    log.error("lock order violation: %r taken while holding %r: %s\n%s%s", taken, held,
              what[found["kind"]], stack, found["other"])
    out = os.environ.get("SNAPSHOTD_LOCKDEP_DIR")
    if out:
        try:
            name = os.path.join(out, f"lockdep-{os.getpid()}-{len(_reported)}.json")
            with open(name, "w") as f:
                json.dump(found, f)
        except OSError:
            pass


class _Checked:
    """A lock that tells the checker when it is taken and let go."""

    def __init__(self, name: str, inner: Any, reentrant: bool = False) -> None:
        self.name, self._inner, self._reentrant = name, inner, reentrant

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        held = _held()
        again = self._reentrant and any(i == id(self) for _, i in held)
        if not again:
            for name in {n for n, _ in held}:
                _note(name, self.name)
        got = self._inner.acquire(blocking, timeout)
        if got:
            held.append((self.name, id(self)))
        return bool(got)

    def release(self) -> None:
        held = _held()
        for i in range(len(held) - 1, -1, -1):
            if held[i][1] == id(self):
                del held[i]
                break
        self._inner.release()

    # What threading.Condition asks of its lock (without them it probes with acquire(False)).
    def _is_owned(self) -> bool:
        return any(i == id(self) for _, i in _held())

    def _release_save(self) -> None:
        self.release()

    def _acquire_restore(self, _: object) -> None:
        self.acquire()

    def locked(self) -> bool:
        return bool(self._inner.locked()) if hasattr(self._inner, "locked") else False

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"<checked lock {self.name!r} {self._inner!r}>"


class Tally(dict):  # type: ignore[type-arg]
    """A dict whose values' sizes are summed as they change (``total``), so another
    component reads the bytes it holds without taking its lock (the store's budget reads
    parity, fragments and remote copies while holding its own: design section 6).

    >>> t = Tally(lambda r: r)
    >>> t["a"] = 5; t["b"] = 7; del t["a"]; t.total
    7
    >>> t.pop("b"), t.total
    (7, 0)
    """

    def __init__(self, size: Callable[[Any], int]) -> None:
        super().__init__()
        self._size = size
        self.total = 0

    def __setitem__(self, key: Any, value: Any) -> None:
        if key in self:
            self.total -= self._size(dict.__getitem__(self, key))
        dict.__setitem__(self, key, value)
        self.total += self._size(value)

    def __delitem__(self, key: Any) -> None:
        self.total -= self._size(dict.__getitem__(self, key))
        dict.__delitem__(self, key)

    _missing = object()

    def pop(self, key: Any, default: Any = _missing) -> Any:
        if key in self:
            value = dict.pop(self, key)
            self.total -= self._size(value)
            return value
        if default is Tally._missing:
            raise KeyError(key)
        return default

    def clear(self) -> None:
        dict.clear(self)
        self.total = 0

    def setdefault(self, key: Any, default: Any = None) -> Any:
        if key not in self:
            self[key] = default
        return dict.__getitem__(self, key)

    def update(self, *args: Any, **kw: Any) -> None:  # type: ignore[override]
        for key, value in dict(*args, **kw).items():
            self[key] = value

    def popitem(self) -> tuple[Any, Any]:
        key, value = dict.popitem(self)
        self.total -= self._size(value)
        return key, value
