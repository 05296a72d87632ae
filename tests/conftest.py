"""Shared fixtures: every test has a timeout (pyproject sets the default), and every daemon
lock is checked for its order (snapshotd.common.locks): in this process and in every daemon
the tests start, which inherit the environment set here before anything makes a lock."""
import json
import os
import shutil
import tempfile

import pytest

os.environ.setdefault("SNAPSHOTD_LOCKDEP", "1")
_MADE_DIR = "SNAPSHOTD_LOCKDEP_DIR" not in os.environ
_LOCKDEP_DIR = os.environ.setdefault("SNAPSHOTD_LOCKDEP_DIR",
                                     tempfile.mkdtemp(prefix="snapshotd-lockdep-"))

from snapshotd.common import locks  # noqa: E402  (after the environment is set)


def _daemon_reports(seen: set[str]) -> list[dict]:
    found = []
    try:
        names = sorted(os.listdir(_LOCKDEP_DIR))
    except FileNotFoundError:
        return found
    for name in names:
        if name in seen or not name.endswith(".json"):
            continue
        seen.add(name)
        try:
            with open(os.path.join(_LOCKDEP_DIR, name)) as f:
                found.append(json.load(f))
        except (OSError, ValueError):
            continue
    return found


_seen_files: set[str] = set()


@pytest.fixture(autouse=True)
def lock_order_checked(request):
    """Fail the test during which a lock was taken against the documented order, in a
    cycle, or nested with its own name (here or in a daemon this suite started)."""
    before = len(locks.violations())
    yield
    if request.node.get_closest_marker("lockdep_provoked"):
        return
    found = locks.violations()[before:] + _daemon_reports(_seen_files)
    if found:
        text = "\n\n".join(f"[pid {v.get('pid')} {v.get('thread')}] {v['taken']!r} taken "
                           f"while holding {v['held']!r} ({v['kind']}):\n{v['stack']}"
                           f"{v.get('other', '')}" for v in found)
        pytest.fail(f"lock order violation (docs/design.md section 6, "
                    f"snapshotd/common/locks.py ORDER):\n{text}", pytrace=False)


def pytest_sessionfinish(session, exitstatus):
    if _MADE_DIR:
        shutil.rmtree(_LOCKDEP_DIR, ignore_errors=True)
