"""A wall clock that a test steps, as NTP does, for the process it is loaded into (the fault
tests put this directory on a daemon's PYTHONPATH with SNAPSHOTD_TEST_CLOCK_FILE set).

``time.time`` and ``time.time_ns`` return the real clock plus the offset in seconds written in
that file (re-read at most every 50 ms); the monotonic clocks are left alone, as an NTP step
leaves them. The file may be rewritten at any time: the next reading jumps."""
import os
import time

_path = os.environ.get("SNAPSHOTD_TEST_CLOCK_FILE")
if _path:
    _real_time, _real_time_ns, _mono = time.time, time.time_ns, time.monotonic
    _cache = [0.0, -1.0]          # offset, when read (monotonic)

    def _offset() -> float:
        now = _mono()
        if now - _cache[1] > 0.05:
            try:
                with open(_path) as fh:
                    _cache[0] = float(fh.read().strip() or 0.0)
            except (OSError, ValueError):
                pass
            _cache[1] = now
        return _cache[0]

    def _time() -> float:
        return _real_time() + _offset()

    def _time_ns() -> int:
        return _real_time_ns() + int(_offset() * 1e9)

    time.time = _time
    time.time_ns = _time_ns
