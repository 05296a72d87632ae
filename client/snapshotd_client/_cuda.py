"""The CUDA path of a save: device-to-host copies on a side stream into pinned shared memory.

On the calling thread, :func:`mark_ready` records one event per device on its current stream
(the point at which the state is final). The background copy waits for that event on a side
stream, so it overlaps the next forward/backward instead of stalling it, and copies straight
into the daemon's segment, registered with ``cudaHostRegister`` so the copy is a real DMA. None
of this runs for CPU tensors, and nothing here touches CUDA on a machine without it.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
from typing import Any

import torch

__all__ = ["mark_ready", "DeviceCopier"]

log = logging.getLogger("snapshotd_client")


def mark_ready(tensors: list[torch.Tensor]) -> dict[torch.device, Any]:
    """Record, per CUDA device, an event after the work that produces ``tensors``."""
    events: dict[torch.device, Any] = {}
    for t in tensors:
        if t.is_cuda and t.device not in events:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(t.device))
            events[t.device] = event
    return events


class DeviceCopier:
    """Side streams per device, and pinned registration of the client's segment mappings."""

    def __init__(self) -> None:
        self._streams: dict[torch.device, Any] = {}
        self._pinned: dict[int, int] = {}          # id(mapping) -> registered address
        self._warned = False

    def copy(self, pairs: list[tuple[torch.Tensor, torch.Tensor]],
             events: dict[torch.device, Any], mapping: mmap.mmap | None) -> None:
        """Copy each (host destination, device source) pair; return when all have landed."""
        if not pairs:
            return
        if mapping is not None:
            self._pin(mapping)
        used = []
        for dst, src in pairs:
            stream = self._stream(src.device)
            if src.device in events and stream not in used:
                stream.wait_event(events[src.device])
            with torch.cuda.stream(stream):
                dst.copy_(src, non_blocking=True)
            if stream not in used:
                used.append(stream)
        for stream in used:
            stream.synchronize()

    def _stream(self, device: torch.device) -> Any:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device=device)
        return self._streams[device]

    def _pin(self, mapping: mmap.mmap) -> None:
        if id(mapping) in self._pinned:
            return
        address = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
        err = torch.cuda.cudart().cudaHostRegister(address, len(mapping), 0)
        if int(err) != 0:
            if not self._warned:
                self._warned = True
                log.warning("cudaHostRegister of the snapshot segment failed (%s); copies "
                            "go through pageable memory and are slower", err)
            return
        self._pinned[id(mapping)] = address

    def unpin(self, mapping: mmap.mmap) -> None:
        """Unregister a mapping before it is closed."""
        address = self._pinned.pop(id(mapping), None)
        if address is not None:
            torch.cuda.cudart().cudaHostUnregister(address)
