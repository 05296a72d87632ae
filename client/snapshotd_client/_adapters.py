"""Registered adapters: small non-tensor objects of other types, held as plain values.

A snapshot holds tensors and plain values (no pickle: a restore never runs code from the
daemon's memory). An object of another type (a framework's progress counters, a dataclass, an
enum) is held through an adapter registered for its type: ``to_plain`` turns it into plain
values (and tensors) at ``save()``, ``from_plain`` builds it back at ``restore()``. The
snapshot records the adapter's *name*, never code; a restore that meets a name no adapter is
registered under fails, naming it.

Example (runs as is)::

    >>> import dataclasses
    >>> from snapshotd_client import register_type
    >>> from snapshotd_client._flatten import flatten, unflatten
    >>> @dataclasses.dataclass
    ... class Progress:
    ...     epoch: int
    ...     seen: int
    >>> register_type(Progress, dataclasses.asdict, lambda d: Progress(**d))
    >>> layout = flatten({"progress": Progress(3, 128)})
    >>> unflatten(layout.meta, layout.tensors)
    {'progress': Progress(epoch=3, seen=128)}
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["register_type", "adapter_for", "adapter_named", "Adapter"]


@dataclass(frozen=True)
class Adapter:
    name: str
    cls: type
    to_plain: Callable[[Any], Any]
    from_plain: Callable[[Any], Any]


_lock = threading.Lock()
_by_type: dict[type, Adapter] = {}
_by_name: dict[str, Adapter] = {}


def register_type(cls: type, to_plain: Callable[[Any], Any], from_plain: Callable[[Any], Any],
                  *, name: str | None = None) -> None:
    """Hold objects of type ``cls`` in snapshots as ``to_plain(obj)`` (plain values and
    tensors), built back with ``from_plain(value)`` at restore.

    ``name`` (default ``module.QualifiedName`` of ``cls``) is what the snapshot records; the
    restoring process must have registered the same name. Registering a type again replaces
    its adapter (the same name); another type under a name in use is refused. Only exactly
    ``cls`` is matched (not subclasses): a subclass holds more than its parent's adapter
    knows."""
    if not isinstance(cls, type):
        raise TypeError(f"register_type: {cls!r} is not a type")
    if not callable(to_plain) or not callable(from_plain):
        raise TypeError("register_type: to_plain and from_plain must be callables")
    key = name or f"{cls.__module__}.{cls.__qualname__}"
    with _lock:
        held = _by_name.get(key)
        if held is not None and held.cls is not cls:
            raise ValueError(f"register_type: the name {key!r} is registered for "
                             f"{held.cls.__module__}.{held.cls.__qualname__}; pass another "
                             "name=")
        old = _by_type.get(cls)
        if old is not None and old.name != key:
            _by_name.pop(old.name, None)
        adapter = Adapter(key, cls, to_plain, from_plain)
        _by_type[cls] = adapter
        _by_name[key] = adapter


def adapter_for(cls: type) -> Adapter | None:
    """The adapter registered for exactly ``cls``, or None."""
    return _by_type.get(cls)


def adapter_named(name: str) -> Adapter:
    """The adapter registered under ``name``; ``KeyError`` with what to do if none is."""
    adapter = _by_name.get(name)
    if adapter is None:
        raise KeyError(f"the snapshot holds an object of registered type {name!r}, and no "
                       "adapter is registered under that name in this process: call "
                       "snapshotd_client.register_type for it (as the saving process did) "
                       "before restoring")
    return adapter
